"""Volume geometry between Slicer (voxel array [k, j, i] + IJK-to-RAS matrix) and SimpleITK (LPS physical space).

Slicer's world is RAS; ITK's is LPS. The two differ by flipping the first two axes, so for a voxel index (i, j, k):
``ras = M @ (i, j, k, 1)`` and ``lps = diag(-1, -1, 1) @ ras``. SimpleITK's ``GetImageFromArray`` reads a [k, j, i]
array as size (i, j, k), which is Slicer's voxel order, so no transposition is needed.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def image_from_array(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image with the voxels of ``array_kji`` ([K, J, I]) placed by the 4x4 ``ijk_to_ras`` matrix."""
    matrix = np.asarray(ijk_to_ras, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be 4x4, got {matrix.shape}")
    linear = matrix[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("the IJK-to-RAS matrix has a zero-length axis")
    direction_lps = RAS_TO_LPS @ (linear / spacing)
    origin_lps = RAS_TO_LPS @ matrix[:3, 3]
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji), isVector=False)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin_lps])
    image.SetDirection([float(d) for d in direction_lps.ravel()])
    return image


def ijk_to_ras_from_image(image: sitk.Image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a 3-D SimpleITK image (inverse of :func:`image_from_array`'s placement)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = RAS_TO_LPS @ direction @ np.diag(spacing)
    matrix[:3, 3] = RAS_TO_LPS @ np.asarray(image.GetOrigin(), dtype=float)
    return matrix


def vtk_matrix_to_numpy(vtk_matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 float array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)
