"""DICOM study folders: list the series under a folder, pick the one H-SAM should segment, read it as a volume.

A hospital export holds a whole study: scouts, thin and thick reconstructions, contrast phases, dose reports, often
one folder per series but sometimes all files in one folder, named with or without extension. :func:`scan_series`
reads the header of every file that starts like DICOM (pydicom, no pixel data) and groups the files by Series
Instance UID; an anonymiser may leave that empty or remove it, and then the files of one folder that share study,
frame of reference, series number and description, orientation and size form a series, with a note saying so (SOP
Class and Instance UIDs fall back to the file meta's). Copies of the same instance are read once. Pixels are decoded
by GDCM (SimpleITK), which reads every encoding a DICOM export uses (JPEG lossless, JPEG-LS, JPEG 2000, RLE, deflate,
big endian); one slice per series is decoded while scanning, so an undecodable series is listed with its reason.
:func:`pick_series` chooses the axial CT series with the most slices (ties: the smallest slice spacing), or the one
the user names. A series that cannot be read as one volume (mixed orientations, duplicate or uneven slice positions,
not an image, pixels GDCM cannot decode) and the files with a DICOM header that cannot be read at all are listed
with the reason and never picked, so a broken series gives one line, not a crash.
"""

from __future__ import annotations

import hashlib
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
    "NumberOfFrames", "FrameOfReferenceUID",
)  # fmt: skip
UNREADABLE = "unreadable-files"  # the uid of the entry that lists the files with a DICOM header that cannot be read
_PREAMBLE = 128  # bytes before "DICM" in a DICOM file
# Modality of the image storage SOP classes, for files whose Modality an anonymiser emptied
_MODALITY_OF_SOP_CLASS = {
    "1.2.840.10008.5.1.4.1.1.2": "CT", "1.2.840.10008.5.1.4.1.1.2.1": "CT", "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "MR", "1.2.840.10008.5.1.4.1.1.128": "PT", "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.2.2": "CT", "1.2.840.10008.5.1.4.1.1.4.4": "MR",  # legacy converted enhanced
}  # fmt: skip
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
    note: str = ""  # how the files were grouped when they had no Series Instance UID ("" when they had one)
    frame_count: int = 0  # frames of a series that is one multi-frame image (0: classic single-frame files)

    @property
    def slices(self) -> int:
        return self.frame_count or len(self.files)

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
        if self.uid == UNREADABLE:
            return f"{self.slices} file(s) with a DICOM header"
        number = f"#{self.number} " if self.number is not None else ""
        description = f"'{self.description}' " if self.description else ""
        spacing = f", {self.slice_spacing:.3g} mm apart" if self.slice_spacing else ""
        return f"series {number}{description}({self.modality or '?'}, {self.slices} slices{spacing})"


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _candidate_files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder`` (recursive, sorted), any name or extension; DICOM or not is decided by
    :func:`has_dicom_header`."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _is_hidden(d))
        found.extend(Path(root) / f for f in sorted(files) if not _is_hidden(f) and f.upper() != "DICOMDIR")
    return found


def has_dicom_header(path: Path) -> bool:
    """True when ``path`` starts like a DICOM file: the 128-byte preamble and "DICM", or (an old or raw file without
    preamble) a first element of the file meta (group 0002) or identifying (group 0008) group, either byte order."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_PREAMBLE + 4)
    except OSError:
        return False
    if head[_PREAMBLE:_PREAMBLE + 4] == b"DICM":
        return True
    return len(head) >= 8 and (int.from_bytes(head[:2], "little") in (2, 8) or int.from_bytes(head[:2], "big") in (2, 8))


def _read_header(path: Path):  # noqa: ANN202 (a pydicom Dataset)
    """The header fields :data:`_TAGS` of one file (no pixel data); a file without preamble is read as a raw data set."""
    import pydicom

    with open(path, "rb") as handle:
        preamble = handle.read(_PREAMBLE + 4)[_PREAMBLE:] == b"DICM"
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS), force=not preamble)


def _text(header, keyword: str) -> str:  # noqa: ANN001 (a pydicom Dataset)
    """A header value as stripped text; "" when missing, empty or undecodable."""
    try:
        return str(header.get(keyword, "") or "").strip()
    except Exception:  # noqa: BLE001 (a value pydicom cannot decode)
        return ""


def instance_uids(header) -> tuple[str, str]:  # noqa: ANN001 (a pydicom Dataset)
    """(SOP Class UID, SOP Instance UID) of a file: the data set's, else the file meta's Media Storage ones (which an
    anonymiser that blanks the data set's often leaves); "" where neither has one."""
    meta = getattr(header, "file_meta", None)
    sop_class = _text(header, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta is not None else "")
    instance = _text(header, "SOPInstanceUID") or (_text(meta, "MediaStorageSOPInstanceUID") if meta is not None else "")
    return sop_class, instance


def _series_key(header, path: Path, root: Path) -> tuple[str, str]:  # noqa: ANN001 (a pydicom Dataset)
    """(series id, note) of a file: its Series Instance UID; without one, an id made from its folder, study, frame of
    reference, series number and description, orientation and size, with a note saying so."""
    uid = _text(header, "SeriesInstanceUID")
    if uid:
        return uid, ""
    try:
        orientation = tuple(round(float(v), 3) for v in header.get("ImageOrientationPatient", None) or ())
    except (TypeError, ValueError):
        orientation = ()
    folder = path.parent.relative_to(root).as_posix()
    key = (folder, _text(header, "StudyInstanceUID"), _text(header, "FrameOfReferenceUID"), _text(header, "SeriesNumber"),
           _text(header, "SeriesDescription"), orientation, _text(header, "Rows"), _text(header, "Columns"))
    digest = hashlib.sha256(repr(key).encode("utf-8")).hexdigest()[:12]
    note = (f"its files have no Series Instance UID: grouped by folder ({folder}), frame of reference, orientation "
            "and size instead")
    return f"no-uid-{digest}", note


def _header_problem(header) -> str:  # noqa: ANN001 (a pydicom Dataset)
    """Why a header pydicom read without complaint is still unusable ("" when it is usable): pydicom stops quietly at
    the end of a truncated or damaged file, leaving no elements, or none that places the file in a series."""
    if len(header) == 0:
        return "no data elements after the file meta (truncated or damaged)"
    if not _text(header, "SeriesInstanceUID") and "Rows" not in header:
        return "no Series Instance UID and no image size (truncated, damaged, or not an image)"
    return ""


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:100]}"


