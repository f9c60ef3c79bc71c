"""Real DICOM series as hospitals and anonymisers write them, made from the real GE CT of ../shared/data/real/dcmqi.

Every pixel encoding GDCM reads (re-encoded with pydicom and its pylibjpeg-openjpeg plug-in, or GDCM's own
``gdcmconv`` from the python-gdcm wheel), identifying UIDs blanked, removed or duplicated, files renamed without
extension and shuffled into sub-folders. The voxels never change: every variant must read as the original volume.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydicom.filewriter import dcmwrite

IDENTIFYING_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
GDCMCONV_ENCODINGS = {"jpeg-lossless": "--jpeg", "jpeg-ls": "--jpegls", "rle": "--rle", "jpeg2000-gdcm": "--j2k"}
ENCODINGS = ("jpeg2000", "deflate", "big-endian", *GDCMCONV_ENCODINGS)


def gdcmconv() -> str:
    """The gdcmconv of the python-gdcm wheel in this environment (skips the test when it is not installed)."""
    path = Path(sys.executable).parent / "gdcmconv"
    if not path.is_file():
        path = Path(shutil.which("gdcmconv") or "")
    if not path.is_file():
        pytest.skip("gdcmconv not installed (pip install python-gdcm, in the test extra)")
    return str(path)


def encode(source: Path, target: Path, encoding: str) -> pydicom.Dataset:
    """Write ``source`` to ``target`` in ``encoding`` (lossless; the same voxels) and return the written data set."""
    if encoding in GDCMCONV_ENCODINGS:
        subprocess.run([gdcmconv(), GDCMCONV_ENCODINGS[encoding], str(source), str(target)], check=True, timeout=60)
        return pydicom.dcmread(target)
    ds = pydicom.dcmread(source)
    if encoding == "jpeg2000":
        pytest.importorskip("openjpeg", reason="pip install pylibjpeg-openjpeg (in the test extra)")
        ds.compress(pydicom.uid.JPEG2000Lossless, generate_instance_uid=False)
        ds.save_as(target)
    elif encoding == "deflate":
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        ds.save_as(target, implicit_vr=False, little_endian=True)
    elif encoding == "big-endian":
        pixels = ds.pixel_array
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRBigEndian
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
        dcmwrite(target, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    elif encoding == "native":
        ds.save_as(target)
    else:
        raise ValueError(encoding)
    return ds


def rewrite(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    """Apply ``change`` to a file's data set and write it back in its own transfer syntax (pixels untouched)."""
    ds = pydicom.dcmread(path)
    change(ds)
    syntax = ds.file_meta.TransferSyntaxUID
    dcmwrite(path, ds, implicit_vr=syntax.is_implicit_VR, little_endian=syntax.is_little_endian, force_encoding=True)


def blank(*keywords: str) -> Callable[[pydicom.Dataset], None]:
    """A change that leaves the elements present but empty, as the anonymiser of the issue did."""
    def change(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            setattr(ds, keyword, "")
    return change


def remove(*keywords: str) -> Callable[[pydicom.Dataset], None]:
    """A change that deletes the elements."""
    def change(ds: pydicom.Dataset) -> None:
        for keyword in keywords:
            if keyword in ds:
                delattr(ds, keyword)
    return change


def make_series(sources: list[Path], folder: Path, encoding: str = "native",
                change: Callable[[pydicom.Dataset], None] | None = None, shuffle_into: int = 0,
                seed: int = 0) -> list[Path]:
    """Copy a series into ``folder``: encoded, changed, named ``IM<random>`` without extension, and (``shuffle_into``
    > 0) scattered at random over that many sub-folders. Returns the written files."""
    rng = random.Random(seed)
    written = []
    for index, source in enumerate(sources):
        where = folder / f"part{rng.randrange(shuffle_into)}" if shuffle_into else folder
        where.mkdir(parents=True, exist_ok=True)
        target = where / f"IM{rng.randrange(10**6):06d}{index}"
        encode(source, target, encoding)
        if change is not None:
            rewrite(target, change)
        written.append(target)
    return written


def make_multiframe(sources: list[Path], target: Path) -> pydicom.Dataset:
    """The series as one Legacy Converted Enhanced CT image (highdicom's converter): one file, one frame per slice."""
    import warnings

    import highdicom as hd

    with warnings.catch_warnings():  # the GE patient name's one-part form
        warnings.simplefilter("ignore")
        image = hd.legacy.LegacyConvertedEnhancedCTImage(
            [pydicom.dcmread(s) for s in sources], series_instance_uid=hd.UID(), series_number=7,
            sop_instance_uid=hd.UID(), instance_number=1)
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(target, enforce_file_format=True)
    return image
