"""Change one segment inside a box of the CT's voxel grid, and undo it: what a prompt's answer does to the scene.

Qt-free. Only the voxels inside the box ([k, j, i] crop of the volume's grid at ``offset``) are read and written, so
applying a prompt's mask costs milliseconds also on a 512 x 512 x 600 CT (a timer callback must stay under 50 ms).

Overlap rule: a prompt changes its own segment only. Voxels that belong to another segment are never taken from it
and are not added to the prompted segment either (the new mask is cut where other segments are), so no overlap is
created and no other segment changes. Before every change the segment's voxels in the box are kept, so
:meth:`UndoStack.undo` puts them back exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

Offset = tuple[int, int, int]  # (k, j, i) of the crop's first voxel


def _box_image(volume_node, offset: Offset, shape: tuple[int, int, int]):  # noqa: ANN001, ANN202 (VTK objects)
    """An empty vtkOrientedImageData on the volume's grid covering the crop (extent in i, j, k)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(matrix)
    (k0, j0, i0), (nk, nj, ni) = offset, shape
    image.SetExtent(i0, i0 + ni - 1, j0, j0 + nj - 1, k0, k0 + nk - 1)
    return image


def read_segment_box(segmentation_node, segment_id: str, volume_node, offset: Offset,  # noqa: ANN001
                     shape: tuple[int, int, int]) -> np.ndarray:
    """The segment's voxels in the crop as a bool array [k, j, i] (resampled if the segmentation's grid differs)."""
    stored = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, stored)
    reference = _box_image(volume_node, offset, shape)
    out = slicer.vtkOrientedImageData()
    empty = stored.GetPointData().GetScalars() is None or stored.IsEmpty()
    if empty or not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            stored, reference, out):  # fmt: skip
        return np.zeros(shape, dtype=bool)
    return vtk_to_numpy(out.GetPointData().GetScalars()).reshape(shape) > 0


def write_segment_box(segmentation_node, segment_id: str, volume_node, offset: Offset,  # noqa: ANN001
                      mask: np.ndarray) -> None:
    """Replace the segment's voxels in the crop by ``mask`` [k, j, i]; voxels outside the crop are kept."""
    image = _box_image(volume_node, offset, mask.shape)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE,
                                            image.GetExtent()):  # fmt: skip
        from hsam.errors import HSAMError

        raise HSAMError(f"Slicer could not change segment '{segment_id}'; report this bug")


def other_segments_box(segmentation_node, segment_id: str, volume_node, offset: Offset,  # noqa: ANN001
                       shape: tuple[int, int, int]) -> np.ndarray:
    """Voxels of the crop that belong to any segment but ``segment_id`` (bool [k, j, i])."""
    segmentation = segmentation_node.GetSegmentation()
    taken = np.zeros(shape, dtype=bool)
    for index in range(segmentation.GetNumberOfSegments()):
        other = segmentation.GetNthSegmentID(index)
        if other != segment_id:
            taken |= read_segment_box(segmentation_node, other, volume_node, offset, shape)
    return taken


@dataclass
class UndoStep:
    """A segment's voxels in a crop before one change."""

    segmentation_id: str
    segment_id: str
    offset: Offset
    before: np.ndarray  # bool [k, j, i]
    what: str  # "box on slice 12", "propagation over 9 slices"
    tag: Any = None  # the caller's record of the step (the prompt logic: the prompt process's step number)


@dataclass
class UndoStack:
    """The states before each prompt's change, newest last (one volume's session; cleared with it)."""

    steps: list[UndoStep] = field(default_factory=list)
    limit: int = 50

    def apply(self, segmentation_node, segment_id: str, volume_node, offset: Offset,  # noqa: ANN001
              answer: np.ndarray, what: str, tag: Any = None) -> int:
        """Apply a mask answer (uint8 crop: 0 keep, 1 clear, 2 organ) to the segment under the overlap rule,
        keeping the state before for undo. Returns the segment's voxel count in the crop afterwards."""
        shape = answer.shape
        before = read_segment_box(segmentation_node, segment_id, volume_node, offset, shape)
        others = other_segments_box(segmentation_node, segment_id, volume_node, offset, shape)
        after = np.where(answer == 0, before, (answer == 2) & ~others)
        self.steps = (self.steps + [UndoStep(segmentation_node.GetID(), segment_id, offset, before, what, tag)])[
            -self.limit:]
        write_segment_box(segmentation_node, segment_id, volume_node, offset, after)
        return int(after.sum())

    def undo(self, scene, volume_node) -> UndoStep | None:  # noqa: ANN001
        """Put back the newest kept state; returns its step (None when there is nothing to undo)."""
        while self.steps:
            step = self.steps.pop()
            node = scene.GetNodeByID(step.segmentation_id)
            if node is not None and node.GetSegmentation().GetSegment(step.segment_id) is not None:
                write_segment_box(node, step.segment_id, volume_node, step.offset, step.before)
                return step
        return None
