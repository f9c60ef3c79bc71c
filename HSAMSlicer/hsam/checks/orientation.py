"""Orientation self-check: does the model find its organs better on a mirrored or turned copy of the scan?

A model sees axial slices in its card's canonical orientation; a scan whose header lies, or a card whose orientation
guess is wrong, gives it mirrored or turned slices and nothing fails visibly. The laterality of the output does not
reveal it either: position-driven models still put a (small) "liver" on the patient's right of a mirrored scan. What
does change is how much organ the model finds and how sure it is (issue 14, bundled demo model on the whole sample
CT: 66,693 organ voxels at mean confidence 0.958 as given, 17,580 at 0.849 mirrored left-right, 6,041 at 0.872
turned 180 degrees).

So a few slices are run again mirrored left-right, mirrored front-back and turned 180 degrees (all three wrong
in-plane layouts), and compared with the run as given on the same slices: the slice where the run as given found the
most organ, and slices spread over the rest of the body (:func:`checked_slices` says why). An alternative beats the
scan as given when it finds at least ``MIN_ORGAN_FRACTION`` of the slices' pixels as organ and either

* a fair share of the organ (``MIN_ORGAN_SHARE`` of the as-given voxels) with clearly higher mean confidence inside
  it (``CONFIDENCE_MARGIN``), or
* clearly more organ (``MORE_ORGAN`` times) at no lower confidence (``CONFIDENCE_SLACK``);

the check fires naming the most confident of these alternatives (among those within ``CONFIDENCE_SLACK`` of it, the
one with the most organ). On a correctly oriented scan the as-given layout is the best on both counts (measured:
benchmarks/orientation/results.md).
Cost: 3 forward passes per checked slice: 3 in all when the first slice settles it (every correctly oriented scan
measured), 9 when the check has to look further. 2.7 % of the run's passes on 112 slices, 10 % on 30, as many
as the run's on a 3-slice scan (kept there: a few seconds, and the check is right on such scans too).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
CONFIDENCE_MARGIN = 0.05
MIN_ORGAN_SHARE = 0.5
MORE_ORGAN = 1.5
CONFIDENCE_SLACK = 0.01
MIN_ORGAN_FRACTION = 0.01
MAX_SLICES = 3  # checked slices at most: the first, then the middles of the other thirds of the body

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
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # pooled over the checked slices
    per_slice: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # slice -> scores there
    suspect: str | None = None  # the variant that looks right instead of the scan as given
    suggested_orientation: str | None = None  # the --orientation code that would give the model that variant
    warning: str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time: unlike wall time, not inflated by other jobs or pauses

    def as_dict(self) -> dict:
        """JSON-ready record for provenance."""
        return asdict(self)


def first_slice(labels: np.ndarray, tissue: np.ndarray) -> int | None:
    """Where the as-given run found the most organ (the middle slice with tissue if it found none; None: no tissue).

    This is the as-given layout's best evidence: on a correctly oriented scan the model finds its organs there and
    every other layout does clearly worse, so one slice (3 passes) settles it."""
    body = np.flatnonzero(tissue)
    if not len(body):
        return None
    organ = (labels.reshape(labels.shape[0], -1) > 0).sum(axis=1)
    return int(np.argmax(organ)) if organ.any() else int(body[len(body) // 2])


def further_slices(tissue: np.ndarray, first: int) -> list[int]:
    """The middle of each of ``MAX_SLICES`` equal parts of the body's extent (slices with tissue) but the first's.

    On a wrong layout the model may put its organs at the wrong height (on example_ct turned 180 degrees it found the
    most organ in the pelvis, where no layout finds much), so these slices are spread over the body, not over the run's organs: in-plane
    mirroring moves nothing along z, so the layout that is right finds its organs wherever they really are."""
    body = np.flatnonzero(tissue)
    return [int(part[len(part) // 2]) for part in np.array_split(body, MAX_SLICES)
            if len(part) and not part[0] <= first <= part[-1]]


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


def _scores_on(
    canonical: np.ndarray, labels: np.ndarray, confidence: np.ndarray, chosen: list[int], predict: Predict,
) -> dict[str, dict[str, float]]:
    """As given (from the run) and the three variants (3 passes per slice) on the ``chosen`` slices."""
    scores = {"as given": _score(labels[chosen], confidence[chosen])}
    slices = canonical[chosen]
    for name, (flip_rows, flip_columns) in VARIANTS.items():
        axes = tuple(a for a, flip in ((1, flip_rows), (2, flip_columns)) if flip)
        scores[name] = _score(*predict(np.ascontiguousarray(np.flip(slices, axis=axes))))
    return scores


def settled(scores: dict[str, dict[str, float]], floor: float) -> bool:
    """True when the layout as given beats every variant by the rule a variant must meet to fire (``_beats`` with
    the roles swapped): then looking further would only add passes."""
    given = scores["as given"]
    return all(_beats(given, score, floor) for name, score in scores.items() if name != "as given")


def _pooled(per_slice: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Organ voxels summed and mean confidence weighted by them, over the checked slices."""
    pooled = {}
    for name in next(iter(per_slice.values())):
        voxels = sum(s[name]["organ_voxels"] for s in per_slice.values())
        weighted = sum(s[name]["organ_voxels"] * s[name]["mean_confidence"] for s in per_slice.values())
        pooled[name] = {"organ_voxels": voxels, "mean_confidence": round(weighted / voxels, 4) if voxels else 0.0}
    return pooled


