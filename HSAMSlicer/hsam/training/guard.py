"""The forgetting guard that acts: an epoch whose reference Dice fell by more than ``guard.margin`` is not kept.

``hsam finetune`` scores the starting model on the reference cases the base model was validated on (the "before").
With a margin, the reference cases are also scored after every epoch; only epochs within ``before - margin`` may
become the best epoch, so the saved model is the best epoch that respects the margin. When no epoch does, the
starting weights are kept, the record says ``within_margin: false`` and the Slicer module keeps the base model
selected. Without a margin (``null``) the guard only reports, as before issue 28.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping


@dataclass
class ForgettingGuard:
    """``margin``: the largest allowed drop of the reference Dice (None: report only); ``before``: the starting
    model's reference Dice (None: no reference cases)."""

    margin: float | None
    before: float | None
    over: list[int] = field(default_factory=list)  # 1-based epochs whose reference drop broke the margin

    @property
    def acting(self) -> bool:
        return self.margin is not None and self.before is not None

    def allows(self, epoch: int, dice: float) -> bool:
        """Whether epoch ``epoch`` (0-based), with reference Dice ``dice``, may be kept; a refused epoch is
        remembered."""
        if not self.acting or math.isnan(dice):
            return True
        if self.before - dice <= self.margin + 1e-12:
            return True
        self.over.append(epoch + 1)
        return False

    def replay(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Rebuild the refused epochs from ``log.csv`` rows (a resumed run)."""
        for row in history:
            if "reference_dice" in row:
                self.allows(int(row["epoch"]), float(row["reference_dice"]))

    def record(self, kept_epoch: int | None) -> dict[str, Any]:
        """The guard's verdict for the saved model: ``kept_epoch`` is the 1-based epoch saved (0: the starting
        weights, None: the last epoch, nothing selected)."""
        if not self.acting:
            return {"margin": self.margin, "within_margin": None, "epochs_over_margin": [], "kept_epoch": kept_epoch}
        return {"margin": self.margin, "within_margin": kept_epoch != 0, "epochs_over_margin": list(self.over),
                "kept_epoch": kept_epoch}
