"""DICOM SEG in and out: H-SAM label maps written as DICOM Segmentation objects (highdicom) and read back.

Writing needs the source series: the SEG references every source instance, copies the patient and study attributes
and lies on the source's slices, which is what a PACS and Slicer's DICOM browser need to show it over the CT. A
source whose UIDs an anonymiser removed cannot be referenced and is refused (:func:`read_sources`), unless new UIDs
are asked for. Each organ found becomes one segment with the label table's SNOMED CT codes, name and display colour,
and the model as the algorithm (id, revision = id + short weights SHA-256, full SHA-256); the SEG says which organs
were looked for and not found, and whether the model is a demo. BINARY uncompressed is the default (every reader
opens it); LABELMAP, RLE and deflate are options (:class:`SegOptions`).

Reading matches segments to H-SAM organs by terminology code first (SNOMED CT, also the retired SRT codes older files
such as dcmqi's carry), then by name. A SEG stores only the frames that hold a segment, so it is placed on a reference
grid (the CT, or the label volume it is compared with); without one, the grid spans its frames.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from hsam.errors import HSAMError

SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "binary",  # Segmentation Storage (BINARY or FRACTIONAL)
    "1.2.840.10008.5.1.4.1.1.66.7": "labelmap",  # Label Map Segmentation Storage (DICOM 2024)
}
# Whole-organ SNOMED CT codes some tools (e.g. TotalSegmentator) use instead of Kidney + a laterality modifier.
_LATERAL_KIDNEY_CODES = {"9846003": "kidney_right", "18639004": "kidney_left"}
_POSITION_TOLERANCE = 0.01  # voxels: how far a frame may sit from a grid point and still be "on" it


@dataclass(frozen=True)
class Algorithm:
    """The model that made a segmentation, as DICOM SEG's Algorithm Identification records it."""

    name: str  # model id
    version: str  # the model's revision: its id and the short SHA-256 of its weights (see :func:`algorithm_version`)
    weights_sha256: str = ""
    demo: bool = False  # the model card says demo: the SEG says "demo model, not for clinical use"


@dataclass(frozen=True)
class SegOptions:
    """How the SEG is encoded and what it may change (the defaults are what every reader opens)."""

    seg_type: str = "binary"  # "binary" (one frame per segment and slice) or "labelmap" (DICOM 2024, one per slice)
    compress: str = "none"  # "none", "rle" (RLE Lossless pixel data) or "deflate" (the whole data set deflated)
    new_uids: bool = False  # make up the source UIDs an anonymiser removed (the SEG then says so)
    min_voxels: int = 0  # organs with fewer voxels are left out (and named in the SEG); 0 keeps every one

    def check(self) -> None:
        """HSAMError for a combination that cannot be written."""
        if self.seg_type not in SEG_TYPES or self.compress not in SEG_COMPRESSIONS or self.min_voxels < 0:
            raise HSAMError(f"unknown DICOM SEG encoding {self.seg_type}/{self.compress}/{self.min_voxels}; use "
                            f"{'|'.join(SEG_TYPES)}, {'|'.join(SEG_COMPRESSIONS)} and a voxel count of 0 or more")
        if self.seg_type == "binary" and self.compress == "rle":
            raise HSAMError("--dicom-compress rle needs --dicom-seg-type labelmap (BINARY frames are bit-packed and "
                            "the SEG writer, highdicom, allows no RLE for them); use --dicom-compress deflate instead")


SEG_TYPES = ("binary", "labelmap")
SEG_COMPRESSIONS = ("none", "rle", "deflate")
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def algorithm_version(model_id: str, weights_sha256: str) -> str:
    """Algorithm Version (LO, 64 characters): the model id and its revision, the weights' short SHA-256."""
    return f"{model_id} sha256:{weights_sha256[:12]}"[:64] if weights_sha256 else model_id[:64]


