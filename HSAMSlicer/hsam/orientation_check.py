"""Orientation self-check: does the model find its organs better on a mirrored or turned copy of the scan?

A model sees axial slices in its card's canonical orientation; a scan whose header lies, or a card whose orientation
guess is wrong, gives it mirrored or turned slices and nothing fails visibly. The laterality of the output does not
reveal it either: position-driven models still put a (small) "liver" on the patient's right of a mirrored scan. What
does change is how much organ the model finds and how sure it is (issue 14, bundled demo model on the whole sample
CT: 66,693 organ voxels at mean confidence 0.958 as given, 17,580 at 0.849 mirrored left-right, 6,041 at 0.872
turned 180 degrees).

So a few slices of the organ range are run again mirrored left-right, mirrored front-back and turned 180 degrees
(all three wrong in-plane layouts), and compared with the run as given on the same slices. An alternative beats the
scan as given when it finds at least ``MIN_ORGAN_FRACTION`` of the slices' pixels as organ and either

* a fair share of the organ (``MIN_ORGAN_SHARE`` of the as-given voxels) with clearly higher mean confidence inside
  it (``CONFIDENCE_MARGIN``), or
* clearly more organ (``MORE_ORGAN`` times) at no lower confidence (``CONFIDENCE_SLACK``);

the check fires naming the most confident of these alternatives (among those within ``CONFIDENCE_SLACK`` of it, the
one with the most organ). On a correctly oriented scan the as-given layout is the best on both counts (measured:
benchmarks/orientation/results.md).
Cost: 3 forward passes per checked slice, one checked slice per ``SLICES_PER`` slices with tissue (1 to 3).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
CONFIDENCE_MARGIN = 0.05
MIN_ORGAN_SHARE = 0.5
MORE_ORGAN = 1.5
CONFIDENCE_SLACK = 0.01
MIN_ORGAN_FRACTION = 0.01
SLICES_PER = 100  # one checked slice per this many slices with tissue, rounded up (3 passes each), 1 to MAX_SLICES
MAX_SLICES = 3

# name -> (flip rows [y], flip columns [x]) of a canonical [z, y, x] slice
VARIANTS: dict[str, tuple[bool, bool]] = {
    "mirrored left-right": (False, True),
    "mirrored front-back": (True, False),
    "turned 180 degrees": (True, True),
}
_OPPOSITE = {"L": "R", "R": "L", "P": "A", "A": "P", "S": "I", "I": "S"}

Predict = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]
"""slices [n, H, W] (HU, canonical layout) -> (labels uint8 [n, H, W], confidence uint8 [n, H, W])."""


@dataclass
class OrientationCheck:
    """What the check measured: per variant the organ voxels and mean organ confidence on the checked slices."""

    slices: list[int]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    suspect: str | None = None  # the variant that looks right instead of the scan as given
    suggested_orientation: str | None = None  # the --orientation code that would give the model that variant
    warning: str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: unlike wall time, not inflated by other jobs or pauses

    def as_dict(self) -> dict:
        """JSON-ready record for provenance."""
        return asdict(self)


def slice_count(body_slices: int) -> int:
    """How many slices to check: one per ``SLICES_PER`` slices with tissue, rounded up, 1 to ``MAX_SLICES``."""
    return int(min(MAX_SLICES, max(1, math.ceil(body_slices / SLICES_PER))))


def checked_slices(labels: np.ndarray, tissue: np.ndarray) -> list[int]:
    """Slices to check (``slice_count`` of them): where the as-given run found the most organ, and the middle of each
    other equal part of the body's extent (the slices with tissue).

    The first is the as-given hypothesis's best evidence: on a correctly oriented scan the model finds its organs
    there and every other layout does worse, so the check stays silent. But on a wrong layout the model may put its
    organs at the wrong height (on example_ct mirrored front-back they went below the real organs), so the other
    slices are spread over the body, not over the run's organs: in-plane mirroring does not move anything along z, so
    the layout that is right finds its organs wherever they really are in the body.
    """
    body = np.flatnonzero(tissue)
    if not len(body):
        return []
    organ = (labels.reshape(labels.shape[0], -1) > 0).sum(axis=1)
    first = int(np.argmax(organ)) if organ.any() else int(body[len(body) // 2])
    chosen = {first}
    for part in np.array_split(body, slice_count(len(body))):
        if len(part) and not part[0] <= first <= part[-1]:
            chosen.add(int(part[len(part) // 2]))
    return sorted(chosen)


def _score(labels: np.ndarray, confidence: np.ndarray) -> dict[str, float]:
    organ = labels > 0
    voxels = int(organ.sum())
    mean = float(confidence[organ].mean()) / 255.0 if voxels else 0.0
    return {"organ_voxels": voxels, "mean_confidence": round(mean, 4)}


def suggested_code(orientation: str, flip_rows: bool, flip_columns: bool) -> str:
    """The canonical code that shows the model the variant (columns = first letter, rows = second)."""
    letters = list(orientation.upper())
    if flip_columns:
        letters[0] = _OPPOSITE[letters[0]]
    if flip_rows:
        letters[1] = _OPPOSITE[letters[1]]
    return "".join(letters)


def _beats(score: dict[str, float], given: dict[str, float], floor: float) -> bool:
    voxels, confidence = score["organ_voxels"], score["mean_confidence"]
    if voxels < floor:
        return False
    surer = voxels >= MIN_ORGAN_SHARE * given["organ_voxels"] and confidence >= given["mean_confidence"] + CONFIDENCE_MARGIN
    more = voxels >= MORE_ORGAN * given["organ_voxels"] and confidence >= given["mean_confidence"] - CONFIDENCE_SLACK
    return surer or more


def better_layout(scores: dict[str, dict[str, float]], floor: float) -> str | None:
    """The variant that beats ``scores["as given"]`` (module docstring): if several do, the most confident one, and
    among those within ``CONFIDENCE_SLACK`` of it the one with the most organ; None when the scan as given is best."""
    given = scores["as given"]
    better = [name for name, score in scores.items() if name != "as given" and _beats(score, given, floor)]
    if not better:
        return None
    top = max(scores[n]["mean_confidence"] for n in better)
    near = [n for n in better if scores[n]["mean_confidence"] >= top - CONFIDENCE_SLACK]
    return max(near, key=lambda n: scores[n]["organ_voxels"])


def check_orientation(
    canonical: np.ndarray, labels: np.ndarray, confidence: np.ndarray, predict: Predict, orientation: str | None,
    tissue: np.ndarray,
) -> OrientationCheck:
    """Compare the as-given result on a few slices with the model's result on their mirrored and turned copies.

    ``canonical``: the scan in the model's layout [z, y, x] (HU); ``labels``/``confidence``: the run's result on it;
    ``tissue``: bool per slice, True where the slice is not all air; ``orientation``: the code the scan was put in
    (None: the stored order, as in the reference protocol).
    """
    started, cpu = time.perf_counter(), time.process_time()
    chosen = checked_slices(labels, tissue)
    check = OrientationCheck(slices=chosen)
    if not chosen:
        return check
    given = _score(labels[chosen], confidence[chosen])
    check.scores["as given"] = given
    slices = canonical[chosen]
    for name, (flip_rows, flip_columns) in VARIANTS.items():
        axes = tuple(a for a, flip in ((1, flip_rows), (2, flip_columns)) if flip)
        variant_labels, variant_confidence = predict(np.ascontiguousarray(np.flip(slices, axis=axes)))
        check.scores[name] = _score(variant_labels, variant_confidence)
    best = better_layout(check.scores, MIN_ORGAN_FRACTION * slices.size)
    if best is not None:
        score = check.scores[best]
        check.suspect = best
        times = score["organ_voxels"] / max(1, given["organ_voxels"])
        found = (
            f"orientation looks wrong: on {len(chosen)} checked slice(s) the model is more confident "
            f"({given['mean_confidence']:.2f} -> {score['mean_confidence']:.2f} inside organs, {times:.1f}x the organ "
            f"voxels) when the slices are {best}; "
        )
        if orientation is None:  # slices in stored order (reference protocol): nothing to override
            check.warning = found + "the volume's stored slice order may not be the one the model was trained on"
        else:
            check.suggested_orientation = suggested_code(orientation, *VARIANTS[best])
            check.warning = found + (
                f"the scan's orientation header may be wrong, or the model's canonical orientation '{orientation}' "
                f"may not fit this scan: check left/right in a viewer, or rerun with "
                f"--orientation {check.suggested_orientation}"
            )
    check.seconds = time.perf_counter() - started
    check.cpu_seconds = time.process_time() - cpu
    return check
