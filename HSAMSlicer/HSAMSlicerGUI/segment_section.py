"""The Segment section: organ list, Segment organs (a child job), the result in the scene, Review and Export.

A mixin of ``HSAMSlicerWidget`` (HSAMSlicer.py): ``self`` is the widget, with its ``ui``, ``logic``, parameter node,
status line and job list. Qt is imported here, in the GUI only; the work is done by the Qt-free HSAMSlicerLib.
"""

import qt
import slicer
from slicer.i18n import tr as _

from HSAMSlicerLib.logic import NotCT, RunOptions, SegmentationJob, organs_selected


class SegmentSection:
    """The Segment section (mixin of HSAMSlicerWidget)."""

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

    def _onOrgansChanged(self, item=None) -> None:
        if not self._parameterNode:
            return
        values = []
        for row in range(self.ui.organListWidget.count):
            entry = self.ui.organListWidget.item(row)
            if entry.checkState() == qt.Qt.Checked:
                values.append(str(entry.data(qt.Qt.UserRole)))
        self._parameterNode.organs = ",".join(values)

    def _activeVolume(self):
        """The volume shown in the slice views, else the first scalar volume (never a label map)."""
        selection = slicer.app.applicationLogic().GetSelectionNode()
        volume = slicer.mrmlScene.GetNodeByID(selection.GetActiveVolumeID()) if selection else None
        if volume is None or volume.IsA("vtkMRMLLabelMapVolumeNode"):
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if volume is not None and volume.IsA("vtkMRMLLabelMapVolumeNode"):
            return None
        return volume

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
