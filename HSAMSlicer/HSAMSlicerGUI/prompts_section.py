"""The "Correct with prompts" section: pick an organ segment, drag a box or click +/- on any slice view, Propagate,
Undo. The work is :class:`HSAMSlicerLib.prompt_logic.PromptLogic` (Qt-free, tested headless); this class only turns
markups into RAS positions, polls the warm process from a QTimer and shows the outcome in its status line.

A mixin of ``HSAMSlicerWidget`` (HSAMSlicer.py): ``self`` is the widget, with its ``ui``, parameter node and
``_reportingErrors``. Not run in a real Slicer here (no Qt in this environment); see docs/slicer.md.
"""

import logging

import qt
import slicer
from slicer.i18n import tr as _

PROMPT_POLL_MS = 100  # a poll only reads a file and, when an answer is there, writes a crop of one segment
BOX_NAME, POSITIVE_NAME, NEGATIVE_NAME = "H-SAM box", "H-SAM + points", "H-SAM - points"


class PromptsSection:
    """The prompt section (mixin of HSAMSlicerWidget)."""

    def _setupPrompts(self) -> None:
        self._promptLogic = None
        self._promptMarkups = {}  # name -> markups node placed by this section
        self._promptTimer = qt.QTimer()
        self._promptTimer.setInterval(PROMPT_POLL_MS)
        self._promptTimer.connect("timeout()", self._pollPrompts)
        self.ui.promptBoxButton.connect("clicked(bool)", lambda checked=False: self._placePrompt(BOX_NAME))
        self.ui.promptPositiveButton.connect("clicked(bool)", lambda checked=False: self._placePrompt(POSITIVE_NAME))
        self.ui.promptNegativeButton.connect("clicked(bool)", lambda checked=False: self._placePrompt(NEGATIVE_NAME))
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.promptUndoButton.connect("clicked(bool)", self.onPromptUndo)

    def _stopPrompts(self) -> None:
        """Module closed or Slicer quits: end the warm process (its whole process group) and stop polling."""
        self._promptTimer.stop()
        if self._promptLogic is not None:
            self._promptLogic.close()
            self._promptLogic = None

    def _updatePromptButtons(self) -> None:
        """Fill the organ-segment list from the segmentation under review; enable what can run."""
        node = self._parameterNode
        segmentation = node.outputSegmentation if node else None
        combo = self.ui.promptSegmentComboBox
        chosen = combo.itemData(combo.currentIndex) if combo.count else None
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if segmentation is not None:
            segments = segmentation.GetSegmentation()
            for index in range(segments.GetNumberOfSegments()):
                segmentId = segments.GetNthSegmentID(index)
                combo.addItem(segments.GetSegment(segmentId).GetName(), segmentId)
        if chosen is not None and combo.findData(chosen) >= 0:
            combo.setCurrentIndex(combo.findData(chosen))
        combo.blockSignals(wasBlocked)
        ready = combo.count > 0 and self._promptVolume() is not None
        for button in (self.ui.promptBoxButton, self.ui.promptPositiveButton, self.ui.promptNegativeButton,
                       self.ui.propagateButton):  # fmt: skip
            button.enabled = ready
        self.ui.promptUndoButton.enabled = bool(self._promptLogic and self._promptLogic.undo_stack.steps)

    def _promptVolume(self):
        node = self._parameterNode
        if not node or not node.outputSegmentation:
            return None
        return self.logic.source_volume(node.outputSegmentation) or node.inputVolume

    def _promptTarget(self):
        """(segmentation, segment ID, CT) to prompt on; starts the warm process for the CT (once per CT/model)."""
        from HSAMSlicerLib.prompt_logic import PromptLogic

        node = self._parameterNode
        volume = self._promptVolume()
        model = node.modelId if node.modelId in self._installedModelIds() else None
        if self._promptLogic is not None and self._promptLogic.model != model:
            self._stopPrompts()
        if self._promptLogic is None:
            self._promptLogic = PromptLogic(slicer.mrmlScene, model=model)
            self._promptLogic.before_change = self._saveSegmentEditorUndoState
        if self._promptLogic.volume_id != volume.GetID():
            self._setPromptStatus(_("Starting the prompt process for {name} (the first mask takes longer)...").format(
                name=volume.GetName()))  # fmt: skip
        with slicer.util.WaitCursor():  # writes the CT once (uncompressed, a fraction of a second)
            self._promptLogic.open(volume)
        combo = self.ui.promptSegmentComboBox
        return node.outputSegmentation, combo.itemData(combo.currentIndex), volume

    @staticmethod
    def _installedModelIds() -> set:
        from hsam.weights.store import available_models

        return {model.id for model in available_models()}

    # ------------------------------------------------------------------ markups -> prompts
    def _placePrompt(self, name: str) -> None:
        """Put the slice views in place mode for a box (a markups ROI) or a +/- point (markups fiducials)."""
        className = "vtkMRMLMarkupsROINode" if name == BOX_NAME else "vtkMRMLMarkupsFiducialNode"
        markups = self._promptMarkups.get(name)
        if markups is None or slicer.mrmlScene.GetNodeByID(markups.GetID()) is None:
            markups = slicer.mrmlScene.AddNewNodeByClass(className, name)
            markups.CreateDefaultDisplayNodes()
            markups.SetHideFromEditors(True)
            self._promptMarkups[name] = markups
            self.addObserver(markups, markups.PointPositionDefinedEvent, self._onPromptPlaced)
            if name == BOX_NAME:  # dragging the box's handles prompts again; a dragged point would add a new click
                self.addObserver(markups, markups.PointEndInteractionEvent, self._onPromptPlaced)
        if name == BOX_NAME:
            markups.RemoveAllControlPoints()  # a new box replaces the old one
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(className)
        selection.SetActivePlaceNodeID(markups.GetID())
        slicer.app.applicationLogic().GetInteractionNode().SetCurrentInteractionMode(
            slicer.vtkMRMLInteractionNode.Place)  # fmt: skip

    def _onPromptPlaced(self, caller, event) -> None:
        from HSAMSlicerLib.prompt_logic import roi_corners

        name = caller.GetName()
        with self._reportingErrors():
            segmentation, segmentId, volume = self._promptTarget()
            if name == BOX_NAME:
                if caller.GetNumberOfDefinedControlPoints() == 0:
                    return  # still being drawn
                self._promptLogic.box(segmentation, segmentId, volume, roi_corners(caller), done=self._promptDone)
            else:
                last = caller.GetNumberOfControlPoints() - 1
                position = [0.0, 0.0, 0.0]
                caller.GetNthControlPointPositionWorld(last, position)
                self._promptLogic.point(segmentation, segmentId, volume, position, name == POSITIVE_NAME,
                                        done=self._promptDone)  # fmt: skip
            self._setPromptStatus(_("Segmenting the prompt..."))
            self._promptTimer.start()

    def onPropagate(self) -> None:
        with self._reportingErrors():
            segmentation, segmentId, volume = self._promptTarget()
            limits = None
            if self.ui.promptLimitCheckBox.checked:
                limits = (self.ui.promptFromSpinBox.value, self.ui.promptToSpinBox.value)
            self._promptLogic.propagate(segmentation, segmentId, volume, limits, done=self._promptDone)
            self._setPromptStatus(_("Propagating..."))
            self._promptTimer.start()

    def onPromptUndo(self) -> None:
        if self._promptLogic is None:
            return
        with self._reportingErrors():
            self._setPromptStatus(self._promptLogic.undo().message)
            self._promptTimer.start()  # collects the prompt process's answer to its own undo
        self._updatePromptButtons()

    # ------------------------------------------------------------------ following the warm process
    def _pollPrompts(self) -> None:
        if self._promptLogic is None:
            self._promptTimer.stop()
            return
        notes = len(self._promptLogic.notes())
        with self._reportingErrors():
            self._promptLogic.poll()
        if len(self._promptLogic.notes()) > notes:  # a restart (or the final stop): one line, never a dialog
            self._setPromptStatus(self._promptLogic.notes()[-1], error=True)
        if not self._promptLogic.busy:
            self._promptTimer.stop()

    def _promptDone(self, outcome) -> None:
        self._setPromptStatus(outcome.message, error=outcome.error is not None)
        self._updatePromptButtons()

    def _saveSegmentEditorUndoState(self) -> None:
        """Segment Editor's own undo (Ctrl+Z) also gets the state before a prompt, when its editor is open on this
        segmentation."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except AttributeError:
            return
        node = self._parameterNode
        if editor is not None and node and editor.segmentationNode() == node.outputSegmentation:
            editor.saveStateForUndo()

    def _setPromptStatus(self, text: str, error: bool = False) -> None:
        self.ui.promptStatusLabel.text = text
        self.ui.promptStatusLabel.setStyleSheet("color: #c0392b" if error else "")
        if error:
            logging.warning(f"HSAMSlicer prompts: {text}")
