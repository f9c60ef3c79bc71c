"""DICOM study folders: list the series under a folder, pick the one H-SAM should segment, read it as a volume.

A hospital export holds a whole study: scouts, thin and thick reconstructions, contrast phases, dose reports, often
one folder per series but sometimes all files in one folder. :func:`scan_series` reads every file's header once
(pydicom, no pixel data) and groups the files by Series Instance UID; :func:`pick_series` chooses the axial CT series
with the most slices (ties: the smallest slice spacing), or the one the user names. A series that cannot be read as
one volume (mixed orientations, duplicate or uneven slice positions, not an image) is listed with the reason and never
picked, so a broken series gives one line, not a crash.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hsam.errors import HSAMError

if TYPE_CHECKING:  # pragma: no cover
    import SimpleITK as sitk

_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "Modality", "ImageType", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
    "NumberOfFrames",
)  # fmt: skip
_LOCALIZER_WORDS = re.compile(r"scout|topogram|localizer|localiser|surview|scanogram|pilot|survey", re.IGNORECASE)
# Modalities of objects that are not images to segment (segmentations, structure sets, reports, key images, states).
_NOT_IMAGES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "KO", "PR", "REG", "DOC"}


@dataclass
class DicomSeries:
    """One series of a study folder: what ``hsam series`` lists, and the files :func:`read_series` reads."""

    uid: str
    study_uid: str = ""
    modality: str = ""
    description: str = ""
    number: int | None = None
    image_type: tuple[str, ...] = ()
    files: list[Path] = field(default_factory=list)  # sorted along the slice normal once analysed
    rows: int = 0
    columns: int = 0
    pixel_spacing: tuple[float, float] | None = None  # (row spacing, column spacing) mm
    slice_spacing: float | None = None  # mm between neighbouring slices
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (row direction, column direction)
    problem: str = ""  # why it cannot be read as one volume ("" when it can)

    @property
    def slices(self) -> int:
        return len(self.files)

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type or bool(_LOCALIZER_WORDS.search(self.description))

    @property
    def is_axial(self) -> bool:
        """Slices perpendicular to the body axis (within 45 degrees: a tilted gantry is still axial)."""
        if self.orientation is None:
            return False
        normal = np.cross(self.orientation[:3], self.orientation[3:])
        return bool(np.argmax(np.abs(normal)) == 2)

    def unsuitable(self) -> str:
        """Why the default choice skips this series ("" when it is an axial CT volume)."""
        if self.problem:
            return self.problem
        if self.is_localizer:
            return "localizer/scout"
        if self.modality != "CT":
            return f"{self.modality or 'unknown'} modality, not CT"
        if not self.is_axial:
            return "not axial (a reformat); H-SAM segments axial slices"
        return ""

    def label(self) -> str:
        """A short human name: number, description, modality, slices, spacing."""
        number = f"#{self.number} " if self.number is not None else ""
        description = f"'{self.description}' " if self.description else ""
        spacing = f", {self.slice_spacing:.3g} mm apart" if self.slice_spacing else ""
        return f"series {number}{description}({self.modality or '?'}, {self.slices} slices{spacing})"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _dicom_files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder`` (recursive, sorted); DICOM or not is decided by reading it."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        found.extend(Path(root) / f for f in sorted(files) if not _is_hidden(f) and f.upper() != "DICOMDIR")
    return found


def scan_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """All DICOM series under ``folder`` (recursively), sorted by series number; files that are not DICOM are skipped.

    Raises HSAMError when the folder does not exist or holds no DICOM file.
    """
    import pydicom

    root = Path(folder)
    if not root.is_dir():
        raise HSAMError(f"{root} is not a folder; give a folder of DICOM files")
    series: dict[str, DicomSeries] = {}
    headers: dict[str, list[tuple[Path, object]]] = {}
    for path in _dicom_files(root):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
            uid = str(header.get("SeriesInstanceUID", "") or "")
            if uid and uid not in series:
                series[uid] = _new_series(uid, header)
        except Exception:  # noqa: BLE001 (pydicom raises many types: struct.error, BytesLengthException, ...)
            continue  # not DICOM, or too damaged to tell which series it belongs to
        if not uid:
            continue
        headers.setdefault(uid, []).append((path, header))
    if not series:
        raise HSAMError(f"no DICOM series found in folder {root}; point to a folder of .dcm files or to a volume file")
    for uid, entry in series.items():
        try:
            _analyse(entry, headers[uid])
        except Exception:  # noqa: BLE001 (pydicom decodes values on access, and raises many types for damaged ones)
            entry.problem = "damaged header fields (size, position or orientation)"
    return sorted(series.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))


def _new_series(uid: str, header) -> DicomSeries:  # noqa: ANN001 (a pydicom Dataset)
    """A series' identity from its first file's header (a malformed number or type is left out, not fatal)."""
    def text(keyword: str) -> str:
        try:
            return str(header.get(keyword, "") or "").strip()
        except Exception:  # noqa: BLE001 (a value pydicom cannot decode)
            return ""

    try:
        number: int | None = int(header.get("SeriesNumber", None))
    except Exception:  # noqa: BLE001 (missing, empty or undecodable)
        number = None
    try:
        image_type = tuple(str(v).upper() for v in (header.get("ImageType", None) or ()))
    except Exception:  # noqa: BLE001 (undecodable)
        image_type = ()
    return DicomSeries(uid=uid, study_uid=text("StudyInstanceUID"), modality=text("Modality"),
                       description=text("SeriesDescription"), number=number, image_type=image_type)


def _analyse(series: DicomSeries, headers: list) -> None:
    """Fill in geometry and ``problem``; sort ``files`` along the slice normal."""
    series.files = [path for path, _ in headers]
    datasets = [header for _, header in headers]
    if series.modality in _NOT_IMAGES or any("Rows" not in d for d in datasets):
        series.problem = f"not an image series ({series.modality or 'no modality'})"
        return
    if any(int(d.get("NumberOfFrames", 1) or 1) > 1 for d in datasets):
        series.problem = "multi-frame (enhanced) images; export the series as classic single-frame images"
        return
    try:
        orientations = np.array([[float(v) for v in d.ImageOrientationPatient] for d in datasets])
        positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
        spacings = np.array([[float(v) for v in d.PixelSpacing] for d in datasets])
    except (AttributeError, TypeError, ValueError):
        series.problem = "slices without position, orientation or pixel spacing"
        return
    if orientations.shape[1] != 6 or positions.shape[1] != 3 or spacings.shape[1] != 2:
        series.problem = "malformed position, orientation or pixel spacing"
        return
    series.rows, series.columns = int(datasets[0].Rows), int(datasets[0].Columns)
    series.orientation = tuple(orientations[0])
    series.pixel_spacing = (float(spacings[0][0]), float(spacings[0][1]))
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        series.problem = "slices have different orientations (several stacks in one series)"
        return
    if any((int(d.Rows), int(d.Columns)) != (series.rows, series.columns) for d in datasets) or not np.allclose(
        spacings, spacings[0], rtol=1e-4
    ):
        series.problem = "slices have different sizes or pixel spacings"
        return
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    series.files = [series.files[i] for i in order]
    if len(along) < 2:
        return
    gaps = np.diff(along[order])
    smallest = float(gaps.min())
    if smallest < 1e-3:
        duplicates = int((gaps < 1e-3).sum())
        series.problem = (f"{duplicates} duplicate slice position(s) (several phases or acquisitions in one series); "
                          "split it before segmenting")
        return
    series.slice_spacing = float(np.median(gaps))
    if float(gaps.max()) - smallest > max(0.01, 0.05 * series.slice_spacing):
        series.problem = f"uneven slice spacing ({smallest:.3g} to {float(gaps.max()):.3g} mm): missing slices?"


def pick_series(series: list[DicomSeries], uid: str | None = None, folder: str | os.PathLike[str] = "") -> DicomSeries:
    """The series named by ``uid``, or the default: the axial CT series with the most slices, then the smallest
    slice spacing (non-CT image volumes only when there is no CT, so an MR folder reaches the CT check with its own
    message). Raises HSAMError when the named series is unknown or unreadable, or when none is usable."""
    where = f" in {folder}" if folder else ""
    if uid:
        chosen = next((s for s in series if s.uid == uid.strip()), None)
        if chosen is None:
            raise HSAMError(f"no series {uid}{where}; `hsam series {folder or 'DIR'}` lists the series UIDs")
        if chosen.problem:
            raise HSAMError(f"{chosen.label()} cannot be read as one volume: {chosen.problem}")
        return chosen
    candidates = [s for s in series if not s.unsuitable()]
    if not candidates:  # e.g. an MR study: let the caller's CT check explain, or --allow-non-ct segment it
        candidates = [s for s in series if not s.problem and not s.is_localizer]
    if not candidates:
        reasons = "; ".join(f"{s.label()}: {s.unsuitable()}" for s in series[:4])
        raise HSAMError(f"no series{where} can be segmented ({reasons}{'; ...' if len(series) > 4 else ''})")
    return max(candidates, key=lambda s: (s.slices, -(s.slice_spacing or 0.0), -(s.number or 0), s.uid))


def read_series(series: DicomSeries) -> "sitk.Image":
    """Read a series (analysed by :func:`scan_series`) as a SimpleITK image; slices in the sorted file order."""
    import SimpleITK as sitk

    if series.problem:
        raise HSAMError(f"{series.label()} cannot be read as one volume: {series.problem}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    try:
        return reader.Execute()
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:160]
        raise HSAMError(f"could not read {series.label()}: {detail}") from None


def choose_series(folder: str | os.PathLike[str], uid: str | None = None) -> tuple[DicomSeries, list[DicomSeries]]:
    """Scan ``folder`` and pick a series (see :func:`pick_series`); returns the choice and every series found."""
    found = scan_series(folder)
    return pick_series(found, uid, folder), found


def describe_choice(folder: str | os.PathLike[str], chosen: DicomSeries, found: list[DicomSeries]) -> str:
    """One line saying which series was picked among several, and how to pick another."""
    others = sorted((s.slices for s in found if s is not chosen), reverse=True)
    return (f"{Path(folder).name} holds {len(found)} DICOM series: using {chosen.label()} [{chosen.uid}]; the others "
            f"have {', '.join(map(str, others))} slices; `hsam series` lists them, --series UID picks another")
