"""``segment_volume``: a CT volume in, organ labels + confidence on the same grid out, through the named stages.

orient -> window + predict in batches (slab search; refine in place of the plain predict; keep the embeddings) ->
checks (orientation)
-> body mask -> post-process -> back to the input grid -> checks (laterality). The protocol picks the engine, orient
and predict stages (:func:`_default_stages`, :func:`_reference_stages`); the rest is shared. Memory is bounded by
one batch: only uint8 label and confidence volumes are kept for the whole scan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import SimpleITK as sitk

from hsam.pipeline import body, checks
from hsam.pipeline.batches import Predict, encode
from hsam.pipeline.device import device_name
from hsam.pipeline.engine import Engine, start_engine
from hsam.pipeline.keep import KeepStage, keep_stage
from hsam.pipeline.options import SegmentOptions
from hsam.pipeline.orient import Oriented, orient, stored_order, to_input_grid
from hsam.pipeline.post import keep_largest_components
from hsam.pipeline.predict import class_names, predict_slices, predict_slices_skipping_air, selected_channels
from hsam.pipeline.result import SegmentationResult, organ_volumes_ml
from hsam.pipeline.slab import BY_DEFAULT, plan_probes
from hsam.volume import check_volume, window

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.checkpoint import ModelCard
    from hsam.model.hsam import HSAM


@dataclass
class Stages:
    """The protocol's choice of stages for one run."""

    engine: Engine
    oriented: Oriented
    predict: Predict  # the predict stage of the batches (air shortcut, or refine)
    predict_plain: Predict  # the same network output without shortcuts, for the orientation check
    keep: KeepStage | None = None  # the encoder's embeddings written for the prompt tools


@dataclass
class Labelled:
    """The labels of a run in the oriented layout, before the way back to the input grid."""

    labels: np.ndarray  # uint8 [z,H,W]
    confidence: np.ndarray  # uint8 [z,H,W]
    orientation_check: dict | None
    slab: dict | None
    embeddings: str | None = None  # the folder the slice embeddings were kept in


