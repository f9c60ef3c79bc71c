"""Overlap and surface-distance metrics between two binary 3-D masks.

Arrays are in SimpleITK's numpy order ``[z, y, x]``; ``spacing`` is given in the same order (mm), i.e. the reverse of
``sitk.Image.GetSpacing()``. Two protocols share these building blocks:

* ``"mm"`` (ours): HD95 in millimetres with the voxel spacing; an organ absent from both masks is *not counted*
  (``nan``), a missed or hallucinated organ scores Dice 0 and has no HD95 (``nan``).
* ``"reference"``: what the released H-SAM ``test.py`` computes (hsam-model.md §3): HD95 in voxels (no spacing);
  both non-empty -> computed; prediction non-empty and reference empty -> (1, 0); prediction empty -> (0, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

PROTOCOLS = ("mm", "reference")


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice 2|A∩B| / (|A|+|B|) of two boolean masks; ``nan`` when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def _crop_to_union(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel.

    Exact for surface distances: every surface voxel of either mask lies in the box, and where the box touches the
    volume edge the crop edge *is* the volume edge, so erosion sees the same zero border as on the full array.
    """
    union = np.logical_or(a, b)
    slices = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hit = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(hit[0]) - 1, 0), int(hit[-1]) + 2))
    box = tuple(slices)
    return a[box], b[box]


def _surface(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Voxels of ``mask`` that have a background neighbour (face neighbours for connectivity 1); the volume edge
    counts as background."""
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return np.logical_xor(mask, ndimage.binary_erosion(mask, structure=structure, iterations=1, border_value=0))


def surface_distances(
    a: np.ndarray, b: np.ndarray, spacing: Sequence[float] | None = None, connectivity: int = 1
) -> np.ndarray:
    """Distance from every surface voxel of ``a`` to the nearest surface voxel of ``b`` (in the units of
    ``spacing``; voxels when ``None``). Both masks must be non-empty. Returns a 1-D float array."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if not a.any() or not b.any():
        raise ValueError("surface distances need two non-empty masks")
    a, b = _crop_to_union(a, b)
    surface_a = _surface(a, connectivity)
    surface_b = _surface(b, connectivity)
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    # Euclidean distance of every voxel to the nearest voxel of b's surface (the zeros of the input).
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=sampling)
    return to_b[surface_a]


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None, connectivity: int = 1) -> float:
    """95th percentile of the symmetric surface distances (pooled both ways); ``nan`` if either mask is empty."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if not pred.any() or not ref.any():
        return math.nan
    both = np.concatenate(
        [surface_distances(pred, ref, spacing, connectivity), surface_distances(ref, pred, spacing, connectivity)]
    )
    return float(np.percentile(both, 95))


@dataclass(frozen=True)
class OrganScore:
    """One organ in one volume. ``status``: ``both`` | ``absent`` (in neither) | ``missed`` (ref only) |
    ``false_positive`` (prediction only). ``hd95`` is in mm for protocol ``mm``, in voxels for ``reference``."""

    organ: int
    dice: float
    hd95: float
    status: str
    pred_voxels: int
    ref_voxels: int

    @property
    def counted(self) -> bool:
        """Whether this score enters the mean Dice of its organ (always under the reference protocol)."""
        return not math.isnan(self.dice)


def score_organ(
    pred: np.ndarray, ref: np.ndarray, organ: int, spacing: Sequence[float] | None, protocol: str = "mm"
) -> OrganScore:
    """Score the binary masks of one organ. ``spacing`` ([z, y, x] mm) is ignored by the reference protocol."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    status = {(True, True): "both", (False, False): "absent", (False, True): "missed", (True, False): "false_positive"}[
        (n_pred > 0, n_ref > 0)
    ]
    if protocol == "reference":
        # The released rules, including its two quirks: an empty prediction scores 0 even when the organ is absent,
        # and a false positive on an absent organ scores Dice 1.
        if status == "both":
            return OrganScore(organ, dice(pred, ref), hd95(pred, ref, None), status, n_pred, n_ref)
        if status == "false_positive":
            return OrganScore(organ, 1.0, 0.0, status, n_pred, n_ref)
        return OrganScore(organ, 0.0, 0.0, status, n_pred, n_ref)
    if status == "both":
        return OrganScore(organ, dice(pred, ref), hd95(pred, ref, spacing), status, n_pred, n_ref)
    if status == "absent":
        return OrganScore(organ, math.nan, math.nan, status, 0, 0)
    return OrganScore(organ, 0.0, math.nan, status, n_pred, n_ref)


def score_volume(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    organs: Sequence[int],
    spacing: Sequence[float] | None = None,
    protocol: str = "mm",
) -> list[OrganScore]:
    """Score every organ index in ``organs`` between two label volumes of equal shape ([z, y, x])."""
    if pred_labels.shape != ref_labels.shape:
        raise ValueError(f"prediction shape {pred_labels.shape} differs from reference shape {ref_labels.shape}")
    return [score_organ(pred_labels == k, ref_labels == k, k, spacing, protocol) for k in organs]


def dice_per_organ(pred_labels: np.ndarray, ref_labels: np.ndarray, organs: Sequence[int]) -> dict[int, float]:
    """Dice only (fast, for validation during training): ``nan`` where an organ is absent from both."""
    return {k: dice(pred_labels == k, ref_labels == k) for k in organs}
