"""Box and click prompts on a CT in the scene -> voxels of one organ segment, through the warm prompt process.

Qt-free (issue 26). The widget turns markups into RAS positions (a ROI's bounds, fiducials' positions) and calls
:meth:`PromptLogic.box`, :meth:`PromptLogic.point`, :meth:`PromptLogic.propagate` and :meth:`PromptLogic.undo`; its
timer calls :meth:`PromptLogic.poll`, which never blocks: each request goes to ``hsam serve`` at once and its answer
is applied by the callback chain (prompt -> mask of the changed slices -> segment), then ``done(Outcome)`` reports.

Geometry: markups are in world RAS. A position is taken into the volume's own RAS through the volume's parent
transform, then to continuous IJK with the volume's IJK-to-RAS matrix (oblique directions included) to check that it
lies inside the CT and to name its slice. The engine gets the volume-local RAS millimetres (``"space": "ras"``): it
slices axially in physical space (its canonical grid), so a box stays a box on any grid, also one rotated in-plane,
where a box given by two voxel corners would not. The only rounding is the engine's, once, to its slice.

The engine's masks come back as a crop of the volume's grid holding only the changed slices
(``{"cmd": "mask"}``), and :class:`HSAMSlicerLib.segment_edit.UndoStack` writes them under its overlap rule: other
segments are never changed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import slicer
import vtk

from hsam.errors import HSAMError
from HSAMSlicerLib import kept, nodes
from HSAMSlicerLib.prompts import PromptProcess
from HSAMSlicerLib.segment_edit import UndoStack

EDGE_TOLERANCE = 0.5  # voxels: a position may lie on the CT's outer voxel faces


@dataclass(frozen=True)
class Outcome:
    """What one prompt, propagation or undo did, for the status line."""

    message: str
    voxels: int = 0  # the segment's voxels on the changed slices afterwards
    slices: tuple[int, ...] = ()  # canonical slices changed
    error: BaseException | None = None


Done = Callable[[Outcome], None]


class PromptLogic:
    """Prompts for one CT at a time. ``model``: whose TinyViT encoder the warm process uses (None: the default)."""

    def __init__(self, scene=None, model: str | None = None, child_env: dict[str, str] | None = None,  # noqa: ANN001
                 root: Path | None = None) -> None:
        from HSAMSlicerLib.logic import jobs_root

        self.scene = scene if scene is not None else slicer.mrmlScene
        self.model, self.child_env = model, dict(child_env or {})
        self.root = Path(root) if root is not None else jobs_root()
        self.process: PromptProcess | None = None
        self.volume_id: str | None = None
        self.undo_stack = UndoStack()
        self.before_change: Callable[[], None] | None = None  # the widget: Segment Editor's saveStateForUndo
        self._last_slice: dict[int, int] = {}  # organ -> canonical slice of its latest prompt (propagation start)
        self._masks = 0
        self._kept_stamp: float | None = None  # the kept embeddings the process was given (HSAMSlicerLib.kept.stamp)
        self.kept_slices = 0  # slices whose embedding the process reads from the automatic run instead of encoding
        self._step = 0  # the number of the latest change sent (prompt, propagation)
        logic = weakref.ref(self)
        self._observers = [self.scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent,
                                                  lambda caller, event: logic() is not None and logic().stop())]

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def removed(caller, event, node) -> None:  # noqa: ANN001
            if logic() is not None and node is not None and node.GetID() == logic().volume_id:
                logic().stop()

        self._observers.append(self.scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, removed))

    # ------------------------------------------------------------------ the process
    def open(self, volume_node) -> None:  # noqa: ANN001
        """Make ``volume_node`` the prompted CT: start the warm process for it (the old one ends). Writes the voxels
        once (uncompressed, in their own type: a fraction of a second) and returns without waiting."""
        from HSAMSlicerLib import geometry
        from HSAMSlicerLib.nrrd_input import write_volume_nrrd

        nodes.check_input_volume(volume_node)
        if self.process is not None and self.volume_id == volume_node.GetID() and not self.process.failed:
            fresh = self._fresh_embeddings(volume_node.GetID())
            if fresh is not None:  # an automatic run finished since: its embeddings spare the encoder
                self.process.send({"cmd": "embeddings", "folder": fresh}, self._took_embeddings)
            return
        self.stop()
        process = PromptProcess(self.model, root=self.root, env=self.child_env)
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        source = process.folder / "volume.nrrd"
        write_volume_nrrd(slicer.util.arrayFromVolume(volume_node), geometry.vtk_matrix_to_numpy(matrix), source)
        self.process, self.volume_id = process, volume_node.GetID()
        fresh = self._fresh_embeddings(volume_node.GetID())
        process.send({"cmd": "open", "volume": str(source), **({"embeddings": fresh} if fresh else {})},
                     self._took_embeddings)

    def _took_embeddings(self, answer: dict) -> None:
        self.kept_slices = int(answer.get("kept_slices", 0))

    def _fresh_embeddings(self, volume_id: str) -> str | None:
        """The folder of the slice embeddings the volume's latest automatic run kept (:mod:`HSAMSlicerLib.kept`)
        when the process has not been given them yet; else None."""
        stamp = kept.stamp(self.root, volume_id)
        if stamp is None or stamp == self._kept_stamp:
            return None
        self._kept_stamp = stamp
        return str(kept.folder_of(self.root, volume_id))

    def stop(self) -> None:
        """End the warm process and its whole group, remove its folder, forget the undo states (scene closed, volume
        removed, module closed)."""
        process, self.process, self.volume_id = self.process, None, None
        self._kept_stamp, self.kept_slices = None, 0
        self.undo_stack = UndoStack()
        self._last_slice = {}
        if process is not None:
            process.close()

    def poll(self) -> None:
        """Deliver the answers that arrived (the widget's timer; never blocks)."""
        if self.process is not None:
            self.process.poll()

    @property
    def busy(self) -> bool:
        return self.process is not None and self.process.pending > 0

    def notes(self) -> list[str]:
        """The process's restart (or stop) lines."""
        return list(self.process.notes) if self.process is not None else []

    def close(self) -> None:
        """Stop and stop observing the scene."""
        self.stop()
        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self._observers = []

    # ------------------------------------------------------------------ prompts
    def box(self, segmentation_node, segment_id: str, volume_node,  # noqa: ANN001 (MRML nodes)
            corners_ras: Sequence[Sequence[float]], done: Done | None = None) -> None:
        """A box prompt: world-RAS points whose in-plane extent is the box and whose mean height is the slice
        (two opposite corners, or a ROI's corners from :func:`roi_corners`). Replaces the organ's prompt there."""
        organ = self._organ(segmentation_node, segment_id)
        local = np.array([self.to_local(volume_node, p) for p in corners_ras])
        z = float(local[:, 2].mean())
        box = [float(local[:, 0].min()), float(local[:, 1].min()), float(local[:, 0].max()), float(local[:, 1].max())]
        k = [self.slice_of(volume_node, (x, y, z), local=True) for x, y in (box[:2], box[2:])][0]
        self._prompt({"cmd": "prompt", "organ": organ, "space": "ras", "z": z, "box": box},
                     segmentation_node, segment_id, volume_node, f"box on slice {k}", done)

    def point(self, segmentation_node, segment_id: str, volume_node, point_ras: Sequence[float],  # noqa: ANN001
              positive: bool, done: Done | None = None) -> None:
        """A + (inside) or - (outside) click, added to the organ's prompt on its slice."""
        organ = self._organ(segmentation_node, segment_id)
        x, y, z = self.to_local(volume_node, point_ras)
        k = self.slice_of(volume_node, (x, y, z), local=True)
        request = {"cmd": "prompt", "organ": organ, "space": "ras", "z": float(z), "point": [float(x), float(y)],
                   "positive": bool(positive)}
        self._prompt(request, segmentation_node, segment_id, volume_node,
                     f"{'+' if positive else '-'} point on slice {k}", done)

    def propagate(self, segmentation_node, segment_id: str, volume_node,  # noqa: ANN001
                  limits_ras_z: tuple[float, float] | None = None, done: Done | None = None) -> None:
        """Fill the slices above and below the organ's latest prompt, up to where the organ ends or the limits
        (world-RAS heights in mm, either order). Slices the user prompted are never overwritten."""
        organ = self._organ(segmentation_node, segment_id)
        if organ not in self._last_slice:
            raise HSAMError("nothing to propagate yet: draw a box on the organ first")
        request = {"cmd": "propagate", "organ": organ, "slice": self._last_slice[organ], **self._next_step()}
        if limits_ras_z is not None:
            low, high = sorted(float(self.to_local(volume_node, (0.0, 0.0, z))[2]) for z in limits_ras_z)
            request.update({"space": "ras", "from": low, "to": high})
        tag = (request["step"], dict(self._last_slice))  # undone: the propagation start goes back too

        def propagated(answer: dict) -> None:
            slices = [int(z) for z in answer.get("slices") or []]
            if not slices:
                self._report(done, Outcome("Propagation added no slice: the organ ends next to the prompted slice "
                                           "(or a limit or a prompted slice is there)."))
                return
            self._apply(organ, slices, segmentation_node, segment_id, volume_node,
                        f"propagation over {len(slices)} slices", done, tag)

        self._send(request, propagated, done)

    def undo(self, volume_node=None) -> Outcome:  # noqa: ANN001
        """Put back the segment as it was before the latest prompt or propagation."""
        volume_node = volume_node or (self.scene.GetNodeByID(self.volume_id) if self.volume_id else None)
        step = self.undo_stack.undo(self.scene, volume_node) if volume_node is not None else None
        if step is None:
            return Outcome("Nothing to undo.")
        if step.tag is not None:  # the prompt process forgets the change too: a later propagation starts before it
            number, self._last_slice = step.tag
            if self.process is not None and not self.process.failed:
                self.process.send({"cmd": "undo", "step": number})
        return Outcome(f"Undone: the {step.what} on '{step.segment_id}'.", int(step.before.sum()))

    # ------------------------------------------------------------------ geometry
    def to_local(self, volume_node, point_ras: Sequence[float]) -> np.ndarray:  # noqa: ANN001
        """A world-RAS point in the volume's own RAS (through its parent transform, if any)."""
        point = [float(v) for v in point_ras]
        parent = volume_node.GetParentTransformNode()
        if parent is None:
            return np.array(point)
        to_volume = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, parent, to_volume)
        return np.array(to_volume.TransformPoint(point))

    def slice_of(self, volume_node, point_ras: Sequence[float], local: bool = False) -> int:  # noqa: ANN001
        """The volume's slice (k) a RAS point lies on; HSAMError when the point is outside the CT."""
        local_point = np.asarray(point_ras, dtype=float) if local else self.to_local(volume_node, point_ras)
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetRASToIJKMatrix(matrix)
        ijk = np.array(matrix.MultiplyPoint([*local_point, 1.0])[:3])
        size = np.array(volume_node.GetImageData().GetDimensions())
        if np.any(ijk < -EDGE_TOLERANCE) or np.any(ijk > size - 1 + EDGE_TOLERANCE):
            raise HSAMError(f"the prompt at R {local_point[0]:.1f}, A {local_point[1]:.1f}, S {local_point[2]:.1f} "
                            f"mm is outside '{volume_node.GetName()}': place it on the CT")
        return int(round(ijk[2]))

    # ------------------------------------------------------------------ internals
    def _organ(self, segmentation_node, segment_id: str) -> int:  # noqa: ANN001
        from HSAMSlicerLib.export import organ_of_segment

        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segmentation_node else None
        if segment is None:
            raise HSAMError("no organ segment is chosen: pick the segment to correct")
        found = organ_of_segment(segment)
        if found is None:
            raise HSAMError(f"segment '{segment.GetName()}' is not one of the eight H-SAM organs (by terminology or "
                            "name): prompts correct organ segments only")
        if self.process is None:
            raise HSAMError("prompts are not started: choose the CT first")
        return found.index

    def _send(self, request: dict, on_answer: Callable[[dict], None], done: Done | None) -> None:
        self.process.send(request, on_answer, lambda error: self._report(done, Outcome(f"Failed: {error}",
                                                                                       error=error)))

    def _next_step(self) -> dict:
        """The step number of the next change ({"step": n} in its request; the undo step's tag holds it)."""
        self._step += 1
        return {"step": self._step}

    def _prompt(self, request: dict, segmentation_node, segment_id: str, volume_node, what: str,  # noqa: ANN001
                done: Done | None) -> None:
        request = {**request, **self._next_step()}
        tag = (request["step"], dict(self._last_slice))

        def prompted(answer: dict) -> None:
            self._last_slice[int(answer["organ"])] = int(answer["slice"])
            self._apply(int(answer["organ"]), [int(answer["slice"])], segmentation_node, segment_id, volume_node,
                        what, done, tag)

        self._send(request, prompted, done)

    def _apply(self, organ: int, slices: list[int], segmentation_node, segment_id: str, volume_node,  # noqa: ANN001
               what: str, done: Done | None, tag: tuple[int, dict]) -> None:
        """Ask for the organ's mask on ``slices`` and write it into the segment when it arrives."""
        self._masks += 1
        path = self.process.folder / f"mask-{self._masks}.npy"

        def arrived(answer: dict) -> None:
            crop = np.load(path)
            path.unlink()
            if self.before_change is not None:
                self.before_change()
            voxels = self.undo_stack.apply(segmentation_node, segment_id, volume_node,
                                           tuple(int(v) for v in answer["offset"]), crop, what, tag)
            self._report(done, Outcome(f"{what[0].upper()}{what[1:]}: '{segment_id}' has {voxels} voxels there.",
                                       voxels, tuple(slices)))

        self._send({"cmd": "mask", "organ": organ, "slices": slices, "output": str(path)}, arrived, done)

    @staticmethod
    def _report(done: Done | None, outcome: Outcome) -> None:
        if done is not None:
            done(outcome)


def roi_corners(roi_node) -> list[tuple[float, float, float]]:  # noqa: ANN001
    """The world-RAS corners of a markups ROI's bounds at its middle height (a box drawn on an axial view)."""
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    z = (bounds[4] + bounds[5]) / 2
    return [(bounds[0], bounds[2], z), (bounds[1], bounds[2], z), (bounds[0], bounds[3], z), (bounds[1], bounds[3], z)]
