"""HSAMSlicer: prompt-free segmentation of eight abdominal organs in CT with H-SAM (Cheng et al., CVPR 2024).

The four classes Slicer expects live here: the module description, the GUI (a thin widget), the Logic (re-exported from
HSAMSlicerLib.logic, where it is Qt-free and testable headless) and the self-test. Nothing heavy is imported at file
scope: torch and the network load only when the user clicks Segment organs. No ``from __future__ import annotations``
here: parameterNodeWrapper reads the parameter annotations as real types.
"""

import logging
import pathlib
import traceback
from typing import Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from HSAMSlicerLib.logic import HSAMSlicerLogic as _QtFreeLogic
from HSAMSlicerLib.logic import RunOptions
from HSAMSlicerLib.worker import BackgroundTask, format_eta

__all__ = [
    "HSAMSlicer", "HSAMSlicerLogic", "HSAMSlicerParameterNode", "HSAMSlicerTest", "HSAMSlicerWidget", "RunOptions",
]  # fmt: skip


def _resource(relative: str) -> str:
    """A file in the shared Resources folder (next to the module when installed; the repository root in a checkout)."""
    from hsam.paths import resources_dir

    return str(resources_dir() / relative)


#
# HSAMSlicer
#


class HSAMSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("H-SAM Organ Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []  # PyTorchUtils is used when present; it is not needed to load the module
        self.parent.contributors = ["HSAMSlicer contributors"]
        self.parent.helpText = _(
            "Segments eight abdominal organs in a CT volume without any prompt: spleen, right and left kidney, "
            "gallbladder, liver, stomach, aorta and pancreas. Pick the CT and a model, click <b>Segment organs</b>, "
            "watch the per-slice progress (you can cancel at any time), correct the result in Segment Editor, and "
            "<b>Export for fine-tuning</b> to collect training cases for <code>hsam finetune</code>. "
            'See the <a href="https://github.com/hsamslicer/SlicerHSAM#readme">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "H-SAM was published by Zhiheng Cheng, Qingyue Wei, Hongru Zhu, Yan Wang, Liangqiong Qu, Wei Shao and "
            "Yuyin Zhou: <i>Unleashing the Potential of SAM for Medical Adaptation via Hierarchical Decoding</i>, "
            "CVPR 2024 (arXiv:2403.18271). It builds on the Segment Anything Model (Kirillov et al., ICCV 2023). "
            "Please cite the paper when you use this module. Model weights carry their own licences, listed in the "
            "module's model list."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)  # registration needs the app to be up


#
# Sample data: a small real abdominal CT (TotalSegmentator's test image, Apache-2.0), for the tutorial in the README
#

SAMPLE_NAME = "HSAMAbdomenCT"
SAMPLE_URL = (
    "https://github.com/wasserth/TotalSegmentator/raw/0e65a448d557382b1e925276212b3bec7f5aff83/"
    "tests/reference_files/example_ct_sm.nii.gz"
)
SAMPLE_SHA256 = "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb"


def registerSampleData() -> None:
    """Add the sample CT to the Sample Data module (downloaded on demand, SHA-256 checked)."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="HSAMSlicer",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=_resource("Icons/HSAMSlicer.png"),
        uris=SAMPLE_URL,
        fileNames=f"{SAMPLE_NAME}.nii.gz",
        checksums=f"SHA256:{SAMPLE_SHA256}",
        nodeNames=SAMPLE_NAME,
    )


#
# HSAMSlicerParameterNode
#


@parameterNodeWrapper
class HSAMSlicerParameterNode:
    """The module's state, saved with the scene.

    inputVolume - the CT to segment.
    outputSegmentation - the segmentation to review and export (set to the new result after each run).
    modelId - an installed model id, a manifest id (downloaded on first use) or a model folder path.
    device - "auto", "cuda" or "cpu".
    organs - comma-separated H-SAM label values to keep (1 spleen ... 8 pancreas).
    createConfidence / largestComponent / showIn3D - options of a run.
    exportDirectory - the folder that collects training cases.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelId: str = ""
    device: str = "auto"
    organs: str = "1,2,3,4,5,6,7,8"
    createConfidence: bool = False
    largestComponent: bool = False
    showIn3D: bool = True
    exportDirectory: pathlib.Path = pathlib.Path.home() / "HSAMSlicer-cases"


#
# HSAMSlicerWidget
#


class HSAMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI. It only reads the parameter node, starts the worker, polls it and shows what happened."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None  # BackgroundTask while a segmentation or a model import runs
        self._taskFinish = None  # called with the task's final TaskState, on the main thread
        self._taskContext = None  # (volume node ID, RunOptions) while a segmentation runs; None for an import
        self._deviceTask = None  # BackgroundTask that imports torch to detect the GPU
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resource("UI/HSAMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HSAMSlicerLogic()

        for text, value in ((_("Auto"), "auto"), (_("CUDA"), "cuda"), (_("CPU"), "cpu")):
            self.ui.deviceComboBox.addItem(text, value)
        self._fillOrganList()
        self._fillModelList()
        self.ui.progressBar.hide()

        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.reviewButton.connect("clicked(bool)", self.onReview)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.clearCacheButton.connect("clicked(bool)", self.onClearCache)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self._onDeviceChanged)
        self.ui.organListWidget.connect("itemChanged(QListWidgetItem*)", self._onOrgansChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._detectDevicesInBackground()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None:
            self._task.cancel()  # its result will find no volume to attach to and is dropped
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = self._activeVolume()
            if volume:
                self._parameterNode.inputVolume = volume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._showParameters()
            self._updateButtons()

    # ------------------------------------------------------------------ GUI <-> parameters not bound by connectGui
    def _showParameters(self) -> None:
        """Model, device and organ choices are stored as strings; show them in their widgets."""
        node = self._parameterNode
        index = self.ui.modelComboBox.findData(node.modelId) if node.modelId else -1
        if index >= 0:
            self.ui.modelComboBox.setCurrentIndex(index)
        elif self.ui.modelComboBox.count:
            node.modelId = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex) or ""
        index = self.ui.deviceComboBox.findData(node.device)
        self.ui.deviceComboBox.setCurrentIndex(max(index, 0))
        chosen = {v.strip() for v in node.organs.split(",")}
        wasBlocked = self.ui.organListWidget.blockSignals(True)
        for row in range(self.ui.organListWidget.count):
            item = self.ui.organListWidget.item(row)
            item.setCheckState(qt.Qt.Checked if str(item.data(qt.Qt.UserRole)) in chosen else qt.Qt.Unchecked)
        self.ui.organListWidget.blockSignals(wasBlocked)

    def _onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelId = self.ui.modelComboBox.itemData(index) or ""

    def _onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def _onOrgansChanged(self, item=None) -> None:
        if not self._parameterNode:
            return
        values = []
        for row in range(self.ui.organListWidget.count):
            entry = self.ui.organListWidget.item(row)
            if entry.checkState() == qt.Qt.Checked:
                values.append(str(entry.data(qt.Qt.UserRole)))
        self._parameterNode.organs = ",".join(values)

    def _updateButtons(self, caller=None, event=None) -> None:
        node = self._parameterNode
        running = self._task is not None
        segmenting = running and self._taskContext is not None
        ready = bool(node and node.inputVolume and node.modelId and node.organs)
        self.ui.applyButton.enabled = segmenting or (ready and not running)
        self.ui.importModelButton.enabled = not running
        self.ui.clearCacheButton.enabled = not running
        if not running:
            self.ui.applyButton.text = _("Segment organs")
            if not (node and node.inputVolume):
                self.ui.applyButton.toolTip = _("Select a CT volume first.")
            elif not (node and node.modelId):
                self.ui.applyButton.toolTip = _("Choose a model, or import a model file.")
            elif not (node and node.organs):
                self.ui.applyButton.toolTip = _("Tick at least one organ.")
            else:
                self.ui.applyButton.toolTip = _("Segment the organs. While it runs, this button cancels.")
        hasSegmentation = bool(node and node.outputSegmentation)
        self.ui.reviewButton.enabled = hasSegmentation and not running
        hasFolder = bool(node and str(node.exportDirectory) not in ("", "."))
        self.ui.exportButton.enabled = hasSegmentation and not running and hasFolder

    def _fillOrganList(self) -> None:
        from hsam.labels import ORGANS

        self.ui.organListWidget.clear()
        for entry in ORGANS:
            item = qt.QListWidgetItem(entry.display_name)
            item.setData(qt.Qt.UserRole, entry.index)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked)
            pixmap = qt.QPixmap(12, 12)
            pixmap.fill(qt.QColor(*entry.rgb))
            item.setIcon(qt.QIcon(pixmap))
            self.ui.organListWidget.addItem(item)

    def _fillModelList(self, select: Optional[str] = None) -> None:
        """Installed models first (most accurate first), then manifest models that can be downloaded."""
        from hsam import weights

        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        installed = set()
        try:
            for model in weights.available_models():
                installed.add(model.id)
                combo.addItem(f"{model.title} ({model.id})", model.id)
                combo.setItemData(combo.count - 1, str(model.path), qt.Qt.ToolTipRole)
            for entry in sorted(weights.load_manifest().values(), key=lambda e: -e.priority):
                if entry.kind != "hsam" or entry.id in installed:
                    continue
                downloadable = all(f.url and f.sha256 for f in entry.files)
                suffix = _("download on first use") if downloadable else _("needs import, see tooltip")
                combo.addItem(f"{entry.title} ({entry.id}, {suffix})", entry.id)
                combo.setItemData(combo.count - 1, f"{entry.license}\n{entry.homepage}", qt.Qt.ToolTipRole)
        except Exception as error:  # a broken manifest must not prevent the module from opening
            logging.error(f"HSAMSlicer: could not list models: {error}")
            self._setStatus(_("Could not read the model list: {error}").format(error=error), error=True)
        if select is not None and combo.findData(select) >= 0:
            combo.setCurrentIndex(combo.findData(select))
        combo.blockSignals(wasBlocked)
        self._onModelChanged(combo.currentIndex)

    def _activeVolume(self):
        """The volume shown in the slice views, else the first scalar volume (never a label map)."""
        selection = slicer.app.applicationLogic().GetSelectionNode()
        volume = slicer.mrmlScene.GetNodeByID(selection.GetActiveVolumeID()) if selection else None
        if volume is None or volume.IsA("vtkMRMLLabelMapVolumeNode"):
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if volume is not None and volume.IsA("vtkMRMLLabelMapVolumeNode"):
            return None
        return volume

    # ------------------------------------------------------------------ device detection (imports torch: background)
    def _detectDevicesInBackground(self) -> None:
        from HSAMSlicerLib import dependencies

        if self._deviceTask is not None:
            return
        if not dependencies.torch_installed():
            self.ui.deviceInfoLabel.text = _("PyTorch is not installed yet (installed on first run)")
            return
        self.ui.deviceInfoLabel.text = _("Detecting...")
        self._deviceTask = BackgroundTask(lambda progress, cancel, status: dependencies.detect_devices(),
                                          name="HSAMSlicer device detection").start()  # fmt: skip
        self._timer.start()

    def _pollDeviceTask(self) -> None:
        from HSAMSlicerLib import dependencies

        state = self._deviceTask.poll()
        if not state.done:
            return
        if state.error is None:
            self.ui.deviceInfoLabel.text = dependencies.describe_devices(state.result)
            self.ui.deviceInfoLabel.toolTip = _("PyTorch {version}").format(version=state.result.get("torch", "?"))
        else:
            self.ui.deviceInfoLabel.text = _("PyTorch could not be loaded: {error}").format(error=state.error)
        self._deviceTask = "done"

    # ------------------------------------------------------------------ segmentation
    def onApplyButton(self) -> None:
        if self._task is not None:
            if self._taskContext is not None:
                self._task.cancel()
                self.ui.applyButton.enabled = False
                self._setStatus(_("Cancelling after the current slices..."))
            return
        if not self._ensureDependencies():
            return
        from hsam.errors import HSAMError

        node = self._parameterNode
        volume = node.inputVolume
        options = RunOptions(
            model=node.modelId,
            device=node.device,
            organs=[int(v) for v in node.organs.split(",") if v.strip()],
            confidence=node.createConfidence,
            largest_component=node.largestComponent,
            show_3d=node.showIn3D,
        )
        try:
            image = self.logic.volume_to_image(volume)  # MRML is read here, on the main thread
        except HSAMError as error:
            self._setStatus(str(error), error=True)
            return
        logic = self.logic

        def job(progress, cancel, status):  # runs in the worker thread: no MRML, no Qt
            return logic.compute(image, options, progress=progress, cancel=cancel, status=status)

        self._taskContext = (volume.GetID(), options)
        self._startTask(job, self._finishSegmentation, _("Starting..."))
        self.ui.applyButton.text = _("Cancel")
        self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is added to the scene.")

    def _startTask(self, job, finish, message: str) -> None:
        """Run ``job(progress, cancel, status)`` in the worker; ``finish(state)`` runs on the main thread after."""
        self._task = BackgroundTask(job).start()
        self._taskFinish = finish
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress report
        self.ui.progressBar.setFormat("")
        self.ui.progressBar.show()
        self._setStatus(message)
        self._updateButtons()
        self._timer.start()

    def _poll(self) -> None:
        if isinstance(self._deviceTask, BackgroundTask):
            self._pollDeviceTask()
        if self._task is None:
            if not isinstance(self._deviceTask, BackgroundTask):
                self._timer.stop()
            return
        state = self._task.poll()
        if not state.done:
            if state.total:
                self.ui.progressBar.setRange(0, state.total)
                self.ui.progressBar.setValue(state.current)
                eta = format_eta(state.eta_s)
                text = _("Slice {current}/{total}").format(current=state.current, total=state.total)
                self.ui.progressBar.setFormat(text + (_(", about {eta} left").format(eta=eta) if eta else ""))
                if not state.cancel_requested:
                    self._setStatus(_("Segmenting..."))
            elif state.message:
                self._setStatus(state.message)
            return
        finish = self._taskFinish
        self._task = None
        self._taskFinish = None
        self.ui.progressBar.hide()
        try:
            finish(state)
        finally:
            self._taskContext = None
            self._updateButtons()

    def _finishSegmentation(self, state) -> None:
        from hsam.errors import HSAMError
        from hsam.inference import Cancelled

        volumeID, options = self._taskContext
        if isinstance(state.error, Cancelled) or (state.error is None and state.cancel_requested):
            self._setStatus(_("Cancelled: nothing was added to the scene."))
            return
        if state.error is not None:
            self._reportError(state.error)
            return
        volume = slicer.mrmlScene.GetNodeByID(volumeID)
        if volume is None:
            self._setStatus(_("The input volume was removed while segmenting: the result was dropped."), error=True)
            return
        result, card = state.result
        try:
            with slicer.util.WaitCursor():
                segmentation = self.logic.apply_result(volume, result, card, options)
        except HSAMError as error:
            self._setStatus(str(error), error=True)
            return
        self._parameterNode.outputSegmentation = segmentation
        if self.ui.modelComboBox.findData(options.model) >= 0:
            self._fillModelList(select=options.model)  # a model downloaded by this run is now listed as installed
        from hsam.labels import organ

        chosen = [organ(int(value)).name for value in options.organs or []]
        found = sum(1 for name in chosen if (result.volumes_ml or {}).get(name, 0.0) > 0)
        message = _("Done in {seconds:.0f} s on {device}: {found} of {total} organs found. Check them with Review in "
                    "Segment Editor.").format(seconds=state.elapsed_s, device=result.device, found=found,
                                              total=len(options.organs or []))  # fmt: skip
        for warning in getattr(result, "warnings", None) or []:
            message += " " + _("Warning: {text}.").format(text=warning)
        self._setStatus(message, error=bool(getattr(result, "warnings", None)))

    # ------------------------------------------------------------------ dependencies (one confirmation)
    def _ensureDependencies(self) -> bool:
        """torch through PyTorchUtils, requirements.txt and the weight-only wheels, after one confirmation."""
        from HSAMSlicerLib import dependencies

        requirements = pathlib.Path(_resource(dependencies.REQUIREMENTS_FILE))
        needTorch = not dependencies.torch_installed()
        missing = dependencies.missing_requirements(requirements)
        weightWheels = dependencies.missing_no_deps_requirements()

        def satisfied() -> bool:
            return (dependencies.torch_installed() and not dependencies.missing_requirements(requirements)
                    and not dependencies.missing_no_deps_requirements())  # fmt: skip

        if not needTorch and not missing and not weightWheels:
            return True
        if slicer.app.testingEnabled():
            names = ", ".join((["torch"] if needTorch else []) + missing + weightWheels)
            self._setStatus(_("Missing Python packages: {names}").format(names=names), error=True)
            return False
        packaging = getattr(slicer, "packaging", None)
        if not needTorch and not weightWheels and packaging is not None and hasattr(packaging, "pip_ensure"):
            # Slicer 5.12+: checks, asks once, installs with progress and offers a restart if needed.
            packaging.pip_ensure(packaging.load_requirements(str(requirements)), requester="HSAMSlicer")
            return satisfied()
        lines = ([_("PyTorch (through the PyTorch extension; it picks the build for your GPU, up to a few GB)")]
                 if needTorch else []) + missing + weightWheels  # fmt: skip
        question = _("H-SAM Organ Segmentation needs these Python packages. Download and install them now?")
        if not slicer.util.confirmOkCancelDisplay(question + "\n\n" + "\n".join(f"- {line}" for line in lines),
                                                  windowTitle=_("Install Python packages")):  # fmt: skip
            self._setStatus(_("Python packages were not installed: segmentation needs them."), error=True)
            return False
        with slicer.util.tryWithErrorDisplay(_("Installing Python packages failed."), waitCursor=True):
            if needTorch:
                try:
                    import PyTorchUtils
                except ImportError:
                    slicer.util.errorDisplay(_("Install the PyTorch extension from the Extensions Manager, restart "
                                               "Slicer, and click Segment organs again."))  # fmt: skip
                    return False
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=dependencies.TORCH_REQUIREMENT
                )
                if torch is None:
                    return False
            if missing:
                if packaging is not None and hasattr(packaging, "pip_install"):
                    packaging.pip_install(missing)
                else:
                    slicer.util.pip_install(missing)
            if weightWheels:
                slicer.util.pip_install("--no-deps " + " ".join(weightWheels))
        return satisfied()

    # ------------------------------------------------------------------ models
    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Import a model file"), "",
            _("H-SAM models (model.json model.safetensors *.pth);;All files (*)"),
        )  # fmt: skip
        if not path:
            return
        if path.lower().endswith((".pth", ".pt")) and not self._ensureDependencies():
            return  # converting an official checkpoint needs torch
        logic = self.logic

        def job(progress, cancel, status):  # download of the SAM base weights + conversion: worker thread
            return logic.import_model_file(path, status=status)

        def finish(state) -> None:
            if state.error is not None:
                self._reportError(state.error)
                return
            self._fillModelList(select=state.result)
            self._setStatus(_("Imported model {name} from {path}").format(name=state.result, path=path))

        self._startTask(job, finish, _("Importing {path}...").format(path=path))

    def onClearCache(self) -> None:
        from hsam import weights

        downloaded = self.logic.downloaded_models()  # only what can be downloaded again
        if not downloaded:
            self._setStatus(_("No downloaded models to delete."))
            return
        if not slicer.util.confirmOkCancelDisplay(
            _("Delete these downloaded models from {folder}? They are downloaded again when needed.").format(
                folder=weights.hsam_home()) + "\n\n" + "\n".join(downloaded)):  # fmt: skip
            return
        for model_id in downloaded:
            weights.remove_model(model_id)
        self.logic.forget_models()
        self._fillModelList()
        self._setStatus(_("Deleted {count} downloaded models.").format(count=len(downloaded)))

    # ------------------------------------------------------------------ review and export
    def onReview(self) -> None:
        segmentation = self._parameterNode.outputSegmentation
        volume = self.logic.source_volume(segmentation) or self._parameterNode.inputVolume
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(volume)
        else:  # Slicer < 5.4
            editor.setMasterVolumeNode(volume)
        slicer.util.setSliceViewerLayers(background=volume, fit=True)

    def onExport(self) -> None:
        from hsam.errors import HSAMError

        node = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                folder = self.logic.export_for_finetuning(node.outputSegmentation, node.exportDirectory)
        except HSAMError as error:
            self._setStatus(str(error), error=True)
            return
        self._setStatus(_("Exported a training case to {folder}").format(folder=folder))

    def _reportError(self, error: BaseException) -> None:
        """HSAMError: its one line says what to do. Anything else is a bug: short line here, traceback in the log."""
        from hsam.errors import HSAMError

        if isinstance(error, HSAMError):
            self._setStatus(str(error), error=True)
            return
        logging.error("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        self._setStatus(_("Failed: {error}. Details are in the Python console.").format(error=error), error=True)

    def _setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b" if error else "")
        if error:
            logging.warning(f"HSAMSlicer: {text}")


#
# HSAMSlicerLogic
#


class HSAMSlicerLogic(ScriptedLoadableModuleLogic, _QtFreeLogic):
    """The Qt-free HSAMSlicerLib logic plus Slicer's parameter-node plumbing (getParameterNode)."""

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _QtFreeLogic.__init__(self, scene)

    def getParameterNode(self):
        return HSAMSlicerParameterNode(super().getParameterNode())


#
# HSAMSlicerTest
#


class HSAMSlicerTest(ScriptedLoadableModuleTest):
    """The whole path in a real Slicer on CPU with a tiny random-weight model: seconds, no download."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_HSAMSlicer_whole_path()
        self.setUp()
        self.test_HSAMSlicer_rejects_label_map()

    def test_HSAMSlicer_whole_path(self) -> None:
        import tempfile

        from HSAMSlicerLib import dependencies
        from HSAMSlicerLib.testing import check_whole_path

        if not dependencies.torch_installed():
            self.delayDisplay("PyTorch is not installed: install it (PyTorch Utils module) to run this test")
            return
        with tempfile.TemporaryDirectory() as temporary:
            check_whole_path(HSAMSlicerLogic(), temporary, log=self.delayDisplay)  # also run headless by pytest
        self.delayDisplay("Test passed")

    def test_HSAMSlicer_rejects_label_map(self) -> None:
        import numpy as np

        from hsam.errors import HSAMError

        labelMap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(labelMap, np.zeros((4, 8, 8), dtype=np.uint8))
        with self.assertRaises(HSAMError):
            HSAMSlicerLogic().volume_to_image(labelMap)
        self.delayDisplay("Test passed")
