"""The automatic refinement stage of ``hsam segment`` (issue 26): the prompt-free result prompts LiteMedSAM.

For every slice and organ: the organ's softmax probability of the automatic model, inside the slice's trunk
(:mod:`hsam.checks.body_mask`), >= ``min_probability`` gives a box, widened by ``widen_px`` and made at least ``min_side_px``
wide and high; the prompt decoder turns it into a mask; one more pass re-boxes each mask (``rebox_px``) and decodes
again; organs are merged by the highest decoder logit (background where every logit is negative). Pixel sizes are in
the 256-px model frame, so they scale with the field of view. Only H-SAM-Lite models have the stage: their image
embedding is the one LiteMedSAM's decoder reads, taken from the automatic run's own encoder pass (not computed twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hsam.prompting.decoder import INPUT_SIZE
from hsam.prompting.session import box_of, model_box

if TYPE_CHECKING:  # pragma: no cover
    from hsam.prompting.decoder import PromptDecoder


# Off (benchmarks/prompting/RESULTS.md): issue 26's rule, on only where every labelled CT gains on the mean of liver,
# spleen, stomach and aorta and no organ loses more than 0.01, failed: lidc-idri-0001 mean 0.672 -> 0.713 but liver
# -0.020; the demo's own training patient lost on every organ (mean 0.941 -> 0.857)
REFINE_BY_DEFAULT = False


@dataclass(frozen=True)
class RefineRule:
    """The box rule measured in issue 26 on two unseen patients (its pixels were 512-px slice pixels: halved here)."""

    min_probability: float = 0.3
    widen_px: float = 5.0
    min_side_px: float = 20.0
    rebox_px: float = 2.5


def _box(mask: np.ndarray, widen: float, min_side: float) -> tuple[float, float, float, float] | None:
    """Edges (x0, y0, x1, y1) in the decoder's frame of a [256, 256] mask (model-frame pixels), widened and at least
    ``min_side`` per side. The same edges as a user's box around the mask: box_of, then the session's frame mapping
    (:func:`hsam.prompting.session.model_box`; on a 256-px grid it moves box_of's edges by half a pixel)."""
    around = box_of(mask)
    if around is None:
        return None
    x0, y0, x1, y1 = model_box(around, *mask.shape)
    edges = []
    for low, high in ((x0, x1), (y0, y1)):
        low, high = low - widen, high + widen
        if high - low < min_side:
            centre = (low + high) / 2
            low, high = centre - min_side / 2, centre + min_side / 2
        edges.append((low, high))
    return edges[0][0], edges[1][0], edges[0][1], edges[1][1]


def _decode(decoder: "PromptDecoder", embedding: torch.Tensor, boxes: list, dtype: torch.dtype | None) -> np.ndarray:
    """Mask logits [N, 256, 256] float32 of N boxes (model frame) on one slice, in one decoder call, under autocast
    to ``dtype`` when given (the engine's precision)."""
    prompts = torch.tensor(boxes, device=embedding.device)
    if dtype is None:
        return decoder(embedding, prompts).logits.float().cpu().numpy()
    with torch.autocast(device_type=embedding.device.type, dtype=dtype):
        return decoder(embedding, prompts).logits.float().cpu().numpy()


def refine_slice(decoder: "PromptDecoder", embedding: torch.Tensor, probability: np.ndarray, organs: Sequence[int],
                 rule: RefineRule = RefineRule(), dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One slice: automatic probabilities [K, 256, 256] (already zero outside the trunk) -> (organ index [256, 256]
    int64, winning logit [256, 256] float32; index 0 where no logit is positive) in the model frame. Organs with no
    pixel at ``rule.min_probability`` on the slice are not decoded; ``dtype``: the engine's autocast precision."""
    boxes = {k: _box(probability[k] >= rule.min_probability, rule.widen_px, rule.min_side_px) for k in organs}
    boxes = {k: b for k, b in boxes.items() if b is not None}
    best = np.zeros((INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    index = np.zeros((INPUT_SIZE, INPUT_SIZE), dtype=np.int64)
    if not boxes:
        return index, best
    keys = list(boxes)
    logits = _decode(decoder, embedding, [boxes[k] for k in keys], dtype)
    rebox = {k: _box(logits[n] > 0, rule.rebox_px, rule.min_side_px) for n, k in enumerate(keys)}
    again = [k for k in keys if rebox[k] is not None]
    if again:
        second = _decode(decoder, embedding, [rebox[k] for k in again], dtype)
        logits = np.stack([second[again.index(k)] if k in again else logits[n] for n, k in enumerate(keys)])
    winner = logits.argmax(axis=0)
    top = logits.max(axis=0)
    inside = top > 0
    index[inside] = np.asarray(keys)[winner[inside]]
    best[inside] = top[inside]
    return index, best


def refine_batch(decoder: "PromptDecoder", embeddings: torch.Tensor, logits: torch.Tensor, trunk: np.ndarray,
                 organs: Sequence[int], size: tuple[int, int], rule: RefineRule = RefineRule(),
                 dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Refined (labels, confidence) uint8 [b, H, W] for a batch.

    embeddings [b,256,64,64]; logits [b,K,256,256] of the automatic model (fused, model frame); trunk [b,H,W] bool;
    ``organs``: channel indices to refine (label values); size (H, W) of the slices; ``dtype``: the engine's autocast
    precision for the prompt decoder (None: fp32).
    """
    probability = torch.softmax(logits.float(), dim=1)
    frame = F.interpolate(torch.from_numpy(trunk[:, None].astype(np.float32)), (INPUT_SIZE, INPUT_SIZE),
                          mode="nearest")[:, 0].numpy() > 0
    labels = np.zeros((len(logits),) + tuple(size), dtype=np.uint8)
    confidence = np.full((len(logits),) + tuple(size), 255, dtype=np.uint8)
    for n in range(len(logits)):
        masked = probability[n].numpy() * frame[n]
        index, best = refine_slice(decoder, embeddings[n], masked, organs, rule, dtype)
        # back to the slice: the winning logit bilinear, the organ index nearest (as the automatic path resizes)
        logit = F.interpolate(torch.from_numpy(best)[None, None], size, mode="bilinear", align_corners=False)[0, 0]
        organ = F.interpolate(torch.from_numpy(index.astype(np.float32))[None, None], size, mode="nearest")[0, 0]
        inside = (logit > 0) & (organ > 0)
        labels[n][inside.numpy()] = organ[inside].numpy().astype(np.uint8)
        confidence[n][inside.numpy()] = (255.0 * torch.sigmoid(logit[inside])).round().numpy().astype(np.uint8)
    return labels, confidence


def logits_and_embeddings(predictor: Callable, model: torch.nn.Module, images: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fused logits [b,K,S,S], encoder embedding [b,256,g,g]) from one pass of the automatic model's engine: the ONNX
    graph's second output, or a forward hook on the engine model's encoder (eager, fast, bf16, int8)."""
    if hasattr(predictor, "run") and hasattr(predictor, "session"):  # hsam.engines.ort.OrtPredictor
        logits, embedding = predictor.run(images, ("logits", "embedding"))
        return logits, embedding
    owner = getattr(predictor, "__self__", None)
    encoder = getattr(owner, "image_encoder", None)
    if encoder is None:  # a compiled function: no module to hook, so the encoder runs once more
        with torch.inference_mode():
            return predictor(images), model.image_encoder(images)
    captured: list[torch.Tensor] = []
    handle = encoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.inference_mode():
            logits = predictor(images)
    finally:
        handle.remove()
    return logits, captured[0]


def predict_refined(model: torch.nn.Module, slices: np.ndarray, window_hu: Sequence[float], device: torch.device,
                    dtype: torch.dtype | None, channels: Sequence[int] | None, predictor: Callable,
                    decoder: "PromptDecoder", pixel_mm: Sequence[float], rule: RefineRule = RefineRule(),
                    keep: Callable[[torch.Tensor], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The refine stage for one batch of raw slices [b,H,W] (HU): the automatic model's logits and embeddings from
    one engine pass, then :func:`refine_batch`. Returns labels and confidence uint8 [b,H,W]; ``keep`` is handed the
    embeddings (:mod:`hsam.pipeline.keep`)."""
    from hsam.checks.body_mask import tissue_threshold, trunk_mask_slice
    from hsam.pipeline.window import model_images

    images = model_images(slices, window_hu, model.img_size, device)
    if dtype is not None:
        with torch.autocast(device_type=device.type, dtype=dtype):
            logits, embeddings = logits_and_embeddings(predictor, model, images)
    else:
        logits, embeddings = logits_and_embeddings(predictor, model, images)
    if keep is not None:
        keep(embeddings)
    tissue = tissue_threshold(window_hu[0])
    trunk = np.stack([trunk_mask_slice(hu, pixel_mm, tissue_hu=tissue) for hu in slices])
    organs = list(channels[1:]) if channels is not None else list(range(1, logits.shape[1]))
    if channels is not None:  # organs not asked for take no part in the softmax, as in predict_slices
        keep = torch.full_like(logits[:, :1], float("-inf")).expand_as(logits).clone()
        keep[:, list(channels)] = 0.0
        logits = logits.float() + keep
    # the prompt decoder runs where the engine ran, in its autocast precision (on CPUs every engine's decoders are fp32)
    decoder.to(embeddings.device)
    return refine_batch(decoder, embeddings.float(), logits.float().cpu(), trunk, organs, slices.shape[1:], rule, dtype)


def refine_decoder_for(model: torch.nn.Module) -> tuple["PromptDecoder | None", str]:
    """(the prompt decoder, "") when ``model`` can be refined (an H-SAM-Lite model and the LiteMedSAM weights are
    installed), else (None, why not)."""
    from hsam.engines.modes import encoder_family

    if encoder_family(model) != "tiny_vit":
        return None, "the refine stage needs an H-SAM-Lite (TinyViT) model: its embedding is LiteMedSAM's"
    try:
        from hsam.prompting.decoder import load_prompt_decoder

        return load_prompt_decoder(), ""
    except (FileNotFoundError, ValueError) as error:
        return None, f"the refine stage needs LiteMedSAM's prompt decoder: {error}"
