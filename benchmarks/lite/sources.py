"""The labelled volumes the Lite benchmarks build from (TotalSegmentator's test CT and the test MR's label map), read
in the canonical layout, and a NIfTI writer for the volumes they derive; used by ``prepare_data.py`` and ``stress.py``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

SM_OFFSET = 82  # example_ct_sm == example_ct[82:112]


def load_canonical(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """[z, y, x] array in the LPS layout the model card states (the card's orientation), and (z, y, x) spacing."""
    from hsam.volume import read_image, to_canonical

    image = read_image(path)
    array, how = to_canonical(image, "LPS")
    sx, sy, sz = how.canonical_spacing
    return np.asarray(array), (sz, sy, sx)


@dataclass
class Source:
    """One labelled volume: HU (or MR) image, full TotalSegmentator labels, their names and H-SAM label map."""

    name: str
    image: np.ndarray
    full: np.ndarray
    names: dict[int, str]
    label_map: str
    spacing: float
    centre: np.ndarray
    body: np.ndarray
    is_ct: bool

    def hsam_labels(self, full: np.ndarray) -> np.ndarray:
        from hsam.labels import remap_labels

        return remap_labels(full, self.label_map).astype(np.uint8)


def body_centre(volume_hu: np.ndarray) -> np.ndarray:
    """(row, col) centre of the body (voxels above -500 HU) over the whole volume."""
    rows, cols = np.nonzero((volume_hu > -500).any(axis=0))
    return np.array([(rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2])


def write_volume(array: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """A [z, y, x] array as an LPS-identity-direction NIfTI (the canonical layout, so no reorientation applies)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing[2], spacing[1], spacing[0]))
    temp = path.with_name("tmp_" + path.name)
    sitk.WriteImage(image, str(temp), useCompression=True)
    os.replace(temp, path)


def class_names(data: Path, task: str) -> dict[int, str]:
    table = json.loads((data / "totalsegmentator" / "classmap_total_v2.json").read_text())[task]
    return {int(k): v for k, v in table.items()}


def load_ct_source(data: Path) -> Source:
    """example_ct with its full label map: ``total`` labels for z 82-111 (example_seg), ``total --fast`` below."""
    folder = data / "totalsegmentator"
    ct, spacing = load_canonical(folder / "example_ct.nii.gz")
    full, _ = load_canonical(folder / "example_seg_fast_force_split.nii.gz")
    sm, _ = load_canonical(folder / "example_seg.nii.gz")
    full = full.astype(np.int16)
    full[SM_OFFSET:SM_OFFSET + sm.shape[0]] = sm
    if abs(spacing[1] - spacing[2]) > 1e-3:
        raise SystemExit("expected square pixels")
    ct = ct.astype(np.float32)
    body = np.stack([ndimage.binary_fill_holes(s > -500) for s in ct])
    return Source("ct", ct, full, class_names(data, "total"), "totalseg_total", spacing[1], body_centre(ct), body,
                  True)


def load_mr_source(data: Path) -> Source:
    """The MR patient, used only through its labels (every copy is synthesised as CT); the body is where the MR
    signal is above the air's (closed and filled)."""
    folder = data / "totalsegmentator"
    mr, spacing = load_canonical(folder / "example_mr_sm.nii.gz")
    full, _ = load_canonical(folder / "example_seg_mr.nii.gz")
    mr = mr.astype(np.float32)
    body = np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(s > 25, iterations=2)) for s in mr])
    rows, cols = np.nonzero(body.any(axis=0))
    centre = np.array([(rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2])
    return Source("mr", mr, full.astype(np.int16), class_names(data, "total_mr"), "totalseg_total_mr", spacing[1],
                  centre, body, False)
