"""Orient stage: the CT as the model sees it (slices along axis 0), and the way back to the input's grid.

Default: the card's canonical orientation (or an override), :func:`hsam.volume.to_canonical`. Reference protocol:
the stored array order [z, y, x], no reorientation (as the released ``test.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from hsam.volume import from_canonical, looks_like_ct, to_canonical


@dataclass
class Oriented:
    """The scan in the model's slice layout."""

    volume: np.ndarray  # [z, y, x] in HU
    spacing: tuple[float, float, float]  # mm along x, y, z of ``volume`` (axes 2, 1, 0)
    code: str | None  # the canonical orientation code; None: the stored order
    how: Any  # to_canonical's record of the reorientation; None: the stored order

    @property
    def label(self) -> str:
        """What :attr:`SegmentationResult.orientation` reports."""
        return self.code if self.code is not None else "stored order"

    @property
    def pixel_mm(self) -> tuple[float, float]:
        """(row, column) pixel size in mm of a slice."""
        return self.spacing[1], self.spacing[0]


def orient(image: sitk.Image, code: str, notes: list[str]) -> Oriented:
    """``image`` (3-D, HU) in the canonical orientation ``code``; a note when it does not look like CT."""
    canonical, how = to_canonical(image, code)
    if not looks_like_ct(canonical):
        notes.append(
            "the image does not look like CT in Hounsfield units (no air near -1000 HU); "
            "results on MR or pre-normalised images are unreliable"
        )
    return Oriented(canonical, tuple(how.canonical_spacing), code, how)


def stored_order(image: sitk.Image) -> Oriented:
    """``image`` as stored (reference protocol): its array [z, y, x], no reorientation."""
    return Oriented(sitk.GetArrayViewFromImage(image), tuple(image.GetSpacing()), None, None)


def to_input_grid(array: np.ndarray, oriented: Oriented, image: sitk.Image) -> sitk.Image:
    """A uint8 [z, y, x] result in ``oriented``'s layout as an image with exactly ``image``'s grid."""
    if oriented.how is not None:
        return from_canonical(array, oriented.how)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out
