"""``segment_volume``: a CT volume in, organ labels + confidence on the same grid out.

Pipeline (hsam-model.md §3): reorient to the card's canonical slice layout -> for each batch of axial slices: window
(card), resize to the model input S x S (bicubic), ``HSAM.predict`` (stage-3 fused logits [B,K,S,S]), resize the
*logits* back to the slice size (bilinear) so thin organs survive, softmax, argmax -> labels, max probability ->
confidence -> paste into uint8 volumes -> back to the input grid.

Memory is bounded by one batch: only the uint8 label and confidence volumes are kept for the whole scan, never a
per-class float volume. Device: CUDA, then MPS, then CPU; fp16/bf16 autocast only on GPUs (on request, or by the
precision rule of :mod:`hsam.engines.modes`). Slab search (:mod:`hsam.slab`): probe slices first, then only the slices
around the organs found. On CUDA out-of-memory the batch is halved and retried; at batch 1 the run continues on the CPU
with a warning. ``progress(k, n)`` is called
after every batch; ``cancel()`` is checked before every batch and raises :class:`Cancelled`.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from hsam.errors import HSAMError
from hsam.volume import check_volume, direction_from_code, from_canonical, looks_like_ct, to_canonical, window

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.checkpoint import ModelCard
    from hsam.model.hsam import HSAM

log = logging.getLogger(__name__)

DEFAULT_BATCH = {"cuda": 8, "mps": 4, "cpu": 2}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class Cancelled(Exception):
    """Raised by :func:`segment_volume` when its ``cancel`` callback returns True (checked between batches)."""


@dataclass
class SegmentationResult:
    """What :func:`segment_volume` returns. Both images have exactly the input's size, spacing, origin, direction."""

    labels: sitk.Image  # uint8, 0 = background, 1..K-1 = card.classes[1:]
    confidence: sitk.Image  # uint8, round(255 * max softmax probability)
    volumes_ml: dict[str, float]  # organ name -> volume in millilitres (every organ of the card, 0.0 if absent)
    device: str  # where the last batch ran ("cuda:0", "mps", "cpu")
    seconds: float
    batch_size: int = 1  # the batch size that finished the run (after any halving)
    precision: str = "fp32"
    mode: str = "eager"  # speed mode that ran (hsam.engines.modes)
    mode_reason: str = ""  # why that engine ran (processor, evidence; hsam.engines.modes.choose_engine)
    warnings: list[str] = field(default_factory=list)
    orientation: str = "LPS"  # the canonical orientation the scan was put in (the card's, or the override)
    orientation_check: dict | None = None  # hsam.checks.orientation.OrientationCheck.as_dict(); None when not run
    laterality_check: dict | None = None  # hsam.checks.laterality.LateralityCheck.as_dict(); None when not run
    slab: dict | None = None  # hsam.slab.SlabPlan.as_dict(): which slices were encoded; None when the search was off


def select_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA, then Apple MPS, then CPU. An explicit device that is not available raises HSAMError."""
    name = (device or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HSAMError("--device cuda was requested but PyTorch sees no CUDA GPU; use --device auto or cpu")
    if name == "mps" and not mps_ok:
        raise HSAMError("--device mps was requested but Apple MPS is not available; use --device auto or cpu")
    if not (name == "cpu" or name == "mps" or name.startswith("cuda")):
        raise HSAMError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def select_precision(precision: str, device: torch.device, family: str = "any") -> tuple[str, torch.dtype | None]:
    """``(name, autocast dtype or None)``. ``auto``: fp32 on the CPU; on GPUs the half precision that met the
    precision rule for the encoder ``family`` (:func:`hsam.engines.modes.gpu_precision`), else fp32."""
    name = (precision or "auto").lower()
    if name not in PRECISIONS:
        raise HSAMError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device.type == "cpu":
        if name in ("fp16", "bf16"):
            raise HSAMError(f"{name} runs only on a GPU; use --precision fp32 (or auto) on the CPU")
        return "fp32", None
    if name == "auto":
        from hsam.engines.modes import gpu_precision

        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = gpu_precision(device.type, bf16, family)[0]
    return name, {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _is_oom(error: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _class_names(card: "ModelCard", model: "HSAM") -> list[str]:
    names = list(getattr(card, "classes", None) or [])
    if len(names) != model.num_outputs:
        raise HSAMError(
            f"model card lists {len(names)} classes but the network has {model.num_outputs} outputs; the model is "
            "damaged or mismatched: re-import it"
        )
    return names


def _selected_channels(organs: Sequence[int | str] | None, names: list[str]) -> list[int] | None:
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


def model_images(slices: np.ndarray, window_hu: Sequence[float], size: int, device: torch.device) -> torch.Tensor:
    """Raw slices [b,H,W] (HU) -> network input [b,3,size,size]: windowed to [0, 1], resized bicubic (clamped)."""
    batch = torch.from_numpy(window(slices, float(window_hu[0]), float(window_hu[1]))).to(device)[:, None]
    if tuple(batch.shape[-2:]) != (size, size):
        batch = F.interpolate(batch, (size, size), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    return batch.expand(-1, 3, -1, -1)


def predict_slices(
    model: "HSAM",
    slices: np.ndarray,
    window_hu: Sequence[float],
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels: Sequence[int] | None = None,
    predictor: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidence (uint8 [b,H,W] each) for raw slices [b,H,W] (HU, any numeric dtype).

    The windowed slices are resized to the model input S x S (bicubic, clamped to [0, 1]); the fused logits
    [b,K,S,S] are resized back to H x W (bilinear) *before* softmax/argmax. ``predictor`` (images -> fused logits,
    from :func:`hsam.engines.modes.prepare`) replaces ``model.predict``.
    """
    height, width = slices.shape[-2:]
    images = model_images(slices, window_hu, model.img_size, device)
    run = predictor or model.predict
    with torch.inference_mode():
        if dtype is not None:
            with torch.autocast(device_type=device.type, dtype=dtype):
                logits = run(images)
        else:
            logits = run(images)
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


