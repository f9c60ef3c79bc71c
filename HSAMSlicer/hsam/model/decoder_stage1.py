"""Stage-1 decoder: SAM's mask decoder with K class tokens and H-SAM's block order (hsam-model.md §1.3).

image embedding [B,256,g,g] -> logits [B,K,4g,4g] (128x128 at S=512), IoU predictions [B,K],
``up_embed`` [B,32,4g,4g] (the skip feature for stage 2) and, on request, the class maps
``class_maps`` = mask-token outputs x updated image tokens [B,K,g*g] (input of the CMAttn branch, §1.5).

Parameter names are SAM's (``transformer.layers.N.{self_attn,cross_attn_token_to_image,...}``, ``iou_token``,
``mask_tokens``, ``output_upscaling``, ``output_hypernetworks_mlps``, ``iou_prediction_head``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from hsam.model.common import GELU, LayerNorm2d
from hsam.model.sam_compat import modeling

_sam = modeling()
Attention = _sam.transformer.Attention
MLPBlock = _sam.common.MLPBlock
MLP = _sam.mask_decoder.MLP


class ClassTokenBlock(_sam.transformer.TwoWayAttentionBlock):
    """One two-way block in H-SAM order: tokens->image cross-attention, token self-attention, MLP,
    image->tokens cross-attention, each followed by a residual and its LayerNorm (norm2, norm1, norm3, norm4).

    queries [B,T,256], keys [B,N,256] -> same shapes. In the first block the self-attention has no positional
    encoding and no residual (``skip_first_layer_pe``), as in SAM.
    """

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, prior: Optional[Tensor] = None
    ) -> tuple[Tensor, Tensor]:
        k = keys + key_pe
        queries = self.norm2(queries + self.attend_tokens_to_image(q=queries + query_pe, k=k, v=keys, prior=prior))

        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        keys = self.norm4(keys + self.attend_image_to_tokens(q=k, k=q, v=queries, prior=prior))
        return queries, keys

    def attend_tokens_to_image(self, q: Tensor, k: Tensor, v: Tensor, prior: Optional[Tensor]) -> Tensor:
        """The tokens->image cross-attention step; stage 2 overrides it to modulate by the prior."""
        return self.cross_attn_token_to_image(q=q, k=k, v=v)

    def attend_image_to_tokens(self, q: Tensor, k: Tensor, v: Tensor, prior: Optional[Tensor]) -> Tensor:
        """The image->tokens cross-attention step; stage 2 overrides it to modulate by the prior."""
        return self.cross_attn_image_to_token(q=q, k=k, v=v)


class ClassTokenTransformer(nn.Module):
    """Depth-2 two-way transformer (8 heads, MLP 2048, ReLU, cross-attention 128 wide) + final token->image attention.

    forward(image [B,256,g,g], image_pe [1,256,g,g], tokens [B,T,256]) -> (tokens [B,T,256], image [B,g*g,256]).
    """

    def __init__(self, depth: int = 2, embedding_dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            ClassTokenBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=nn.ReLU,
                attention_downsample_rate=2,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate=2)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image: Tensor, image_pe: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
        attn = self.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
        return self.norm_final_attn(queries + attn), keys


@dataclass
class Stage1Output:
    """logits [B,K,4g,4g]; iou [B,K]; up_embed [B,32,4g,4g]; class_maps [B,K,g*g] or None."""

    logits: Tensor
    iou: Tensor
    up_embed: Tensor
    class_maps: Optional[Tensor]


def upscaling(transformer_dim: int) -> nn.Sequential:
    """SAM's 4x upscaling of the image tokens: [B,C,g,g] -> [B,C/8,4g,4g] (ConvT, LN2d, GELU, ConvT, GELU)."""
    return nn.Sequential(
        nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
        LayerNorm2d(transformer_dim // 4),
        GELU(),
        nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
        GELU(),
    )


class MaskDecoderStage1(nn.Module):
    """Stage-1 decoder with ``num_outputs`` (K) class tokens; all K channels are kept (0 = background)."""

    def __init__(self, num_outputs: int, transformer_dim: int = 256) -> None:
        super().__init__()
        self.num_mask_tokens = num_outputs
        self.transformer = ClassTokenTransformer(embedding_dim=transformer_dim)
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(num_outputs, transformer_dim)
        self.output_upscaling = upscaling(transformer_dim)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(num_outputs)
        )
        self.iou_prediction_head = MLP(transformer_dim, 256, num_outputs, 3)

    def forward(
        self, image_embeddings: Tensor, image_pe: Tensor, dense_embedding: Tensor, want_class_maps: bool = False
    ) -> Stage1Output:
        """image_embeddings [B,256,g,g], image_pe and dense_embedding [1,256,g,g] -> :class:`Stage1Output`."""
        batch, channels, grid_h, grid_w = image_embeddings.shape
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(batch, -1, -1)
        src = image_embeddings + dense_embedding

        hs, keys = self.transformer(src, image_pe, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        class_maps = mask_tokens_out @ keys.transpose(1, 2) if want_class_maps else None

        up_embed = self.output_upscaling(keys.transpose(1, 2).reshape(batch, channels, grid_h, grid_w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        b, c, h, w = up_embed.shape
        logits = (hyper_in @ up_embed.view(b, c, h * w)).view(b, -1, h, w)
        return Stage1Output(logits, self.iou_prediction_head(iou_token_out), up_embed, class_maps)
