"""The Models section: model and device lists, device detection (a child job), importing models, the cache, and the
one confirmation before Python packages are installed.

A mixin of ``HSAMSlicerWidget`` (HSAMSlicer.py): ``self`` is the widget, with its ``ui``, ``logic``, parameter node,
status line and job list. Qt is imported here, in the GUI only; the work is done by the Qt-free HSAMSlicerLib.
"""

import logging
import pathlib
from typing import Optional

import qt
import slicer
from slicer.i18n import tr as _

from HSAMSlicerGUI.common import resource as _resource


class ModelsSection:
    """The Models section (mixin of HSAMSlicerWidget)."""

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

    def _onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.modelId = self.ui.modelComboBox.itemData(index) or ""

    def _onDeviceChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

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