# ---------------------------------------------------------------------------------------------------------- sources
def read_sources(source_files: Sequence[str | os.PathLike[str]], new_uids: bool = False) -> tuple[list, str]:
    """The source instances' headers, ready to be referenced, and a note of the UIDs made up ("" when none).

    SOP Class and Instance UIDs an anonymiser emptied are taken from the file meta. Raises HSAMError when the UIDs
    a SEG must reference (SOP Instance, unique; SOP Class; Study, Series and Frame of Reference, one each) are
    missing, unless ``new_uids``: then they are made up and the note says which.
    """
    import pydicom

    from hsam.volume.dicom_series import instance_uids

    sources = []
    for file in source_files:
        try:
            source = pydicom.dcmread(file, stop_before_pixels=True, force=True)
        except Exception as error:  # pydicom raises several types for a damaged file
            raise HSAMError(f"could not read source DICOM {Path(file).name}: {' '.join(str(error).split())[:120]}") from None
        if int(source.get("NumberOfFrames", 1) or 1) > 1:
            raise HSAMError("a DICOM SEG over a multi-frame (enhanced) image is not written yet (its frames are "
                            "referenced differently); write .seg.nrrd or .nii.gz instead")
        sop_class, instance = instance_uids(source)
        source.SOPClassUID, source.SOPInstanceUID = sop_class, instance
        sources.append(source)
    missing = _missing_uids(sources)
    if missing and not new_uids:
        raise HSAMError(f"cannot write a DICOM SEG over this series: it has {'; '.join(missing)} (an anonymiser removed "
                        "them?), so the SEG could not reference its images; write .seg.nrrd or .nii.gz instead, or "
                        "pass --dicom-new-uids to make up new UIDs that the SEG states and only it carries")
    return sources, (_make_up_uids(sources, missing) if missing else "")


def _missing_uids(sources: list) -> list[str]:
    """What the sources lack for a SEG to reference them: one phrase per problem, [] when nothing."""
    missing = []
    instances = [str(s.get("SOPInstanceUID", "") or "") for s in sources]
    if not all(instances):
        missing.append(f"no SOP Instance UID in {sum(not i for i in instances)} of {len(sources)} files")
    elif len(set(instances)) < len(instances):
        missing.append(f"{len(instances) - len(set(instances))} duplicate SOP Instance UID(s)")
    if not all(str(s.get("SOPClassUID", "") or "") for s in sources):
        missing.append("no SOP Class UID")
    for keyword, name in (("StudyInstanceUID", "Study"), ("SeriesInstanceUID", "Series"),
                          ("FrameOfReferenceUID", "Frame of Reference")):
        values = {str(s.get(keyword, "") or "").strip() for s in sources}
        if "" in values or len(values) != 1:
            missing.append(f"no {name} Instance UID" if "" in values else f"{len(values)} different {name} UIDs")
    return [m.replace("Frame of Reference Instance UID", "Frame of Reference UID") for m in missing]


def _make_up_uids(sources: list, missing: list[str]) -> str:
    """Give the sources the UIDs they lack (in memory only) and return the note the SEG carries."""
    from pydicom.uid import generate_uid

    made = []
    for keyword, name in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
                          ("FrameOfReferenceUID", "frame of reference")):
        values = {str(s.get(keyword, "") or "").strip() for s in sources}
        if "" in values or len(values) != 1:
            uid = generate_uid()
            for source in sources:
                setattr(source, keyword, uid)
            made.append(name)
    seen: set[str] = set()
    renamed = 0
    for source in sources:
        if not source.SOPClassUID:
            source.SOPClassUID = _CT_IMAGE_STORAGE
        if not source.SOPInstanceUID or source.SOPInstanceUID in seen:
            source.SOPInstanceUID = generate_uid()
            renamed += 1
        seen.add(source.SOPInstanceUID)
    if renamed:
        made.append(f"{renamed} image")
    return (f"The source series had {'; '.join(missing)}: --dicom-new-uids made up new {', '.join(made)} UIDs, "
            "which only this SEG carries (it cannot be matched to the source images in a PACS).")


