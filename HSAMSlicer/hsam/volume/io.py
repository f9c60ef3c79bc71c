"""Reading CT volumes (NIfTI, NRRD, MHA, DICOM series folders) and writing label maps and .seg.nrrd segmentations.

Everything is a ``SimpleITK.Image`` with its physical geometry in LPS, as ITK keeps it. Problems a user can fix raise
:class:`hsam.errors.HSAMError` with a one-line message. Writes are atomic (:mod:`hsam.volume.files`): a temporary file
in the target folder, then ``os.replace``, so a failed run never leaves a partial output behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import SimpleITK as sitk

from hsam.errors import HSAMError
from hsam.volume.files import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    atomic_write,
    check_nifti_complete,
    check_writable,
    suffix_of,
)

if TYPE_CHECKING:  # pragma: no cover
    from hsam.volume.dicom_series import DicomSeries


def read_image(path: str | os.PathLike[str], series: str | None = None) -> sitk.Image:
    """Read a CT volume from a file (NIfTI, NRRD, MHA, ...) or a DICOM folder and check it is usable.

    A folder may hold a whole study: ``series`` (a Series Instance UID) picks one, else the axial CT series with the
    most slices is read and a warning names it (:func:`hsam.volume.dicom_series.pick_series`).

    Returns a 3-D scalar image (a 4-D file with one time point is reduced to 3-D). Raises HSAMError for a missing
    path, an empty, truncated or unreadable file, a 2-D or 4-D image, a multi-component image, or NaN/inf voxels.
    """
    source = Path(path)
    if not source.exists():
        raise HSAMError(f"input not found: {source}; check the path")
    if source.is_dir():
        image = _read_dicom_folder(source, series)
    else:
        if series:
            raise HSAMError(f"--series picks a series of a DICOM folder, but {source.name} is a file")
        if source.stat().st_size == 0:
            raise HSAMError(f"input file is empty (0 bytes): {source}; copy or export it again")
        if suffix_of(source) in (".nii", ".nii.gz"):
            check_nifti_complete(source)  # ITK reads a short NIfTI silently, padding with zeros
        if suffix_of(source) in (".mha", ".mhd"):
            _check_metaimage_header(source)  # ITK's MetaIO crashes the process on some hostile headers
        try:
            image = sitk.ReadImage(str(source))
        except RuntimeError as error:
            detail = str(error).strip().splitlines()[-1][:160] if str(error).strip() else "unknown reason"
            raise HSAMError(
                f"could not read {source.name}: the file is truncated, corrupt or not a supported image "
                f"(NIfTI, NRRD, MHA or a DICOM folder) [{detail}]"
            ) from None
    return check_volume(image, source.name)


def _check_metaimage_header(source: Path) -> None:
    """Raise HSAMError for a MetaImage header ITK must not see: ``NDims = 2147483648`` makes MetaIO segfault (found
    by Testing/test_fuzz_readers.py), so the size fields are checked here first."""
    bad = lambda why: HSAMError(f"could not read {source.name}: its MetaImage header is invalid ({why})")  # noqa: E731
    with open(source, "rb") as handle:
        head = handle.read(1 << 16)
    fields: dict[str, str] = {}
    for raw in head.split(b"\n"):
        key, sep, value = raw.decode("latin-1").partition("=")
        if not sep:
            continue
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    try:
        ndims = int(fields.get("NDims", "3"))
        sizes = [int(v) for v in fields.get("DimSize", "1").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
    except ValueError as error:
        raise bad(str(error)[:80]) from None
    if not 1 <= ndims <= 6:
        raise bad(f"NDims = {ndims}")
    if len(sizes) < ndims or any(not 0 < v < 2**31 for v in sizes[:ndims]):
        raise bad(f"DimSize = {fields.get('DimSize')!r} for NDims = {ndims}")
    if not 1 <= channels <= 1024 or header_size < -1:
        raise bad(f"ElementNumberOfChannels = {channels}, HeaderSize = {header_size}")
    # a geometry value near the float limit (TransformMatrix ... 1e308 ...) makes ITK loop forever
    for key in ("TransformMatrix", "Rotation", "Orientation", "Offset", "Position", "Origin", "ElementSpacing",
                "ElementSize", "CenterOfRotation"):
        try:
            values = [float(v) for v in fields.get(key, "").split()]
        except ValueError:
            raise bad(f"{key} = {fields[key][:40]!r}") from None
        if not all(abs(v) < 1e30 for v in values):  # also False for NaN and inf
            raise bad(f"{key} = {fields[key][:40]!r}")


def _read_dicom_folder(folder: Path, series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series under ``folder`` (see :func:`read_dicom_volume`)."""
    return read_dicom_volume(folder, series_uid)[0]


