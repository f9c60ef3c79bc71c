"""Which segmentations are this module's results, and whether the user has changed one since it was made.

The rule (``product.md``, "The correction loop"): a run never deletes or overwrites a result the user edited. A run
may replace only a result that is still exactly what the module wrote. To tell, every result records at creation

- its own node ID (``HSAMSlicer.ResultNodeID``): ``vtkMRMLNode::Copy`` copies attributes and node references, so a
  copy the user made (Subject Hierarchy "Clone", ``Copy``) carries the result's tag and its CT reference too; its ID
  differs, so it is the user's segmentation, never a result;
- a fingerprint of its content (``HSAMSlicer.ContentHash``): segment IDs, names, colours, terminology and the voxels of
  each segment. Any edit in Segment Editor (paint, erase, add, delete, rename, recolour) changes it; an undo back to the
  original state restores it; display changes and the 3-D surface do not touch it.

Qt-free and GUI-free: the widget turns :class:`ResultsOfVolume` into a question.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import vtk

RESULT_ATTRIBUTE = "HSAMSlicer.Result"
SEGMENTATION = "segmentation"
ROLE_SOURCE = "HSAMSlicer.SourceVolume"
NODE_ID_ATTRIBUTE = "HSAMSlicer.ResultNodeID"
HASH_ATTRIBUTE = "HSAMSlicer.ContentHash"


@dataclass(frozen=True)
class EditedResult:
    """A result the user changed: the widget asks before a run may replace it. ``fingerprint`` is its content when
    the question was asked, so a replace chosen then never removes edits made later."""

    node_id: str
    name: str
    fingerprint: str


def _segment_voxels(segment) -> tuple[bytes, tuple[int, ...], np.ndarray]:
    """The segment's voxels as (geometry bytes, absolute bounding box, cropped bool mask): independent of the padding
    and of the shared layer (label value) Slicer happens to store them in."""
    import slicer
    from vtk.util.numpy_support import vtk_to_numpy

    labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if labelmap is None or labelmap.GetPointData().GetScalars() is None:
        return b"", (), np.zeros((0, 0, 0), dtype=bool)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    geometry = np.round([matrix.GetElement(r, c) for r in range(3) for c in range(4)], 3).tobytes()
    x0, x1, y0, y1, z0, z1 = labelmap.GetExtent()
    if x1 < x0 or y1 < y0 or z1 < z0:
        return geometry, (), np.zeros((0, 0, 0), dtype=bool)
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
    mask = values == segment.GetLabelValue()
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return geometry, (), np.zeros((0, 0, 0), dtype=bool)
        box.append((int(hits[0]), int(hits[-1]) + 1))
    cropped = mask[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]]
    absolute = (box[0][0] + z0, box[0][1] + z0, box[1][0] + y0, box[1][1] + y0, box[2][0] + x0, box[2][1] + x0)
    return geometry, absolute, cropped


def content_fingerprint(segmentation_node) -> str:
    """A hash of what the user sees and edits in a segmentation: per segment its ID, name, colour, terminology tag
    and voxels (bounding box in absolute voxel indices + packed mask)."""
    digest = hashlib.blake2b(digest_size=16)
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        terminology = vtk.mutable("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), terminology)
        colour = tuple(round(float(c), 4) for c in segment.GetColor())
        digest.update(repr((segment_id, segment.GetName(), colour, str(terminology))).encode())
        geometry, box, mask = _segment_voxels(segment)
        digest.update(geometry + repr(box).encode() + np.packbits(mask).tobytes())
    return digest.hexdigest()


def mark_result(segmentation_node) -> None:
    """Record the node's ID and content: call once the result is complete (after its last change)."""
    segmentation_node.SetAttribute(NODE_ID_ATTRIBUTE, segmentation_node.GetID())
    segmentation_node.SetAttribute(HASH_ATTRIBUTE, content_fingerprint(segmentation_node))


def is_result(node) -> bool:
    """This module made ``node`` (a copy of a result is not one: its ID differs from the recorded one)."""
    return (node is not None and node.IsA("vtkMRMLSegmentationNode")
            and node.GetAttribute(RESULT_ATTRIBUTE) == SEGMENTATION
            and node.GetAttribute(NODE_ID_ATTRIBUTE) == node.GetID())  # fmt: skip


def is_untouched(node) -> bool:
    """A result whose content is exactly what the module wrote (False for anything else, edited or not a result)."""
    recorded = node.GetAttribute(HASH_ATTRIBUTE) if is_result(node) else None
    return bool(recorded) and recorded == content_fingerprint(node)


@dataclass(frozen=True)
class ResultsOfVolume:
    """The module's earlier results for one CT: those a new run may replace, and those the user edited."""

    untouched: tuple  # segmentation nodes
    edited: tuple[EditedResult, ...]


def results_of_volume(scene, volume_node) -> ResultsOfVolume:
    """Sort the module's results for ``volume_node`` into untouched and edited ones."""
    untouched, edited = [], []
    collection = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for i in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(i)
        if not is_result(node) or node.GetNodeReferenceID(ROLE_SOURCE) != volume_node.GetID():
            continue
        fingerprint = content_fingerprint(node)
        if fingerprint == node.GetAttribute(HASH_ATTRIBUTE):
            untouched.append(node)
        else:
            edited.append(EditedResult(node.GetID(), node.GetName(), fingerprint))
    return ResultsOfVolume(tuple(untouched), tuple(edited))


def unique_name(scene, base: str, leaving: set[str]) -> str:
    """``base``, or ``base 2``, ``base 3`` ... when a segmentation that stays (ID not in ``leaving``) has that name."""
    collection = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    taken = {collection.GetItemAsObject(i).GetName() for i in range(collection.GetNumberOfItems())
             if collection.GetItemAsObject(i).GetID() not in leaving}  # fmt: skip
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base} {number}"
    return name
