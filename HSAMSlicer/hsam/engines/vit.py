"""Inference-only SAM ViT blocks that do less work for the same outputs (up to float rounding).

Two exact rewrites of ``segment_anything``'s ``Block``/``Attention`` (images -> embedding unchanged):

* **No work on window padding.** At 512 the 32x32 token grid is padded to 42x42 for the 14x14 windows. SAM pads the
  *normalised* tokens with zeros, so a padded token's q/k/v is exactly the qkv bias and its attention output is cropped
  away. :class:`FastBlock` runs ``qkv`` and ``proj`` on the 1024 real tokens only and fills the padding with the bias
  (12 % of the encoder's FLOPs at 512).
* **Fused attention.** SAM materialises the N x N logits, adds the decomposed relative-position terms in another
  pass, softmaxes in a third and multiplies by v (memory-bound passes over 12 x 1024 x 1024 floats per global block).
  Here the relative-position terms become the additive mask of one ``scaled_dot_product_attention`` call, whose
  blocked (flash) CPU kernel does logits, softmax and the weighted sum in cache: 1.6x (global) to 1.9x (windowed)
  faster attention on one core, same result to 2e-6.

:class:`FastEncoder` wraps the blocks of a (LoRA-merged) encoder, which is left untouched; parameters are shared, not
copied.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsam.model.lora import LoRAQKV


def _rel_table(size: int, rel_pos: Tensor) -> Tensor:
    """[size, size, D]: SAM's ``get_rel_pos`` for equal query/key sizes (table resized when its length differs)."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T[None], size=length, mode="linear")[0].T
    coords = torch.arange(size)[:, None] - torch.arange(size)[None, :] + (size - 1)
    return rel_pos[coords]


