"""The engine of one run: device, precision, speed mode and batch size, and what an out-of-memory error changes.

On CUDA out-of-memory the batch is halved and retried; at batch 1 the run continues on the CPU (fast mode, fp32)
with a warning. The predictor (images [b,3,S,S] -> fused logits [b,K,S,S], :func:`hsam.engines.modes.prepare`) is
built on first use and again after a move to the CPU.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from hsam.pipeline.device import DEFAULT_BATCH, is_oom, select_device, select_precision

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.hsam import HSAM
    from hsam.pipeline.options import SegmentOptions

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """Where and how the network runs; ``target``, ``dtype``, ``batch``, ``mode`` change on an OOM fallback."""

    model: "HSAM"
    target: torch.device
    dtype: torch.dtype | None  # autocast dtype (None: fp32)
    precision: str
    batch: int
    mode: str  # concrete speed mode ("reference": the reference protocol's plain fp32 forward)
    reason: str  # why that mode runs
    requested_batch: int | None  # the caller's batch size (None: by device)
    say: Callable[[str], None]
    notes: list[str] = field(default_factory=list)  # warnings for the result
    built_for: torch.device | None = None  # device the current predictor was built for
    built: Callable[[torch.Tensor], torch.Tensor] | None = None

    def predictor(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The speed mode's predictor for ``target``, built on first use and after a move to the CPU."""
        from hsam.engines.modes import prepare

        if self.built_for != self.target:
            if self.built_for is not None:
                self.mode = "fast"  # after an out-of-memory fallback to the CPU: no export/quantisation mid-run
                self.reason = "moved to the CPU after running out of GPU memory"
            try:
                self.built = prepare(self.model, self.mode, self.target, say=self.say)
            except OSError as error:  # e.g. the exported-graph cache cannot be written (disk full): run without it
                self.reason = f"speed mode {self.mode} could not be prepared ({error.strerror or error})"
                self.notes.append(f"{self.reason}; ran in fast mode")
                self.mode = "fast"
                self.built = prepare(self.model, self.mode, self.target, say=self.say)
            self.built_for = self.target
        return self.built

    def place_model(self) -> None:
        """Put the model in eval mode on ``target`` (on the CPU when the GPU has no room for it)."""
        self.model.eval()
        try:
            self.model.to(self.target)
        except Exception as error:  # noqa: BLE001
            if not is_oom(error) or self.target.type == "cpu":
                raise
            self.fall_back_to_cpu()

    def recover(self, error: BaseException) -> bool:
        """After a failed batch: True when the batch should be retried (halved batch, or moved to the CPU)."""
        if not is_oom(error) or self.target.type == "cpu":
            return False
        if self.target.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch > 1:
            self.batch = max(1, self.batch // 2)
            log.warning("out of GPU memory: retrying with batch size %d", self.batch)
            return True
        self.fall_back_to_cpu()
        return True

    def fall_back_to_cpu(self) -> None:
        """Move the model to the CPU after an out-of-memory error at batch 1; warn once."""
        message = f"out of {self.target.type.upper()} memory even at batch size 1: continuing on the CPU (slower)"
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        log.warning(message)
        self.notes.append(message)
        self.model.to("cpu")
        if self.target.type == "cuda":
            torch.cuda.empty_cache()
        self.target, self.dtype, self.precision = torch.device("cpu"), None, "fp32"
        self.batch = self.requested_batch or DEFAULT_BATCH["cpu"]


def start_engine(model: "HSAM", options: "SegmentOptions", notes: list[str],
                 status: Callable[[str], None] | None) -> Engine:
    """The engine the options ask for: device, precision and speed mode by the measured rules (hsam.engines.modes);
    the chosen mode and why go to ``status``; warnings of the run go to ``notes``."""
    from hsam.engines.modes import choose_engine, encoder_family

    target = select_device(options.device)
    family = encoder_family(model)
    precision, dtype = select_precision(options.precision, target, family)
    choice = choose_engine(options.mode, target, family)
    if status:
        status(f"engine {choice.mode}: {choice.reason}")
    return Engine(model, target, dtype, precision, options.batch_size or DEFAULT_BATCH[target.type], choice.mode,
                  choice.reason, options.batch_size, status or log.info, notes)
