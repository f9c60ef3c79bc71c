"""Export a reviewed segmentation as a training case for ``hsam finetune``.

A case is a new folder under the export root holding::

    image.nii.gz            the CT, voxels and geometry as in Slicer
    labels.nii.gz           uint8 H-SAM label values (0 background, 1 spleen ... 8 pancreas) on the CT's grid
    segmentation.seg.nrrd   the segmentation as Slicer saves it (names, colours, terminology)
    hsam_labels.csv         the label table (Slicer colour table with terminology columns)
    provenance.json         model, times, which organs are labelled and which unknown, segments merged or left out,
                            and which organs and slices the user changed versus the stored prediction

Only what was labelled teaches: an organ without a segment (not run, or deleted) is "unknown", not background;
training masks it (hsam.training.losses) and validation does not score it. Several segments of one organ are merged.

provenance.json is written last, atomically: a folder without it is an interrupted export. An existing folder is never
written into; the case name gets a ``_2``, ``_3`` ... suffix instead.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from hsam.errors import HSAMError
from HSAMSlicerLib import geometry

CASE_FORMAT = "hsam-case/1"
IMAGE_FILE, LABELS_FILE, SEGMENTATION_FILE, TABLE_FILE, PROVENANCE_FILE = (
    "image.nii.gz", "labels.nii.gz", "segmentation.seg.nrrd", "hsam_labels.csv", "provenance.json",
)  # fmt: skip


_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def sanitize_case_name(name: str) -> str:
    """A folder name safe on every OS: letters, digits, '-', '_' and '.', no leading dot, at most 80 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "").strip("._-")[:80].strip("._-")
    if not cleaned or cleaned.upper() in _RESERVED:
        cleaned = "case"
    elif cleaned.split(".")[0].upper() in _RESERVED:  # Windows devices also with an extension ("con.nii", "COM2.a")
        cleaned = f"case_{cleaned}"[:80].rstrip("._-")
    return cleaned


def reserve_case_folder(root: Path, name: str) -> Path:
    """Create and return a new, empty ``root/name`` (or ``name_2``, ``name_3`` ...); never reuses a folder."""
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10000):
        candidate = root / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            candidate.mkdir()  # atomic: fails if it exists, so two exports can never share a folder
        except FileExistsError:
            continue
        return candidate
    raise HSAMError(f"too many cases named '{name}' in {root}: choose another export folder")


def segment_terminology(segment) -> str:
    """A segment's terminology entry, read from its tag (``vtkSegment.GetTerminology`` exists only from Slicer 5.10)."""
    value = vtk.mutable("")
    return str(value) if segment.GetTag(segment.GetTerminologyEntryTagName(), value) else ""


