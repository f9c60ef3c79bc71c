"""What a segmentation run returns (:class:`SegmentationResult`) or raises when cancelled (:class:`Cancelled`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk


class Cancelled(Exception):
    """Raised by :func:`hsam.pipeline.run.segment_volume` when its ``cancel`` callback returns True (between batches)."""


@dataclass
class SegmentationResult:
    """What :func:`hsam.pipeline.run.segment_volume` returns. Both images have exactly the input's size, spacing,
    origin, direction."""

    labels: sitk.Image  # uint8, 0 = background, 1..K-1 = card.classes[1:]
    confidence: sitk.Image  # uint8, round(255 * max softmax probability)
    volumes_ml: dict[str, float]  # organ name -> volume in millilitres (every organ of the card, 0.0 if absent)
    device: str  # where the last batch ran ("cuda:0", "mps", "cpu")
    seconds: float
    batch_size: int = 1  # the batch size that finished the run (after any halving)
    precision: str = "fp32"
    mode: str = "eager"  # speed mode that ran (hsam.engines.modes); "reference" for the reference protocol
    mode_reason: str = ""  # why that engine ran (processor, evidence; hsam.engines.modes.choose_engine)
    warnings: list[str] = field(default_factory=list)
    orientation: str = "LPS"  # the canonical orientation the scan was put in (the card's, or the override)
    orientation_check: dict | None = None  # hsam.checks.orientation.OrientationCheck.as_dict(); None when not run
    laterality_check: dict | None = None  # hsam.checks.laterality.LateralityCheck.as_dict(); None when not run
    slab: dict | None = None  # hsam.pipeline.slab.SlabPlan.as_dict(): which slices were encoded; None: search off
    embeddings: str | None = None  # folder of the kept slice embeddings (hsam.prompting.kept); None: none kept


def organ_volumes_ml(labels: sitk.Image, names: Sequence[str]) -> dict[str, float]:
    """``{name: millilitres}`` for classes 1.. of ``names`` from a uint8 label image (spacing in mm)."""
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=len(names))
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {name: float(counts[i]) * voxel_ml for i, name in enumerate(names) if i > 0}
