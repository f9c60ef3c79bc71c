"""HSAMSlicerLogic: CT volume node -> H-SAM (in a child process) -> one segmentation node with eight
terminology-tagged organ segments.

Qt-free and GUI-free: it runs headless (pytest on the PyPI ``slicer-core`` wheel, ``Slicer --no-main-window``) and never
shows a dialog. No model work runs in Slicer's process (``product.md``, "Process model in Slicer"): every long job is an
``hsam`` command in a child process (:mod:`HSAMSlicerLib.process`), and this process never imports torch. A
segmentation is three steps, so that the GUI can follow the middle one from a timer:

1. :meth:`HSAMSlicerLogic.start_segmentation` (main thread): the volume node's voxels (in their own type, no copy:
   :mod:`HSAMSlicerLib.nrrd_input`) and geometry go to a private folder under :func:`jobs_root`, and
   ``hsam segment ... --progress json`` starts on them.
2. :meth:`HSAMSlicerLib.process.ChildJob.poll` (main thread, never blocks): progress, status, warnings.
3. :meth:`HSAMSlicerLogic.finish_segmentation` (main thread): the labels are read back and become a new result.
   It replaces this module's earlier result for the same volume only where that is untouched since it was made; an
   edited result stays (the new one is numbered) unless the user chose to replace it (:class:`RunOptions`
   ``replace_edited``); a segmentation the user made or copied is never touched (:mod:`HSAMSlicerLib.results`). The
   folder is removed.

:meth:`HSAMSlicerLogic.process` runs all three in a row (scripts, the self-test). Model downloads, imports, device
detection and fine-tuning are child jobs too (``start_*`` methods).
"""

from __future__ import annotations

import datetime as _dt
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import slicer
import vtk

from HSAMSlicerLib import kept, nodes, results
from HSAMSlicerLib.nodes import (  # noqa: F401 (PROVENANCE_KEYS: part of this module's interface)
    PROVENANCE_KEYS, PROVENANCE_PREFIX, ROLE_CONFIDENCE, ROLE_PREDICTION, ROLE_TABLE,
)
from HSAMSlicerLib.process import ChildJob, JobState
from HSAMSlicerLib.results import RESULT_ATTRIBUTE, ROLE_SOURCE, SEGMENTATION, EditedResult, ResultsOfVolume
from hsam.errors import HSAMError

# RESULT_ATTRIBUTE marks every node this module creates; its value says which part of a result the node is.
PREDICTION, CONFIDENCE, TABLE = "prediction", "confidence", "volumes"
PART_ROLES = {PREDICTION: ROLE_PREDICTION, CONFIDENCE: ROLE_CONFIDENCE, TABLE: ROLE_TABLE}
KEPT_FOLDER = "embeddings"  # in a segmentation job's folder: the slice embeddings it keeps for the prompts

# The paper's model: what an official H-SAM .pth checkpoint is imported as.
OFFICIAL_MODEL_ID = "hsam-vitb-synapse"
# Segment tag holding the H-SAM label value (for scripts; export matches segments by terminology, then by name).
LABEL_VALUE_TAG = "HSAMSlicer.LabelValue"


@dataclass
class RunOptions:
    """What to run: the model (installed id, manifest id downloaded on first use, or a path), device, outputs."""

    model: str
    device: str = "auto"  # "auto" | "cuda" | "cpu" (anything torch accepts)
    organs: Sequence[int] | None = None  # H-SAM label values to keep; None = all eight
    confidence: bool = False  # also create a confidence volume
    largest_component: bool = False
    show_3d: bool = True  # build closed surfaces so the organs show in 3D (when display nodes exist)
    batch_size: int | None = None
    mode: str = "auto"  # speed mode (hsam segment --mode)
    # edited earlier results the user chose to replace (results_of_volume().edited, as they were when asked); any
    # other edited result stays and the new result gets a numbered name
    replace_edited: Sequence[EditedResult] = ()
    # segment a volume that does not look like CT (MR, a normalised image): only after the user said so (NotCT)
    allow_non_ct: bool = False


class NotCT(HSAMError):
    """The volume does not look like CT in Hounsfield units (the CLI's check): a question for the user, not an error.
    Ask it (the message ends with one) and start again with ``RunOptions.allow_non_ct`` on a yes."""


