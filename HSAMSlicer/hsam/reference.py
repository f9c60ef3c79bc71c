"""The released H-SAM test pipeline (``test.py`` -> ``utils.test_single_volume``), for numbers comparable to the paper.

Differences from :func:`hsam.inference.segment_volume`, all on purpose (hsam-model.md §3):

* slices are taken in the volume's stored array order [z, y, x]: no reorientation to the card's orientation;
* each windowed slice is zoomed with ``scipy.ndimage.zoom`` order 3 (no clamp) to ``input_size`` (224 by default, as
  ``test.py``'s ``--input_size``), then to the model's input size: the released 10 % command runs 512 -> 224 -> 512;
* the stage-3 logits are argmax-ed at the model's size and the labels zoomed back with order 0 (nearest);
* fp32, no speed modes, no air-slice shortcut.

:func:`predict_volume_reference` takes already windowed volumes (the released ``test_vol_h5`` files store the image
clipped to [-125, 275] HU and scaled to [0, 1]); :func:`segment_volume_reference` windows a CT in HU as the card says.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np
import SimpleITK as sitk
import torch
from scipy.ndimage import zoom

from hsam.errors import HSAMError
from hsam.volume import check_volume, window

if TYPE_CHECKING:  # pragma: no cover
    from hsam.inference import SegmentationResult
    from hsam.model.checkpoint import ModelCard
    from hsam.model.hsam import HSAM

DEFAULT_INPUT_SIZE = 224


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
    input_size: int = DEFAULT_INPUT_SIZE,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidence (uint8 [D, H, W]) for a windowed volume [D, H, W] in [0, 1], slice by slice along axis 0."""
    from hsam.inference import Cancelled

    if volume01.ndim != 3:
        raise HSAMError(f"expected a 3-D volume [slices, rows, columns], got shape {volume01.shape}")
    if input_size < 8:
        raise HSAMError(f"--input-size must be at least 8 pixels, got {input_size}")
    target = torch.device(device)
    model.eval()
    model.to(target)
    total = volume01.shape[0]
    labels = np.zeros(volume01.shape, dtype=np.uint8)
    confidence = np.zeros(volume01.shape, dtype=np.uint8)
    if progress:
        progress(0, total)
    for start in range(0, total, max(1, batch_size)):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled after {start} of {total} slices")
        stop = min(total, start + max(1, batch_size))
        labels[start:stop], confidence[start:stop] = predict_slices_reference(
            model, volume01[start:stop], input_size, target)
        if progress:
            progress(stop, total)
    return labels, confidence


def segment_volume_reference(
    image: sitk.Image,
    model: "HSAM",
    card: "ModelCard",
    *,
    input_size: int = DEFAULT_INPUT_SIZE,
    device: str = "auto",
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    check_orientation: bool = True,
) -> "SegmentationResult":
    """Segment a CT in HU with the released test pipeline (module docstring); the result has the input's grid.

    The orientation self-check runs on the stored slice order; its warning, if any, is in ``warnings``.
    """
    from hsam.inference import DEFAULT_BATCH, SegmentationResult, _class_names, organ_volumes_ml, select_device
    from hsam.checks.orientation import check_orientation as run_check

    started = time.perf_counter()
    image = check_volume(image, "the input volume")
    names = _class_names(card, model)
    window_hu = list(getattr(card, "window", None) or (-125, 275))
    target = select_device(device)
    size = batch_size or DEFAULT_BATCH[target.type]
    stored = sitk.GetArrayViewFromImage(image)
    volume01 = window(stored, float(window_hu[0]), float(window_hu[1]))
    labels, confidence = predict_volume_reference(model, volume01, input_size=input_size, device=target,
                                                  batch_size=size, progress=progress, cancel=cancel)
    notes: list[str] = []
    check = None
    if check_orientation:
        tissue = (volume01.reshape(len(volume01), -1) > 0).any(axis=1)
        check = run_check(volume01, labels, confidence,
                          lambda s: predict_slices_reference(model, s, input_size, target), None, tissue)
        if check.warning:
            notes.append(check.warning)
    label_image = sitk.GetImageFromArray(labels)
    label_image.CopyInformation(image)
    confidence_image = sitk.GetImageFromArray(confidence)
    confidence_image.CopyInformation(image)
    laterality = None
    if check_orientation:  # sides in patient coordinates (no inference): hsam.checks.laterality
        from hsam.checks.laterality import check_laterality

        laterality = check_laterality(label_image, image, names)
        if laterality.warning:
            notes.append(laterality.warning)
    return SegmentationResult(
        labels=label_image, confidence=confidence_image, volumes_ml=organ_volumes_ml(label_image, names),
        device=str(target), seconds=time.perf_counter() - started, batch_size=size, precision="fp32",
        mode="reference", warnings=notes, orientation="stored order",
        orientation_check=check.as_dict() if check is not None else None,
        laterality_check=laterality.as_dict() if laterality is not None else None,
    )
