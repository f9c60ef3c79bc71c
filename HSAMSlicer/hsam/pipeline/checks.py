"""Checks stage: the orientation self-check (:mod:`hsam.checks.orientation`, extra passes on mirrored and turned
slices) and the laterality check of the final labels in patient coordinates (:mod:`hsam.checks.laterality`, no
inference). A check that fires adds its warning to ``notes``."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from hsam.pipeline.batches import Predict
from hsam.pipeline.result import Cancelled
from hsam.pipeline.slab import SlabPlan, encoded_mask

log = logging.getLogger(__name__)


def orientation_check(volume: np.ndarray, labels: np.ndarray, confidence: np.ndarray, predict: Predict,
                      code: str | None, window_low: float, plan: SlabPlan | None,
                      cancel: Callable[[], bool] | None, notes: list[str]) -> dict:
    """Run the orientation self-check on ``volume`` [z,H,W] (HU) and the run's ``labels``/``confidence`` [z,H,W],
    only on slices with tissue the network ran on; returns its measurements (``OrientationCheck.as_dict``)."""
    from hsam.checks.orientation import check_orientation

    total = volume.shape[0]

    def predict_checked(slices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if cancel is not None and cancel():  # the check's passes answer a cancel as the run's batches do
            raise Cancelled(f"cancelled during the orientation check after {total} slices")
        return predict(slices)

    tissue = (volume.reshape(total, -1) > float(window_low)).any(axis=1)
    if plan is not None:  # check only slices the network ran on
        tissue &= encoded_mask(plan)
    check = check_orientation(volume, labels, confidence, predict_checked, code, tissue)
    if check.warning:
        log.warning(check.warning)
        notes.append(check.warning)
    return check.as_dict()


def laterality_check(labels: sitk.Image, image: sitk.Image, names: Sequence[str], notes: list[str]) -> dict:
    """Check the sides of the final ``labels`` (on ``image``'s grid) in patient coordinates; returns
    ``LateralityCheck.as_dict``."""
    from hsam.checks.laterality import check_laterality

    laterality = check_laterality(labels, image, names)
    if laterality.warning:
        log.warning(laterality.warning)
        notes.append(laterality.warning)
    return laterality.as_dict()