def check_orientation(
    canonical: np.ndarray, labels: np.ndarray, confidence: np.ndarray, predict: Predict, orientation: str | None,
    tissue: np.ndarray,
) -> OrientationCheck:
    """Compare the as-given result with the model's result on mirrored and turned copies of a few slices.

    First the slice where the as-given run found the most organ (:func:`first_slice`): a variant that beats the as
    given there fires; an as given that beats every variant there ends the check (3 passes). Otherwise (neither is
    clearly right there: on a wrong layout the run's organs may lie at the wrong height) the check looks at slices
    spread over the body (:func:`further_slices`, 3 passes each): a variant fires if it beats the as given on one of
    them and is more confident over all checked slices together (``CONFIDENCE_MARGIN``), so one slice where a layout
    happens to look good is not enough.

    ``canonical``: the scan in the model's layout [z, y, x] (HU); ``labels``/``confidence``: the run's result on it;
    ``tissue``: bool per slice, True where the slice is not all air; ``orientation``: the code the scan was put in
    (None: the stored order, as in the reference protocol).
    """
    started, cpu = time.perf_counter(), time.process_time()
    first = first_slice(labels, tissue)
    check = OrientationCheck(slices=[] if first is None else [first])
    if first is None:
        return check
    floor = MIN_ORGAN_FRACTION * canonical[0].size  # per slice
    per_slice = {first: _scores_on(canonical, labels, confidence, [first], predict)}
    best, decided_on = better_layout(per_slice[first], floor), first
    if best is None and not settled(per_slice[first], floor):
        for z in further_slices(tissue, first):
            per_slice[z] = _scores_on(canonical, labels, confidence, [z], predict)
        pooled = _pooled(per_slice)
        confident = {n for n, v in pooled.items() if n != "as given"
                     and v["mean_confidence"] >= pooled["as given"]["mean_confidence"] + CONFIDENCE_MARGIN}
        verdicts = {z: better_layout(per_slice[z], floor) for z in per_slice if z != first}
        wins = [(z, w) for z, w in sorted(verdicts.items()) if w in confident]
        if wins:  # the most confident winner over all checked slices
            decided_on, best = max(wins, key=lambda zw: pooled[zw[1]]["mean_confidence"])
    check.slices = sorted(per_slice)
    check.scores = _pooled(per_slice)
    check.per_slice = {str(z): scores for z, scores in sorted(per_slice.items())}
    if best is not None:
        given, score = per_slice[decided_on]["as given"], per_slice[decided_on][best]
        check.suspect = best
        times = score["organ_voxels"] / max(1, given["organ_voxels"])
        found = (
            f"orientation looks wrong: on checked slice {decided_on} the model is more confident "
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
