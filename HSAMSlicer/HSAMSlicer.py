"""HSAMSlicer: prompt-free segmentation of eight abdominal organs in CT with H-SAM (Cheng et al., CVPR 2024).

The four classes Slicer expects live here: the module description, the GUI (a thin widget), the Logic (re-exported from
HSAMSlicerLib.logic, where it is Qt-free and testable headless) and the self-test. Slicer's process never imports torch
or the network, and loading the module imports no SimpleITK (it is used only to read a finished run's labels and to
write an export): every long job (segmentation, model download and import, device detection, fine-tuning) is an
``hsam`` command in a child process, followed from a QTimer (HSAMSlicerLib.process). No
``from __future__ import annotations`` here: parameterNodeWrapper reads the parameter annotations as real types.
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
from HSAMSlicerLib.logic import NotCT, RunOptions, SegmentationJob, organs_selected
from HSAMSlicerLib.process import ChildCrashed, JobCancelled, format_eta

__all__ = [
    "HSAMSlicer", "HSAMSlicerLogic", "HSAMSlicerParameterNode", "HSAMSlicerTest", "HSAMSlicerWidget", "RunOptions",
]  # fmt: skip


MINIMUM_SLICER = (5, 6)  # parameterNodeWrapper GUI connection and slicer.i18n; also in README and CMakeLists.txt


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
            "<b>Export for fine-tuning</b> to collect training cases, and <b>Fine-tune</b> a model on them. "
            "<b>Not for clinical use:</b> research software; every result must be checked by a qualified person. "
            'See the <a href="https://github.com/hsamslicer/SlicerHSAM#readme">documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "H-SAM was published by Zhiheng Cheng, Qingyue Wei, Hongru Zhu, Yan Wang, Liangqiong Qu, Wei Shao and "
            "Yuyin Zhou: <i>Unleashing the Potential of SAM for Medical Adaptation via Hierarchical Decoding</i>, "
            "CVPR 2024 (arXiv:2403.18271). It builds on the Segment Anything Model (Kirillov et al., ICCV 2023). "
            "Please cite the paper when you use this module. Model weights carry their own licences, listed in the "
            "module's model list."
        )
        self.parent.icon = qt.QIcon(_resource("Icons/HSAMSlicer.png"))  # also found in a source checkout
        slicer.app.connect("startupCompleted()", registerSampleData)  # registration needs the app to be up


def slicerVersionProblem() -> str:
    """Why this Slicer is too old for the module, or '' when it is recent enough."""
    version = (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    if version >= MINIMUM_SLICER:
        return ""
    return _("H-SAM Organ Segmentation needs 3D Slicer {minimum} or later; this is {version}. Install a recent Slicer "
             "from download.slicer.org.").format(minimum="{}.{}".format(*MINIMUM_SLICER),
                                                 version="{}.{}".format(*version))  # fmt: skip


#
# Sample data: a small real abdominal CT (TotalSegmentator's test image, Apache-2.0), for the tutorial in docs/slicer.md
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
    finetuneCases / finetuneEpochs / finetuneModelName - the Fine-tune section (empty name: "<base model>-ft").
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
    finetuneCases: pathlib.Path = pathlib.Path.home() / "HSAMSlicer-cases"
    finetuneEpochs: int = 10
    finetuneModelName: str = ""


#
# HSAMSlicerWidget
#


class HSAMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The GUI. It reads the parameter node, starts child jobs through the Logic, polls them and shows what happened."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        # kind -> (running ChildJob or SegmentationJob, finish(state) called on the main thread when it has ended).
        # "segment" (a segmentation, or the model download before it) and "finetune" run side by side; "import" alone.
        self._jobs = {}
        self._deviceJob = None  # ChildJob running `hsam devices` (imports torch in the child)
        self._devicesKnown = False
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resource("UI/HSAMSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = HSAMSlicerLogic()
        self.logic.sweep_stale_job_folders()  # folders a crash of Slicer left in the temporary folder

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
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self._onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self._onDeviceChanged)
        self.ui.organListWidget.connect("itemChanged(QListWidgetItem*)", self._onOrgansChanged)

        problem = slicerVersionProblem()
        if problem:
            self._setStatus(problem, error=True)
            self.ui.applyButton.enabled = False
            return
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """The module is closed or Slicer quits: end every child process now and remove its files."""
        self._stopAllJobs()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def _stopAllJobs(self) -> None:
        if self.logic is not None:
            self.logic.stop_jobs()
        if self._deviceJob is not None:
            self.ui.deviceInfoLabel.text = ""  # detected again when the module is entered
        self._jobs, self._deviceJob = {}, None

    def enter(self) -> None:
        if slicerVersionProblem():
            return
        self.initializeParameterNode()
        self._detectDevices()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        """A segmentation stops (its volume goes; the Logic ends its child); a fine-tune or download goes on."""
        job = self._jobs.get("segment", (None,))[0]
        if isinstance(job, SegmentationJob):
            del self._jobs["segment"]
            self._setStatus(_("The scene was closed: the segmentation was stopped."))
            self.ui.progressBar.hide()
            self._updateButtons()
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
        running = bool(self._jobs)
        segmenting, finetuning, importing = ("segment" in self._jobs, "finetune" in self._jobs, "import" in self._jobs)
        ready = bool(node and node.inputVolume and node.modelId and node.organs)
        self.ui.applyButton.enabled = segmenting or (ready and not importing)
        self.ui.finetuneButton.enabled = finetuning or (
            not importing and self.ui.finetuneBaseComboBox.count > 0 and bool(node and str(node.finetuneCases) != "."))
        self.ui.importModelButton.enabled = not running
        self.ui.clearCacheButton.enabled = not running
        if not segmenting:
            self.ui.applyButton.text = _("Segment organs")
            if not (node and node.inputVolume):
                self.ui.applyButton.toolTip = _("Select a CT volume first.")
            elif not (node and node.modelId):
                self.ui.applyButton.toolTip = _("Choose a model, or import a model file.")
            elif not (node and node.organs):
                self.ui.applyButton.toolTip = _("Tick at least one organ.")
            else:
                self.ui.applyButton.toolTip = _("Segment the organs. While it runs, this button cancels.")
        if not finetuning:
            self.ui.finetuneButton.text = _("Fine-tune")
        hasSegmentation = bool(node and node.outputSegmentation)
        self.ui.reviewButton.enabled = hasSegmentation and not segmenting
        hasFolder = bool(node and str(node.exportDirectory) not in ("", "."))
        self.ui.exportButton.enabled = hasSegmentation and not segmenting and hasFolder

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
        """Installed models first (most accurate first; demo models say so), then manifest models to download. The
        Fine-tune section lists the installed models."""
        from hsam.weights.manifest import load_manifest
        from hsam.weights.store import available_models

        combo, bases = self.ui.modelComboBox, self.ui.finetuneBaseComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        bases.clear()
        installed = set()
        try:
            for model in available_models():
                installed.add(model.id)
                title = f"{model.title} ({model.id})"
                if model.demo:
                    title += " - " + _("demo, not for real use")
                combo.addItem(title, model.id)
                combo.setItemData(combo.count - 1, str(model.path), qt.Qt.ToolTipRole)
                bases.addItem(title, model.id)
            for entry in sorted(load_manifest().values(), key=lambda e: -e.priority):
                if entry.kind != "hsam" or entry.id in installed:
                    continue
                suffix = _("download on first use") if entry.downloadable else _("needs import, see tooltip")
                combo.addItem(f"{entry.title} ({entry.id}, {suffix})", entry.id)
                combo.setItemData(combo.count - 1, f"{entry.license}\n{entry.homepage}", qt.Qt.ToolTipRole)
        except Exception as error:  # a broken manifest or model folder must not prevent the module from opening
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

    # ------------------------------------------------------------------ device detection (imports torch: a child)
    def _detectDevices(self, again: bool = False) -> None:
        from HSAMSlicerLib import dependencies

        if self._deviceJob is not None or (self._devicesKnown and not again):
            return
        if not dependencies.torch_installed():
            self.ui.deviceInfoLabel.text = _("PyTorch is not installed yet (installed on first run)")
            return
        self.ui.deviceInfoLabel.text = _("Detecting...")
        try:
            self._deviceJob = self.logic.start_device_detection()
        except Exception as error:  # noqa: BLE001 (shown, never raised into Qt)
            self.ui.deviceInfoLabel.text = _("Could not detect devices: {error}").format(error=error)
            return
        self._timer.start()

    def _pollDeviceJob(self) -> None:
        from HSAMSlicerLib import dependencies

        state = self._deviceJob.poll()
        if not state.done:
            return
        if state.error is None:
            devices = state.result["devices"]
            self.ui.deviceInfoLabel.text = dependencies.describe_devices(devices)
            self.ui.deviceInfoLabel.toolTip = _("PyTorch {version}").format(version=devices.get("torch", "?"))
            self._devicesKnown = True
        else:
            self.ui.deviceInfoLabel.text = _("PyTorch could not be loaded: {error}").format(error=state.error)
        self._deviceJob.cleanup()
        self._deviceJob = None

    # ------------------------------------------------------------------ segmentation
    def _cancelledOrBusy(self, kind: str) -> bool:
        """The button of a running job cancels it; an import (or missing packages) blocks a new one. A segmentation
        and a fine-tune run side by side."""
        if kind in self._jobs:
            self._cancelJob(kind)
            return True
        return "import" in self._jobs or not self._ensureDependencies()

    def onApplyButton(self) -> None:
        if self._cancelledOrBusy("segment"):
            return
        node = self._parameterNode
        options = RunOptions(
            model=node.modelId,
            device=node.device,
            organs=[int(v) for v in node.organs.split(",") if v.strip()],
            confidence=node.createConfidence,
            largest_component=node.largestComponent,
            show_3d=node.showIn3D,
        )
        edited = self.logic.results_of_volume(node.inputVolume).edited
        if edited:
            choice = self._askAboutEditedResults(edited)
            if choice is None:
                return
            options.replace_edited = choice
        if self._downloadFirst(options.model):
            return
        with self._reportingErrors():
            try:
                with slicer.util.WaitCursor():  # a 512x512x600 CT is written in 1.5-3 s (its 300-600 MiB, no copy)
                    job = self.logic.start_segmentation(node.inputVolume, options)  # MRML is read on the main thread
            except NotCT as question:
                if not slicer.util.confirmOkCancelDisplay(str(question), windowTitle=_("Not a CT?")):
                    self._setStatus(_("Not segmented: the volume does not look like CT."))
                    return
                options.allow_non_ct = True
                job = self.logic.start_segmentation(node.inputVolume, options)
            self._startJob(job, "segment", lambda state: self._finishSegmentation(job, state), _("Starting..."))
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is added to the scene.")

    def _askAboutEditedResults(self, edited):
        """The user changed earlier results of this CT: keep them (default: the new result gets a numbered name) or
        replace them. Returns the results to replace (none or all), or None to not segment."""
        if slicer.app.testingEnabled():
            return ()
        names = "\n".join(f"- {result.name}" for result in edited)
        box = qt.QMessageBox(qt.QMessageBox.Question, _("Segment organs"),
                             _("You edited these results of this CT:\n{names}\n\nKeep them and add the new result "
                               "next to them, or replace them with the new result?").format(names=names),
                             qt.QMessageBox.NoButton, slicer.util.mainWindow())  # fmt: skip
        keep = box.addButton(_("Keep my edits"), qt.QMessageBox.AcceptRole)
        replace = box.addButton(_("Replace them"), qt.QMessageBox.DestructiveRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(keep)
        box.exec_()
        if box.clickedButton() == keep:
            return ()
        if box.clickedButton() == replace:
            return tuple(edited)
        return None

    def _downloadFirst(self, modelId: str) -> bool:
        """A manifest model that is not installed yet: show what it is and its terms, and on OK download it in a child
        process, then segment. True when the segmentation must wait (download started or declined)."""
        from hsam.paths import hsam_home
        from hsam.weights.manifest import load_manifest
        from hsam.weights.store import available_models

        entry = load_manifest().get(modelId)
        installed = {m.id for m in available_models()}
        if entry is None or entry.kind != "hsam" or modelId in installed or not entry.downloadable:
            return False
        size = sum(f.size or 0 for f in entry.files)
        terms = entry.license_text or _("Licence: {license}").format(license=entry.license or _("see the homepage"))
        text = _("{title} is downloaded now{size}, checked and kept in {folder}.\n\n{terms}\n\n{homepage}\n\n"
                 "Accept these terms and download it?").format(
            title=entry.title, size=f" ({round(size / 2**20)} MB)" if size else "", folder=hsam_home(),
            terms=terms, homepage=entry.homepage)  # fmt: skip
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Download a model")):
            self._setStatus(_("The model was not downloaded; choose another model or import one."))
            return True

        def finish(state) -> None:
            if not self._succeeded(state, _("Download cancelled; it continues where it stopped next time.")):
                return
            self._fillModelList(select=modelId)
            if not (self._parameterNode and self._parameterNode.inputVolume):  # the scene was closed meanwhile
                self._setStatus(_("Model {model} downloaded.").format(model=modelId))
                return
            self.onApplyButton()  # the model is installed now: segment as the user asked

        with self._reportingErrors():
            self._startJob(self.logic.start_model_download(modelId), "segment", finish,
                           _("Downloading {title}").format(title=entry.title))  # fmt: skip
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the download; it continues where it stopped next time.")
        return True

    def _startJob(self, job, kind: str, finish, message: str) -> None:
        """Follow ``job`` (a started child); ``finish(state)`` runs on the main thread when it has ended."""
        self._jobs[kind] = (job, finish)
        if kind != "finetune":  # the progress bar follows a segmentation or an import; a fine-tune shows its own line
            self.ui.progressBar.setRange(0, 0)  # busy until the first progress report
            self.ui.progressBar.setFormat("")
            self.ui.progressBar.show()
        self._setStatus(message)
        self._updateButtons()
        self._timer.start()

    def _succeeded(self, state, cancelledText: str) -> bool:
        """True when a finished job succeeded; a cancelled one shows ``cancelledText``, a failed one raises its error
        (reported by _poll)."""
        if isinstance(state.error, JobCancelled):
            self._setStatus(cancelledText)
            return False
        if state.error is not None:
            raise state.error
        return True

    def _cancelJob(self, kind: str) -> None:
        job = self._jobs.get(kind, (None,))[0]
        if job is None:
            return
        job.cancel()  # the child stops within about a second; _poll sees it end
        (self.ui.finetuneButton if kind == "finetune" else self.ui.applyButton).enabled = False
        self._setStatus(_("Cancelling..."))

    def _poll(self) -> None:
        if self._deviceJob is not None:
            self._pollDeviceJob()
        if not self._jobs:
            if self._deviceJob is None:
                self._timer.stop()
            return
        for kind, (job, finish) in list(self._jobs.items()):
            state = job.poll()
            if not state.done:
                self._showProgress(state, kind)
                continue
            del self._jobs[kind]
            if kind != "finetune":
                self.ui.progressBar.hide()
            try:
                with self._reportingErrors():
                    finish(state)
            finally:
                (job.job if isinstance(job, SegmentationJob) else job).cleanup()
                self._updateButtons()

    def _showProgress(self, state, kind: str) -> None:
        if state.cancel_requested:
            return
        if kind == "finetune":  # beside a segmentation: its own line in the Fine-tune section
            step = _("Step {current}/{total}").format(current=state.current, total=state.total) if state.total else ""
            epoch = self._describeEpoch(state.epochs[-1]) if state.epochs else state.message
            self.ui.finetuneResultLabel.text = _("Fine-tuning: {step} {epoch}").format(step=step, epoch=epoch or "")
            return
        if state.total and state.stage in ("segment", "train", "download"):
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.setValue(int(1000 * min(state.current, state.total) / state.total))
            eta = format_eta(state.eta_s)
            if state.stage == "segment":
                text = _("Slice {current}/{total}").format(current=state.current, total=state.total)
            elif state.stage == "train":
                text = _("Step {current}/{total}").format(current=state.current, total=state.total)
            else:
                text = _("{done} of {total} MB").format(done=state.current >> 20, total=state.total >> 20)
            self.ui.progressBar.setFormat(text + (_(", about {eta} left").format(eta=eta) if eta else ""))
        if state.epochs:
            self._setStatus(self._describeEpoch(state.epochs[-1]))
        elif state.stage == "segment" and state.total:
            self._setStatus(_("Segmenting..."))
        elif state.message:
            self._setStatus(state.message + "...")

    def _finishSegmentation(self, job: SegmentationJob, state) -> None:
        if not self._succeeded(state, _("Cancelled: nothing was added to the scene.")):
            return
        with slicer.util.WaitCursor():
            segmentation = self.logic.finish_segmentation(job, state)
        self._parameterNode.outputSegmentation = segmentation
        self._fillModelList(select=self._parameterNode.modelId)  # a model downloaded by this run is now installed
        self._resetViewsTo(segmentation)
        result = state.result["result"]
        from hsam.labels import organ

        organs = [o.index for o in organs_selected(job.options.organs)]  # the run's organs, not today's ticks

        found = sum(1 for value in organs if (result.get("volumes_ml") or {}).get(organ(value).name, 0.0) > 0)
        message = _("Done in {seconds:.0f} s on {device} (engine {engine}): {found} of {total} organs found. Check them "
                    "with Review in Segment Editor.").format(seconds=state.elapsed_s, device=result.get("device", "?"),
                                                             engine=result.get("mode", "?"), found=found,
                                                             total=len(organs))  # fmt: skip
        for warning in state.warnings:  # the run's own (e.g. not CT-like, CPU fallback) and the model's (demo)
            message += " " + _("Warning: {text}.").format(text=warning)
        self._setStatus(message, error=bool(result.get("warnings")))
        self.ui.statusLabel.toolTip = result.get("mode_reason", "")  # why this engine: the precision rule's evidence

    def _resetViewsTo(self, segmentation) -> None:
        """Show the CT in the slice views and centre the 3D view on the organs, unless the user has moved on to
        another volume while the run went on."""
        volume = self.logic.source_volume(segmentation)
        active = self._activeVolume()
        if volume is None or (active is not None and active.GetID() != volume.GetID()):
            return
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount > 0:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    # ------------------------------------------------------------------ dependencies (one confirmation)
    def _ensureDependencies(self) -> bool:
        """torch through PyTorchUtils, requirements.txt and the weight-only wheels, after one confirmation."""
        import importlib

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
        try:
            packaging = importlib.import_module("slicer.packaging")  # Slicer 5.12+; never imported by slicer itself
        except ImportError:
            packaging = None
        if not needTorch and not weightWheels and packaging is not None and hasattr(packaging, "pip_ensure"):
            # Slicer 5.12+: checks, asks once, installs with progress and offers a restart if needed.
            with self._reportingErrors(_("Installing Python packages failed.")):
                packaging.pip_ensure(packaging.load_requirements(str(requirements)), requester="HSAMSlicer")
            if not satisfied():
                self._setStatus(_("Python packages were not installed: segmentation needs them."), error=True)
                return False
            return True
        lines = ([_("PyTorch (through the PyTorch extension; it picks the build for your GPU, up to a few GB)")]
                 if needTorch else []) + missing + weightWheels  # fmt: skip
        question = _("H-SAM Organ Segmentation needs these Python packages. Download and install them now?")
        if not slicer.util.confirmOkCancelDisplay(question + "\n\n" + "\n".join(f"- {line}" for line in lines),
                                                  windowTitle=_("Install Python packages")):  # fmt: skip
            self._setStatus(_("Python packages were not installed: segmentation needs them."), error=True)
            return False
        with self._reportingErrors(_("Installing Python packages failed.")), slicer.util.WaitCursor():
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
                    self._setStatus(_("PyTorch was not installed: segmentation needs it."), error=True)
                    return False
            if missing:
                if packaging is not None and hasattr(packaging, "pip_install"):
                    packaging.pip_install(missing)
                else:
                    slicer.util.pip_install(missing)
            if weightWheels:
                slicer.util.pip_install("--no-deps " + " ".join(weightWheels))
        if needTorch and dependencies.torch_installed():
            self._detectDevices(again=True)
        if not satisfied():
            self._setStatus(_("Some Python packages could not be installed; see the Python console."), error=True)
            return False
        return True

    # ------------------------------------------------------------------ models
    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent, _("Import a model file"), "",
            _("H-SAM models (model.json model.safetensors *.pth *.pt);;All files (*)"),
        )  # fmt: skip
        if not path or self._jobs:
            return
        if not self._ensureDependencies():
            return

        def finish(state) -> None:
            if not self._succeeded(state, _("Import cancelled: nothing was installed.")):
                return
            self._fillModelList(select=state.result["id"])
            self._setStatus(_("Imported model {name} from {path}").format(name=state.result["id"], path=path))

        with self._reportingErrors():
            self._startJob(self.logic.start_model_import(path), "import", finish,
                           _("Importing {path}").format(path=path))  # fmt: skip

    def onClearCache(self) -> None:
        from hsam.paths import hsam_home
        from hsam.weights.store import remove_model

        downloaded = self.logic.downloaded_models()  # only what can be downloaded again
        if not downloaded:
            self._setStatus(_("No downloaded models to delete."))
            return
        if not slicer.util.confirmOkCancelDisplay(
            _("Delete these downloaded models from {folder}? They are downloaded again when needed.").format(
                folder=hsam_home()) + "\n\n" + "\n".join(downloaded)):  # fmt: skip
            return
        with self._reportingErrors():
            for model_id in downloaded:
                remove_model(model_id)
        self._fillModelList()
        self._setStatus(_("Deleted {count} downloaded models.").format(count=len(downloaded)))

    # ------------------------------------------------------------------ fine-tuning
    def onFinetuneButton(self) -> None:
        if self._cancelledOrBusy("finetune"):
            return
        node = self._parameterNode
        base = self.ui.finetuneBaseComboBox.itemData(self.ui.finetuneBaseComboBox.currentIndex) or ""
        name = node.finetuneModelName.strip() or f"{base}-ft"
        cases = node.finetuneCases

        def finish(state) -> None:
            if not self._succeeded(state, _("Fine-tuning cancelled: no model was added.")):
                return
            model = (state.result.get("model") or {}).get("id") or name
            worse = self.logic.finetune_worse_than_base(state.result)
            self._fillModelList(select=base if worse else model)
            summary = self._describeEpoch(state.epochs[-1]) if state.epochs else ""
            for key, label in (("held_out", _("held-out cases")), ("forgetting_guard", _("reference case"))):
                figures = state.result.get(key) or {}
                if figures.get("dice_before") is not None and figures.get("dice_after") is not None:
                    summary += " " + _("Dice on the {label}: {before:.3f} before, {after:.3f} after.").format(
                        label=label, before=figures["dice_before"], after=figures["dice_after"])  # fmt: skip
            folder = state.result.get("run_folder", "")
            if worse:  # a fine-tune that made the held-out cases worse must not become the default silently
                self.ui.finetuneResultLabel.text = _(
                    "New model {model} scores lower than {base} on the held-out cases or lost more than the allowed "
                    "margin on the reference case, so {base} stays selected. "
                    "{summary} Run folder: {folder}").format(model=model, base=base, summary=summary, folder=folder)
                self._setStatus(_("Fine-tuned model {model} is worse than {base} on the held-out or reference cases; "
                                  "{base} stays "
                                  "selected.").format(model=model, base=base))  # fmt: skip
                return
            self.ui.finetuneResultLabel.text = _("New model {model} (chosen above). {summary} Run folder: "
                                                 "{folder}").format(model=model, summary=summary, folder=folder)
            self._setStatus(_("Fine-tuned model {model} is ready; it is selected for the next segmentation.").format(
                model=model))  # fmt: skip

        with self._reportingErrors():
            job = self.logic.start_finetune(cases, base, node.finetuneEpochs, name, device=node.device)
            self._startJob(job, "finetune", finish, _("Starting fine-tuning of {base}").format(base=base))
            self.ui.finetuneButton.text = _("Cancel fine-tuning")

    @staticmethod
    def _describeEpoch(epoch: dict) -> str:
        """'Epoch 3/10: loss 0.412, validation Dice 0.81 (spleen 0.93, liver 0.95, ...)'."""
        text = _("Epoch {epoch}/{epochs}: loss {loss:.3f}").format(
            epoch=epoch.get("epoch"), epochs=epoch.get("epochs"), loss=epoch.get("loss") or 0.0)
        if epoch.get("val_dice") is not None:
            organs = ", ".join(f"{name} {value:.2f}" for name, value in (epoch.get("val_dice_organs") or {}).items()
                               if value is not None)
            text += _(", validation Dice {dice:.2f}").format(dice=epoch["val_dice"])
            text += f" ({organs})" if organs else ""
        return text

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
        node = self._parameterNode
        with self._reportingErrors(), slicer.util.WaitCursor():
            folder = self.logic.export_for_finetuning(node.outputSegmentation, node.exportDirectory)
            self._setStatus(self.logic.describe_export(folder))

    # ------------------------------------------------------------------ errors and status
    def _reportingErrors(self, what: Optional[str] = None):
        """A context that shows any error to the user and never lets it escape into Qt."""
        widget = self

        class Reporting:
            def __enter__(self):
                return self

            def __exit__(self, kind, error, trace) -> bool:
                if error is not None:
                    widget._reportError(error, what)
                return True

        return Reporting()

    def _reportError(self, error: BaseException, what: Optional[str] = None) -> None:
        """HSAMError: its one line says what to do. A crashed child or anything unexpected: a dialog with details."""
        from hsam.errors import HSAMError

        if "segment" not in self._jobs and "import" not in self._jobs:
            self.ui.progressBar.hide()
        self._updateButtons()
        if isinstance(error, HSAMError) and not isinstance(error, ChildCrashed):
            self._setStatus(str(error), error=True)
            return
        if isinstance(error, ChildCrashed):
            details = error.details
        else:
            details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            logging.error(details)
        self._setStatus(_("Failed: {error}").format(error=error), error=True)
        slicer.util.errorDisplay((what + "\n\n" if what else "") + str(error), detailedText=details,
                                 windowTitle=_("H-SAM Organ Segmentation"))  # fmt: skip

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

    def __init__(self, scene=None, child_env=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        _QtFreeLogic.__init__(self, scene, child_env)

    def getParameterNode(self):
        return HSAMSlicerParameterNode(super().getParameterNode())


#
# HSAMSlicerTest
#


class HSAMSlicerTest(ScriptedLoadableModuleTest):
    """The whole path in a real Slicer on CPU with a tiny random-weight model, run in a child process as the GUI
    runs it: seconds, no download, a temporary model home."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_HSAMSlicer_whole_path()
        self.setUp()
        self.test_HSAMSlicer_rejects_label_map()

    def test_HSAMSlicer_whole_path(self) -> None:
        import os
        import tempfile

        from HSAMSlicerLib import dependencies
        from HSAMSlicerLib.testing import check_whole_path

        missing = (["torch"] if not dependencies.torch_installed() else []) + dependencies.missing_requirements(
            pathlib.Path(_resource(dependencies.REQUIREMENTS_FILE)))
        if missing:
            self.delayDisplay(f"Skipped: Python packages missing ({', '.join(missing)}); click Segment organs once "
                              "to install them, then run this test again")
            return
        with tempfile.TemporaryDirectory() as temporary:
            previous = os.environ.get("HSAM_HOME")
            os.environ["HSAM_HOME"] = os.path.join(temporary, "hsam-home")  # never the user's ~/.hsam
            try:
                check_whole_path(HSAMSlicerLogic(), temporary, log=self.delayDisplay)  # also run headless by pytest
            finally:
                if previous is None:
                    os.environ.pop("HSAM_HOME", None)
                else:
                    os.environ["HSAM_HOME"] = previous
        self.delayDisplay("Test passed")

    def test_HSAMSlicer_rejects_label_map(self) -> None:
        import numpy as np

        from hsam.errors import HSAMError

        labelMap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(labelMap, np.zeros((4, 8, 8), dtype=np.uint8))
        with self.assertRaises(HSAMError):
            HSAMSlicerLogic().volume_to_image(labelMap)
        self.delayDisplay("Test passed")
