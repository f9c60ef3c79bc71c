"""Test inputs shared by the Slicer self-test (HSAMSlicerTest) and the pytest suite: a tiny real H-SAM network and
a small synthetic CT. The network is the real H-SAM architecture at toy size with random weights, so a run takes
seconds on a CPU; its labels are meaningless, but every step of the pipeline runs for real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_CONFIG = "vit_tiny"


def save_tiny_model(folder: str | Path, seed: int = 0, name: str = "hsam-tiny-test") -> Path:
    """Build the ``vit_tiny`` H-SAM with seeded random weights and save it (model.safetensors + model.json)."""
    import torch

    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, save_model
    from hsam.model.config import load_model_config

    config = load_model_config(TINY_CONFIG)
    torch.manual_seed(seed)
    model = build_hsam(config)
    card = ModelCard.for_config(
        config, name=name, title="Tiny test model (random weights)", classes=list(CLASS_NAMES), demo=True,
        training_data="none: random weights, for tests only",
    )  # fmt: skip
    return save_model(model, card, folder)


def synthetic_ct(slices: int = 10, rows: int = 48, columns: int = 64) -> np.ndarray:
    """An int16 [k, j, i] HU array: air around an elliptic soft-tissue body with one brighter 'organ'."""
    k, j, i = np.mgrid[0:slices, 0:rows, 0:columns]
    body = ((i - columns / 2) / (0.44 * columns)) ** 2 + ((j - rows / 2) / (0.42 * rows)) ** 2 < 1
    organ = ((i - 0.35 * columns) / (0.12 * columns)) ** 2 + ((j - 0.45 * rows) / (0.15 * rows)) ** 2 < 1
    array = np.where(body, 40, -1000).astype(np.int16)
    array[organ & (k >= 2)] = 130
    return array
