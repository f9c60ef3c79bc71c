"""The validators every DICOM SEG the tests write goes through (issue 29): dicom3tools' ``dciodvfy`` (the IOD
checker) and dcmqi's ``segimage2itkimage`` (what Slicer's QuantitativeReporting reads SEGs with).

Each returns None when its tool is not installed (the tests then skip that check; ``.ci/install-validators.sh``
installs both). Two limits of the Debian 12 dciodvfy (dicom3tools 2022) are worked around, not hidden: it reads no
deflated file (the SEG is inflated to a temporary copy first, the content checked is the same), and it predates the
DICOM 2024 Label Map Segmentation IOD (such SEGs are checked by dcmqi and highdicom only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from hsam.volume.dicom_seg import SEG_SOP_CLASSES, organ_of_segment, read_dicom_seg

LABELMAP_SOP_CLASS = next(uid for uid, kind in SEG_SOP_CLASSES.items() if kind == "labelmap")


def is_hsam_seg(path: Path) -> bool:
    """A DICOM SEG this package wrote (not a copy of dcmqi's test SEG or a file a test damaged on purpose)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Manufacturer"])
    except Exception:  # noqa: BLE001 (not DICOM)
        return False
    return str(header.get("SOPClassUID", "")) in SEG_SOP_CLASSES and header.get("Manufacturer") == "HSAMSlicer"


def _missing(tool: str) -> None:
    """None (the check is skipped) where ``tool`` is not installed, unless HSAM_REQUIRE_VALIDATORS is set, as CI sets
    it after installing them: there a missing validator fails the test instead of passing it unchecked."""
    assert not os.environ.get("HSAM_REQUIRE_VALIDATORS"), f"{tool} is required (HSAM_REQUIRE_VALIDATORS) but absent"
    return None


def dciodvfy_errors(path: Path, work: Path) -> list[str] | None:
    """dciodvfy's Error lines for ``path`` ([] when it validates); None when dciodvfy is absent or cannot judge it."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        return _missing("dciodvfy")
    ds = pydicom.dcmread(path)
    if str(ds.SOPClassUID) == LABELMAP_SOP_CLASS:
        return None  # the IOD is newer than Debian's dicom3tools ("Information Object Not found")
    if ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # dicom3tools reads no deflated file
        path = work / f"inflated-{path.name}"
        ds.save_as(path, enforce_file_format=True)
    report = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    text = report.stdout + report.stderr
    if "Segmentation" not in text:
        return [f"dciodvfy did not recognise a Segmentation IOD: {text[:300]}"]
    return [line for line in text.splitlines() if line.startswith("Error")]


def dcmqi_labels(path: Path, reference: sitk.Image, work: Path) -> np.ndarray | None:
    """The SEG as dcmqi's segimage2itkimage converts it, as H-SAM labels [k, j, i] on ``reference``'s grid; None when
    dcmqi is not installed. Raises AssertionError when dcmqi fails."""
    tool = Path(sys.executable).parent / "segimage2itkimage"
    if not tool.is_file():
        found = shutil.which("segimage2itkimage")
        if found is None:
            return _missing("segimage2itkimage")
        tool = Path(found)
    out = work / f"dcmqi-{path.stem}"
    out.mkdir(parents=True, exist_ok=True)
    report = subprocess.run([str(tool), "--inputDICOM", str(path), "--outputDirectory", str(out), "-t", "nrrd"],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, f"segimage2itkimage failed on {path.name}: {report.stdout[-500:]}{report.stderr[-500:]}"
    organ_of = {int(item.SegmentNumber): organ_of_segment(item) or 0
                for item in pydicom.dcmread(path, stop_before_pixels=True).SegmentSequence}
    lookup = np.zeros(256, dtype=np.uint8)
    for number, organ in organ_of.items():
        lookup[number] = organ
    labels = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.uint8)
    files = sorted(out.glob("*.nrrd"))
    assert files, f"segimage2itkimage wrote no segment for {path.name}"
    for file in files:  # one file per segment (value = segment number), or one label map (LABELMAP)
        image = sitk.Cast(sitk.ReadImage(str(file)), sitk.sitkUInt8)
        on_grid = sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        labels = np.where(on_grid > 0, lookup[on_grid], labels)
    return labels


def check_seg(path: Path, work: Path, reference: sitk.Image | None = None) -> None:
    """Every installed validator accepts ``path``: no dciodvfy error, and dcmqi converts it voxel-equal to how hsam
    reads it on ``reference``'s grid (default: the grid its frames span; hsam's reading is itself checked against
    the labels written)."""
    errors = dciodvfy_errors(path, work)
    assert not errors, f"dciodvfy on {path.name}: {errors}"
    image = read_dicom_seg(path, reference)
    reference = image if reference is None else reference
    ours = sitk.GetArrayFromImage(image)
    theirs = dcmqi_labels(path, reference, work)
    if theirs is not None:
        assert np.array_equal(theirs, ours), f"dcmqi reads {path.name} differently: {(theirs != ours).sum()} voxels"


def check_segs_under(folder: Path) -> int:
    """Run :func:`check_seg` on every SEG hsam wrote under ``folder`` (recursively); returns how many."""
    work = folder / ".validators"
    segs = [p for p in sorted(folder.rglob("*")) if p.is_file() and ".validators" not in p.parts and is_hsam_seg(p)]
    for path in segs:
        work.mkdir(exist_ok=True)
        check_seg(path, work)
    return len(segs)
