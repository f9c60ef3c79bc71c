"""The stage-2 "class-balanced mask-guided self-attention" (CMAttn) branch (hsam-model.md §1.5).

Its parameters live directly on the stage-2 decoder (``mask_decoder2.{med_sel,self_attn,norm1,self_attn2,norm2,mlp}``,
the released key names), registered by :func:`add_cmattn_modules`. Width W = g*g (1024 at S=512): the K class maps
of stage 1 act as K tokens of width W.

Three computations exist:

* ``"constant"`` (default): what the released code computes. Its last step is a softmax over a size-1 channel, so
  the gain map is identically 1 and ``src + src * gain`` is exactly ``2 * src``; the model computes ``src + src``
  and never touches these tensors. :func:`released_gain` runs the released computation (tests use it to show that).
* ``"mask_guided"``: our reading of the paper's intent, for training experiments (:func:`mask_guided_gain`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsam.model.sam_compat import modeling

_sam = modeling()

CMATTN_MODULE_NAMES: tuple[str, ...] = ("med_sel", "self_attn", "norm1", "self_attn2", "norm2", "mlp")
MLP_DIM = 2048


def cmattn_heads(width: int) -> int:
    """8 heads as released (width 1024 or 196); fewer when 8 does not divide g*g (heads do not change shapes)."""
    return math.gcd(width, 8)


def add_cmattn_modules(decoder: nn.Module, width: int, num_outputs: int) -> None:
    """Register the CMAttn layers on ``decoder`` in the released order (so state-dict key order matches)."""
    heads = cmattn_heads(width)
    decoder.med_sel = nn.Sequential(nn.Linear(num_outputs, 1), nn.ReLU())
    decoder.self_attn = _sam.transformer.Attention(width, heads)
    decoder.norm1 = nn.LayerNorm(width)
    decoder.self_attn2 = _sam.transformer.Attention(width, heads)
    decoder.norm2 = nn.LayerNorm(width)
    decoder.mlp = _sam.common.MLPBlock(width, MLP_DIM, nn.ReLU)


def released_gain(decoder: nn.Module, class_maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """The released computation: class maps [B,K,W] -> gain [B,1,g,g] (identically 1; kept to demonstrate it).

    MHSA -> LN -> MHSA -> x + MLP(x) -> LN -> Linear(K->1) + ReLU -> softmax over the single channel.
    """
    x = decoder.self_attn(q=class_maps, k=class_maps, v=class_maps)
    x = decoder.norm1(x)
    x = decoder.self_attn2(q=x, k=x, v=x)
    x = x + decoder.mlp(x)
    x = decoder.norm2(x)
    x = decoder.med_sel(x.transpose(-2, -1))  # [B,W,1]
    x = x.transpose(-1, -2).reshape(x.shape[0], 1, *grid)
    return torch.softmax(x, dim=1)


def mask_guided_gain(decoder: nn.Module, class_maps: Tensor, prior: Tensor, grid: tuple[int, int]) -> Tensor:
    """A real mask-guided, class-balanced self-attention: class maps [B,K,W], prior P [B,K,W] -> gain [B,1,g,g].

    * class balance: each class token is weighted by the inverse of its soft area in the prior (normalised to mean 1
      over classes), so small organs count as much as the liver;
    * self-attention among the K class tokens (with residuals, unlike the released code), MLP, LayerNorms;
    * mask guidance: every token is gated by where the prior places its class before ``med_sel`` (Linear K->1, ReLU)
      mixes the classes into one spatial score;
    * the score becomes a gain with mean 1 over the grid (W * softmax over positions), so ``src + src * gain``
      equals the released ``2 * src`` on average and re-weights positions around it.
    In training the class maps get dropout 0.1, as in the released (disabled) class-balance code.
    """
    x = F.dropout(class_maps, p=0.1, training=decoder.training)
    area = prior.sum(dim=-1, keepdim=True)  # [B,K,1] soft pixel count per class
    balance = 1.0 / (area + 1.0)
    balance = balance * (balance.shape[1] / balance.sum(dim=1, keepdim=True))
    x = x * balance
    x = decoder.norm1(x + decoder.self_attn(q=x, k=x, v=x))
    x = x + decoder.self_attn2(q=x, k=x, v=x)
    x = decoder.norm2(x + decoder.mlp(x))
    score = decoder.med_sel((x * prior).transpose(-2, -1))  # [B,W,1]
    width = score.shape[1]
    gain = torch.softmax(score.squeeze(-1), dim=-1) * width
    return gain.reshape(score.shape[0], 1, *grid)
