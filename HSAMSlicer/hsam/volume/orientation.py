"""Reorientation between an input volume's voxel grid and the model's canonical slice layout, and back.

The model card states the canonical orientation as an ITK/DICOM orientation code of the slice array (e.g. ``"LPS"``:
index i runs toward patient Left, j toward Posterior, k toward Superior, as ``SimpleITK.DICOMOrient`` reads it). The
model sees axial slices of that array viewed as ``[z, y, x]``.

* Axis-aligned inputs (any permutation/flip of the canonical axes; RAS-stored NIfTI, LPS DICOM, ...) are reoriented
  exactly with array transposes and flips, no resampling, and mapped back the same way: every voxel of the output is
  the prediction for the same voxel of the input.
* Oblique inputs (some axis more than ``tolerance_degrees`` off a patient axis) are resampled (linear) onto the nearest
  canonical grid covering the input; results are resampled back onto the input grid with nearest-neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from hsam.errors import HSAMError

# Physical (LPS) axis and sign each orientation letter points toward.
_LETTERS = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}

DEFAULT_TOLERANCE_DEGREES = 1.0


def direction_from_code(code: str) -> np.ndarray:
    """The 3x3 direction matrix (columns = index axes i, j, k in LPS) of an orientation code such as ``"LPS"``."""
    code = code.upper()
    if len(code) != 3 or set(code) - set(_LETTERS) or len({_LETTERS[c][0] for c in code}) != 3:
        raise HSAMError(f"invalid orientation code {code!r}; use three letters from L/R, P/A, S/I such as 'LPS'")
    matrix = np.zeros((3, 3))
    for column, letter in enumerate(code):
        axis, sign = _LETTERS[letter]
        matrix[axis, column] = sign
    return matrix


def code_from_direction(direction: np.ndarray) -> str:
    """The orientation code of the nearest axis-aligned direction (columns = index axes)."""
    letters = {(0, 1): "L", (0, -1): "R", (1, 1): "P", (1, -1): "A", (2, 1): "S", (2, -1): "I"}
    _, axes, signs = _nearest_permutation(direction)
    return "".join(letters[(int(a), int(s))] for a, s in zip(axes, signs))


def _nearest_permutation(direction: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(worst angle in degrees, physical axis of each index axis, sign of each) for the closest signed permutation."""
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for perm in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)):
        axes = np.array(perm)
        cosines = direction[axes, np.arange(3)]
        worst = min(abs(c) for c in cosines)
        angle = math.degrees(math.acos(min(1.0, worst)))
        if best is None or angle < best[0]:
            best = (angle, axes, np.where(cosines >= 0, 1.0, -1.0))
    assert best is not None
    return best


@dataclass(frozen=True)
class Grid:
    """A voxel grid's geometry without pixels: size (x, y, z), spacing, origin, direction (row-major 3x3)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Grid":
        """The grid of ``image``."""
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),  # type: ignore[arg-type]
                   tuple(image.GetDirection()))

    def apply(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (same size) this grid's spacing, origin and direction; returns it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def resample(self, image: sitk.Image, interpolator: int, default: float = 0.0) -> sitk.Image:
        """``image`` resampled onto this grid (identity transform, physical space)."""
        return sitk.Resample(image, list(self.size), sitk.Transform(), interpolator, self.origin, self.spacing,
                             self.direction, default, image.GetPixelID())


@dataclass(frozen=True)
class Reorientation:
    """How an input grid maps to the canonical array; :func:`from_canonical` undoes it."""

    reference: Grid  # the input's grid
    orientation: str  # the canonical orientation code
    resampled: bool  # True for oblique inputs (resampled onto ``canonical_grid``)
    axes: tuple[int, int, int] = (0, 1, 2)  # numpy [z,y,x] axis of the input feeding each canonical numpy axis
    flips: tuple[bool, bool, bool] = (False, False, False)  # canonical numpy axes flipped after the transpose
    canonical_grid: Grid | None = None  # for resampled inputs: the canonical grid

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Spacing (x, y, z) in mm of the canonical array's axes."""
        if self.canonical_grid is not None:
            return self.canonical_grid.spacing
        spacing = self.reference.spacing
        # numpy axis a is ITK axis 2-a
        return tuple(spacing[2 - self.axes[2 - itk]] for itk in range(3))  # type: ignore[return-value]


