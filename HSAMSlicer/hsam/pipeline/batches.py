"""The batch loop of the predict stage: slices in batches through a predict function, with the slab search.

``progress(k, n)`` is called after every batch (first with k = 0); ``cancel()`` is checked before every batch and
raises :class:`~hsam.pipeline.result.Cancelled`; ``batch_done(slices)`` gets each batch's slice numbers once
``predict`` answered for it (for stages that keep something per slice). With a slab plan (:mod:`hsam.pipeline.slab`)
the probe slices run first, then only the slab's other slices; ``progress``'s n is the slice count until the slab is
chosen, then the slices to encode. An out-of-memory error goes to :meth:`Engine.recover` (halve the batch, or move to
the CPU).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from hsam.pipeline.engine import Engine
from hsam.pipeline.result import Cancelled
from hsam.pipeline.slab import SlabPlan, choose_slab

Predict = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]  # slices [b,H,W] -> labels, confidence uint8


def encode(
    volume: np.ndarray,
    predict: Predict,
    engine: Engine,
    plan: SlabPlan | None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    status: Callable[[str], None] | None = None,
    batch_done: Callable[[list[int]], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidence (uint8 [z,H,W]) of ``volume`` [z,H,W]: ``predict`` on batches of ``engine.batch``
    slices (all of them, or the plan's probes then its slab); slices not encoded are background."""
    total = volume.shape[0]
    labels = np.zeros(volume.shape, dtype=np.uint8)
    confidence = np.zeros(volume.shape, dtype=np.uint8)
    todo = list(plan.probes) if plan is not None else list(range(total))  # slices to encode, in order
    slab_chosen = plan is None
    if progress:
        progress(0, total)
    done = 0
    while done < len(todo):
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled after {done} of {len(todo)} slices")
        stop = min(len(todo), done + engine.batch)
        chosen = todo[done:stop]
        try:
            batch_labels, batch_confidence = predict(volume[chosen])
        except Exception as error:  # noqa: BLE001 (only out-of-memory is handled; everything else re-raised)
            if not engine.recover(error):
                raise
            continue
        labels[chosen], confidence[chosen] = batch_labels, batch_confidence
        if batch_done:
            batch_done(chosen)
        done = stop
        if not slab_chosen and done == len(todo):  # the probes ran: choose the slab
            todo += choose_slab(plan, labels)
            slab_chosen = True
            if status:
                status(f"slab: {plan.reason}")
        if progress:
            progress(done, len(todo) if slab_chosen else total)
    return labels, confidence