@dataclass
class ModelInfo:
    """The model a segmentation ran with, as the child reported it."""

    id: str
    name: str = ""
    title: str = ""
    sha256: str = ""
    classes: list[str] = field(default_factory=list)
    demo: bool = False


@dataclass
class SegmentationOutput:
    """A finished segmentation read back from the child: arrays on the CT's voxel grid ([k, j, i]), the run's facts."""

    labels: np.ndarray  # uint8, values are the model's class indices
    confidence: np.ndarray | None  # uint8, 255 x max class probability
    model: ModelInfo
    device: str = "cpu"
    precision: str = "fp32"
    mode: str = ""
    mode_reason: str = ""  # why the child ran that engine (processor and evidence)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    volumes_ml: dict[str, float] = field(default_factory=dict)


@dataclass
class SegmentationJob:
    """A running segmentation: the child job plus what is needed to apply its result."""

    job: ChildJob
    volume_id: str
    options: RunOptions

    def poll(self) -> JobState:
        return self.job.poll()

    def cancel(self) -> None:
        self.job.cancel()


def jobs_root() -> Path:
    """Where job folders go: ``hsam`` under Slicer's temporary folder (Application Settings), else under the
    system's temporary folder (headless)."""
    import tempfile

    application = getattr(slicer, "app", None)
    base = getattr(application, "temporaryPath", "") if application is not None else ""
    return Path(base or tempfile.gettempdir()) / "hsam"


def hsam_organs_of_card(card) -> dict[int, Any]:
    """{model label value: hsam.labels organ} for the card's classes that are H-SAM organs (others are dropped)."""
    from hsam.labels import ORGANS, organ

    classes = list(getattr(card, "classes", None) or ["background"] + [o.name for o in ORGANS])
    found = {}
    for value, name in enumerate(classes):
        if value == 0:
            continue
        try:
            found[value] = organ(name)
        except KeyError:
            continue  # a class H-SAM does not know: not shown (the model may segment more than the 8 organs)
    return found


def organs_selected(organs: Sequence[int] | None) -> list:
    """The hsam.labels organ entries for ``organs`` (label values), in H-SAM order; all eight when None."""
    from hsam.labels import ORGANS

    if organs is None:
        return list(ORGANS)
    wanted = {int(i) for i in organs}
    unknown = wanted - {o.index for o in ORGANS}
    if unknown:
        raise HSAMError(f"unknown organ label value(s) {sorted(unknown)}; H-SAM organs are 1..{len(ORGANS)}")
    if not wanted:
        raise HSAMError("no organ is selected: tick at least one organ")
    return [o for o in ORGANS if o.index in wanted]


