"""Open a :class:`PromptSession` on a CT image and run a whole prompt plan on it (what ``hsam prompt`` does)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import SimpleITK as sitk
from torch import nn

from hsam.prompting.decoder import PromptDecoder, load_prompt_decoder
from hsam.prompting.embedding import LITEMEDSAM_WINDOW_HU, SliceEmbeddings, litemedsam_encoder
from hsam.prompting.kept import KeptEmbeddings
from hsam.prompting.propagation import PropagationRule, propagate
from hsam.prompting.session import PromptSession
from hsam.volume import check_volume, to_canonical
from hsam.volume.orientation import Reorientation

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.checkpoint import ModelCard
    from hsam.prompting.prompt_file import PromptPlan


def encoder_for(model: nn.Module | None, card: "ModelCard | None") -> tuple[nn.Module, tuple[float, float]]:
    """(TinyViT encoder, its window): the model's own when it is H-SAM-Lite (its frozen encoder is LiteMedSAM's,
    so the automatic run's embeddings serve the prompts), else LiteMedSAM's with its CT window."""
    from hsam.model.tiny_vit import TinyViT

    encoder = getattr(model, "image_encoder", None)
    if isinstance(encoder, TinyViT) and card is not None and getattr(card, "window", None):
        return encoder.eval(), (float(card.window[0]), float(card.window[1]))
    return litemedsam_encoder(), LITEMEDSAM_WINDOW_HU


def open_session(image: sitk.Image, model: nn.Module | None = None, card: "ModelCard | None" = None,
                 decoder: PromptDecoder | None = None, orientation: str | None = None) -> PromptSession:
    """A prompt session on ``image`` (3-D CT in HU, any orientation) in the card's canonical orientation."""
    image = check_volume(image, "the input volume")
    canonical, how = to_canonical(image, (orientation or getattr(card, "orientation", None) or "LPS").upper())
    return session_on(canonical, how, model, card, decoder)


def session_on(canonical: np.ndarray, how: Reorientation, model: nn.Module | None = None,
               card: "ModelCard | None" = None, decoder: PromptDecoder | None = None) -> PromptSession:
    """A prompt session on a canonical volume [D, H, W] (HU) from :func:`hsam.volume.to_canonical`."""
    encoder, window_hu = encoder_for(model, card)
    return PromptSession(SliceEmbeddings(canonical, encoder, window_hu), decoder or load_prompt_decoder(), how)


def attach_kept(session: PromptSession, folder: str | Path) -> str:
    """Read slice embeddings an automatic run kept in ``folder`` (:mod:`hsam.prompting.kept`) before running the
    encoder; returns "" when they match this session's volume, encoder and window, else why they are not used."""
    embeddings = session.embeddings
    kept, why_not = KeptEmbeddings.open(folder, embeddings.volume, embeddings.encoder, embeddings.window_hu)
    embeddings.kept = kept
    return why_not


def run_plan(session: PromptSession, plan: "PromptPlan", rule: PropagationRule = PropagationRule(),
             progress: Callable[[int, int], None] | None = None) -> None:
    """Decode every prompt of ``plan`` (one decoder batch per slice), then propagate when the plan asks (within
    ``plan.limits``).

    ``progress(k, n)``: k of n prompted slices done (propagated slices are reported after them, n growing).
    """
    slices = sorted({z for _, z in plan.prompts})
    total = len(slices)
    for done, z in enumerate(slices, start=1):
        boxed = [key for key in plan.prompts if key[1] == z and plan.prompts[key].box is not None]
        for key, (logits, iou) in zip(boxed, session.decode_prompted(z, [plan.prompts[key] for key in boxed])):
            session.store(key[0], z, plan.prompts[key], logits, iou)
        for key in [key for key in plan.prompts if key[1] == z and plan.prompts[key].box is None]:
            session.set_prompt(key[0], z, plan.prompts[key])
        if progress:
            progress(done, total)
    if not plan.propagate:
        return
    for organ in plan.organs:
        prompted = [z for (o, z) in plan.prompts if o == organ]
        low, high = plan.limits.get(organ, (None, None))
        for start, step, limit in ((min(prompted), -1, low), (max(prompted), 1, high)):
            propagate(session, organ, start, step, limit, rule=rule, pixel_mm=session.pixel_mm)


def confidence_of(session: PromptSession, labels: np.ndarray) -> np.ndarray:
    """uint8 [D, H, W]: round(255 * sigmoid(logit)) of the winning organ on labelled voxels, 255 elsewhere."""
    confidence = np.full(labels.shape, 255, dtype=np.uint8)
    for (organ, z), found in session.masks.items():
        h, w = found.logits.shape
        region = (z, slice(found.top, found.top + h), slice(found.left, found.left + w))
        mine = labels[region] == organ
        value = np.round(255.0 / (1.0 + np.exp(-found.logits.astype(np.float32)))).astype(np.uint8)
        confidence[region][mine] = value[mine]
    return confidence