def _default_stages(image: sitk.Image, model: "HSAM", card: "ModelCard", options: SegmentOptions,
                    channels: list[int] | None, window_hu: list[float], notes: list[str],
                    status: Callable[[str], None] | None) -> Stages:
    """This package's path: the card's orientation, torch resizes, speed modes, the air shortcut, refine."""
    from hsam.pipeline.refine import refine_decoder

    engine = start_engine(model, options, notes, status)
    oriented = orient(image, (options.orientation or getattr(card, "orientation", None) or "LPS").upper(), notes)
    decoder = refine_decoder(model, options.refine, status, oriented.pixel_mm)
    keep = keep_stage(options.keep_embeddings, model, engine, oriented.volume, window_hu, options.crop_to_body, notes,
                      status)
    air_cache: dict = {}

    def plain(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict_slices(model, slices, window_hu, engine.target, engine.dtype, channels, engine.predictor())

    def batch(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if decoder is not None:
            from hsam.prompting.refine import predict_refined

            return predict_refined(model, slices, window_hu, engine.target, engine.dtype, channels,
                                   engine.predictor(), decoder, oriented.pixel_mm, keep=keep.hold if keep else None)
        if keep is not None:  # every slice through the encoder (no air shortcut): each gets its embedding
            return predict_slices(model, slices, window_hu, engine.target, engine.dtype, channels,
                                  engine.predictor(), keep=keep.hold)
        return predict_slices_skipping_air(model, slices, window_hu, engine.target, engine.dtype, channels,
                                           engine.predictor(), air_cache)

    return Stages(engine, oriented, batch, plain, keep)


def _reference_stages(image: sitk.Image, model: "HSAM", options: SegmentOptions, window_hu: list[float],
                      notes: list[str]) -> Stages:
    """The released test pipeline (:mod:`hsam.pipeline.reference`): stored order, scipy zooms, plain fp32."""
    from hsam.pipeline.reference import predict_slices_reference, reference_engine

    engine = reference_engine(model, options, notes)

    def predict(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slices01 = window(slices, float(window_hu[0]), float(window_hu[1]))
        return predict_slices_reference(model, slices01, options.input_size, engine.target)

    return Stages(engine, stored_order(image), predict, predict)


def _label(stages: Stages, options: SegmentOptions, window_low: float, organ_values: Sequence[int],
           progress: Callable[[int, int], None] | None, cancel: Callable[[], bool] | None,
           status: Callable[[str], None] | None) -> Labelled:
    """Body crop (optional) -> predict in batches with the slab search -> orientation check -> body mask ->
    largest components (optional), all in the oriented layout [z,H,W]."""
    oriented, box = stages.oriented, None
    volume = oriented.volume
    if options.crop_to_body:
        volume, box = body.crop_to_trunk(volume, oriented.pixel_mm, window_low)
    stages.engine.place_model()
    sx, sy, sz = oriented.spacing
    slab = BY_DEFAULT if options.slab is None else options.slab
    plan = plan_probes(volume.shape[0], sz, sx * sy) if slab else None
    keep = stages.keep
    labels, confidence = encode(volume, stages.predict, stages.engine, plan, progress, cancel, status,
                                batch_done=keep.commit if keep else None)
    kept = keep.close() if keep else None
    check = None
    if options.check_orientation:
        check = checks.orientation_check(volume, labels, confidence, stages.predict_plain, oriented.code, window_low,
                                         plan, cancel, stages.engine.notes)
    if box is not None:  # back onto the whole slice: outside the square is background, with full confidence
        labels, confidence = body.uncrop(labels, confidence, box, oriented.volume.shape)
    if options.body_mask:
        body.clear_outside_body(labels, oriented.volume, oriented.pixel_mm, window_low)
    if options.largest_component:
        keep_largest_components(labels, organ_values)
    return Labelled(labels, confidence, check, plan.as_dict() if plan is not None else None, kept)


def segment_volume(
    image: sitk.Image,
    model: "HSAM",
    card: "ModelCard",
    options: SegmentOptions = SegmentOptions(),
    *,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    status: Callable[[str], None] | None = None,
) -> SegmentationResult:
    """Segment a 3-D CT ``image`` (HU, any orientation) as ``options`` say; the result has ``image``'s grid.

    ``model``/``card``: from :func:`hsam.weights.store.load_named_model` (moved to the chosen device, and to the CPU after
    an out-of-memory fallback). ``progress(k, n)``: k of n slices done (:func:`hsam.pipeline.batches.encode`);
    ``cancel()``: polled before every batch, True raises :class:`Cancelled`; ``status(text)``: one-line messages
    on the engine, refine stage and slab search (the CLI's JSON progress stages).
    """
    started = time.perf_counter()
    image = check_volume(image, "the input volume")
    names = class_names(card, model)
    channels = selected_channels(options.organs, names)
    options.check()
    window_hu = list(getattr(card, "window", None) or (-125, 275))
    notes: list[str] = []
    if options.protocol == "reference":
        stages = _reference_stages(image, model, options, window_hu, notes)
    else:
        stages = _default_stages(image, model, card, options, channels, window_hu, notes, status)
    organ_values = channels[1:] if channels else range(1, len(names))
    done = _label(stages, options, float(window_hu[0]), organ_values, progress, cancel, status)
    label_image = to_input_grid(done.labels, stages.oriented, image)
    laterality = checks.laterality_check(label_image, image, names, notes) if options.check_orientation else None
    engine = stages.engine
    return SegmentationResult(
        labels=label_image, confidence=to_input_grid(done.confidence, stages.oriented, image),
        volumes_ml=organ_volumes_ml(label_image, names), device=device_name(engine.target),
        seconds=time.perf_counter() - started, batch_size=engine.batch, precision=engine.precision,
        mode=engine.mode, mode_reason=engine.reason, warnings=notes, orientation=stages.oriented.label,
        orientation_check=done.orientation_check, laterality_check=laterality, slab=done.slab,
        embeddings=done.embeddings,
    )
