"""Layers shared by the encoders and decoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of [B,C,H,W] (SAM's ``LayerNorm2d``: same parameters, same eps 1e-6).

    SAM writes it as a chain of elementwise ops (mean, subtract, square, mean, divide, scale, shift), each a full pass
    over the activation in the forward and again in the backward. The fused kernel on the channels-last view computes
    the same function in one pass: on the Lite decoders' [B,32,256,256] maps a batch-8 training step takes 2.6 s
    instead of 3.3-3.8 s (benchmarks/finetune/bench_decoder_step.py, RESULTS.md there).
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return normed.permute(0, 3, 1, 2)


def _same_layout(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` with the memory layout of ``like`` (contiguous or channels-last) where it differs."""
    if grad.stride() == like.stride():
        return grad
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        return grad.contiguous(memory_format=torch.channels_last)
    return grad.contiguous() if like.is_contiguous() else grad


class _GELUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return F.gelu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(_same_layout(grad, x), x)


class GELU(nn.GELU):
    """``nn.GELU`` (exact, erf form) whose backward gets its gradient in the layout of its input.

    In the decoders' upscaling the activations are channels-last, while the gradient reaching a GELU is often laid out
    otherwise (contiguous from the hypernetwork product, a channel slice of the skip connection's concatenation).
    ``gelu_backward`` on mixed layouts takes a strided path several times slower than its vectorized one (and rounds
    bf16 differently in the last bit); one copy of the gradient costs less. A batch-8 Lite training step: 1.82 s
    instead of 2.11 s (``benchmarks/finetune/bench_decoder_step.py --compare gelu``). Without autograd (inference,
    export) it is ``F.gelu``.
    """

    def __init__(self) -> None:
        super().__init__()  # the exact form only: the backward calls the erf kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing():
            return _GELUFunction.apply(x)
        return F.gelu(x)