def read_dicom_volume(folder: str | os.PathLike[str], series_uid: str | None = None) -> tuple[sitk.Image, "DicomSeries"]:
    """Read one DICOM series under ``folder`` and return ``(image, series)``; ``series`` lists its source files.

    ``series_uid`` picks the series, else :func:`hsam.volume.dicom_series.pick_series` does and a UserWarning names
    it when the folder holds several; another says how files without a Series Instance UID were grouped. The image
    is checked like :func:`read_image`'s.
    """
    import warnings

    from hsam.volume.dicom_series import choose_series, describe_choice, read_series

    source = Path(folder)
    if not source.is_dir():
        raise HSAMError(f"{source} is not a DICOM folder; a DICOM SEG output needs the DICOM series as input (it "
                        "references the source images): give the series folder, or write .seg.nrrd / .nii.gz")
    chosen, found = choose_series(source, series_uid)
    if len(found) > 1 and not series_uid:
        warnings.warn(describe_choice(source, chosen, found), UserWarning, stacklevel=2)
    if chosen.note:  # grouped without a Series Instance UID, or copies left out: the user must know
        warnings.warn(f"{source.name}: {chosen.label()}: {chosen.note}", UserWarning, stacklevel=2)
    return check_volume(read_series(chosen), source.name), chosen


def check_volume(image: sitk.Image, name: str = "the image") -> sitk.Image:
    """Validate a CT volume: 3-D, one component per voxel, non-empty, finite. Returns the (possibly squeezed) image."""
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
    if dimension == 2:
        raise HSAMError(f"{name} is a 2-D image; H-SAM segments 3-D CT volumes (a NIfTI/NRRD volume or a DICOM series folder)")
    if dimension != 3:
        raise HSAMError(
            f"{name} is {dimension}-D (size {list(image.GetSize())}); give one 3-D CT volume, "
            "e.g. extract a single time point or phase first"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise HSAMError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector image); "
            "give a grey-scale CT volume"
        )
    if min(image.GetSize()) < 1:
        raise HSAMError(f"{name} has no voxels")
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        array = sitk.GetArrayViewFromImage(image)
        # slab by slab so a large volume does not need a full boolean copy
        for start in range(0, array.shape[0], 16):
            slab = array[start : start + 16]
            if not np.isfinite(slab).all():
                bad = int((~np.isfinite(slab)).sum())
                raise HSAMError(
                    f"{name} contains NaN or infinite voxels (at least {bad} in slices {start}-{start + len(slab) - 1}); "
                    "fix or mask them before segmenting"
                )
    return image


def read_labels(path: str | os.PathLike[str], reference: sitk.Image | None = None) -> sitk.Image:
    """Read a label map (NIfTI/NRRD/MHA), a Slicer ``.seg.nrrd`` or a DICOM SEG as a uint8 image of H-SAM label values.

    For ``.seg.nrrd`` and DICOM SEG, segments are matched to H-SAM organs by terminology (type + modifier) or name;
    others become 0; where organ segments of a ``.seg.nrrd`` overlap the higher label wins. The grid is the file's: a
    segmentation Slicer saved is cropped to its segments (:func:`hsam.volume.onto_grid` puts it back on the CT's
    grid). A DICOM SEG stores only the slices it segments, so it is placed on ``reference``'s grid (the CT) when
    given. Plain label maps are returned as stored (values must fit in 0..255).
    """
    source = Path(path)
    if not source.is_file():
        raise HSAMError(f"label file not found: {source}")
    if suffix_of(source) == ".seg.nrrd":
        return _read_seg_nrrd(source)
    if suffix_of(source) == ".dcm":
        from hsam.volume.dicom_seg import read_dicom_seg

        return read_dicom_seg(source, reference)
    if suffix_of(source) in (".mha", ".mhd"):
        _check_metaimage_header(source)
    try:
        image = sitk.ReadImage(str(source))
    except RuntimeError:
        raise HSAMError(f"could not read label map {source.name}: truncated, corrupt or unsupported") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise HSAMError(f"label map {source.name} must be a 3-D single-component image")
    array = sitk.GetArrayViewFromImage(image)
    if array.size and (array.min() < 0 or array.max() > 255 or np.any(np.mod(array, 1) != 0)):
        raise HSAMError(f"label map {source.name} holds values outside whole numbers 0..255")
    return sitk.Cast(image, sitk.sitkUInt8)


def _read_seg_nrrd(source: Path) -> sitk.Image:
    import slicerio.segmentation as slicerio_segmentation

    from hsam import labels as label_table

    try:
        segmentation = slicerio_segmentation.read_segmentation(str(source))
    except Exception as error:  # slicerio/pynrrd raise several types for a bad file
        detail = " ".join(str(error).split())[:160]  # their messages can span lines
        raise HSAMError(f"could not read segmentation {source.name}: {detail}") from None
    try:
        return _seg_to_image(segmentation, source, label_table)
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, np.linalg.LinAlgError) as error:
        # a damaged file can parse as NRRD yet hold nonsense segment fields or geometry
        raise HSAMError(f"could not read segmentation {source.name}: damaged segment or geometry fields "
                        f"({type(error).__name__}: {' '.join(str(error).split())[:100]})") from None