def organ_of_segment(segment) -> Any | None:
    """The hsam.labels organ a segment stands for: by terminology (type + modifier), else by ID tag, else by name."""
    from hsam.labels import ORGANS

    terminology = segment_terminology(segment)
    if terminology:
        parts = terminology.split("~")
        if len(parts) >= 4:
            type_value = parts[2].split("^")[1] if parts[2].count("^") >= 2 else ""
            modifier_value = parts[3].split("^")[1] if parts[3].count("^") >= 2 else ""
            for entry in ORGANS:
                if entry.type_code[1] == type_value and entry.modifier_code[1] == modifier_value:
                    return entry
    names = {segment.GetName().strip().lower().replace(" ", "_")}
    for entry in ORGANS:
        if names & {entry.name, entry.display_name.replace(" ", "_")}:
            return entry
    return None


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a bool [k, j, i] array on the CT's voxel grid (resampled if the segmentation's grid differs)."""
    scene = segmentation_node.GetScene()
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__HSAMSlicer_export__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, ids, temporary, volume_node
        )
        if not ok:
            raise HSAMError(f"Slicer could not export segment '{segment_id}'; report this bug")
        array = slicer.util.arrayFromVolume(temporary) != 0
    finally:
        display = temporary.GetDisplayNode()
        if display is not None and display.GetColorNode() is not None:
            scene.RemoveNode(display.GetColorNode())
        scene.RemoveNode(temporary)
    return array


@dataclass
class ExportedLabels:
    """What a segmentation holds as H-SAM labels on the CT grid, and how its segments were used."""

    labels: np.ndarray  # uint8 [k, j, i], H-SAM label values, 0 where no labelled organ is
    segments: dict[str, list[str]]  # organ name -> the IDs of its segments (several: merged, their union)
    ignored: list[str]  # names of segments that are none of the eight organs
    overlap: int  # voxels claimed by two organ segments (the higher label value wins)
    names: dict[str, str] = field(default_factory=dict)  # segment ID -> segment name

    def merged(self) -> dict[str, list[str]]:
        """Organ name -> segment names, for the organs whose segments were merged (two or more)."""
        return {organ: [self.names[i] for i in ids] for organ, ids in self.segments.items() if len(ids) > 1}


def collect_labels(segmentation_node, volume_node) -> ExportedLabels:
    """The segmentation as one H-SAM label array on the CT grid.

    Several segments of one organ (a copied or split segment, or the user's own "Liver" next to the result's) are
    merged: their union is the organ. Organs are painted in H-SAM order, so where two organ segments overlap the higher
    label wins.
    """
    shape = slicer.util.arrayFromVolume(volume_node).shape
    labels = np.zeros(shape, dtype=np.uint8)
    seen = np.zeros(shape, dtype=bool)
    segmentation = segmentation_node.GetSegmentation()
    matched: dict[int, tuple[Any, list[str]]] = {}
    ignored: list[str] = []
    names: dict[str, str] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        names[segment_id] = segment.GetName()
        entry = organ_of_segment(segment)
        if entry is None:
            ignored.append(segment.GetName())
            continue
        matched.setdefault(entry.index, (entry, []))[1].append(segment_id)
    overlap = 0
    for value in sorted(matched):
        entry, segment_ids = matched[value]
        mask = np.zeros(shape, dtype=bool)
        for segment_id in segment_ids:
            mask |= segment_array(segmentation_node, segment_id, volume_node)
        overlap += int(np.count_nonzero(mask & seen))
        seen |= mask
        labels[mask] = entry.index
    segments = {entry.name: ids for entry, ids in (matched[v] for v in sorted(matched))}
    return ExportedLabels(labels, segments, ignored, overlap, names)


def changes_versus_prediction(labels: np.ndarray, prediction: np.ndarray | None, organ_indices: list[int]) -> dict:
    """Per organ: changed?, voxels added/removed, and the slice indices k (array axis 0) that differ."""
    from hsam.labels import organ

    if prediction is None:
        return {"prediction_available": False, "organs": {}, "changed_organs": [], "changed_slices": []}
    organs: dict[str, dict] = {}
    all_slices: set[int] = set()
    for value in organ_indices:
        now, before = labels == value, prediction == value
        added, removed = now & ~before, before & ~now
        slices = sorted({int(k) for k in np.flatnonzero((added | removed).any(axis=(1, 2)))})
        all_slices.update(slices)
        organs[organ(value).name] = {
            "changed": bool(slices),
            "voxels_added": int(added.sum()),
            "voxels_removed": int(removed.sum()),
            "voxels_predicted": int(before.sum()),
            "voxels_final": int(now.sum()),
            "slices_changed": slices,
        }
    return {
        "prediction_available": True,
        "organs": organs,
        "changed_organs": [name for name, info in organs.items() if info["changed"]],
        "changed_slices": sorted(all_slices),
    }


def export_case(segmentation_node, output_root, *, volume_node=None, case_name: str | None = None) -> Path:
    """Write the case folder (module docstring) and return its path. Raises HSAMError for user-fixable problems."""
    from hsam import __version__
    from hsam.labels import ORGANS, write_color_table
    from hsam.volume import write_image
    from HSAMSlicerLib.nodes import PROVENANCE_KEYS, ROLE_PREDICTION, check_input_volume, provenance, source_volume
    from HSAMSlicerLib.results import RESULT_ATTRIBUTE

    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise HSAMError("no segmentation to export: run Segment organs first or select a segmentation")
    volume_node = volume_node or source_volume(segmentation_node)
    if volume_node is None:
        raise HSAMError(
            f"'{segmentation_node.GetName()}' is not linked to a CT: set its source volume in Segment Editor first"
        )
    check_input_volume(volume_node)
    if str(output_root or "").strip() in ("", "."):
        raise HSAMError("no export folder: choose a folder for the training cases")

    image = _image(volume_node)
    collected = collect_labels(segmentation_node, volume_node)
    labels = collected.labels
    if not collected.segments:
        raise HSAMError(
            f"'{segmentation_node.GetName()}' has no segment that is one of the eight H-SAM organs "
            "(matched by terminology or name): nothing to export"
        )
    prediction_node = segmentation_node.GetNodeReference(ROLE_PREDICTION)
    prediction = None
    if prediction_node is not None and prediction_node.GetAttribute(RESULT_ATTRIBUTE) is not None:
        prediction = slicer.util.arrayFromVolume(prediction_node)
        if prediction.shape != labels.shape:
            prediction = None  # the CT was changed after the run; differences would be meaningless
    attributes = provenance(segmentation_node)
    predicted_organs = [int(v) for v in attributes.get("Organs", "").split(",") if v.strip()]
    compared = sorted({o.index for o in ORGANS if o.name in collected.segments} | set(predicted_organs))
    for organ_name, names in collected.merged().items():
        warnings.warn(f"merged {len(names)} segments into {organ_name} (their union): {', '.join(names)}",
                      UserWarning, stacklevel=2)

    root = Path(output_root).expanduser()
    folder = reserve_case_folder(root, sanitize_case_name(case_name or volume_node.GetName()))
    try:
        # hsam.volume.write_image checks what it wrote: ITK's NIfTI writer reports success on a full disk
        write_image(image, folder / IMAGE_FILE)
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        write_image(label_image, folder / LABELS_FILE)
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(folder / SEGMENTATION_FILE))
        if not storage.WriteData(segmentation_node):
            raise HSAMError(f"could not write {folder / SEGMENTATION_FILE}: check free disk space and permissions")
        write_color_table(folder / TABLE_FILE)
        provenance = {
            "format": CASE_FORMAT,
            "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "hsam_version": __version__,
            "files": {"image": IMAGE_FILE, "labels": LABELS_FILE, "segmentation": SEGMENTATION_FILE,
                      "label_table": TABLE_FILE},  # fmt: skip
            "source": {
                "volume": volume_node.GetName(),
                "segmentation": segmentation_node.GetName(),
                "size_ijk": list(image.GetSize()),
                "spacing_mm": list(image.GetSpacing()),
                "slice_axis": "k (axis 0 of the [k, j, i] array; z of the NIfTI files)",
            },
            "model": {key: attributes[key] for key in PROVENANCE_KEYS if key in attributes} or None,
            # per organ: "labelled" (a segment of it was exported: its voxels, or its absence, are the truth) or
            # "unknown" (no segment: not run, or deleted; 0 in labels.nii.gz means "not known" there, and training
            # never teaches it as background)
            "organs": {o.name: "labelled" if o.name in collected.segments else "unknown" for o in ORGANS},
            "segments": {"exported": {organ: ids[0] for organ, ids in collected.segments.items()},
                         "merged": collected.merged(), "ignored": collected.ignored,
                         "overlapping_voxels": collected.overlap},  # fmt: skip
            "labels": {str(o.index): o.name for o in ORGANS},
            "changes": changes_versus_prediction(labels, prediction, compared),
        }
        _write_json_atomic(folder / PROVENANCE_FILE, provenance)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def describe_export(folder: Path) -> str:
    """One message saying what an exported case holds: the organs labelled, segments merged, segments left out and
    the organs left unknown (read from its provenance.json)."""
    from hsam.labels import organ

    provenance = json.loads((Path(folder) / PROVENANCE_FILE).read_text(encoding="utf-8"))
    organs, segments = provenance["organs"], provenance["segments"]
    labelled = [organ(name).display_name for name, state in organs.items() if state == "labelled"]
    unknown = [organ(name).display_name for name, state in organs.items() if state != "labelled"]
    text = f"Exported {len(labelled)} labelled organ(s) ({', '.join(labelled)}) to {folder}."
    for organ_name, names in segments.get("merged", {}).items():
        text += f" Merged {len(names)} segments into {organ(organ_name).display_name}: {', '.join(names)}."
    if segments.get("ignored"):
        text += f" Left out (not one of the eight organs): {', '.join(segments['ignored'])}."
    if unknown:
        text += f" Not labelled, so never taught as background: {', '.join(unknown)}."
    return text


def _image(volume_node) -> sitk.Image:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return geometry.image_from_array(slicer.util.arrayFromVolume(volume_node), geometry.vtk_matrix_to_numpy(matrix))


def _write_json_atomic(path: Path, data: dict) -> None:
    from hsam import atomic

    atomic.write_text(path, json.dumps(data, indent=2) + "\n")