def scan_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """All DICOM series under ``folder`` (recursively, any file name), sorted by series number.

    Files are grouped by Series Instance UID, or as :func:`_series_key` says when they have none. Files that are
    not DICOM are skipped; files with a DICOM header that cannot be read are listed as one entry with the reason.
    Raises HSAMError when the folder does not exist or no file in it has a DICOM header.
    """
    root = Path(folder)
    if not root.is_dir():
        raise HSAMError(f"{root} is not a folder; give a folder of DICOM files")
    candidates = _candidate_files(root)
    groups: dict[str, list[tuple[Path, object]]] = {}
    notes: dict[str, str] = {}
    unreadable: list[tuple[Path, str]] = []
    for path in candidates:
        if not has_dicom_header(path):
            continue
        try:
            header = _read_header(path)
            uid, note = _series_key(header, path, root)
        except Exception as error:  # noqa: BLE001 (pydicom raises many types: struct.error, BytesLengthException, ...)
            unreadable.append((path, _reason(error)))
            continue
        if _header_problem(header):
            unreadable.append((path, _header_problem(header)))
            continue
        groups.setdefault(uid, []).append((path, header))
        notes[uid] = note
    if not groups and not unreadable:
        raise HSAMError(f"no DICOM series found in folder {root}: none of its {len(candidates)} files has a DICOM "
                        "header; point to a folder of DICOM files or to a volume file")
    series = []
    for uid, members in groups.items():
        entry = _new_series(uid, members[0][1])
        entry.note = notes[uid]
        try:
            _analyse(entry, members)
        except Exception:  # noqa: BLE001 (pydicom decodes values on access, and raises many types for damaged ones)
            entry.problem = "damaged header fields (size, position or orientation)"
        series.append(entry)
    if unreadable:
        series.append(_unreadable_entry(unreadable))
    return sorted(series, key=lambda s: (s.number is None, s.number or 0, s.uid))


def _unreadable_entry(unreadable: list[tuple[Path, str]]) -> DicomSeries:
    """One listed (never picked) entry for the files that have a DICOM header but could not be read."""
    first, reason = unreadable[0]
    more = f" and {len(unreadable) - 1} more" if len(unreadable) > 1 else ""
    return DicomSeries(uid=UNREADABLE, files=[p for p, _ in unreadable],
                       problem=f"{first.name}{more} could not be read ({reason}); export them again")


def _new_series(uid: str, header) -> DicomSeries:  # noqa: ANN001 (a pydicom Dataset)
    """A series' identity from its first file's header (a malformed number or type is left out, not fatal)."""
    try:
        number: int | None = int(header.get("SeriesNumber", None))
    except Exception:  # noqa: BLE001 (missing, empty or undecodable)
        number = None
    try:
        image_type = tuple(str(v).upper() for v in (header.get("ImageType", None) or ()))
    except Exception:  # noqa: BLE001 (undecodable)
        image_type = ()
    modality = _text(header, "Modality") or _MODALITY_OF_SOP_CLASS.get(instance_uids(header)[0], "")
    return DicomSeries(uid=uid, study_uid=_text(header, "StudyInstanceUID"), modality=modality,
                       description=_text(header, "SeriesDescription"), number=number, image_type=image_type)


