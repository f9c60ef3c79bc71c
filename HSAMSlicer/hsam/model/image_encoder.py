"""SAM's ViT image encoder (segment-anything modules) at any input size, with LoRA on q and v.

images [B,3,S,S] in [0,1] -> embedding [B,256,S/16,S/16]. For ViT-B at S=512: patch embedding [B,32,32,768],
12 pre-LN blocks (window 14, global blocks 2,5,8,11), neck 768->256 (hsam-model.md §1.1).

SAM was trained at 1024; at another size the absolute ``pos_embed`` [1,64,64,C] and the global blocks'
``rel_pos_h/w`` [127,head_dim] are resized when SAM weights are loaded (:func:`resize_pos_embed`,
:func:`resize_rel_pos`); the windowed blocks' tables ([27,head_dim]) do not depend on S.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from hsam.model.lora import apply_lora
from hsam.model.sam_compat import modeling

_sam = modeling()

SAM_PRETRAIN_SIZE = 1024
PATCH_SIZE = 16
EMBED_CHANNELS = 256


@dataclass(frozen=True)
class ViTSpec:
    """Width, depth, heads and attention layout of one SAM ViT size."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14


VIT_SPECS: dict[str, ViTSpec] = {
    "vit_b": ViTSpec(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ViTSpec(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ViTSpec(1280, 32, 16, (7, 15, 23, 31)),
    # Test-only: 2 blocks (one windowed, one global), same code paths as the real sizes.
    "vit_tiny": ViTSpec(32, 2, 2, (1,), window_size=4),
}


class SamViTEncoder(_sam.ImageEncoderViT):
    """``segment_anything``'s ``ImageEncoderViT`` with the layout of ``spec`` at ``img_size``.

    forward: images [B,3,S,S] -> [B,256,S/16,S/16]. ``stride`` = 16 (input pixels per embedding cell).
    """

    stride: int = PATCH_SIZE

    def __init__(self, spec: ViTSpec, img_size: int) -> None:
        if img_size % PATCH_SIZE:
            raise ValueError(f"img_size must be a multiple of {PATCH_SIZE}, got {img_size}")
        super().__init__(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=img_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
            out_chans=EMBED_CHANNELS,
        )
        self.spec = spec


def build_sam_vit(name: str, img_size: int, lora_rank: int) -> SamViTEncoder:
    """SAM ViT ``name`` at ``img_size`` with LoRA of rank ``lora_rank`` (0: none); base weights frozen if LoRA."""
    encoder = SamViTEncoder(VIT_SPECS[name], img_size)
    if lora_rank > 0:
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)
        apply_lora(encoder, lora_rank)  # new adapter parameters are trainable
    return encoder


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1,G,G,C] -> [1,grid,grid,C] by bilinear resize (align_corners=False), as the released loader does."""
    if pos_embed.shape[1] == grid and pos_embed.shape[2] == grid:
        return pos_embed
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2), (grid, grid), mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """[L,D] -> [length,D]: bilinear resize of the [1,1,L,D] image to (length, D), i.e. linear along L."""
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(rel_pos[None, None], (length, rel_pos.shape[1]), mode="bilinear", align_corners=False)
    return resized[0, 0]
