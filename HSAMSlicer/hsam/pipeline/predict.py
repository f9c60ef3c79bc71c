"""Predict stage (default protocol): labels and confidence for a batch of raw slices.

The windowed slices are resized to the model input S x S (:func:`hsam.pipeline.window.model_images`), the engine
gives the stage-3 fused logits [b,K,S,S], which are resized back to the slice size (bilinear) *before*
softmax/argmax so thin organs survive; max probability -> confidence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hsam.errors import HSAMError
from hsam.pipeline.window import model_images

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.checkpoint import ModelCard
    from hsam.model.hsam import HSAM


def class_names(card: "ModelCard", model: "HSAM") -> list[str]:
    """The card's class names; an error when they do not match the network's outputs."""
    names = list(getattr(card, "classes", None) or [])
    if len(names) != model.num_outputs:
        raise HSAMError(
            f"model card lists {len(names)} classes but the network has {model.num_outputs} outputs; the model is "
            "damaged or mismatched: re-import it"
        )
    return names


def selected_channels(organs: Sequence[int | str] | None, names: list[str]) -> list[int] | None:
    """Channel indices to keep (always 0 = background first), or None for all."""
    if organs is None:
        return None
    chosen = [0]
    for item in organs:
        index = names.index(item) if isinstance(item, str) and item in names else item
        if not isinstance(index, (int, np.integer)) or not 0 < int(index) < len(names):
            raise HSAMError(f"unknown organ {item!r}; this model knows {', '.join(names[1:])}")
        if int(index) not in chosen:
            chosen.append(int(index))
    return chosen


def predict_slices(
    model: "HSAM",
    slices: np.ndarray,
    window_hu: Sequence[float],
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels: Sequence[int] | None = None,
    predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep: Callable[[torch.Tensor], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidence (uint8 [b,H,W] each) for raw slices [b,H,W] (HU, any numeric dtype).

    ``predictor`` (images -> fused logits, from :func:`hsam.engines.modes.prepare`) replaces ``model.predict``;
    ``keep`` is handed the encoder's embeddings [b,256,g,g] of the same pass (:mod:`hsam.pipeline.keep`).
    """
    height, width = slices.shape[-2:]
    images = model_images(slices, window_hu, model.img_size, device)
    run = predictor or model.predict
    with torch.inference_mode():
        if dtype is not None:
            with torch.autocast(device_type=device.type, dtype=dtype):
                logits = _forward(run, model, images, keep)
        else:
            logits = _forward(run, model, images, keep)
        logits = logits.float()
        if channels is not None:
            logits = logits[:, list(channels)]
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, (height, width), mode="bilinear", align_corners=False)
        probability, index = torch.softmax(logits, dim=1).max(dim=1)
        if channels is not None:
            index = torch.as_tensor(channels, device=index.device)[index]
        labels = index.to(torch.uint8).cpu().numpy()
        confidence = (probability * 255.0).round_().to(torch.uint8).cpu().numpy()
    return labels, confidence


def _forward(run: Callable[[torch.Tensor], torch.Tensor], model: "HSAM", images: torch.Tensor,
             keep: Callable[[torch.Tensor], None] | None) -> torch.Tensor:
    """The engine's fused logits of ``images``; with ``keep``, from a pass that also gives it the embeddings."""
    if keep is None:
        return run(images)
    from hsam.prompting.refine import logits_and_embeddings

    logits, embeddings = logits_and_embeddings(run, model, images)
    keep(embeddings)
    return logits


def predict_slices_skipping_air(
    model: "HSAM",
    slices: np.ndarray,
    window_hu: Sequence[float],
    device: torch.device,
    dtype: torch.dtype | None,
    channels: Sequence[int] | None,
    predictor: Callable[[torch.Tensor], torch.Tensor] | None,
    air_cache: dict,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`predict_slices`, without running the network on air-only slices.

    A slice with every voxel at or below the window's lower bound windows to an all-zero image, so the network sees
    the same input for all of them: its labels/confidence are computed once per slice shape (kept in ``air_cache``)
    and copied. Exact, and crop-free: slices with any tissue run as usual.
    """
    air = (slices.reshape(len(slices), -1) <= float(window_hu[0])).all(axis=1)
    if not air.any():
        return predict_slices(model, slices, window_hu, device, dtype, channels, predictor)
    key = (slices.shape[1:], str(device), dtype)
    if key not in air_cache:
        air_cache[key] = predict_slices(model, slices[air][:1], window_hu, device, dtype, channels, predictor)
    labels = np.empty(slices.shape, dtype=np.uint8)
    confidence = np.empty(slices.shape, dtype=np.uint8)
    labels[air], confidence[air] = air_cache[key][0][0], air_cache[key][1][0]
    if not air.all():
        labels[~air], confidence[~air] = predict_slices(
            model, slices[~air], window_hu, device, dtype, channels, predictor
        )
    return labels, confidence
