"""Keep stage: the automatic run's slice embeddings, written for the prompt tools (:mod:`hsam.prompting.kept`).

The predict stage hands each batch's encoder output to :meth:`KeepStage.hold`; the batch loop names the batch's
slices (:meth:`KeepStage.commit`); the run commits the index at its end (:meth:`KeepStage.close`), so a failed or
cancelled run leaves nothing a reader trusts. Keeping is a convenience: a full disk drops it with a note, never the run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from hsam.pipeline.engine import Engine

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.hsam import HSAM
    from hsam.prompting.kept import EmbeddingWriter

log = logging.getLogger(__name__)

# modes whose encoder gives fp32 embeddings (ort: the same network exported, labels identical to eager's)
FULL_PRECISION_MODES = ("eager", "fast", "ort")


class KeepStage:
    """Collects the embeddings [b, 256, 64, 64] of each encoded batch into an :class:`EmbeddingWriter`."""

    def __init__(self, writer: "EmbeddingWriter", notes: list[str]) -> None:
        self.writer: "EmbeddingWriter | None" = writer
        self.notes = notes
        self.pending: torch.Tensor | None = None

    def hold(self, embeddings: torch.Tensor) -> None:
        """The encoder output of the batch being predicted (named by the next :meth:`commit`)."""
        self.pending = embeddings

    def commit(self, slices: list[int]) -> None:
        """The held embeddings are those of canonical ``slices``: write them."""
        pending, self.pending = self.pending, None
        if self.writer is None or pending is None:
            return
        try:
            self.writer.put(slices, pending)
        except OSError as error:
            self._drop(error)

    def close(self) -> str | None:
        """Write the index; returns the folder (None when nothing was kept)."""
        if self.writer is None:
            return None
        try:
            return str(self.writer.close())
        except OSError as error:
            self._drop(error)
            return None

    def _drop(self, error: OSError) -> None:
        text = f"--keep-embeddings: stopped keeping slice embeddings ({error.strerror or error}); the run goes on"
        log.warning(text)
        self.notes.append(text)
        self.writer = None


def keep_stage(folder: str | None, model: "HSAM", engine: Engine, volume: np.ndarray, window_hu: list[float],
               crop_to_body: bool, notes: list[str], status: Callable[[str], None] | None) -> KeepStage | None:
    """The keep stage for a run on the canonical ``volume`` [D, H, W], or None: not asked, or its embeddings would
    not be the ones the prompt decoder reads (``status`` says why: the prompt tools then encode as before, so it is
    no warning; the Slicer module asks on every run)."""
    if folder is None:
        return None
    from hsam.engines.modes import encoder_family

    why_not = None
    if encoder_family(model) != "tiny_vit":
        why_not = "this model's encoder is not LiteMedSAM's TinyViT, whose embedding the prompt decoder reads"
    elif crop_to_body:
        why_not = "--crop-to-body encodes crops, not the whole slices the prompt tools use"
    elif engine.mode not in FULL_PRECISION_MODES or engine.dtype is not None:
        why_not = f"the {engine.mode} mode's embeddings ({engine.precision}) are not the fp32 ones the prompt tools use"
    if why_not is None:
        from hsam.prompting.kept import EmbeddingWriter

        try:
            return KeepStage(EmbeddingWriter(folder, volume, model.image_encoder, window_hu), notes)
        except OSError as error:
            why_not = f"{folder} cannot be written ({error.strerror or error})"
    text = f"--keep-embeddings: nothing kept: {why_not}; the prompt tools will compute their own"
    log.info(text)
    if status:
        status(text)
    return None
