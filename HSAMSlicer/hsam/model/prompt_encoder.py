"""SAM's prompt encoder used prompt-free, with the released code's 11 point embeddings (hsam-model.md §1.2).

H-SAM never passes points, boxes or masks, so only two things are used:

* dense embedding: the learned ``no_mask_embed`` [1,256] broadcast to [1,256,g,g];
* image positional encoding: random-Fourier features on the g x g embedding grid, [1,256,g,g].

The sparse embedding would be [1,0,256] (no tokens) and is skipped. ``point_embeddings`` has 11 entries (SAM has 4)
so the official tensors load; none is used. The released model registers this module a second time as
``prompt_encoder2``; here it exists once and the official import/export maps both names onto it.
"""

from __future__ import annotations

import torch
from torch import nn

from hsam.model.sam_compat import modeling

_sam = modeling()

NUM_POINT_EMBEDDINGS = 11


class PromptFreeEncoder(_sam.PromptEncoder):
    """``segment_anything``'s ``PromptEncoder`` for an embedding grid of ``grid`` x ``grid`` cells."""

    def __init__(self, grid: int, img_size: int, embed_dim: int = 256) -> None:
        super().__init__(
            embed_dim=embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        )
        self.num_point_embeddings = NUM_POINT_EMBEDDINGS
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(NUM_POINT_EMBEDDINGS)])

    def dense_embedding(self) -> torch.Tensor:
        """[1,256,g,g]: ``no_mask_embed`` at every cell (a broadcast view, no copy)."""
        grid_h, grid_w = self.image_embedding_size
        return self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, grid_h, grid_w)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(dense embedding [1,256,g,g], image positional encoding [1,256,g,g])."""
        return self.dense_embedding(), self.get_dense_pe()
