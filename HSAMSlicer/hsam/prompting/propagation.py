"""Carry an organ's mask from a prompted slice to its neighbours, one slice at a time.

Each next slice gets a box prompt around the previous slice's mask (widened by ``margin_mm``). The organ is taken
to have ended where the decoder's mask is small (``min_area_mm2``), where it shrinks to a fraction of the previous
slice's (``min_ratio``), where it overlaps the previous slice's mask by less than ``min_overlap`` (intersection over
union: the decoder has jumped to a neighbouring structure) or where the decoder's own IoU estimate falls below
``min_iou``; propagation also stops at the volume's end, at the caller's limit and at any slice the user prompted
(never overwritten).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from hsam.prompting.session import PROPAGATED, PromptSession, SlicePrompt, box_of


@dataclass(frozen=True)
class PropagationRule:
    """How far to widen and when to stop (see the module docstring). Chosen on lidc-idri-0001 and the 3-mm
    TotalSegmentator test CT together (benchmarks/prompting/RESULTS.md): a margin in mm, not pixels (5 px were 3.5 mm
    on one and 15 mm on the other, where every mask grew into its neighbours), and the overlap rule."""

    margin_mm: float = 3.5
    min_area_mm2: float = 25.0
    min_ratio: float = 0.25
    min_overlap: float = 0.5
    min_iou: float = 0.5


def propagate(session: PromptSession, organ: int, start: int, step: int, limit: int | None = None,
              rule: PropagationRule = PropagationRule(), pixel_mm: tuple[float, float] = (1.0, 1.0),
              progress: Callable[[int], None] | None = None) -> list[int]:
    """From slice ``start`` (which must hold a mask of ``organ``) towards ``step`` (+1 or -1) up to ``limit``
    (inclusive; default the volume's end). Returns the slices that got a propagated mask, in order.

    A propagated mask earlier left on a slice beyond where the organ now ends is removed. ``pixel_mm``: (row, col)
    spacing of the canonical slices; ``progress(z)`` is called after each slice.
    """
    if step not in (1, -1):
        raise ValueError(f"step must be +1 or -1, got {step}")
    depth = session.shape[0]
    end = (depth - 1 if step > 0 else 0) if limit is None else max(0, min(depth - 1, int(limit)))
    previous = session.mask(organ, start)
    filled: list[int] = []
    min_area_px = rule.min_area_mm2 / (pixel_mm[0] * pixel_mm[1])
    margin_px = rule.margin_mm / ((pixel_mm[0] + pixel_mm[1]) / 2)
    z = start + step
    while (z - end) * step <= 0 and previous.any():
        if session.is_prompted(organ, z):
            break
        prompt = SlicePrompt(box_of(previous, margin_px), source=PROPAGATED)
        (logits, iou), = session.decode(z, [prompt])
        current = logits > 0
        area = int(current.sum())
        overlap = (current & previous).sum() / max(1, (current | previous).sum())
        if area < min_area_px or area < rule.min_ratio * previous.sum() or overlap < rule.min_overlap \
                or iou < rule.min_iou:
            break
        session.store(organ, z, prompt, logits, iou)
        filled.append(z)
        if progress:
            progress(z)
        previous, z = current, z + step
    while (z - end) * step <= 0 and session.prompts.get((organ, z), SlicePrompt(source="")).source == PROPAGATED:
        session.clear(organ, z)  # the organ ends earlier than an earlier propagation found
        z += step
    return filled
