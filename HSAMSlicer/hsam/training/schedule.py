"""The learning-rate schedule of the H-SAM recipe (hsam-model.md §2.4): linear warm-up, then poly decay.

Step ``s`` (optimizer steps counted from 0) runs at

* ``base / W`` for s = 0,
* ``base · min(s, W) / W`` for 1 <= s <= W (warm-up; ``W`` = ``warmup_iters``, 250),
* ``base · (1 − (s − 1 − W) / max_it) ^ 0.9`` after that, with ``max_it = epochs × iterations per epoch``,

which is what the released loop sets after each step ``it = s − 1``. A pure function of the step, so resuming needs
only the step count.
"""

from __future__ import annotations

import torch


def learning_rate(step: int, base_lr: float, warmup_iters: int, max_iters: int, power: float = 0.9) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if warmup_iters > 0:
        if step == 0:
            return base_lr / warmup_iters
        if step <= warmup_iters:
            return base_lr * step / warmup_iters
        shift = step - 1 - warmup_iters
    else:
        shift = step - 1 if step > 0 else 0
    return base_lr * max(0.0, 1.0 - shift / max_iters) ** power


class PaperSchedule:
    """Sets the optimizer's lr before each step; ``state_dict`` is just the step count."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup_iters: int, max_iters: int,
                 power: float = 0.9):
        self.optimizer, self.base_lr, self.warmup_iters = optimizer, base_lr, warmup_iters
        self.max_iters, self.power, self.step_count = max(1, max_iters), power, 0
        self._apply()

    def current(self) -> float:
        return learning_rate(self.step_count, self.base_lr, self.warmup_iters, self.max_iters, self.power)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.current()

    def step(self) -> None:
        """Call after ``optimizer.step()``: moves to the next step's lr."""
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