class HSAMSlicerLogic:
    """Segment abdominal organs in a CT volume node with H-SAM and manage the resulting nodes.

    ``scene`` defaults to ``slicer.mrmlScene``. ``child_env`` adds environment variables for the child processes.
    Closing the scene ends the segmentations (their volume is gone); fine-tuning, downloads and imports do not depend on
    the scene and keep running (:meth:`stop_jobs` ends them: module closed, Slicer exits).
    """

    def __init__(self, scene=None, child_env: dict[str, str] | None = None):
        # Slicer's ScriptedLoadableModuleLogic.__init__ may already have run this (cooperative super()): once is enough
        for tag in (getattr(self, "_close_observer", None), getattr(self, "_removal_observer", None)):
            if tag is not None:
                self.scene.RemoveObserver(tag)
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.child_env = dict(child_env or {})
        self.jobs_root = jobs_root()
        self._jobs: list[ChildJob] = []
        self._scene_jobs: list[ChildJob] = []  # segmentations: they need their volume
        self._segmentations: list[SegmentationJob] = []
        logic = weakref.ref(self)  # the scene must not keep the Logic alive (a reference cycle through VTK)
        self._close_observer = self.scene.AddObserver(
            slicer.vtkMRMLScene.StartCloseEvent,
            lambda caller, event: logic() is not None and logic().stop_scene_jobs())

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def removed(caller, event, node) -> None:
            if logic() is not None and node is not None:
                logic().cancel_segmentations_of(node.GetID())

        self._removal_observer = self.scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, removed)

    def cancel_segmentations_of(self, volume_id: str) -> None:
        """The volume was removed from the scene: its running segmentations stop (their result has nowhere to go)
        and its kept embeddings go."""
        kept.forget(self.jobs_root, volume_id)
        self._segmentations = [s for s in self._segmentations if not s.poll().done]
        for running in self._segmentations:
            if running.volume_id == volume_id:
                running.cancel()

    def sweep_stale_job_folders(self) -> list:
        """Remove job folders a crash left behind (module start); folders of running jobs stay."""
        from HSAMSlicerLib.process import sweep_stale_folders

        return sweep_stale_folders(self.jobs_root)

    def stop_jobs(self) -> None:
        """End every child job this Logic started and remove their folders and the kept embeddings (module closed,
        Slicer exits)."""
        kept.forget(self.jobs_root)
        jobs, self._jobs, self._scene_jobs = self._jobs, [], []
        for job in jobs:
            job.cleanup()

    def stop_scene_jobs(self) -> None:
        """End the jobs that need the scene (segmentations) and remove their folders and the kept embeddings: the
        scene is being closed."""
        kept.forget(self.jobs_root)
        jobs, self._scene_jobs = self._scene_jobs, []
        self._jobs = [j for j in self._jobs if j not in jobs]
        for job in jobs:
            job.cleanup()

    def running_jobs(self) -> list[ChildJob]:
        """The child jobs that have not ended yet."""
        return [j for j in self._jobs if j.process is not None and j.process.poll() is None]

    def _track(self, job: ChildJob, needs_scene: bool = False) -> ChildJob:
        self._jobs = [j for j in self._jobs if j.process is None or j.process.poll() is None] + [job]
        if needs_scene:
            self._scene_jobs = [j for j in self._scene_jobs if j in self._jobs] + [job]
        return job

    # ------------------------------------------------------------------ step 1: volume node -> SimpleITK image
    @staticmethod
    def check_input_volume(volume_node) -> None:
        """Raise HSAMError unless ``volume_node`` is a 3-D single-component scalar volume with voxels."""
        nodes.check_input_volume(volume_node)

    def volume_to_image(self, volume_node):
        """The volume's voxels as a SimpleITK image in LPS, in the volume's own (untransformed) coordinates.

        Results are written back in the same coordinates and put under the volume's parent transform, so a
        transformed CT gets a segmentation that moves with it.
        """
        from HSAMSlicerLib import geometry

        self.check_input_volume(volume_node)
        array = slicer.util.arrayFromVolume(volume_node)  # [k, j, i], a view; image_from_array copies it
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        return geometry.image_from_array(array, geometry.vtk_matrix_to_numpy(matrix))

    # ------------------------------------------------------------------ step 2: the child process
    def start_segmentation(self, volume_node, options: RunOptions) -> SegmentationJob:
        """Write the CT to a private folder and start ``hsam segment`` on it; returns the running job.

        Raises HSAMError for a bad input volume or option before anything starts, and :class:`NotCT` (a question)
        for a volume that does not look like CT unless ``options.allow_non_ct``.
        """
        from HSAMSlicerLib import geometry
        from HSAMSlicerLib.nrrd_input import write_volume_nrrd

        organs = [o.name for o in organs_selected(options.organs)]  # by name: a model may order its classes freely
        self.check_input_volume(volume_node)
        if not options.allow_non_ct:
            from hsam.volume.intensity import looks_like_ct  # the check `hsam segment` makes, on the same voxels

            if not looks_like_ct(slicer.util.arrayFromVolume(volume_node)):
                raise NotCT(f"'{volume_node.GetName()}' does not look like CT in Hounsfield units (no air near "
                            "-1000 HU: MR or a normalised image?). H-SAM models are trained on CT, so the organs may "
                            "be wrong or missing. Segment it anyway?")
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        job = self._track(ChildJob([], env=self.child_env, root=self.jobs_root), needs_scene=True)
        try:
            source = job.folder / "input.nrrd"
            # the voxels as Slicer holds them (own type, no copy), uncompressed: written in a fraction of a second
            write_volume_nrrd(slicer.util.arrayFromVolume(volume_node), geometry.vtk_matrix_to_numpy(matrix), source)
            arguments = ["segment", source, "-o", job.folder / "labels.nrrd", "--model", options.model,
                         "--device", options.device or "auto", "--organs", ",".join(organs)]
            if options.allow_non_ct:
                arguments.append("--allow-non-ct")
            if options.confidence:
                arguments += ["--confidence", job.folder / "confidence.nrrd"]
            if options.largest_component:
                arguments.append("--largest-component")
            if options.batch_size:
                arguments += ["--batch-size", options.batch_size]
            if options.mode and options.mode != "auto":
                arguments += ["--mode", options.mode]
            arguments += ["--keep-embeddings", job.folder / KEPT_FOLDER]  # for the prompts (HSAMSlicerLib.kept)
            job.arguments = [str(a) for a in arguments]
            job.start()
        except BaseException:
            job.cleanup()
            raise
        running = SegmentationJob(job, volume_node.GetID(), options)
        self._segmentations.append(running)
        return running

    def finish_segmentation(self, running: SegmentationJob, state: JobState | None = None):
        """Apply a finished job's result to the scene and remove its folder; returns the segmentation node.

        Raises the job's error (HSAMError, ``ChildCrashed``, ``JobCancelled``) without touching the scene.
        """
        import SimpleITK as sitk

        try:
            state = state if state is not None else running.poll()
            if not state.done:
                raise RuntimeError("finish_segmentation needs a finished job; poll until state.done")
            if state.error is not None:
                raise state.error
            volume_node = self.scene.GetNodeByID(running.volume_id)
            if volume_node is None:
                raise HSAMError("the input volume was removed while segmenting: the result was dropped")
            written, facts, model = state.result["written"], state.result["result"], state.result["model"]
            confidence = None
            if "confidence" in written:
                confidence = sitk.GetArrayFromImage(sitk.ReadImage(written["confidence"]))
            output = SegmentationOutput(
                labels=sitk.GetArrayFromImage(sitk.ReadImage(written["labels"])),
                confidence=confidence,
                model=ModelInfo(id=str(model.get("id", running.options.model)), name=str(model.get("name", "")),
                                title=str(model.get("title", "")), sha256=str(model.get("sha256", "")),
                                classes=list(model.get("classes") or []), demo=bool(model.get("demo"))),
                device=str(facts.get("device", "")), precision=str(facts.get("precision", "")),
                mode=str(facts.get("mode", "")), mode_reason=str(facts.get("mode_reason", "")),
                seconds=float(facts.get("seconds", 0.0)),
                warnings=list(facts.get("warnings") or []), volumes_ml=dict(facts.get("volumes_ml") or {}),
            )
            segmentation = self.apply_result(volume_node, output, running.options)
            try:
                kept.take(running.job.folder / KEPT_FOLDER, self.jobs_root, running.volume_id)
            except OSError:
                pass  # a convenience: the prompt process computes the embeddings itself
            return segmentation
        finally:
            running.job.cleanup()

    def process(self, volume_node, options: RunOptions, progress: Callable[[int, int], None] | None = None,
                cancel: Callable[[], bool] | None = None, interval_s: float = 0.1):
        """Start, follow and apply a segmentation on the calling thread (scripts, the self-test, headless use).

        ``progress(k, n)`` gets slices done; ``cancel()`` is polled and stops the child (raises ``JobCancelled``).
        """
        running = self.start_segmentation(volume_node, options)
        try:
            reported = None
            while True:
                state = running.poll()
                if progress is not None and state.stage == "segment" and state.total and state.current != reported:
                    reported = state.current
                    progress(state.current, state.total)
                if state.done:
                    break
                if cancel is not None and not state.cancel_requested and cancel():
                    running.cancel()
                time.sleep(interval_s)
            return self.finish_segmentation(running, state)
        finally:
            running.job.cleanup()

    def start_job(self, arguments: Sequence[str]) -> ChildJob:
        """Any other ``hsam`` command as a child job (``--progress json`` is added)."""
        return self._track(ChildJob(arguments, env=self.child_env, root=self.jobs_root)).start()

    def start_device_detection(self) -> ChildJob:
        """``hsam devices``: imports torch in the child; the result's ``devices`` says what PyTorch can use."""
        return self.start_job(["devices"])

    def start_model_download(self, model_id: str) -> ChildJob:
        """``hsam models download ID`` (resumable: a cancelled download continues next time)."""
        return self.start_job(["models", "download", model_id])

    def start_model_import(self, path: str) -> ChildJob:
        """Install a model into the user's model cache; the result's ``id`` names it.

        ``path`` is a saved model (its folder, model.json or model.safetensors) or an official H-SAM ``.pth``/``.pt``
        checkpoint, which is converted (the SAM base weights are downloaded first when missing).
        """
        if Path(path).suffix.lower() in (".pth", ".pt"):
            return self.start_job(["models", "import-official", path, "--id", OFFICIAL_MODEL_ID])
        return self.start_job(["models", "import", path])

    def start_finetune(self, cases: str | Path, base_model: str, epochs: int, name: str,
                       device: str = "auto") -> ChildJob:
        """``hsam finetune`` on exported cases; the new model is installed as ``name``. Its run folder (log, curve,
        checkpoints) is ``HSAM_HOME/runs/<name>-<time>``."""
        from hsam.paths import hsam_home

        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        output = hsam_home() / "runs" / f"{name}-{stamp}"
        return self.start_job(["finetune", "--model", base_model, "--cases", str(cases), "--epochs", str(int(epochs)),
                               "--name", name, "--output", str(output), "--device", device or "auto"])

    @staticmethod
    def finetune_worse_than_base(result: dict) -> bool:
        """Whether a finished fine-tune (``result``: the ``finished`` line of ``hsam finetune --progress json``)
        scored lower than its starting model on the held-out cases, or broke the forgetting guard (no epoch within
        its margin on the reference cases); then the starting model should stay in use."""
        return bool((result.get("held_out") or {}).get("worse_than_start")
                    or (result.get("forgetting_guard") or {}).get("within_margin") is False)

    @staticmethod
    def downloaded_models() -> list[str]:
        """Ids of installed models and base weights that can be downloaded again (safe to delete).

        Models the user imported or converted (no download link in the manifest) are not listed.
        """
        from hsam.weights.cache import base_file
        from hsam.weights.manifest import load_manifest
        from hsam.weights.store import available_models

        manifest = load_manifest()
        again = {e.id for e in manifest.values() if e.verified_download}
        found = [m.id for m in available_models() if m.id in again]
        found += [i for i in sorted(again) if manifest[i].kind == "base" and base_file(i) is not None]
        return found

    # ------------------------------------------------------------------ step 3: result -> MRML (main thread)
    def apply_result(self, volume_node, output: SegmentationOutput, options: RunOptions):
        """Build a new result for ``volume_node``: the segmentation (+ stored prediction, optional confidence volume,
        organ-volume table). Returns the segmentation node.

        Earlier results for the volume that are untouched since they were made are replaced; edited ones stay (the new
        result is numbered: "CT organs 2") unless listed in ``options.replace_edited`` with the content they still
        have. Nothing is left behind if this fails: the new nodes are removed and the earlier results stay.
        """
        self.check_input_volume(volume_node)
        chosen = organs_selected(options.organs)
        labels = output.labels
        reference_shape = slicer.util.arrayFromVolume(volume_node).shape
        if labels.shape != reference_shape:
            raise HSAMError(f"the label volume {labels.shape} does not match the CT {reference_shape}; report this bug")
        # model label value -> H-SAM label value (by class name), keeping only the chosen organs
        lut = np.zeros(256, dtype=np.uint8)
        wanted = {o.index for o in chosen}
        for value, entry in hsam_organs_of_card(output.model).items():
            if entry.index in wanted:
                lut[value] = entry.index
        labels = lut[labels]

        replaced = self._replaced_results(volume_node, options.replace_edited)
        name = results.unique_name(self.scene, self._result_name(volume_node), {n.GetID() for n in replaced})
        created: list = []
        try:
            segmentation = self._new_node("vtkMRMLSegmentationNode", name, SEGMENTATION, created)
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            segmentation.SetNodeReferenceID(ROLE_SOURCE, volume_node.GetID())
            self._fill_segments(segmentation, volume_node, labels, chosen, created)

            prediction = self._new_node("vtkMRMLLabelMapVolumeNode", f"{volume_node.GetName()} H-SAM prediction",
                                        PREDICTION, created)  # fmt: skip
            prediction.CopyOrientation(volume_node)
            slicer.util.updateVolumeFromArray(prediction, labels)
            prediction.SetHideFromEditors(True)  # kept only so that export can tell what the user changed
            segmentation.SetNodeReferenceID(ROLE_PREDICTION, prediction.GetID())

            if options.confidence and output.confidence is not None:
                confidence = self._new_node("vtkMRMLScalarVolumeNode", f"{volume_node.GetName()} H-SAM confidence",
                                            CONFIDENCE, created)  # fmt: skip
                confidence.CopyOrientation(volume_node)
                slicer.util.updateVolumeFromArray(confidence, output.confidence)
                confidence.CreateDefaultDisplayNodes()
                segmentation.SetNodeReferenceID(ROLE_CONFIDENCE, confidence.GetID())

            table = self._new_node("vtkMRMLTableNode", f"{volume_node.GetName()} organ volumes", TABLE, created)
            self._fill_volume_table(table, labels, volume_node, chosen)
            segmentation.SetNodeReferenceID(ROLE_TABLE, table.GetID())

            self._set_provenance(segmentation, output, options, chosen)
            for node in created:
                if node.IsA("vtkMRMLTransformableNode"):  # tables are not transformable
                    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            self._place_in_subject_hierarchy(volume_node, [n for n in created if n is not prediction])
            if options.show_3d and segmentation.GetDisplayNode() is not None:
                segmentation.CreateClosedSurfaceRepresentation()
            results.mark_result(segmentation)
        except BaseException:
            for node in reversed(created):
                self.scene.RemoveNode(node)
            raise
        for node in replaced:
            self._remove_result(node)
        return segmentation

    # ------------------------------------------------------------------ finding results
    def find_result(self, volume_node):
        """This module's newest segmentation for ``volume_node``, or None. User-made segmentations (copies of a result
        included) are never returned."""
        if volume_node is None:
            return None
        found = [node for node in self._nodes_of_class("vtkMRMLSegmentationNode")
                 if results.is_result(node) and node.GetNodeReferenceID(ROLE_SOURCE) == volume_node.GetID()]
        return found[-1] if found else None

    def results_of_volume(self, volume_node) -> ResultsOfVolume:
        """The earlier results for ``volume_node``: untouched ones (a new run replaces them) and edited ones (the widget
        asks whether to keep them, the default, or to replace them: ``RunOptions.replace_edited``)."""
        return results.results_of_volume(self.scene, volume_node)

    @staticmethod
    def is_result(node) -> bool:
        return results.is_result(node)

    @staticmethod
    def source_volume(segmentation_node):
        """The CT a segmentation belongs to (:func:`HSAMSlicerLib.nodes.source_volume`)."""
        return nodes.source_volume(segmentation_node)

    @staticmethod
    def provenance(segmentation_node) -> dict[str, str]:
        """The provenance attributes of a result (empty for a segmentation this module did not make)."""
        return nodes.provenance(segmentation_node)

    def export_for_finetuning(self, segmentation_node, output_root, volume_node=None, case_name=None):
        """Write a training case folder (see :func:`HSAMSlicerLib.export.export_case`); returns its path."""
        from HSAMSlicerLib.export import export_case

        return export_case(segmentation_node, output_root, volume_node=volume_node, case_name=case_name)

    @staticmethod
    def describe_export(folder) -> str:
        """What an exported case holds: labelled organs, merged and left-out segments, unknown organs."""
        from HSAMSlicerLib.export import describe_export

        return describe_export(folder)

    # ------------------------------------------------------------------ helpers
    def _nodes_of_class(self, class_name: str) -> list:
        collection = self.scene.GetNodesByClass(class_name)
        nodes = [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        return nodes

    def _replaced_results(self, volume_node, chosen: Sequence[EditedResult]) -> list:
        """The earlier results a new run replaces: the untouched ones, and edited ones the user chose to replace whose
        content is still what it was when asked."""
        previous = results.results_of_volume(self.scene, volume_node)
        replaced = list(previous.untouched)
        for edited in previous.edited:
            if edited in chosen:  # same node, same content: a later edit makes it a different EditedResult
                replaced.append(self.scene.GetNodeByID(edited.node_id))
        return replaced

    def _remove_result(self, segmentation) -> None:
        """Remove a result and its parts, except parts another segmentation still references (a user's copy)."""
        others = [n for n in self._nodes_of_class("vtkMRMLSegmentationNode") if n is not segmentation]
        for part, role in PART_ROLES.items():
            node = segmentation.GetNodeReference(role)
            if node is None or node.GetAttribute(RESULT_ATTRIBUTE) != part:
                continue
            if not any(other.GetNodeReferenceID(role) == node.GetID() for other in others):
                self.scene.RemoveNode(node)
        self.scene.RemoveNode(segmentation)

    @staticmethod
    def _result_name(volume_node) -> str:
        return f"{volume_node.GetName()} organs"

    def _new_node(self, class_name: str, name: str, part: str, created: list):
        node = self.scene.AddNewNodeByClass(class_name, name)
        node.SetAttribute(RESULT_ATTRIBUTE, part)
        created.append(node)
        return node

    def _fill_segments(self, segmentation_node, volume_node, labels: np.ndarray, chosen: list, created: list) -> None:
        """One segment per chosen organ (also when the model found none of it), voxels imported in one pass."""
        from hsam.labels import ORGANS

        segmentation = segmentation_node.GetSegmentation()
        for entry in chosen:
            segment_id = segmentation.AddEmptySegment(entry.name, entry.display_name, list(entry.rgb_float))
            segment = segmentation.GetSegment(segment_id)
            # a tag, not SetTerminology: that method exists only from Slicer 5.10
            segment.SetTag(segment.GetTerminologyEntryTagName(), entry.terminology_entry)
            segment.SetTag(LABEL_VALUE_TAG, str(entry.index))
        if not labels.any():
            return
        # Label value v goes into the (v-1)-th listed segment ID; unchosen organs were zeroed above.
        ids = vtk.vtkStringArray()
        for entry in ORGANS[: int(labels.max())]:
            ids.InsertNextValue(entry.name)
        temporary = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__HSAMSlicer_import__")
        try:
            temporary.CopyOrientation(volume_node)
            slicer.util.updateVolumeFromArray(temporary, labels)
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if not logic.ImportLabelmapToSegmentationNode(temporary, segmentation_node, ids):
                raise HSAMError("Slicer could not import the organ labels into the segmentation; report this bug")
        finally:
            self.scene.RemoveNode(temporary)
        # The import may add segments for IDs that were not chosen; drop them (their voxels are all zero).
        chosen_ids = {entry.name for entry in chosen}
        for index in reversed(range(segmentation.GetNumberOfSegments())):
            segment_id = segmentation.GetNthSegmentID(index)
            if segment_id not in chosen_ids:
                segmentation.RemoveSegment(segment_id)

    @staticmethod
    def _fill_volume_table(table_node, labels: np.ndarray, volume_node, chosen: list) -> None:
        """Organ, label value, voxel count and volume in mL, computed from the label array and voxel size."""
        voxel_ml = float(np.prod(volume_node.GetSpacing())) / 1000.0
        counts = np.bincount(labels.ravel(), minlength=256)
        table = table_node.GetTable()
        columns = (
            (vtk.vtkStringArray(), "Organ"),
            (vtk.vtkIntArray(), "Label value"),
            (vtk.vtkIntArray(), "Voxels"),
            (vtk.vtkDoubleArray(), "Volume [mL]"),
        )
        for array, name in columns:
            array.SetName(name)
            table.AddColumn(array)
        table.SetNumberOfRows(len(chosen))
        for row, entry in enumerate(chosen):
            count = int(counts[entry.index])
            table.SetValue(row, 0, vtk.vtkVariant(entry.display_name))
            table.SetValue(row, 1, vtk.vtkVariant(entry.index))
            table.SetValue(row, 2, vtk.vtkVariant(count))
            table.SetValue(row, 3, vtk.vtkVariant(round(count * voxel_ml, 3)))
        table_node.Modified()

    @staticmethod
    def _set_provenance(segmentation_node, output: SegmentationOutput, options: RunOptions, chosen: list) -> None:
        import hsam

        values = {
            "ModelId": str(output.model.id or options.model),
            "ModelName": output.model.name,
            "ModelTitle": output.model.title,
            "ModelSHA256": output.model.sha256,
            "Device": output.device,
            "Precision": output.precision,
            "Engine": output.mode,
            "EngineReason": output.mode_reason,
            "Seconds": f"{output.seconds:.2f}",
            "Time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "Version": hsam.__version__,
            "Organs": ",".join(str(entry.index) for entry in chosen),
            "Warnings": " | ".join(output.warnings),
        }
        for key, value in values.items():
            segmentation_node.SetAttribute(PROVENANCE_PREFIX + key, value)

    def _place_in_subject_hierarchy(self, volume_node, nodes: list) -> None:
        """Put the result next to the CT: under the CT's study (its parent item) in Subject Hierarchy."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if hierarchy is None:
            return
        volume_item = hierarchy.GetItemByDataNode(volume_node)
        if not volume_item:
            volume_item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), volume_node)
        parent = hierarchy.GetItemParent(volume_item)
        for node in nodes:
            item = hierarchy.GetItemByDataNode(node)
            if item:
                hierarchy.SetItemParent(item, parent)
            else:
                hierarchy.CreateItem(parent, node)
