"""Putting a label image on another image's voxel grid, e.g. a segmentation that Slicer saved cropped to its segments.

Slicer saves a ``.seg.nrrd`` cropped to the segments' extent by default (its own size and origin), and a label map may
be stored with its axes permuted or flipped. Where the label voxels land exactly on reference voxels (same spacing,
axes that only differ by order or sign, whole-voxel offset) placing them is lossless; anything else is resampled with
nearest neighbour, and a warning says so.
"""

from __future__ import annotations

import warnings

import numpy as np
import SimpleITK as sitk

from hsam.errors import HSAMError
from hsam.volume.io import same_geometry


def index_map(source: sitk.Image, target: sitk.Image) -> np.ndarray:
    """The 4x4 matrix taking a voxel index (i, j, k) of ``source`` to the continuous index of ``target``."""

    def ijk_to_lps(image: sitk.Image) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = np.array(image.GetDirection(), dtype=float).reshape(3, 3) * np.array(image.GetSpacing())
        matrix[:3, 3] = image.GetOrigin()
        return matrix

    return np.linalg.solve(ijk_to_lps(target), ijk_to_lps(source))


def is_exact(mapping: np.ndarray, tolerance: float = 1e-3) -> bool:
    """True when ``mapping`` sends every voxel centre onto a voxel centre: a signed permutation, whole-voxel shift."""
    rotation, shift = mapping[:3, :3], mapping[:3, 3]
    rounded = np.rint(rotation)
    signed_permutation = (np.abs(rounded).sum(axis=0) == 1).all() and (np.abs(rounded).sum(axis=1) == 1).all()
    return bool(signed_permutation and np.allclose(rotation, rounded, atol=tolerance)
                and np.allclose(shift, np.rint(shift), atol=tolerance))


def onto_grid(labels: sitk.Image, reference: sitk.Image, name: str = "the labels") -> sitk.Image:
    """``labels`` on the voxel grid of ``reference`` (same pixel type; 0 where the labels do not reach).

    Lossless when the grids line up voxel for voxel; otherwise resampled with nearest neighbour and a UserWarning
    says so. Labelled voxels outside the reference grid are dropped with a warning. Raises HSAMError when none of the
    labelled voxels lies inside the reference grid (the files belong to different images).
    """
    if same_geometry(labels, reference, tolerance=1e-3):
        placed = sitk.Image(labels)
        placed.CopyInformation(reference)  # the same grid: only float noise in the header differs
        return placed
    placed = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    labelled = int(np.count_nonzero(sitk.GetArrayViewFromImage(labels)))
    kept = int(np.count_nonzero(sitk.GetArrayViewFromImage(placed)))
    if labelled and not kept:
        raise HSAMError(f"{name} do not overlap the reference image in space (origin {_mm(labels.GetOrigin())} vs "
                        f"{_mm(reference.GetOrigin())} mm): they belong to another image; pair the right files")
    if not is_exact(index_map(labels, reference)):
        warnings.warn(f"{name} are on another voxel grid ({_difference(labels, reference)}): resampled onto the "
                      "reference grid with nearest neighbour", UserWarning, stacklevel=2)
    elif kept < labelled:
        warnings.warn(f"{name}: {labelled - kept} labelled voxels lie outside the reference grid and were dropped",
                      UserWarning, stacklevel=2)
    return placed


def _difference(labels: sitk.Image, reference: sitk.Image) -> str:
    """What keeps the voxels of ``labels`` off the reference's voxel centres, in words."""
    linear = np.eye(4)
    linear[:3, :3] = index_map(labels, reference)[:3, :3]
    if is_exact(linear):
        return "origin shifted by a fraction of a voxel"
    axes = np.eye(4)  # the labels' axis directions in the reference's axes
    axes[:3, :3] = (np.array(reference.GetDirection()).reshape(3, 3).T
                    @ np.array(labels.GetDirection()).reshape(3, 3))
    if is_exact(axes):
        return f"spacing {_mm(labels.GetSpacing())} vs {_mm(reference.GetSpacing())} mm"
    return "axes at an angle to the reference's"


def _mm(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
