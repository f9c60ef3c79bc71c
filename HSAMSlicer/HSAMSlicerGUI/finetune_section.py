"""The Fine-tune section: start a fine-tune (a child job) and describe its epochs and result.

A mixin of ``HSAMSlicerWidget`` (HSAMSlicer.py): ``self`` is the widget, with its ``ui``, ``logic``, parameter node,
status line and job list. Qt is imported here, in the GUI only; the work is done by the Qt-free HSAMSlicerLib.
"""

from slicer.i18n import tr as _


class FinetuneSection:
    """The Fine-tune section (mixin of HSAMSlicerWidget)."""

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
