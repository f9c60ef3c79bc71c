"""Stage-2 decoder: mask-modulated two-way transformer + hierarchical pixel decoder (hsam-model.md §1.5-1.7).

Inputs: image embedding [B,256,g,g] (plus training noise), the prior P [B,K,g*g] (softmaxed, downsampled stage-1
logits, §1.4), stage-1 ``up_embed`` [B,32,4g,4g]. Output: logits [B,K,16g,16g] (512x512 at S=512) and IoU [B,K].

* src = 2 * (embedding + dense embedding) in ``"constant"`` CMAttn mode (the released computation), or
  src + src * gain with a real mask-guided gain (:mod:`hsam.model.cmattn`).
* Tokens: K new mask tokens only (no IoU token); the IoU head reads the output of mask token 0.
* Both cross-attentions of the two blocks are full width (256) and multiply the softmaxed attention by P
  (tokens->image) or P^T (image->tokens), with no renormalisation; P is not detached, so gradients reach stage 1.
  Dropout 0.2 on the tokens->image output. The final tokens->image attention is plain and 128 wide.
* Pixel decoder: ConvT 256->64, LN2d, GELU, ConvT 64->32, GELU -> concat stage-1 ``up_embed`` -> ConvT 64->32, LN2d,
  GELU, ConvT 32->16, LN2d, GELU -> [B,16,16g,16g]; K hyper-MLPs (5 layers, 256->16) on the K tokens; dot product.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hsam.model.cmattn import add_cmattn_modules, mask_guided_gain
from hsam.model.common import GELU, LayerNorm2d
from hsam.model.decoder_stage1 import ClassTokenBlock, upscaling
from hsam.model.sam_compat import modeling

_sam = modeling()
Attention = _sam.transformer.Attention
MLP = _sam.mask_decoder.MLP

# Sizes of the three LayerNorms each modulated attention carries in the released model. They are never applied and
# their sizes are fixed constants there (196 = 14*14, 9, 1024 = 32*32) whatever the input size; kept for round-trips.
UNUSED_NORM_SIZES: tuple[int, int, int] = (196, 9, 1024)


class MaskModulatedAttention(Attention):
    """Full-width multi-head attention whose softmaxed map is multiplied by a class prior (§1.6).

    forward(q [B,Tq,256], k [B,Tk,256], v [B,Tk,256], modulation [B,Tq,Tk]) -> [B,Tq,256].
    """

    def __init__(self, embedding_dim: int, num_heads: int) -> None:
        super().__init__(embedding_dim, num_heads, downsample_rate=1)
        self.norm1 = nn.LayerNorm(UNUSED_NORM_SIZES[0])
        self.norm2 = nn.LayerNorm(UNUSED_NORM_SIZES[1])
        self.norm3 = nn.LayerNorm(UNUSED_NORM_SIZES[2])

    def forward(self, q: Tensor, k: Tensor, v: Tensor, modulation: Tensor) -> Tensor:  # type: ignore[override]
        q = self._separate_heads(self.q_proj(q), self.num_heads)
        k = self._separate_heads(self.k_proj(k), self.num_heads)
        v = self._separate_heads(self.v_proj(v), self.num_heads)
        attn = q @ k.permute(0, 1, 3, 2)
        attn = attn / math.sqrt(q.shape[-1])
        # Released-code quirk, kept for identical outputs: a row whose scaled logits sum exactly to its length is
        # zeroed before the softmax (it practically never fires on real data).
        attn = attn.masked_fill(attn.sum(-1, keepdim=True) == attn.shape[-1], 0.0)
        attn = torch.softmax(attn, dim=-1) * modulation.unsqueeze(1)
        return self.out_proj(self._recombine_heads(attn @ v))


class MaskModulatedBlock(ClassTokenBlock):
    """Stage-1's two-way block (same H-SAM order) with both cross-attentions full width and modulated by the prior P,
    and dropout 0.2 on the tokens->image output.

    forward(queries [B,K,256], keys [B,N,256], query_pe, key_pe, prior [B,K,N]) -> (queries, keys).
    """

    def __init__(self, embedding_dim: int, num_heads: int, mlp_dim: int, skip_first_layer_pe: bool) -> None:
        super().__init__(
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            activation=nn.ReLU,
            attention_downsample_rate=2,
            skip_first_layer_pe=skip_first_layer_pe,
        )
        self.cross_attn_token_to_image = MaskModulatedAttention(embedding_dim, num_heads)
        self.cross_attn_image_to_token = MaskModulatedAttention(embedding_dim, num_heads)
        self.dropout = nn.Dropout(0.2)

    def attend_tokens_to_image(self, q: Tensor, k: Tensor, v: Tensor, prior: Tensor) -> Tensor:  # type: ignore[override]
        return self.dropout(self.cross_attn_token_to_image(q=q, k=k, v=v, modulation=prior))

    def attend_image_to_tokens(self, q: Tensor, k: Tensor, v: Tensor, prior: Tensor) -> Tensor:  # type: ignore[override]
        return self.cross_attn_image_to_token(q=q, k=k, v=v, modulation=prior.transpose(1, 2))


class MaskModulatedTransformer(nn.Module):
    """Depth-2 stack of :class:`MaskModulatedBlock` + a plain final tokens->image attention (128 wide) and LayerNorm.

    forward(image [B,256,g,g], image_pe [1,256,g,g], tokens [B,K,256], prior [B,K,g*g])
    -> (tokens [B,K,256], image [B,g*g,256]).
    """

    def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            MaskModulatedBlock(embedding_dim, num_heads, mlp_dim, skip_first_layer_pe=(i == 0)) for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor, prior: Tensor) -> tuple[Tensor, Tensor]:
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe, prior=prior)
        attn = self.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        return self.norm_final_attn(queries + attn), keys


def _pixel_layer(cin: int, cout: int, upscale: bool) -> nn.Module:
    """One pixel-decoder layer: ConvT 2x2 stride 2 (released), or, where the output is already at S, its stride-1
    analogue: a 1x1 conv (a 2x2/2 ConvT is also a per-pixel linear map, followed by a pixel shuffle)."""
    if upscale:
        return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
    return nn.Conv2d(cin, cout, kernel_size=1)


class MaskDecoderStage2(nn.Module):
    """Stage-2 decoder for K = ``num_outputs`` classes on a ``grid`` x ``grid`` embedding.

    ``pixel_upscale``: factor of the skip-connected pixel decoder after the 4g stage-1 resolution, so that stage 2
    ends at S = 4g * pixel_upscale: 4 for SAM ViTs (g = S/16, released), 1 for the H-SAM-Lite TinyViT (g = S/4),
    where its two ConvT 2x2 become 1x1 convs at S (a 1024x1024 decoder for a 256 input would cost ~40x more).

    ``cmattn``: ``"constant"`` (src doubled, the released computation) or ``"mask_guided"``;
    ``keep_cmattn_tensors`` registers the CMAttn parameters (width grid*grid) under their released names.
    """

    def __init__(
        self,
        num_outputs: int,
        grid: int,
        cmattn: str = "constant",
        keep_cmattn_tensors: bool = True,
        transformer_dim: int = 256,
        pixel_upscale: int = 4,
    ) -> None:
        super().__init__()
        if pixel_upscale not in (1, 2, 4):
            raise ValueError(f"pixel_upscale must be 1, 2 or 4, got {pixel_upscale}")
        self.num_mask_tokens = num_outputs
        self.grid = grid
        self.cmattn = cmattn
        self.transformer2 = MaskModulatedTransformer(embedding_dim=transformer_dim)
        self.mask_tokens = nn.Embedding(num_outputs, transformer_dim)
        self.output_upscaling = upscaling(transformer_dim)
        self.skip_connect = nn.Sequential(
            _pixel_layer(transformer_dim // 4, transformer_dim // 8, pixel_upscale >= 2),
            LayerNorm2d(transformer_dim // 8),
            GELU(),
            _pixel_layer(transformer_dim // 8, transformer_dim // 16, pixel_upscale >= 4),
            LayerNorm2d(transformer_dim // 16),
            GELU(),
        )
        self.output_hypernetworks_mlps2 = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 16, 5) for _ in range(num_outputs)
        )
        self.iou_prediction_head = MLP(transformer_dim, 256, num_outputs, 3)
        if keep_cmattn_tensors:
            add_cmattn_modules(self, grid * grid, num_outputs)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        dense_embedding: Tensor,
        prior: Tensor,
        up_embed: Tensor,
        class_maps: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """-> (logits [B,K,4g*pixel_upscale,...], iou [B,K]). ``class_maps`` [B,K,g*g] is needed in ``"mask_guided"`` mode."""
        batch, channels, grid_h, grid_w = image_embeddings.shape
        src = image_embeddings + dense_embedding
        if self.cmattn == "mask_guided":
            if class_maps is None:
                raise ValueError("cmattn='mask_guided' needs the stage-1 class maps")
            src = src + src * mask_guided_gain(self, class_maps, prior, (grid_h, grid_w))
        else:
            src = src + src  # released: src + src * 1.0, exactly 2 * src

        tokens = self.mask_tokens.weight.unsqueeze(0).expand(batch, -1, -1)
        hs, keys = self.transformer2(src, image_pe, tokens, prior)
        iou = self.iou_prediction_head(hs[:, 0, :])

        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(batch, channels, grid_h, grid_w))
        upscaled = self.skip_connect(torch.cat((upscaled, up_embed), dim=1))
        hyper_in = torch.stack(
            [mlp(hs[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps2)], dim=1
        )
        b, c, h, w = upscaled.shape
        logits = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return logits, iou