def to_canonical(
    image: sitk.Image, orientation: str = "LPS", tolerance_degrees: float = DEFAULT_TOLERANCE_DEGREES
) -> tuple[np.ndarray, Reorientation]:
    """Return ``(array [z, y, x] in the canonical layout, how to map back)``.

    For axis-aligned inputs the array is a transposed/flipped view of one copy of the voxels (input pixel type; float64 becomes float32): exact.
    Oblique inputs are resampled with linear interpolation (outside the field of view: the image minimum).
    """
    if image.GetDimension() != 3:
        raise HSAMError(f"expected a 3-D image, got {image.GetDimension()}-D")
    target = direction_from_code(orientation)
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    angle, phys_axes, signs = _nearest_permutation(direction)
    reference = Grid.of(image)
    if angle <= tolerance_degrees:
        # a copy in the input's pixel type: a view would dangle once the caller drops ``image``
        view = sitk.GetArrayViewFromImage(image)
        array = view.astype(np.float32 if view.dtype == np.float64 else view.dtype, copy=True)
        # canonical ITK axis c receives the input ITK axis i whose physical axis is the one target column c points along
        target_axis = np.argmax(np.abs(target), axis=1)  # physical axis -> canonical ITK axis
        target_sign = target[np.arange(3), target_axis]
        itk_source = [0, 0, 0]
        itk_flip = [False, False, False]
        for i in range(3):
            c = int(target_axis[phys_axes[i]])
            itk_source[c] = i
            itk_flip[c] = bool(signs[i] != target_sign[phys_axes[i]])
        # numpy axis a <-> ITK axis 2-a
        axes = tuple(2 - itk_source[2 - a] for a in range(3))
        flips = tuple(itk_flip[2 - a] for a in range(3))
        canonical = np.transpose(array, axes)
        for a, flip in enumerate(flips):
            if flip:
                canonical = np.flip(canonical, axis=a)
        return canonical, Reorientation(reference, orientation.upper(), False, axes, flips)  # type: ignore[arg-type]
    grid = _canonical_grid(image, target, phys_axes)
    minimum = float(sitk.GetArrayViewFromImage(image).min())
    resampled = grid.resample(image, sitk.sitkLinear, minimum)
    return sitk.GetArrayFromImage(resampled), Reorientation(reference, orientation.upper(), True, canonical_grid=grid)


def _canonical_grid(image: sitk.Image, target: np.ndarray, phys_axes: np.ndarray) -> Grid:
    """The canonical-direction grid covering the input's field of view, with the input's spacings re-assigned."""
    spacing_in = np.array(image.GetSpacing())
    size_in = np.array(image.GetSize())
    spacing = np.zeros(3)
    for i in range(3):  # input axis i lies closest to physical axis phys_axes[i]
        c = int(np.argmax(np.abs(target[phys_axes[i]])))
        spacing[c] = spacing_in[i]
    corners = []
    for corner in np.ndindex(2, 2, 2):
        index = np.where(np.array(corner) == 1, size_in - 0.5, -0.5)
        corners.append(image.TransformContinuousIndexToPhysicalPoint(index.tolist()))
    local = np.array(corners) @ target  # coordinates along the canonical axes
    low, high = local.min(axis=0), local.max(axis=0)
    size = np.maximum(1, np.ceil((high - low) / spacing - 1e-6)).astype(int)
    origin = target @ (low + spacing / 2)
    return Grid(tuple(int(n) for n in size), tuple(float(v) for v in spacing),  # type: ignore[arg-type]
                tuple(float(v) for v in origin), tuple(float(v) for v in target.flatten()))


def from_canonical(array: np.ndarray, how: Reorientation, interpolator: int = sitk.sitkNearestNeighbor) -> sitk.Image:
    """Put a canonical ``[z, y, x]`` array (labels, confidence) back on the input grid as a SimpleITK image.

    Exact for axis-aligned inputs; resampled with ``interpolator`` (nearest-neighbour by default) for oblique ones.
    """
    if not how.resampled:
        expected = tuple(np.array(how.reference.size[::-1])[list(how.axes)])
        if tuple(array.shape) != expected:
            raise ValueError(f"canonical array has shape {array.shape}, expected {expected}")
        back = array
        for a, flip in enumerate(how.flips):
            if flip:
                back = np.flip(back, axis=a)
        back = np.transpose(back, np.argsort(how.axes))
        return how.reference.apply(sitk.GetImageFromArray(back))
    assert how.canonical_grid is not None
    canonical = how.canonical_grid.apply(sitk.GetImageFromArray(array))
    return how.reference.resample(canonical, interpolator, 0)
