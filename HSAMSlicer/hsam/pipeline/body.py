"""Body mask stage (:mod:`hsam.checks.body_mask`): crop to the trunk before the resize (optional) and clear labels outside
the patient's trunk after (default: arms, table and air are background; issue 15)."""

from __future__ import annotations

import logging

import numpy as np

from hsam.checks.body_mask import clear_outside_trunk, tissue_threshold, trunk_box

log = logging.getLogger(__name__)

Box = tuple[slice, slice]  # rows, columns of the trunk square


def crop_to_trunk(volume: np.ndarray, pixel_mm: tuple[float, float], window_low: float) -> tuple[np.ndarray, Box]:
    """``volume`` [z,H,W] cropped to one square around its trunk (:func:`hsam.checks.body_mask.trunk_box`) [z,h,w]."""
    box = trunk_box(volume, pixel_mm, tissue_hu=tissue_threshold(window_low))
    return np.ascontiguousarray(volume[:, box[0], box[1]]), box


def uncrop(labels: np.ndarray, confidence: np.ndarray, box: Box, shape: tuple[int, ...]
           ) -> tuple[np.ndarray, np.ndarray]:
    """Cropped results [z,h,w] back onto whole slices ``shape`` [z,H,W]: outside the square is background with full
    confidence."""
    full_labels = np.zeros(shape, dtype=np.uint8)
    full_labels[:, box[0], box[1]] = labels
    full_confidence = np.full(shape, 255, dtype=np.uint8)
    full_confidence[:, box[0], box[1]] = confidence
    return full_labels, full_confidence


def clear_outside_body(labels: np.ndarray, volume: np.ndarray, pixel_mm: tuple[float, float],
                       window_low: float) -> None:
    """In place: labels [z,H,W] outside the trunk of ``volume`` [z,H,W] (HU) become background."""
    cleared = clear_outside_trunk(labels, volume, pixel_mm, tissue_hu=tissue_threshold(window_low))
    if cleared:
        log.info("body mask: %d labelled voxels outside the trunk set to background", cleared)