# ---------------------------------------------------------------------------------------------------------- writing
def write_dicom_seg(
    labels: sitk.Image,
    path: str | os.PathLike[str],
    source_files: Sequence[str | os.PathLike[str]],
    algorithm: Algorithm,
    organs: Sequence[int] | None = None,
    options: SegOptions = SegOptions(),
) -> Path:
    """Write ``labels`` (uint8 H-SAM values on the grid of the source series) as a DICOM SEG, atomically.

    ``source_files`` are the series' instances; every one is referenced. ``organs`` are the organs looked for
    (default: all): those found become segments, the others are named as not found in the SEG's Image Comments.
    Raises HSAMError when the sources cannot be referenced (:func:`read_sources`), the labels are not on the
    source grid, or no organ was found.
    """
    import highdicom as hd
    import pydicom

    from hsam import labels as label_table
    from hsam.volume.files import atomic_write, check_writable

    target = check_writable(path, (".dcm",))
    options.check()
    sources, uid_note = read_sources(source_files, options.new_uids)
    slices = _slice_indices(labels, sources)
    array = sitk.GetArrayViewFromImage(labels)  # [z, y, x]: y = rows, x = columns, as DICOM frames
    frames = np.stack([array[k] for k in slices])
    looked_for = [o.index for o in label_table.ORGANS] if organs is None else sorted(set(organs))
    counts = np.bincount(frames.ravel(), minlength=256)
    wanted = [i for i in looked_for if counts[i] >= max(1, options.min_voxels)]
    if not wanted:
        raise HSAMError("no organ was found, so there is no segment to write as DICOM SEG; check the input or write "
                        "a label map (.nii.gz) instead")
    # segment numbers must run 1..n: organs found map to them in label-table order
    lookup = np.zeros(256, dtype=np.uint8)
    for number, index in enumerate(wanted, start=1):
        lookup[index] = number
    comments = _comments(algorithm, looked_for, wanted, counts, options.min_voxels, uid_note)
    descriptions = _segment_descriptions(hd, pydicom, label_table, algorithm, wanted)
    first = sources[0]
    # SliceThickness is type 2 (may be absent or empty) but highdicom reads it from the first source: the in-memory
    # header (never written back) gets the slice spacing then. SpacingBetweenSlices lets readers rebuild the grid.
    if first.get("SliceThickness", None) in (None, ""):
        first.SliceThickness = float(labels.GetSpacing()[2])
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=[float(v) for v in first.PixelSpacing],
        slice_thickness=float(first.SliceThickness),
        spacing_between_slices=float(labels.GetSpacing()[2]),
    )
    with warnings.catch_warnings():  # a source's one-part patient name ("JANCT000") is kept as it is, not "fixed"
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        try:
            seg = _segmentation(hd, sources, lookup[frames], descriptions, algorithm, measures, options,
                                f"H-SAM {len(wanted)} of {len(looked_for)} organs found")
        except (ValueError, TypeError, AttributeError, KeyError) as error:  # highdicom's checks of the sources
            raise HSAMError(f"could not build a DICOM SEG over this series (highdicom: {type(error).__name__}: "
                            f"{' '.join(str(error).split())[:160]})") from None
    seg.ImageComments = comments
    if options.compress == "deflate":
        seg.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    return atomic_write(target, lambda temp: seg.save_as(temp, enforce_file_format=True))


def _comments(algorithm: Algorithm, looked_for: list[int], wanted: list[int], counts: np.ndarray, min_voxels: int,
              uid_note: str) -> str:
    """Image Comments: the model, demo or not, which organs were looked for and not found, specks left out, UIDs."""
    from hsam import labels as label_table

    def names(indices: list[int]) -> str:
        return ", ".join(label_table.organ(i).display_name for i in indices) or "none"

    absent = [i for i in looked_for if counts[i] == 0]
    small = [i for i in looked_for if 0 < counts[i] < min_voxels]
    parts = [f"Automatic segmentation by H-SAM model {algorithm.version}."]
    if algorithm.demo:
        parts.append("Demo model, not for clinical use.")
    parts.append(f"Organs looked for: {names(looked_for)}. Found: {names(wanted)}. Not found: {names(absent)}.")
    if small:
        parts.append(f"Found but left out as smaller than {min_voxels} voxels (--dicom-min-voxels): "
                     + ", ".join(f"{label_table.organ(i).display_name} ({counts[i]} voxels)" for i in small) + ".")
    if uid_note:
        parts.append(uid_note)
    return " ".join(parts)


