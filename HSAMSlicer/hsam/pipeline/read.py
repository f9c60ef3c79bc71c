"""Read stage: the CT volume (file or DICOM folder) that a run segments."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import SimpleITK as sitk

from hsam.errors import HSAMError


def read_ct(path: str, series: str | None, dicom_source: bool, allow_non_ct: bool,
            warn: Callable[[str], None]) -> tuple[sitk.Image, Any]:
    """The CT at ``path`` (3-D, HU) and, with ``dicom_source``, the DICOM series read (a DICOM SEG references it;
    else None). What the readers warn about (e.g. which series of a study was picked) goes to ``warn``. An image
    that does not look like CT is refused unless ``allow_non_ct``."""
    from hsam.volume import looks_like_ct, read_image

    source_series = None
    with warnings.catch_warnings(record=True) as caught:  # e.g. "the folder holds 2 DICOM series: using ..."
        warnings.simplefilter("always", UserWarning)
        if dicom_source:
            from hsam.volume.io import read_dicom_volume

            image, source_series = read_dicom_volume(path, series)
        else:
            image = read_image(path, series=series)
    for warning in caught:
        warn(str(warning.message))
    if not allow_non_ct and not looks_like_ct(sitk.GetArrayViewFromImage(image)):
        raise HSAMError(
            f"{Path(path).name} does not look like CT in Hounsfield units (no air near -1000 HU: MR or a "
            "normalised image?); H-SAM models are trained on CT: pass --allow-non-ct to segment it anyway"
        )
    return image, source_series
