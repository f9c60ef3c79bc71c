"""Validation on held-out volumes: slice-wise stage-3 prediction (as at inference) and Dice per organ per volume."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hsam.evaluation.metrics import dice_per_organ
from hsam.training.augment import resize_image
from hsam.training.data import Volume


def labels_by_batch(shape: tuple[int, int, int], batch_size: int,
                    logits_of: Callable[[int, int], torch.Tensor]) -> np.ndarray:
    """Label volume uint8 [D, H, W]: ``logits_of(start, stop)`` gives the stage-3 logits [b,K,S,S] of slices
    start..stop-1, resized back (bilinear) to H x W when S differs, then argmax."""
    depth, height, width = shape
    out = np.zeros(shape, dtype=np.uint8)
    for start in range(0, depth, batch_size):
        logits = logits_of(start, min(depth, start + batch_size)).float()
        if logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        # max().indices is argmax (the first maximum) at an eighth of its time on CPUs over the class axis (0.057 s
        # vs 0.471 s for [8,9,512,512], benchmarks/finetune/bench_decoder_step.py): argmax there takes a slow path
        out[start : start + len(logits)] = logits.max(1).indices.to(torch.uint8).cpu().numpy()
    return out


@torch.no_grad()
def predict_volume(model: torch.nn.Module, image: np.ndarray, batch_size: int = 8,
                   device: torch.device | str = "cpu", autocast: Callable[[], Any] | None = None) -> np.ndarray:
    """Label volume uint8 [D, H, W] for a canonical image [D, H, W] in [0, 1]: each slice cubic-resized to the
    model input, stage-3 logits resized back (bilinear) to the slice, argmax. ``model`` must be in eval mode."""
    size = model.img_size

    def logits_of(start: int, stop: int) -> torch.Tensor:
        chunk = np.stack([resize_image(s, size) for s in image[start:stop]])
        batch = torch.from_numpy(chunk)[:, None].expand(-1, 3, -1, -1).to(device)
        with (autocast or contextlib.nullcontext)():
            return model.predict(batch)

    return labels_by_batch(image.shape, batch_size, logits_of)


def validate(model: torch.nn.Module, volumes: Sequence[Volume], organs: Sequence[int], batch_size: int = 8,
             device: torch.device | str = "cpu", autocast: Callable[[], Any] | None = None) -> dict[str, float]:
    """Mean Dice per organ over the volumes where the organ is present in prediction or reference, and their mean
    (``dice``). Keys: ``dice``, ``dice_<organ index>``."""
    was_training = model.training
    model.eval()
    try:
        return mean_dice(((predict_volume(model, v.image, batch_size, device, autocast), v.label, v.unknown_organs)
                          for v in volumes), organs)
    finally:
        model.train(was_training)


def mean_dice(pairs: Iterable[tuple], organs: Sequence[int]) -> dict[str, float]:
    """``dice_<organ>``: mean over the (prediction, reference[, organs the reference did not label]) pairs where the
    organ is in either and was labelled; ``dice``: their mean (NaN when no organ was anywhere)."""
    per_organ: dict[int, list[float]] = {k: [] for k in organs}
    for prediction, reference, *unlabelled in pairs:
        scored = [k for k in organs if not unlabelled or k not in unlabelled[0]]
        for k, value in dice_per_organ(prediction, reference, scored).items():
            if not math.isnan(value):
                per_organ[k].append(value)
    means = {k: float(np.mean(v)) for k, v in per_organ.items() if v}
    result = {f"dice_{k}": means.get(k, math.nan) for k in organs}
    result["dice"] = float(np.mean(list(means.values()))) if means else math.nan
    return result
