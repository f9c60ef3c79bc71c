"""The automatic refinement stage of ``hsam segment`` (issue 26): the prompt-free result prompts LiteMedSAM.

For every slice and organ (:class:`RefineRule`): the organ's softmax probability of the automatic model, inside the
slice's trunk (:mod:`hsam.checks.body_mask`), >= ``min_probability`` gives a box, widened and made at least
``min_side_px`` wide and high; the prompt decoder turns it into a mask (optionally re-boxed and decoded once more);
organs are merged by the highest decoder logit. By default the decoder may only add an organ to automatic background
where that organ's automatic probability is >= 0.05 (add-only); it never removes an automatic voxel and never labels
outside the trunk. Pixel sizes are in the 256-px model frame, so they scale with the field of view. Only H-SAM-Lite
models have the stage: their image embedding is the one LiteMedSAM's decoder reads, taken from the automatic run's own
encoder pass (not computed twice).
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


# Off (benchmarks/prompting/RESULTS.md): issue 26's rule asks every labelled CT to gain on the mean of liver, spleen,
# stomach and aorta with no organ losing more than 0.01, and at most +25 % time per slice. The rule below raises
# lidc-idri-0001 (0.672 -> 0.713, every organ) and dcmqi and lowers nothing, but leaves the 3-mm CTs as they are
# (refining them lowers their organs), and its time is not yet shown within the budget
REFINE_BY_DEFAULT = False


@dataclass(frozen=True)
class RefineRule:
    """How the automatic result prompts the decoder and how much of the decoder's answer is taken.

    Boxes: the organ's automatic probability >= ``min_probability`` (issue 26's rule measured on two unseen patients;
    its pixels were 512-px slice pixels: halved here), widened ``widen_px``, at least ``min_side_px`` per side; one
    re-box of each decoded mask at ``rebox_px`` and a second decoder pass (None: one pass). ``organs``: the label
    values refined (None: all). ``confident``: the automatic label stays where the automatic model's top probability
    is at least this (None: nowhere); an organ is decoded on a slice only where at least ``min_unsure_share`` of its
    box pixels (probability >= ``min_probability``) are below ``confident``. ``add_floor``: add-only, the decoder
    never removes an automatic voxel and adds organ k only to automatic background where k's probability is at least
    this (None: the decoder's answer replaces the automatic labels of the organs it decoded); with
    ``add_min_width_px`` > 0 it adds only the parts of each organ's addition at least that wide (a morphological
    opening, model-frame pixels, about 1.4 mm on the CTs here): it fills what the automatic model missed and leaves
    its borders alone, and an organ with no such part among its candidates (probability >= ``add_floor`` on automatic
    background) is not decoded. ``max_pixel_mm``: slices with coarser pixels (mm, either axis) are not refined at
    all (None: every slice).
    """

    min_probability: float = 0.3
    widen_px: float = 5.0
    min_side_px: float = 20.0
    rebox_px: float | None = None  # the re-box pass: +0.001 mean on lidc-idri-0001 for twice the decoded boxes
    organs: tuple[int, ...] | None = None
    confident: float | None = None
    min_unsure_share: float = 0.0
    add_floor: float | None = 0.05  # add-only: the only rule that lowered no organ on lidc-idri-0001 or dcmqi
    add_min_width_px: float = 0.0
    # coarse slices reach the decoder's 256-px frame blurred by upsampling: on lidc-idri-0001 resampled to 3-mm pixels
    # (and on the 3-mm training CT) the decoder lowered most organs; at 0.7-0.8 mm it raised every one
    max_pixel_mm: float | None = 1.5

    def refines(self, pixel_mm: Sequence[float]) -> bool:
        """Whether slices of this (row, column) pixel spacing in mm are refined (``max_pixel_mm``)."""
        return self.max_pixel_mm is None or max(pixel_mm) <= self.max_pixel_mm


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


def wide_parts(mask: np.ndarray, width_px: float, scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Bool [H, W]: the parts of ``mask`` at least ``width_px`` model-frame pixels wide (opening by an ellipse of
    that diameter; ``scale``: slice pixels per model-frame pixel along rows and columns)."""
    from scipy import ndimage

    ry, rx = (max(width_px * s / 2 - 0.5, 0.0) for s in scale)  # radius of the structuring ellipse, pixel centres
    if (ry < 0.5 and rx < 0.5) or not mask.any():
        return mask
    y, x = np.ogrid[-int(ry): int(ry) + 1, -int(rx): int(rx) + 1]
    ellipse = (y / max(ry, 0.5)) ** 2 + (x / max(rx, 0.5)) ** 2 <= 1.0
    return ndimage.binary_opening(mask, structure=ellipse)