class FastBlock(nn.Module):
    """Same computation as a SAM ``Block`` on x [B,H,W,C] -> [B,H,W,C], with the two rewrites above.

    Shares ``norm1/norm2/mlp`` and the attention's ``qkv``/``proj``/relative tables with ``block`` (a merged LoRA
    adapter is bypassed for its base ``nn.Linear``; merge first for speed). ``fused=False`` keeps SAM's unfused attention
    (the padding saving only), for comparison.
    """

    def __init__(self, block: nn.Module, grid: tuple[int, int], fused: bool = True) -> None:
        super().__init__()
        attn = block.attn
        qkv = attn.qkv
        if isinstance(qkv, LoRAQKV) and qkv.merged:
            qkv = qkv.qkv  # merged adapters live in the base weight; unmerged ones run as usual (LoRA of 0 is 0)
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        self.qkv: nn.Module = qkv
        self.proj: nn.Module = attn.proj
        self.heads = attn.num_heads
        self.scale = attn.scale
        self.window = block.window_size
        self.fused = fused
        self.use_rel_pos = attn.use_rel_pos
        side_h, side_w = (self.window, self.window) if self.window else grid
        self.side = (side_h, side_w)
        if self.use_rel_pos:
            with torch.no_grad():
                self.register_buffer("rh", _rel_table(side_h, attn.rel_pos_h.detach()).clone(), persistent=False)
                self.register_buffer("rw", _rel_table(side_w, attn.rel_pos_w.detach()).clone(), persistent=False)

    def _qkv_bias(self, channels: int, like: Tensor) -> Tensor:
        layer = self.qkv.qkv if isinstance(self.qkv, LoRAQKV) else self.qkv
        bias = getattr(layer, "bias", None)
        if callable(bias) and not isinstance(bias, Tensor):  # a quantized Linear keeps its bias behind a method
            bias = bias()
        if bias is None:
            return torch.zeros(channels, dtype=like.dtype, device=like.device)
        return bias.to(like.dtype)

    def _attention(self, qkv: Tensor) -> Tensor:
        """qkv [Bw,h,w,3C] of whole windows (or the whole grid) -> attention output [Bw,h,w,C] before ``proj``."""
        batch, side_h, side_w, three_c = qkv.shape
        channels = three_c // 3
        tokens = side_h * side_w
        head_dim = channels // self.heads
        q, k, v = qkv.reshape(batch, tokens, 3, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.fused:
            q2 = q.reshape(batch * self.heads, tokens, head_dim)
            k2 = k.reshape(batch * self.heads, tokens, head_dim)
            v2 = v.reshape(batch * self.heads, tokens, head_dim)
            attn = (q2 * self.scale) @ k2.transpose(-2, -1)
            if self.use_rel_pos:
                grid_q = q2.reshape(-1, side_h, side_w, head_dim)
                rel_h = torch.einsum("bhwc,hkc->bhwk", grid_q, self.rh)
                rel_w = torch.einsum("bhwc,wkc->bhwk", grid_q, self.rw)
                attn = (attn.view(-1, side_h, side_w, side_h, side_w) + rel_h[..., None] + rel_w[..., None, :]).view(
                    -1, tokens, tokens
                )
            out = attn.softmax(dim=-1) @ v2
            out = out.view(batch, self.heads, side_h, side_w, head_dim)
        else:
            bias = None
            if self.use_rel_pos:
                grid_q = q.reshape(batch, self.heads, side_h, side_w, head_dim)
                rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, self.rh)
                rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, self.rw)
                bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(batch, self.heads, tokens, tokens)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
            out = out.view(batch, self.heads, side_h, side_w, head_dim)
        return out.permute(0, 2, 3, 1, 4).reshape(batch, side_h, side_w, channels)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        batch, height, width, channels = x.shape
        qkv = self.qkv(self.norm1(x))  # real tokens only
        if self.window:
            ws = self.window
            pad_h, pad_w = (-height) % ws, (-width) % ws
            if pad_h or pad_w:
                # zero (normalised) padding tokens project to exactly the qkv bias
                full = self._qkv_bias(3 * channels, qkv).expand(batch, height + pad_h, width + pad_w, 3 * channels)
                full = full.contiguous()
                full[:, :height, :width] = qkv
                qkv = full
            hp, wp = height + pad_h, width + pad_w
            windows = (
                qkv.view(batch, hp // ws, ws, wp // ws, ws, 3 * channels)
                .permute(0, 1, 3, 2, 4, 5)
                .reshape(-1, ws, ws, 3 * channels)
            )
            out = self._attention(windows)
            out = out.view(batch, hp // ws, wp // ws, ws, ws, channels).permute(0, 1, 3, 2, 4, 5)
            # contiguous before proj: a cropped view makes linear fall back to a batched matmul over a copied weight
            out = out.reshape(batch, hp, wp, channels)[:, :height, :width].contiguous()
        else:
            out = self._attention(qkv)
        x = shortcut + self.proj(out)
        return x + self.mlp(self.norm2(x))


class FastEncoder(nn.Module):
    """A SAM ViT encoder (images [B,3,S,S] -> [B,256,S/16,S/16]) running :class:`FastBlock`s.

    Shares every parameter with ``encoder`` (which is left untouched), so it costs no weight memory.
    """

    def __init__(self, encoder: nn.Module, fused: bool = True) -> None:
        super().__init__()
        if not is_sam_vit(encoder):
            raise ValueError("FastEncoder needs a SAM ViT encoder (patch_embed, blocks with relative positions, neck)")
        side = int(encoder.img_size) // int(encoder.patch_embed.proj.kernel_size[0])
        self.img_size = encoder.img_size
        self.stride = getattr(encoder, "stride", 16)
        self.patch_embed = encoder.patch_embed
        self.pos_embed = encoder.pos_embed
        self.blocks = nn.ModuleList(FastBlock(block, (side, side), fused=fused) for block in encoder.blocks)
        self.neck = encoder.neck

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def is_sam_vit(encoder: nn.Module) -> bool:
    """True for ``segment_anything``'s ``ImageEncoderViT`` layout (the H-SAM ViT backbones)."""
    blocks = getattr(encoder, "blocks", None)
    return (
        blocks is not None
        and hasattr(encoder, "patch_embed")
        and hasattr(encoder, "neck")
        and all(hasattr(b, "attn") and hasattr(b, "window_size") for b in blocks)
    )


def with_encoder(model: nn.Module, encoder: nn.Module) -> nn.Module:
    """A shallow copy of an :class:`~hsam.model.hsam.HSAM` whose ``image_encoder`` is ``encoder``.

    Decoders and all other parameters are shared with ``model``; ``model`` itself is not modified.
    """
    clone = copy.copy(model)
    clone._modules = dict(model._modules)  # own module table: swapping the encoder must not touch ``model``
    clone._modules["image_encoder"] = encoder
    return clone