def _segment_descriptions(hd, pydicom, label_table, algorithm: Algorithm, wanted: list[int]) -> list:  # noqa: ANN001
    """One SegmentDescription per organ found: SNOMED CT codes, name, colour, the model as the algorithm."""
    from pydicom.uid import generate_uid

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=pydicom.sr.codedict.codes.cid7162.ArtificialIntelligence,
        version=algorithm.version,
        source="HSAMSlicer",
        parameters={"weights_sha256": algorithm.weights_sha256} if algorithm.weights_sha256 else None,
    )
    descriptions = []
    for number, index in enumerate(wanted, start=1):
        organ = label_table.organ(index)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=organ.display_name,
            segmented_property_category=hd.sr.CodedConcept(*_value_first(label_table.ANATOMICAL_STRUCTURE)),
            segmented_property_type=hd.sr.CodedConcept(*_value_first(organ.type_code)),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=identification,
            tracking_id=organ.name,
            tracking_uid=generate_uid(),
            display_color=hd.color.CIELabColor.from_rgb(*organ.rgb),
        )
        if organ.modifier_code != label_table.NO_CODE:  # left/right kidney: Kidney + laterality, as Slicer writes it
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(*_value_first(organ.modifier_code))
            ]
        descriptions.append(description)
    return descriptions


def _segmentation(hd, sources: list, pixel_array: np.ndarray, descriptions: list, algorithm: Algorithm,  # noqa: ANN001
                  measures, options: SegOptions, summary: str):  # noqa: ANN001
    """The highdicom Segmentation object (new UIDs; patient, study and references taken from ``sources``)."""
    from pydicom.uid import RLELossless, generate_uid

    from hsam import __version__

    first = sources[0]
    try:
        series_number = int(first.get("SeriesNumber", 0) or 0) + 1000  # sorts after its CT in a PACS series list
    except (TypeError, ValueError):
        series_number = 1000
    demo = ", demo model, not for clinical use" if algorithm.demo else ""
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=(hd.seg.SegmentationTypeValues.LABELMAP if options.seg_type == "labelmap"
                           else hd.seg.SegmentationTypeValues.BINARY),
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="HSAMSlicer",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=f"hsam {__version__}",
        device_serial_number="none",
        content_label="HSAM",
        content_description=(summary + demo)[:64],
        content_creator_name="HSAMSlicer^",  # type 2; the trailing caret: one-part name, as PN wants it written
        series_description=(f"H-SAM organs{demo}" if demo else f"H-SAM organs ({algorithm.name})")[:64],
        # '' (as GE writes it) means the default repertoire
        specific_character_set=first.get("SpecificCharacterSet", None) or None,
        pixel_measures=measures,
        transfer_syntax_uid=RLELossless if options.compress == "rle" else "1.2.840.10008.1.2.1",
    )


def _value_first(code: tuple[str, str, str]) -> tuple[str, str, str]:
    """(scheme, value, meaning) as the label table keeps codes -> (value, scheme, meaning) as CodedConcept takes them."""
    scheme, value, meaning = code
    return value, scheme, meaning


