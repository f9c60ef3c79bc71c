"""HSAMSlicer: prompt-free segmentation of eight abdominal organs in CT with H-SAM (Cheng et al., CVPR 2024).

The four classes Slicer expects live here: the module description, the GUI (a thin widget whose panel sections are
mixins in HSAMSlicerGUI: segment, prompts, models, fine-tune), the Logic (re-exported from HSAMSlicerLib.logic, where it
is Qt-free and testable headless) and the self-test. Slicer's process never imports torch
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

from HSAMSlicerGUI.common import resource as _resource
from HSAMSlicerGUI.finetune_section import FinetuneSection
from HSAMSlicerGUI.models_section import ModelsSection
from HSAMSlicerGUI.prompts_section import PromptsSection
from HSAMSlicerGUI.segment_section import SegmentSection
from HSAMSlicerLib.logic import HSAMSlicerLogic as _QtFreeLogic
from HSAMSlicerLib.logic import RunOptions, SegmentationJob
from HSAMSlicerLib.process import ChildCrashed, JobCancelled, format_eta

__all__ = [
    "HSAMSlicer", "HSAMSlicerLogic", "HSAMSlicerParameterNode", "HSAMSlicerTest", "HSAMSlicerWidget", "RunOptions",
]  # fmt: skip


MINIMUM_SLICER = (5, 6)  # parameterNodeWrapper GUI connection and slicer.i18n; also in README and CMakeLists.txt


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


class HSAMSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin, SegmentSection, PromptsSection,
                       ModelsSection, FinetuneSection):
    """The GUI. It reads the parameter node, starts child jobs through the Logic, polls them and shows what happened.
    Each panel section is a mixin in HSAMSlicerGUI (segment, prompts, models, fine-tune); this class holds what they
    share: set-up, the parameter node, the job list and its timer, the status line and error reporting."""

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
        self._setupPrompts()

        problem = slicerVersionProblem()
        if problem:
            self._setStatus(problem, error=True)
            self.ui.applyButton.enabled = False
            return
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """The module is closed or Slicer quits: end every child process now and remove its files."""
        self._stopAllJobs()
        self._stopPrompts()
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
        self._updatePromptButtons()






    # ------------------------------------------------------------------ segmentation
    def _cancelledOrBusy(self, kind: str) -> bool:
        """The button of a running job cancels it; an import (or missing packages) blocks a new one. A segmentation
        and a fine-tune run side by side."""
        if kind in self._jobs:
            self._cancelJob(kind)
            return True
        return "import" in self._jobs or not self._ensureDependencies()




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
