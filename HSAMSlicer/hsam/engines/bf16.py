"""bfloat16 engine for CPUs with native bf16 arithmetic (AVX512_BF16, AMX): the image encoder in bf16, decoders fp32.

The encoder holds ~95 % of the FLOPs (ViT-B/512: 227 GFLOP per slice). On a CPU with AVX512_BF16 or AMX, oneDNN
runs its bf16 matrix products several times faster than fp32; without those instructions bf16 is emulated and slower
than fp32, which is why :mod:`hsam.engines.cpu` only offers this engine where the instructions exist.

The weights are cast once into a private copy (the caller's model is untouched; +2 bytes per encoder parameter).
The decoders stay fp32: they are a small share of the time for ViT-B, and the fused logits they produce decide the
labels, so keeping them exact keeps label agreement with eager fp32 high (benchmarks/RESULTS.md, section "Speed").
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from hsam.engines.vit import with_encoder


class BF16Encoder(nn.Module):
    """``encoder`` with bfloat16 weights: images [B,3,S,S] (any float dtype) -> fp32 embedding [B,256,g,g]."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder).to(torch.bfloat16).eval()

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images.to(torch.bfloat16)).float()


def bf16_model(model: nn.Module) -> nn.Module:
    """A shallow copy of an HSAM (ideally with the exact fast encoder already swapped in) whose encoder runs in bf16."""
    return with_encoder(model, BF16Encoder(model.image_encoder))