def _slice_indices(labels: sitk.Image, sources: list) -> list[int]:
    """The label slice of each source instance; HSAMError unless the sources tile the label grid exactly."""
    direction = np.array(labels.GetDirection()).reshape(3, 3)
    size = labels.GetSize()
    indices = []
    for source in sources:
        try:
            orientation = np.array([float(v) for v in source.ImageOrientationPatient])
            position = [float(v) for v in source.ImagePositionPatient]
            rows, columns = int(source.Rows), int(source.Columns)
            row_spacing, column_spacing = (float(v) for v in source.PixelSpacing)
        except Exception:  # noqa: BLE001 (missing or undecodable values; pydicom raises many types)
            raise HSAMError("a source instance has no readable image geometry (orientation, position, size, pixel "
                            "spacing); a DICOM SEG needs an image series") from None
        if (columns, rows) != size[:2] or not (
            np.allclose(orientation[:3], direction[:, 0], atol=1e-4)
            and np.allclose(orientation[3:], direction[:, 1], atol=1e-4)
            and np.allclose((column_spacing, row_spacing), labels.GetSpacing()[:2], rtol=1e-4)
        ):
            raise HSAMError("the labels are not on the grid of the source DICOM series (they were resampled or come "
                            "from another series); segment the DICOM folder itself to write a DICOM SEG")
        index = np.array(labels.TransformPhysicalPointToContinuousIndex(position))
        k = int(round(index[2]))
        if np.abs(index[:2]).max() > _POSITION_TOLERANCE or abs(index[2] - k) > _POSITION_TOLERANCE or not 0 <= k < size[2]:
            raise HSAMError("a source DICOM slice lies off the label grid; segment the DICOM folder itself to write "
                            "a DICOM SEG")
        indices.append(k)
    if sorted(indices) != list(range(size[2])):
        raise HSAMError(f"the source series has {len(sources)} slices for {size[2]} label slices (missing or duplicate "
                        "slices); segment the DICOM folder itself to write a DICOM SEG")
    return indices


# ---------------------------------------------------------------------------------------------------------- reading
def is_dicom_seg(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a file holding a DICOM Segmentation object (read by header, not by name)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not DICOM, unreadable: not a SEG
        return False
    return str(header.get("SOPClassUID", "")) in SEG_SOP_CLASSES


@dataclass
class _Frames:
    """The decoded frames of one SEG: organ index per frame, positions, in-plane geometry."""

    masks: np.ndarray  # [frames, rows, columns] bool
    organs: list[int]  # H-SAM organ per frame (0: a segment of no H-SAM organ)
    positions: np.ndarray  # [frames, 3] mm
    orientation: np.ndarray  # (6,) row direction, column direction
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    slice_spacing: float | None


def _read_frames(path: Path) -> _Frames:
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # pydicom raises several types for a damaged file
        raise HSAMError(f"could not read DICOM file {path.name}: {' '.join(str(error).split())[:120]}") from None
    kind = SEG_SOP_CLASSES.get(str(ds.get("SOPClassUID", "")))
    if kind is None:
        raise HSAMError(f"{path.name} is not a DICOM SEG (SOP class {ds.get('SOPClassUID', 'none')}); give a DICOM "
                        "Segmentation object or a label volume")
    try:
        segment_organs = {int(item.SegmentNumber): organ_of_segment(item) for item in ds.SegmentSequence}
        pixels = np.asarray(ds.pixel_array)
        frames = pixels.reshape(int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns))
        shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
        per_frame = ds.PerFrameFunctionalGroupsSequence

        def group(index: int, name: str):
            item = per_frame[index]
            if name in item:
                return item[name].value[0]
            if shared is not None and name in shared:
                return shared[name].value[0]
            raise KeyError(name)

        orientation = np.array([float(v) for v in group(0, "PlaneOrientationSequence").ImageOrientationPatient])
        measures = group(0, "PixelMeasuresSequence")
        pixel_spacing = tuple(float(v) for v in measures.PixelSpacing)
        between = measures.get("SpacingBetweenSlices", None)
        positions = np.array([[float(v) for v in group(i, "PlanePositionSequence").ImagePositionPatient]
                              for i in range(len(frames))])
        if kind == "labelmap":  # one frame per slice, pixel value = segment number
            masks, organs = [], []
            for number, organ in segment_organs.items():
                masks.append(frames == number)
                organs.append(organ or 0)
            n = len(frames)
            masks_array = np.concatenate(masks) if masks else np.zeros((0,) + frames.shape[1:], bool)
            positions = np.tile(positions, (len(organs), 1))
            frame_organs = [o for o in organs for _ in range(n)]
        else:
            numbers = [int(group(i, "SegmentIdentificationSequence").ReferencedSegmentNumber) for i in range(len(frames))]
            if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
                masks_array = frames > float(ds.get("MaximumFractionalValue", 255)) / 2
            else:
                masks_array = frames > 0
            frame_organs = [segment_organs.get(n) or 0 for n in numbers]
    except Exception as error:  # noqa: BLE001 (pydicom decodes values and pixels on access; many error types)
        raise HSAMError(f"could not read DICOM SEG {path.name}: missing or damaged frame fields "
                        f"({type(error).__name__}: {' '.join(str(error).split())[:80]})") from None
    if not any(frame_organs):
        names = ", ".join(str(item.get("SegmentLabel", "?")) for item in ds.SegmentSequence)
        raise HSAMError(f"DICOM SEG {path.name} has no segment of an H-SAM organ (segments: {names}); its codes or "
                        "names must denote spleen, kidneys, gallbladder, liver, stomach, aorta or pancreas")
    return _Frames(masks_array, frame_organs, positions, orientation, pixel_spacing,  # type: ignore[arg-type]
                   float(between) if between not in (None, "") else None)


