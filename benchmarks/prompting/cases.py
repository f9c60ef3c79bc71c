"""The labelled CTs of ../shared/data/real used by the prompting benchmarks: CT, reference labels in H-SAM values,
both as canonical LPS arrays [z, y, x] (the layout the models and the prompt session see)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from hsam.labels import remap_labels
from hsam.volume import to_canonical
from hsam.volume.orientation import Reorientation

# name -> (CT, labels, label map of hsam.labels.LABEL_MAPS)
CASES: dict[str, tuple[str, str, str | dict[int, int]]] = {
    "lidc-idri-0001": ("lidc-idri-0001/ct.nii.gz", "lidc-idri-0001/labels_totalsegmentator.nii.gz", "totalseg_total"),
    "ts-example-ct-sm": ("totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz",
                         "totalseg_total"),
    "dcmqi-liver": ("dcmqi/ct-3slice", "dcmqi/liver_seg.nrrd", {1: 5}),  # 3 slices of 1 mm, liver only
}
# not CT: the abdominal MR of the same source (a check that a stage adds nothing where the model is lost)
OTHER_ANATOMY: dict[str, tuple[str, str, str | dict[int, int]]] = {
    "ts-example-mr-sm": ("totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz",
                         "totalseg_total_mr"),
}


@dataclass
class Case:
    name: str
    image: sitk.Image
    canonical: np.ndarray  # HU [z, y, x], LPS
    how: Reorientation
    reference: np.ndarray  # uint8 H-SAM labels, same layout

    @property
    def pixel_mm(self) -> tuple[float, float]:
        sx, sy, _ = self.how.canonical_spacing
        return float(sy), float(sx)

    @property
    def slice_mm(self) -> float:
        return float(self.how.canonical_spacing[2])


# a case resampled in-plane to coarser pixels (mm): the same patient at another resolution
RESAMPLED: dict[str, tuple[str, float]] = {"lidc-idri-0001-3mm": ("lidc-idri-0001", 3.0)}


def _in_plane(image: sitk.Image, pixel_mm: float, interpolator: int) -> sitk.Image:
    """``image`` resampled to ``pixel_mm`` along its first two axes (same origin, direction and slices)."""
    spacing = (pixel_mm, pixel_mm, image.GetSpacing()[2])
    size = [max(1, round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    return sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing,
                         image.GetDirection(), 0, image.GetPixelID())


def load_case(data: Path, name: str) -> Case:
    source, pixel_mm = RESAMPLED.get(name, (name, None))
    ct_file, labels_file, mapping = {**CASES, **OTHER_ANATOMY}[source]
    from hsam.volume import read_image

    image = read_image(str(data / ct_file))
    reference = sitk.ReadImage(str(data / labels_file))
    if pixel_mm is not None:
        image = _in_plane(image, pixel_mm, sitk.sitkLinear)
        reference = _in_plane(reference, pixel_mm, sitk.sitkNearestNeighbor)
    canonical, how = to_canonical(image, "LPS")
    labels, _ = to_canonical(reference, "LPS")
    return Case(name, image, canonical, how, remap_labels(labels, mapping))


def aorta_below_arch(reference: np.ndarray, min_px: int = 20) -> np.ndarray:
    """The reference aorta (7) cut to the slices below the arch: below the lowest slice (of the upper half of its
    extent) where the aorta shows two parts of at least ``min_px`` pixels (ascending and descending aorta)."""
    from scipy import ndimage

    aorta = reference == 7
    slices = np.flatnonzero(aorta.any(axis=(1, 2)))
    if slices.size == 0:
        return aorta
    cut = slices[-1] + 1
    for z in slices[slices >= (slices[0] + slices[-1]) / 2]:
        parts, count = ndimage.label(aorta[z])
        if count >= 2 and (np.bincount(parts.ravel())[1:] >= min_px).sum() >= 2:
            cut = z
            break
    aorta[cut:] = False
    return aorta


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / total if total else float("nan")
