"""Window stage (default protocol): raw slices in HU -> the network's input (the card's window, bicubic resize)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hsam.volume import window


def model_images(slices: np.ndarray, window_hu: Sequence[float], size: int, device: torch.device) -> torch.Tensor:
    """Raw slices [b,H,W] (HU) -> network input [b,3,size,size]: windowed to [0, 1], resized bicubic (clamped)."""
    batch = torch.from_numpy(window(slices, float(window_hu[0]), float(window_hu[1]))).to(device)[:, None]
    if tuple(batch.shape[-2:]) != (size, size):
        batch = F.interpolate(batch, (size, size), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    return batch.expand(-1, 3, -1, -1)