def organ_boxes(probability: np.ndarray, organs: Sequence[int], rule: RefineRule
                ) -> dict[int, tuple[float, float, float, float]]:
    """The first-pass box of each organ the rule decodes on this slice (probability [K, 256, 256], zero outside the
    trunk): organs in ``rule.organs`` with pixels at ``rule.min_probability`` of which at least
    ``rule.min_unsure_share`` are unsure (top probability below ``rule.confident``)."""
    unsure = None if rule.confident is None else probability.max(axis=0) < rule.confident
    background = probability.argmax(axis=0) == 0
    boxes = {}
    for k in organs:
        if rule.organs is not None and k not in rule.organs:
            continue
        inside = probability[k] >= rule.min_probability
        if unsure is not None and inside.any() and (unsure & inside).sum() < rule.min_unsure_share * inside.sum():
            continue  # the automatic model is sure of this organ here: no decoder call for it
        if rule.add_floor is not None and rule.add_min_width_px > 0 and not wide_parts(
                background & (probability[k] >= rule.add_floor), rule.add_min_width_px).any():
            continue  # nothing wide enough to add here (model frame): the decoder would hardly change the labels
        box = _box(inside, rule.widen_px, rule.min_side_px)
        if box is not None:
            boxes[k] = box
    return boxes


