"""Prompt coordinates -> positions in the canonical slice array [z, row, col] that the models see.

A prompt names a position on the input file's grid: a voxel index (i, j, k) in SimpleITK order, or a point in
millimetres (RAS as Slicer shows it, or LPS as DICOM and ITK store it). Every position goes through physical (LPS)
space and then into the canonical array of :func:`hsam.volume.to_canonical`, so a prompt lands on the same tissue
whatever the file's orientation (RAS NIfTI, LPS DICOM, flipped or permuted axes, oblique: resampled).
Canonical positions are continuous: pixel (z, r, c) covers [r - 0.5, r + 0.5] x [c - 0.5, c + 0.5].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from hsam.volume.orientation import Grid, Reorientation

SPACES = ("voxel", "ras", "lps")


def _index_to_lps(grid: Grid, index: np.ndarray) -> np.ndarray:
    matrix = np.array(grid.direction, dtype=float).reshape(3, 3) * np.array(grid.spacing, dtype=float)
    return np.array(grid.origin, dtype=float) + matrix @ index


def _lps_to_index(grid: Grid, point: np.ndarray) -> np.ndarray:
    matrix = np.array(grid.direction, dtype=float).reshape(3, 3) * np.array(grid.spacing, dtype=float)
    return np.linalg.solve(matrix, point - np.array(grid.origin, dtype=float))


def to_lps(position: Sequence[float], space: str, how: Reorientation) -> np.ndarray:
    """A position (i, j, k) voxel index or (x, y, z) mm in ``space`` -> LPS millimetres [3]."""
    value = np.asarray(position, dtype=float)
    if space == "voxel":
        return _index_to_lps(how.reference, value)
    if space == "ras":
        return value * np.array([-1.0, -1.0, 1.0])
    if space == "lps":
        return value
    raise ValueError(f"unknown space {space!r}; use one of {', '.join(SPACES)}")


def canonical_shape(how: Reorientation) -> tuple[int, int, int]:
    """Shape [z, rows, cols] of the canonical array of ``how``."""
    if how.resampled:
        assert how.canonical_grid is not None
        return tuple(int(n) for n in how.canonical_grid.size[::-1])  # type: ignore[return-value]
    numpy_shape = how.reference.size[::-1]
    return tuple(int(numpy_shape[a]) for a in how.axes)  # type: ignore[return-value]


def lps_to_canonical(point: np.ndarray, how: Reorientation) -> np.ndarray:
    """LPS millimetres [3] -> continuous canonical array position [z, row, col]."""
    if how.resampled:
        assert how.canonical_grid is not None
        return _lps_to_index(how.canonical_grid, point)[::-1]
    numpy_index = _lps_to_index(how.reference, point)[::-1]
    shape = canonical_shape(how)
    position = np.array([numpy_index[a] for a in how.axes])
    for a, flip in enumerate(how.flips):
        if flip:
            position[a] = shape[a] - 1 - position[a]
    return position


def to_canonical_position(position: Sequence[float], space: str, how: Reorientation) -> np.ndarray:
    """A prompt position in ``space`` -> continuous canonical [z, row, col]."""
    return lps_to_canonical(to_lps(position, space, how), how)
