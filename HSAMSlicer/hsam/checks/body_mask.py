"""The patient's trunk on each axial CT slice, so that nothing outside it is labelled (issue 15).

Why: on a scan with the arms down beside the body, the first demo model called the right arm "liver" and the left
arm "spleen". None of the 8 abdominal organs lies outside the trunk, so labels there are always false positives.

Per slice: tissue = voxels above -500 HU (or the model's window floor, :func:`tissue_threshold`) with holes filled
(lungs, bowel gas); eroded by ``neck_mm`` (distance transform, physical pixel size), which cuts the narrow skin
contact where an arm rests on the body; the largest eroded part is the trunk; it is grown back by the same distance
inside the tissue. An arm that touches the trunk along more than about 2 x ``neck_mm`` stays attached (and is then
not masked). Input that is not CT in HU (MR, images scaled to [0, 1]) is almost all above the threshold, so the mask
is the whole slice and changes nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TISSUE_HU = -500.0  # between air/lung (< -700) and fat (> -150)
NECK_MM = 12.0  # arm-to-trunk contacts narrower than ~24 mm are cut


def tissue_threshold(window_low: float) -> float:
    """The tissue threshold for a model whose intensity window starts at ``window_low`` HU: never below it, so that
    the mask, like the network, sees only the windowed image (values below the window act exactly like its lower
    bound: padding, clipped exports). Fat (-150..-60 HU) stays above the abdominal windows' lower bounds."""
    return max(TISSUE_HU, float(window_low))


def trunk_mask_slice(hu: np.ndarray, pixel_mm: Sequence[float], neck_mm: float = NECK_MM,
                     tissue_hu: float = TISSUE_HU) -> np.ndarray:
    """Boolean [H, W]: the trunk of one axial slice (rows, cols spacing ``pixel_mm``); all False without tissue."""
    from scipy import ndimage

    tissue = ndimage.binary_fill_holes(hu > tissue_hu)
    if not tissue.any():
        return tissue
    core = ndimage.distance_transform_edt(tissue, sampling=pixel_mm) > neck_mm
    if not core.any():  # only thin tissue (a table, a slice grazing the skin): keep the tissue's largest part
        core = tissue
    parts, count = ndimage.label(core)
    if count > 1:
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        core = parts == int(sizes.argmax())
    grown = ndimage.distance_transform_edt(~core, sampling=pixel_mm) <= neck_mm + max(pixel_mm)
    return grown & tissue


def clear_outside_trunk(labels: np.ndarray, hu: np.ndarray, pixel_mm: Sequence[float],
                        neck_mm: float = NECK_MM, tissue_hu: float = TISSUE_HU) -> int:
    """In place: set labels outside each slice's trunk to 0. ``labels`` and ``hu`` are [D, H, W]; ``pixel_mm`` the
    (row, col) spacing. Returns the number of voxels cleared."""
    cleared = 0
    for z in range(labels.shape[0]):
        if not labels[z].any():
            continue
        outside = labels[z].astype(bool) & ~trunk_mask_slice(hu[z], pixel_mm, neck_mm, tissue_hu)
        cleared += int(outside.sum())
        labels[z][outside] = 0
    return cleared


def trunk_box(hu: np.ndarray, pixel_mm: Sequence[float], margin_mm: float = 15.0,
              neck_mm: float = NECK_MM, tissue_hu: float = TISSUE_HU) -> tuple[slice, slice] | None:
    """(rows, cols) of a square around the trunk of the whole volume [D, H, W] plus ``margin_mm``, clipped to the
    slice; None when no slice has tissue. Cropping to it before the resize to the model input gives the trunk the
    same share of the 256-px input on a 500 mm scan with arms as on a tight 350 mm one (nnU-Net's idea of a target
    spacing, applied around the body)."""
    union = np.zeros(hu.shape[1:], dtype=bool)
    for z in range(hu.shape[0]):
        union |= trunk_mask_slice(hu[z], pixel_mm, neck_mm, tissue_hu)
    if not union.any():
        return None
    rows, cols = np.nonzero(union)
    centre = ((rows.min() + rows.max()) / 2 * pixel_mm[0], (cols.min() + cols.max()) / 2 * pixel_mm[1])
    half = max((rows.max() - rows.min()) * pixel_mm[0], (cols.max() - cols.min()) * pixel_mm[1]) / 2 + margin_mm
    spans = []
    for axis in range(2):
        lo = int(np.floor((centre[axis] - half) / pixel_mm[axis]))
        hi = int(np.ceil((centre[axis] + half) / pixel_mm[axis])) + 1
        spans.append(slice(max(lo, 0), min(hi, hu.shape[1 + axis])))
    return spans[0], spans[1]
