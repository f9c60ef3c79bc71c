"""Intensity windowing as the model card states it (Synapse H-SAM: clip to [-125, 275] HU, scale to [0, 1])."""

from __future__ import annotations

import numpy as np


def window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip ``array`` to ``[low, high]`` and scale it to float32 in [0, 1]; nothing else is applied."""
    if not high > low:
        raise ValueError(f"window [{low}, {high}] is empty")
    out = np.asarray(array, dtype=np.float32)
    out = np.clip(out, low, high)
    out -= np.float32(low)
    out /= np.float32(high - low)
    return out


def looks_like_ct(array: np.ndarray, samples: int = 200_000) -> bool:
    """Heuristic: does this look like CT in Hounsfield units (air near -1000 or soft tissue around 0-100)?

    MR and already-normalised images are mostly non-negative with no values near -1000. Used for a warning only.
    """
    flat = np.asarray(array).reshape(-1)
    if flat.size == 0:
        return False
    step = max(1, flat.size // samples)
    sample = flat[::step].astype(np.float32)
    return bool(np.percentile(sample, 1) < -500 or (sample < -200).mean() > 0.02)