def organ_of_segment(item) -> int | None:
    """The H-SAM organ a SegmentSequence item denotes: by SNOMED CT type (+ laterality modifier), else by name."""
    from pydicom.sr._snomed_dict import mapping as snomed

    from hsam import labels as label_table

    def sct(code) -> str:  # SNOMED CT code value; SRT (the retired SNOMED RT scheme) translated
        scheme, value = str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", ""))
        return snomed["SRT"].get(value, "") if scheme == "SRT" else value if scheme in ("SCT", "SNM3") else ""

    types = item.get("SegmentedPropertyTypeCodeSequence", None) or []
    if types:
        type_code = sct(types[0])
        modifiers = types[0].get("SegmentedPropertyTypeModifierCodeSequence", None) or []
        modifier = sct(modifiers[0]) if modifiers else ""
        if type_code in _LATERAL_KIDNEY_CODES:
            return label_table.organ(_LATERAL_KIDNEY_CODES[type_code]).index
        for organ in label_table.ORGANS:
            if type_code == organ.type_code[1] and modifier == organ.modifier_code[1]:
                return organ.index
    return organ_of_name(str(item.get("SegmentLabel", "")))


def organ_of_name(name: str) -> int | None:
    """The H-SAM organ a segment name denotes: ``liver``, ``Right Kidney``, ``kidney_left``, ``gall bladder``..."""
    from hsam import labels as label_table

    words = name.strip().lower().replace("-", " ").replace("_", " ").split()
    if words and words[0] in ("left", "right") and len(words) == 2:
        words = [words[1], words[0]]  # "right kidney" -> "kidney right"
    for key in ("_".join(words), " ".join(words), "".join(words)):
        try:
            return label_table.organ(key).index
        except KeyError:
            continue
    return None


def _grid_of_frames(frame_sets: Sequence[_Frames]) -> sitk.Image:
    """An empty uint8 image whose slices span every frame (frames of all sets must share their in-plane geometry)."""
    first = frame_sets[0]
    for other in frame_sets[1:]:
        if not (np.allclose(other.orientation, first.orientation, atol=1e-4)
                and np.allclose(other.pixel_spacing, first.pixel_spacing, rtol=1e-4)
                and other.masks.shape[1:] == first.masks.shape[1:]):
            raise HSAMError("the DICOM SEGs have different slice orientations or pixel grids; compare each with a "
                            "label volume on its CT grid instead")
    row, column = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, column)
    positions = np.concatenate([f.positions for f in frame_sets])
    along = positions @ normal
    unique = np.unique(np.round(along, 3))
    gaps = np.diff(unique)
    spacing = first.slice_spacing or (float(gaps.min()) if len(gaps) else 1.0)
    count = int(round((unique[-1] - unique[0]) / spacing)) + 1 if len(unique) else 1
    origin = positions[int(np.argmin(along))]
    image = sitk.Image(first.masks.shape[2], first.masks.shape[1], count, sitk.sitkUInt8)
    image.SetSpacing((first.pixel_spacing[1], first.pixel_spacing[0], spacing))
    image.SetDirection(np.column_stack([row, column, normal]).flatten().tolist())
    image.SetOrigin(origin.tolist())
    return image