def refine_slice(decoder: "PromptDecoder", embedding: torch.Tensor, probability: np.ndarray, organs: Sequence[int],
                 rule: RefineRule = RefineRule(), dtype: torch.dtype | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """One slice: automatic probabilities [K, 256, 256] (already zero outside the trunk) -> (organ index [256, 256]
    int64, winning logit [256, 256] float32; index 0 where no logit is positive; the organs decoded) in the model
    frame. Organs :func:`organ_boxes` gives no box are not decoded; ``dtype``: the engine's autocast precision."""
    boxes = organ_boxes(probability, organs, rule)
    best = np.zeros((INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    index = np.zeros((INPUT_SIZE, INPUT_SIZE), dtype=np.int64)
    if not boxes:
        return index, best, []
    keys = list(boxes)
    logits = _decode(decoder, embedding, [boxes[k] for k in keys], dtype)
    if rule.rebox_px is not None:
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
    return index, best, keys


def taken_from_decoder(automatic: np.ndarray, probability: np.ndarray, organ: np.ndarray, decoded: Sequence[int],
                       rule: RefineRule) -> np.ndarray:
    """Bool [H, W]: the pixels whose label becomes the decoder's ``organ`` [H, W] (0: background) under ``rule``.

    automatic [H, W] the automatic labels; probability [K, H, W] their softmax, zero outside the trunk; ``decoded``:
    the organs decoded on the slice. Add-only: automatic background where the decoder's organ has probability >=
    ``rule.add_floor`` (each organ's wide parts only, with ``rule.add_min_width_px``). Else: wherever the decoder found
    an organ or the automatic label is a decoded organ. Never where the automatic model is ``rule.confident``.
    """
    if rule.add_floor is not None:
        own = np.take_along_axis(probability, organ[None].astype(np.int64), axis=0)[0]
        taken = (automatic == 0) & (organ > 0) & (own >= rule.add_floor)
        if rule.add_min_width_px > 0:
            scale = (automatic.shape[0] / INPUT_SIZE, automatic.shape[1] / INPUT_SIZE)
            taken = np.logical_or.reduce([wide_parts(taken & (organ == k), rule.add_min_width_px, scale)
                                          for k in decoded] + [np.zeros_like(taken)])
    else:
        taken = (organ > 0) | np.isin(automatic, list(decoded))
    if rule.confident is not None:
        taken &= probability.max(axis=0) < rule.confident
    return taken


def refine_batch(decoder: "PromptDecoder", embeddings: torch.Tensor, logits: torch.Tensor, trunk: np.ndarray,
                 organs: Sequence[int], size: tuple[int, int], pixel_mm: Sequence[float],
                 rule: RefineRule = RefineRule(), dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Refined (labels, confidence) uint8 [b, H, W] for a batch.

    embeddings [b,256,64,64]; logits [b,K,256,256] of the automatic model (fused, model frame); trunk [b,H,W] bool;
    ``organs``: channel indices to refine (label values); size (H, W) of the slices; pixel_mm: their (row, column)
    spacing; ``dtype``: the engine's autocast precision for the prompt decoder (None: fp32). The automatic labels and
    confidence are those of :func:`hsam.pipeline.predict.predict_slices` (logits resized bilinear to the slice,
    softmax argmax); slices coarser than ``rule.max_pixel_mm`` keep them (no decoder call).
    """
    logits = logits.float()
    probability = torch.softmax(logits, dim=1)
    slice_probability = torch.softmax(F.interpolate(logits, tuple(size), mode="bilinear", align_corners=False), dim=1)
    top, automatic = slice_probability.max(dim=1)
    labels = automatic.to(torch.uint8).numpy()
    confidence = (top * 255.0).round_().to(torch.uint8).numpy()
    if not rule.refines(pixel_mm):
        return labels, confidence
    frame = F.interpolate(torch.from_numpy(trunk[:, None].astype(np.float32)), (INPUT_SIZE, INPUT_SIZE),
                          mode="nearest")[:, 0].numpy() > 0
    for n in range(len(logits)):
        masked = probability[n].numpy() * frame[n]
        index, best, decoded = refine_slice(decoder, embeddings[n], masked, organs, rule, dtype)
        if not decoded:
            continue
        # back to the slice: the winning logit bilinear, the organ index nearest (as the automatic path resizes)
        logit = F.interpolate(torch.from_numpy(best)[None, None], size, mode="bilinear", align_corners=False)[0, 0]
        organ = F.interpolate(torch.from_numpy(index.astype(np.float32))[None, None], size, mode="nearest")[0, 0]
        organ = (organ * (logit > 0)).numpy().astype(np.uint8)
        inside_trunk = slice_probability[n].numpy() * trunk[n]  # add-only never adds outside the trunk
        taken = taken_from_decoder(labels[n], inside_trunk, organ, decoded, rule)
        labels[n][taken] = organ[taken]
        sure = (255.0 * torch.sigmoid(logit)).round().numpy().astype(np.uint8)
        confidence[n][taken] = np.where(organ[taken] > 0, sure[taken], 255)
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
    if channels is not None:  # organs not asked for take no part in the softmax, as in predict_slices (finite:
        asked = torch.full_like(logits[:, :1], -1e4).expand_as(logits).clone()  # -inf turns to NaN in resizes)
        asked[:, list(channels)] = 0.0
        logits = logits.float() + asked
    # the prompt decoder runs where the engine ran, in its autocast precision (on CPUs every engine's decoders are fp32)
    decoder.to(embeddings.device)
    return refine_batch(decoder, embeddings.float(), logits.float().cpu(), trunk, organs, slices.shape[1:], pixel_mm,
                        rule, dtype)


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