def keep_largest_components(labels: np.ndarray, values: Sequence[int] | None = None) -> np.ndarray:
    """In place: for each label value keep only its largest 26-connected component (the rest becomes 0)."""
    from scipy import ndimage

    present = [int(v) for v in (values if values is not None else np.unique(labels)) if v != 0]
    boxes = ndimage.find_objects(labels)  # bounding boxes per label value, cheap on a uint8 volume
    structure = np.ones((3, 3, 3), dtype=bool)
    for value in present:
        if value - 1 >= len(boxes) or boxes[value - 1] is None:
            continue
        box = boxes[value - 1]
        region = labels[box]
        components, count = ndimage.label(region == value, structure=structure)
        if count <= 1:
            continue
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        region[(components != 0) & (components != int(sizes.argmax()))] = 0
    return labels


def organ_volumes_ml(labels: sitk.Image, names: Sequence[str]) -> dict[str, float]:
    """``{name: millilitres}`` for classes 1.. of ``names`` from a uint8 label image (spacing in mm)."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=len(names))
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {name: float(counts[i]) * voxel_ml for i, name in enumerate(names) if i > 0}


def _fall_back_to_cpu(
    model: "HSAM", device: torch.device, batch_size: int | None, notes: list[str]
) -> tuple[torch.device, None, str, int]:
    """Move the model to the CPU after an out-of-memory error; warn once. Returns (device, dtype, precision, batch)."""
    message = f"out of {device.type.upper()} memory even at batch size 1: continuing on the CPU (slower)"
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)
    notes.append(message)
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return torch.device("cpu"), None, "fp32", batch_size or DEFAULT_BATCH["cpu"]


def _refine_stage(model: "HSAM", refine: bool | None, notes: list[str],
                  status: Callable[[str], None] | None) -> "torch.nn.Module | None":
    """The prompt decoder when the refine stage runs (``refine``: True required, None where possible), else None."""
    if refine is False:
        return None
    from hsam.prompting.refine import refine_decoder_for

    decoder, why_not = refine_decoder_for(model)
    if decoder is None:
        if refine:
            raise HSAMError(f"{why_not}; run without --refine")
        return None
    notes_text = "refine: each slice's automatic result prompts LiteMedSAM's decoder (boxes from the probabilities)"
    if status:
        status(notes_text)
    log.info(notes_text)
    return decoder


def segment_volume(
    image: sitk.Image,
    model: "HSAM",
    card: "ModelCard",
    *,
    device: str = "auto",
    batch_size: int | None = None,
    precision: str = "auto",
    mode: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    status: Callable[[str], None] | None = None,
    largest_component: bool = False,
    body_mask: bool = True,
    crop_to_body: bool = False,
    organs: Sequence[int | str] | None = None,
    orientation: str | None = None,
    check_orientation: bool = True,
    refine: bool | None = False,
    slab: bool | None = None,
) -> SegmentationResult:
    """Segment a 3-D CT volume; see the module docstring for the pipeline.

    Args:
        image: 3-D scalar CT in HU (any orientation; geometry in LPS as SimpleITK keeps it).
        model, card: from :func:`hsam.weights.store.load_named_model` / :func:`hsam.model.checkpoint.load_model`. The model
            is moved to the chosen device (and to the CPU after an out-of-memory fallback).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``"cuda:N"`` | ``"mps"``.
        batch_size: slices per forward pass (default 8 on CUDA, 4 on MPS, 2 on CPU).
        precision: ``"auto"`` | ``"fp32"`` | ``"fp16"`` | ``"bf16"`` (half precisions only on GPUs; ``auto``:
            :func:`select_precision`).
        mode: speed mode (:mod:`hsam.engines.modes`): ``"auto"`` (the measured fastest mode meeting the one precision
            rule for the device, processor and encoder family), ``"eager"``, ``"fast"``, ``"bf16"``, ``"int8"``,
            ``"ort"``, ``"ort-int8"``, ``"compile"``.
        progress: called as ``progress(k, n)`` with k slices of n done (first with k = 0).
        cancel: polled before every batch; True raises :class:`Cancelled` (nothing is returned).
        status: receives one-line messages about slow preparation steps (building the ONNX Runtime engine).
        largest_component: keep only the largest connected component of each organ.
        body_mask: label nothing outside the patient's trunk on each slice (:mod:`hsam.checks.body_mask`): arms, table and
            air are background. On by default: it removed the arm false positives measured in issue 15 at no cost
            to the organs (benchmarks/RESULTS-lite.md).
        crop_to_body: before the resize to the model input, crop every slice to one square around the volume's
            trunk (:func:`hsam.checks.body_mask.trunk_box`), so that a wide field of view (arms, table, air) does not shrink
            the organs in the input; outside the square is background.
        organs: restrict the argmax to these organs (label values or names); others are never predicted.
        orientation: canonical orientation code for this run (e.g. ``"RPS"``) instead of the card's.
        check_orientation: run the orientation self-check (:mod:`hsam.checks.orientation`); when it finds the
            model doing clearly better on mirrored or turned slices, a warning containing "orientation" is added to
            ``warnings``; its measurements are in ``orientation_check``. With it the final labels' sides are
            checked in patient coordinates (:mod:`hsam.checks.laterality`, no extra inference; ``laterality_check``).
        refine: the refine stage (:mod:`hsam.prompting.refine`): each slice's automatic result prompts LiteMedSAM's
            decoder. True: required (an error where the model cannot have it); None: where it can; False: off.
        slab: encode only the slab around the organs (:mod:`hsam.slab`: probe slices first, then the range
            around the organs found); None: :data:`hsam.slab.BY_DEFAULT`. What it did is in ``slab`` and is sent to
            ``status``. ``progress``'s n is the slice count until the slab is chosen, then the slices to encode.
    """
    started = time.perf_counter()
    image = check_volume(image, "the input volume")
    names = _class_names(card, model)
    channels = _selected_channels(organs, names)
    window_hu = list(getattr(card, "window", None) or (-125, 275))
    if orientation is not None:
        direction_from_code(orientation)  # a bad code is one clear error before any work
    orientation = (orientation or getattr(card, "orientation", None) or "LPS").upper()
    if batch_size is not None and batch_size < 1:
        raise HSAMError(f"batch size must be at least 1, got {batch_size}")

    target = select_device(device)
    from hsam.engines.modes import choose_engine, encoder_family, prepare

    family = encoder_family(model)
    precision_name, dtype = select_precision(precision, target, family)
    size = batch_size or DEFAULT_BATCH[target.type]
    choice = choose_engine(mode, target, family)
    mode_name, mode_reason = choice.mode, choice.reason
    if status:
        status(f"engine {mode_name}: {mode_reason}")
    engine_device: torch.device | None = None  # device the current predictor was built for
    predictor = None
    air_cache: dict = {}
    notes: list[str] = []

    canonical, how = to_canonical(image, orientation)
    if not looks_like_ct(canonical):
        notes.append(
            "the image does not look like CT in Hounsfield units (no air near -1000 HU); "
            "results on MR or pre-normalised images are unreliable"
        )
    total = canonical.shape[0]
    from hsam.checks.body_mask import clear_outside_trunk, tissue_threshold, trunk_box

    sx, sy, sz = how.canonical_spacing
    pixel_mm, tissue_hu = (sy, sx), tissue_threshold(window_hu[0])  # how the trunk mask tells the trunk on a slice
    box = None
    if crop_to_body:
        box = trunk_box(canonical, pixel_mm, tissue_hu=tissue_hu)
    work = canonical if box is None else np.ascontiguousarray(canonical[:, box[0], box[1]])
    labels = np.zeros(work.shape, dtype=np.uint8)
    confidence = np.zeros(work.shape, dtype=np.uint8)

    decoder = _refine_stage(model, refine, notes, status)
    model.eval()
    try:
        model.to(target)
    except Exception as error:  # noqa: BLE001
        if not _is_oom(error) or target.type == "cpu":
            raise
        target, dtype, precision_name, size = _fall_back_to_cpu(model, target, batch_size, notes)
    from hsam.slab import BY_DEFAULT, choose_slab, encoded_mask, plan_probes

    plan = plan_probes(total, sz, sx * sy) if (BY_DEFAULT if slab is None else slab) else None
    todo = list(plan.probes) if plan is not None else list(range(total))  # slices to encode, in order
    slab_chosen = plan is None
    if progress:
        progress(0, total)
    done = 0
    while done < len(todo):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled after {done} of {len(todo)} slices")
        stop = min(len(todo), done + size)
        chosen = todo[done:stop]
        if engine_device != target:
            if engine_device is not None:
                mode_name = "fast"  # after an out-of-memory fallback to the CPU: no export/quantisation mid-run
                mode_reason = "moved to the CPU after running out of GPU memory"
            try:
                predictor = prepare(model, mode_name, target, say=status or log.info)
            except OSError as error:  # e.g. the exported-graph cache cannot be written (disk full): run without it
                mode_reason = f"speed mode {mode_name} could not be prepared ({error.strerror or error})"
                notes.append(f"{mode_reason}; ran in fast mode")
                mode_name = "fast"
                predictor = prepare(model, mode_name, target, say=status or log.info)
            engine_device = target
        try:
            if decoder is not None:
                from hsam.prompting.refine import predict_refined

                batch_labels, batch_confidence = predict_refined(
                    model, work[chosen], window_hu, target, dtype, channels, predictor, decoder, pixel_mm
                )
            else:
                batch_labels, batch_confidence = predict_slices_skipping_air(
                    model, work[chosen], window_hu, target, dtype, channels, predictor, air_cache
                )
        except Exception as error:  # noqa: BLE001 (only out-of-memory is handled; everything else re-raised)
            if not _is_oom(error) or target.type == "cpu":
                raise
            if target.type == "cuda":
                torch.cuda.empty_cache()
            if size > 1:
                size = max(1, size // 2)
                log.warning("out of GPU memory: retrying with batch size %d", size)
                continue
            target, dtype, precision_name, size = _fall_back_to_cpu(model, target, batch_size, notes)
            continue
        labels[chosen] = batch_labels
        confidence[chosen] = batch_confidence
        done = stop
        if not slab_chosen and done == len(todo):  # the probes ran: choose the slab
            todo += choose_slab(plan, labels)
            slab_chosen = True
            if status:
                status(f"slab: {plan.reason}")
        if progress:
            progress(done, len(todo) if slab_chosen else total)
    check = None
    if check_orientation:
        from hsam.checks.orientation import check_orientation as run_check

        def predict_checked(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if cancel is not None and cancel():  # the check's passes answer a cancel as the run's batches do
                raise Cancelled(f"cancelled during the orientation check after {total} slices")
            return predict_slices(model, slices, window_hu, target, dtype, channels, predictor)

        tissue = (work.reshape(total, -1) > float(window_hu[0])).any(axis=1)
        if plan is not None:  # check only slices the network ran on
            tissue &= encoded_mask(plan)
        check = run_check(work, labels, confidence, predict_checked, orientation, tissue)
        if check.warning:
            log.warning(check.warning)
            notes.append(check.warning)
    del work
    if box is not None:  # back onto the whole slice: outside the square is background, with full confidence
        labels, cropped = np.zeros(canonical.shape, dtype=np.uint8), labels
        labels[:, box[0], box[1]] = cropped
        confidence, cropped = np.full(canonical.shape, 255, dtype=np.uint8), confidence
        confidence[:, box[0], box[1]] = cropped
        del cropped
    if body_mask:
        cleared = clear_outside_trunk(labels, canonical, pixel_mm, tissue_hu=tissue_hu)
        if cleared:
            log.info("body mask: %d labelled voxels outside the trunk set to background", cleared)
    del canonical

    if largest_component:
        keep_largest_components(labels, channels[1:] if channels else range(1, len(names)))
    label_image = from_canonical(labels, how)
    del labels
    laterality = None
    if check_orientation:
        from hsam.checks.laterality import check_laterality

        laterality = check_laterality(label_image, image, names)
        if laterality.warning:
            log.warning(laterality.warning)
            notes.append(laterality.warning)
    confidence_image = from_canonical(confidence, how)
    return SegmentationResult(
        labels=label_image,
        confidence=confidence_image,
        volumes_ml=organ_volumes_ml(label_image, names),
        device=str(target) if target.type != "cuda" else f"cuda:{torch.cuda.current_device()}",
        seconds=time.perf_counter() - started,
        batch_size=size,
        precision=precision_name,
        mode=mode_name,
        mode_reason=mode_reason,
        warnings=notes,
        orientation=orientation,
        orientation_check=check.as_dict() if check is not None else None,
        laterality_check=laterality.as_dict() if laterality is not None else None,
        slab=plan.as_dict() if plan is not None else None,
    )