def _place(frames: _Frames, grid: sitk.Image, name: str) -> sitk.Image:
    """Paint each frame's organ onto ``grid`` (same points, any axis order or flip); HSAMError when off the grid."""
    out = np.zeros(sitk.GetArrayViewFromImage(grid).shape, dtype=np.uint8)  # [z, y, x]
    xyz = out.transpose(2, 1, 0)  # a view indexed (x, y, z) like ITK indices
    size = np.array(grid.GetSize())
    row, column = frames.orientation[:3], frames.orientation[3:]
    rows, columns = frames.masks.shape[1:]

    def index(point: np.ndarray) -> np.ndarray:
        return np.array(grid.TransformPhysicalPointToContinuousIndex(point.tolist()))

    off_grid = HSAMError(f"{name} does not lie on the grid of the image it is read with (different slices, pixel "
                         "size or field of view); use the CT series it was made on, or resample")
    origin_index = index(frames.positions[0]) if len(frames.positions) else np.zeros(3)
    step_column = index(frames.positions[0] + row * frames.pixel_spacing[1]) - origin_index
    step_row = index(frames.positions[0] + column * frames.pixel_spacing[0]) - origin_index
    axis_c, axis_r = int(np.argmax(np.abs(step_column))), int(np.argmax(np.abs(step_row)))
    unit_c = (np.eye(3, dtype=int)[axis_c] * int(np.sign(step_column[axis_c])))
    unit_r = (np.eye(3, dtype=int)[axis_r] * int(np.sign(step_row[axis_r])))
    if axis_c == axis_r or not (np.allclose(step_column, unit_c, atol=1e-3) and np.allclose(step_row, unit_r, atol=1e-3)):
        raise off_grid
    axis_k = 3 - axis_c - axis_r
    for mask, organ, position in zip(frames.masks, frames.organs, frames.positions):
        if not organ or not mask.any():
            continue
        start = index(position)
        rounded = np.round(start).astype(int)
        if np.abs(start - rounded).max() > _POSITION_TOLERANCE:
            raise off_grid
        end = (rounded + (columns - 1) * unit_c + (rows - 1) * unit_r).astype(int)
        if (np.minimum(rounded, end) < 0).any() or (np.maximum(rounded, end) >= size).any():
            raise off_grid
        block = mask[:, ::-1] if unit_c[axis_c] < 0 else mask  # [rows, columns], columns now ascending on axis_c
        block = block[::-1, :] if unit_r[axis_r] < 0 else block
        selector: list = [0, 0, 0]
        selector[axis_c] = slice(min(rounded[axis_c], end[axis_c]), max(rounded[axis_c], end[axis_c]) + 1)
        selector[axis_r] = slice(min(rounded[axis_r], end[axis_r]), max(rounded[axis_r], end[axis_r]) + 1)
        selector[axis_k] = int(rounded[axis_k])
        region = xyz[tuple(selector)]  # 2-D, axes in ITK order of (axis_c, axis_r)
        region[(block.T if axis_c < axis_r else block)] = organ
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(grid)
    return image


def read_dicom_seg(path: str | os.PathLike[str], reference: sitk.Image | None = None) -> sitk.Image:
    """A DICOM SEG as a uint8 H-SAM label image on ``reference``'s grid (default: the grid its frames span).

    Segments that denote no H-SAM organ are left out; where segments overlap, the later one wins.
    """
    source = Path(path)
    frames = _read_frames(source)
    return _place(frames, reference if reference is not None else _grid_of_frames([frames]), source.name)


def read_dicom_segs_on_common_grid(paths: Sequence[str | os.PathLike[str]]) -> list[sitk.Image]:
    """Several DICOM SEGs (e.g. a prediction and a reference) on the one grid that spans all their frames."""
    frame_sets = [_read_frames(Path(p)) for p in paths]
    grid = _grid_of_frames(frame_sets)
    return [_place(f, grid, Path(p).name) for f, p in zip(frame_sets, paths)]