def _analyse(series: DicomSeries, headers: list) -> None:
    """Fill in geometry and ``problem``; sort ``files`` along the slice normal."""
    series.files = [path for path, _ in headers]
    datasets = [header for _, header in headers]
    if series.modality in _NOT_IMAGES or any("Rows" not in d for d in datasets):
        series.problem = f"not an image series ({series.modality or 'no modality'})"
        return
    if any(int(d.get("NumberOfFrames", 1) or 1) > 1 for d in datasets):
        if len(datasets) > 1:
            series.problem = ("several multi-frame (enhanced) images in one series; export it as one multi-frame "
                              "image or as classic single-frame images")
            return
        _analyse_multiframe(series)
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
    keep = _without_copies(datasets, positions)
    if len(keep) < len(datasets):  # the same instance twice (a study exported twice into one folder tree)
        series.note = "; ".join(filter(None, [series.note, f"{len(datasets) - len(keep)} duplicate file(s) (same SOP "
                                              "Instance UID and position as another) ignored"]))
        series.files, datasets = [series.files[i] for i in keep], [datasets[i] for i in keep]
        orientations, positions, spacings = orientations[keep], positions[keep], spacings[keep]
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
    series.problem = _pixel_problem(series.files[0])
    if series.problem or len(along) < 2:
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


def _analyse_multiframe(series: DicomSeries) -> None:
    """Geometry and ``problem`` of a series that is one multi-frame (enhanced or legacy converted) image: its frames
    must be parallel, evenly spaced slices of one size, as GDCM reads them into one volume."""
    import pydicom

    path = series.files[0]
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else pydicom.Dataset()
        per_frame = ds.PerFrameFunctionalGroupsSequence

        def group(index: int, name: str):  # noqa: ANN202 (a pydicom Dataset)
            item = per_frame[index]
            return (item[name] if name in item else shared[name]).value[0]

        count = int(ds.NumberOfFrames)
        orientations = np.array([[float(v) for v in group(i, "PlaneOrientationSequence").ImageOrientationPatient]
                                 for i in range(count)])
        positions = np.array([[float(v) for v in group(i, "PlanePositionSequence").ImagePositionPatient]
                              for i in range(count)])
        spacing = [float(v) for v in group(0, "PixelMeasuresSequence").PixelSpacing]
    except Exception:  # noqa: BLE001 (missing functional groups; pydicom raises many types)
        series.problem = "multi-frame image without per-frame position, orientation or pixel spacing"
        return
    series.frame_count = count
    series.rows, series.columns = int(ds.Rows), int(ds.Columns)
    series.orientation, series.pixel_spacing = tuple(orientations[0]), (spacing[0], spacing[1])
    if not np.allclose(orientations, orientations[0], atol=1e-4):
        series.problem = "frames have different orientations (several stacks in one image)"
        return
    along = positions @ np.cross(orientations[0][:3], orientations[0][3:])
    gaps = np.abs(np.diff(along))
    if len(gaps) and float(gaps.min()) < 1e-3:
        series.problem = ("frames share positions (several phases, echoes or acquisitions in one image); export one "
                          "of them")
        return
    series.slice_spacing = float(np.median(gaps)) if len(gaps) else None
    if len(gaps) and (not (np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0))
                      or float(gaps.max() - gaps.min()) > max(0.01, 0.05 * float(np.median(gaps)))):
        series.problem = "frames are not evenly spaced, ordered slices"
        return
    series.problem = _pixel_problem(path)


def _without_copies(datasets: list, positions: np.ndarray) -> list[int]:
    """Indices of the files to keep: the first of each (SOP Instance UID, position); files without a UID all stay."""
    seen: set[tuple[str, tuple[float, ...]]] = set()
    keep = []
    for index, (header, position) in enumerate(zip(datasets, positions)):
        key = (instance_uids(header)[1], tuple(np.round(position, 3)))
        if key[0] and key in seen:
            continue
        seen.add(key)
        keep.append(index)
    return keep


def _pixel_problem(path: Path) -> str:
    """Why GDCM (the reader that decodes the pixels, in every transfer syntax it knows) cannot decode one slice of a
    series; "" when it can. Checked once per series, so a listing names an undecodable encoding up front."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.Execute()
    except RuntimeError as error:
        detail = " ".join(str(error).split())
        detail = detail.split("): ", 1)[-1][:100]  # ITK's text after "file:line: ITK ERROR: GDCMImageIO(0x...): "
        return (f"its pixel data cannot be read ({_transfer_syntax(path) or 'unknown transfer syntax'}; GDCM: {detail}):"
                " the file is truncated or damaged, or uses an encoding GDCM cannot decode; export it again")
    return ""


def _transfer_syntax(path: Path) -> str:
    """The file meta's Transfer Syntax UID with its name ("" when unreadable)."""
    import pydicom

    try:
        syntax = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[], force=True).file_meta.TransferSyntaxUID
    except Exception:  # noqa: BLE001 (no file meta, damaged)
        return ""
    return f"{syntax} {syntax.name}" if syntax.name != syntax else str(syntax)


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
    if series.frame_count:  # one multi-frame image: GDCM builds the volume from its per-frame geometry
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(series.files[0]))
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(p) for p in series.files])
    reader.SetImageIO("GDCMImageIO")  # by content, whatever the file names (many exports have no extension)
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