def _seg_to_image(segmentation: dict, source: Path, label_table) -> sitk.Image:
    """The H-SAM label image of a parsed .seg.nrrd (see :func:`_read_seg_nrrd`)."""
    voxels = np.asarray(segmentation["voxels"])  # pynrrd default: Fortran order (i, j, k[, list first])
    if voxels.ndim == 3:
        voxels = voxels[np.newaxis]
    elif voxels.ndim != 4:
        raise HSAMError(f"segmentation {source.name} has {voxels.ndim} dimensions; expected 3 or 4")
    out = np.zeros(voxels.shape[1:], dtype=np.uint8)
    organs = [(index, segment) for segment in segmentation.get("segments", [])
              if (index := _organ_of_segment(segment, label_table)) is not None]
    # overlapping segments (Slicer keeps them in separate layers): the higher H-SAM label wins, as in the module
    for index, segment in sorted(organs, key=lambda pair: pair[0]):
        layer = int(segment.get("layer", 0))
        out[voxels[layer] == int(segment.get("labelValue", 1))] = index
    image = sitk.GetImageFromArray(np.ascontiguousarray(out.transpose(2, 1, 0)))
    matrix = np.array(segmentation["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((matrix[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(matrix[:3, 3].tolist())
    return image


def _organ_of_segment(segment: dict, label_table) -> int | None:
    terminology = segment.get("terminology") or {}
    if not isinstance(terminology, dict):
        terminology = {}

    def code_value(key: str) -> str:  # a damaged file can hold short lists or other types here
        code = terminology.get(key)
        return str(code[1]) if isinstance(code, (list, tuple)) and len(code) > 1 and code[1] else ""

    type_code, modifier = code_value("type"), code_value("typeModifier")
    for entry in label_table.ORGANS:
        if type_code and type_code == entry.type_code[1] and modifier == entry.modifier_code[1]:
            return entry.index
    try:
        return label_table.organ(str(segment.get("name", "")).strip().lower()).index
    except KeyError:
        return None


def write_image(image: sitk.Image, path: str | os.PathLike[str], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> Path:
    """Write any image (labels, confidence) in the format its extension names (compressed where possible)."""
    target = check_writable(path, [s for s in suffixes if s not in (".seg.nrrd", ".dcm", ".mhd", ".nhdr")])

    def writer(temp: str) -> None:
        try:
            sitk.WriteImage(image, temp, useCompression=True)
        except RuntimeError as error:
            # ITK's message is a stack of lines: keep its "Reason:" line, else its last line
            lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["unknown ITK error"]
            reason = next((line for line in lines if line.startswith("Reason:")), lines[-1])
            raise OSError(reason.removeprefix("Reason:").strip()[:160]) from None

    return atomic_write(target, writer)


def write_labels(labels: sitk.Image, path: str | os.PathLike[str], organs: Sequence[int] | None = None) -> Path:
    """Write a uint8 H-SAM label image: ``.seg.nrrd`` (segments with names, colours, terminology) or a label map."""
    if suffix_of(path) == ".seg.nrrd":
        return write_segmentation(labels, path, organs)
    return write_image(labels, path, LABEL_SUFFIXES)


def write_segmentation(labels: sitk.Image, path: str | os.PathLike[str], organs: Sequence[int] | None = None) -> Path:
    """Write a Slicer ``.seg.nrrd``: one shared labelmap layer, one segment per organ with name, colour, terminology."""
    import slicerio.segmentation as slicerio_segmentation

    from hsam import labels as label_table

    target = check_writable(path, (".seg.nrrd",))
    array = sitk.GetArrayViewFromImage(labels)  # [z, y, x]
    # Slicer crops each segment to its Extent (i, j, k order): state the full grid, since slicerio would derive it
    # from the C-order array shape and write it reversed (k, j, i)
    size_x, size_y, size_z = labels.GetSize()
    extent = [0, size_x - 1, 0, size_y - 1, 0, size_z - 1]
    direction = np.array(labels.GetDirection(), dtype=float).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(labels.GetSpacing())
    ijk_to_lps[:3, 3] = labels.GetOrigin()
    segmentation = {
        "voxels": np.ascontiguousarray(array, dtype=np.uint8),
        "ijkToLPS": ijk_to_lps.tolist(),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [{**segment, "extent": extent}
                     for segment in label_table.segment_metadata(list(organs) if organs is not None else None)],
    }

    def writer(temp: str) -> None:
        # the array is [z, y, x] in C order, i.e. (i, j, k) in Fortran order
        slicerio_segmentation.write_segmentation(temp, segmentation, index_order="C")

    return atomic_write(target, writer)


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-5) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tolerance``)."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )
