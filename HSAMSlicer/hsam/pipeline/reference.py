"""The reference protocol's own stages: the released H-SAM test pipeline (``test.py`` -> ``utils.test_single_volume``),
for numbers comparable to the paper. :func:`hsam.pipeline.run.segment_volume` runs them with
``SegmentOptions.reference()``; everything else of the run (batches, checks, the result) is shared.

Differences from the default protocol, all on purpose (hsam-model.md §3):

* slices are taken in the volume's stored array order [z, y, x]: no reorientation
  (:func:`hsam.pipeline.orient.stored_order`);
* each windowed slice is zoomed with ``scipy.ndimage.zoom`` order 3 (no clamp) to ``input_size`` (224 by default, as
  ``test.py``'s ``--input_size``), then to the model's input size: the released 10 % command runs 512 -> 224 -> 512;
* the stage-3 logits are argmax-ed at the model's size and the labels zoomed back with order 0 (nearest);
* fp32, no speed modes, no air-slice shortcut, no body mask, slab search, refine or post-processing.

:func:`predict_volume_reference` takes already windowed volumes (the released ``test_vol_h5`` files store the image
clipped to [-125, 275] HU and scaled to [0, 1]).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from scipy.ndimage import zoom

from hsam.errors import HSAMError
from hsam.pipeline.batches import encode
from hsam.pipeline.device import DEFAULT_BATCH, select_device
from hsam.pipeline.engine import Engine

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.hsam import HSAM
    from hsam.pipeline.options import SegmentOptions

log = logging.getLogger(__name__)


def reference_engine(model: "HSAM", options: "SegmentOptions", notes: list[str]) -> Engine:
    """The reference protocol's engine: the plain fp32 forward (``model.predict``) on the options' device."""
    target = select_device(options.device)
    return Engine(model, target, None, "fp32", options.batch_size or DEFAULT_BATCH[target.type], "reference", "",
                  options.batch_size, log.info, notes)


def _to_model_input(slice01: np.ndarray, input_size: int, img_size: int) -> np.ndarray:
    """The released double zoom: slice -> input_size (if it differs) -> img_size (if it differs), order 3."""
    x, y = slice01.shape
    image = slice01
    if (x, y) != (input_size, input_size):
        image = zoom(image, (input_size / x, input_size / y), order=3)
    if image.shape != (img_size, img_size):
        image = zoom(image, (img_size / image.shape[0], img_size / image.shape[1]), order=3)
    return image


def predict_slices_reference(
    model: "HSAM", slices01: np.ndarray, input_size: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidence (uint8 [b, H, W]) for windowed slices [b, H, W] in [0, 1], as ``test_single_volume``
    computes the labels (confidence: the maximum softmax probability at the model's size, zoomed back the same way)."""
    size = model.img_size
    images = np.stack([_to_model_input(s.astype(np.float32, copy=False), input_size, size) for s in slices01])
    batch = torch.from_numpy(images.astype(np.float32)).to(device)[:, None].expand(-1, 3, -1, -1)
    with torch.inference_mode():
        probability, index = torch.softmax(model.predict(batch).float(), dim=1).max(dim=1)
    labels = index.cpu().numpy().astype(np.uint8)
    confidence = (probability * 255.0).round_().to(torch.uint8).cpu().numpy()
    height, width = slices01.shape[1:]
    if (height, width) != (size, size):
        factors = (height / size, width / size)
        labels = np.stack([zoom(item, factors, order=0) for item in labels])
        confidence = np.stack([zoom(item, factors, order=0) for item in confidence])
    return labels, confidence


def predict_volume_reference(
    model: "HSAM",
    volume01: np.ndarray,
    *,
    input_size: int = 224,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidence (uint8 [D, H, W]) for a windowed volume [D, H, W] in [0, 1], slice by slice along axis 0."""
    if volume01.ndim != 3:
        raise HSAMError(f"expected a 3-D volume [slices, rows, columns], got shape {volume01.shape}")
    if input_size < 8:
        raise HSAMError(f"--input-size must be at least 8 pixels, got {input_size}")
    target = torch.device(device)
    engine = Engine(model, target, None, "fp32", max(1, batch_size), "reference", "", max(1, batch_size), log.info)
    engine.place_model()
    return encode(volume01, lambda s: predict_slices_reference(model, s, input_size, engine.target), engine, None,
                  progress, cancel)
