"""The H-SAM network: image encoder -> prompt-free stage-1 decoder -> prior -> stage-2 decoder -> stage-3 fusion.

images [B,3,S,S] in [0,1] (a CT slice windowed to [0,1], copied to 3 channels; no mean/std normalisation) ->
stage 1: logits [B,K,S/4,S/4]; stage 2: logits [B,K,S,S]; predict(): their mean at S x S (hsam-model.md §1, §3).

State-dict keys equal the released model's where it has them (``image_encoder.*`` with LoRA as
``blocks.N.attn.qkv.{qkv,linear_a_q,...}``, ``prompt_encoder.*``, ``mask_decoder.*``, ``mask_decoder2.*``), so the
official files map onto it key by key (:mod:`hsam.model.official`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsam.model.config import ModelConfig
from hsam.model.decoder_stage1 import MaskDecoderStage1
from hsam.model.decoder_stage2 import MaskDecoderStage2
from hsam.model.lora import lora_modules
from hsam.model.prompt_encoder import PromptFreeEncoder


def prior_from_logits(logits: Tensor, grid: tuple[int, int]) -> Tensor:
    """Stage-1 logits [B,K,4g,4g] -> prior P [B,K,g*g]: bilinear downsample to the grid, softmax over classes (§1.4)."""
    small = F.interpolate(logits, size=grid, mode="bilinear", align_corners=False)
    return torch.softmax(small, dim=1).flatten(2)


class HSAM(nn.Module):
    """H-SAM for ``config`` around a backbone ``image_encoder`` (images [B,3,S,S] -> embedding [B,256,g,g]).

    The backbone must expose ``stride`` (input pixels per embedding cell: 16 for SAM ViTs), so g = S / stride.
    Attributes: ``config``, ``img_size`` (S), ``num_outputs`` (K), ``grid`` (g), and the parts ``image_encoder``,
    ``prompt_encoder``, ``mask_decoder`` (stage 1), ``mask_decoder2`` (stage 2) so training can freeze any of them.
    """

    def __init__(self, config: ModelConfig, image_encoder: nn.Module) -> None:
        super().__init__()
        stride = int(getattr(image_encoder, "stride"))
        if config.img_size % stride:
            raise ValueError(f"img_size {config.img_size} is not a multiple of the backbone stride {stride}")
        self.config = config
        self.img_size = config.img_size
        self.num_outputs = config.num_outputs
        self.grid = config.img_size // stride
        self.image_encoder = image_encoder
        self.prompt_encoder = PromptFreeEncoder(self.grid, self.img_size)
        self.mask_decoder = MaskDecoderStage1(self.num_outputs)
        self.mask_decoder2 = MaskDecoderStage2(
            self.num_outputs, self.grid, cmattn=config.cmattn, keep_cmattn_tensors=config.keep_cmattn_tensors,
            pixel_upscale=max(1, self.img_size // (4 * self.grid)),  # stage 2 ends at S (1 for the Lite TinyViT)
        )

    def _check_images(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images [B,3,{self.img_size},{self.img_size}] (or 1 channel), got {tuple(images.shape)}"
            )
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def forward(self, images: Tensor, embedding_noise: float = 0.0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both stages. images [B,3,S,S] (or [B,1,S,S]) in [0,1].

        ``embedding_noise``: training-only noise on the stage-2 input, N(0,1) * noise * (max - min of the batch
        embedding); the released recipe uses 0.2 in training. Stage 1 always sees the clean embedding.

        Returns (stage1, stage2), each ``{"masks": [B,K,S,S], "iou_predictions": [B,K], "low_res_logits": ...}``
        with ``low_res_logits`` [B,K,S/4,S/4] for stage 1 and [B,K,S,S] for stage 2 (for ViT backbones).
        """
        return self.decode(self.image_encoder(self._check_images(images)), embedding_noise)

    def decode(self, embedding: Tensor, embedding_noise: float = 0.0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both decoder stages on an image-encoder output [B,256,g,g]: :meth:`forward` without the encoder, so a
        frozen encoder's outputs can be computed once and reused (few-shot fine-tuning)."""
        size = (self.img_size, self.img_size)
        grid = (embedding.shape[-2], embedding.shape[-1])
        dense, image_pe = self.prompt_encoder()

        stage1 = self.mask_decoder(
            embedding, image_pe, dense, want_class_maps=self.config.cmattn == "mask_guided"
        )
        masks1 = F.interpolate(stage1.logits, size, mode="bilinear", align_corners=False)
        prior = prior_from_logits(stage1.logits, grid)

        if embedding_noise > 0:  # as released: the spread is not detached
            spread = embedding.max() - embedding.min()
            embedding = embedding + torch.randn_like(embedding) * (embedding_noise * spread)
        logits2, iou2 = self.mask_decoder2(embedding, image_pe, dense, prior, stage1.up_embed, stage1.class_maps)
        masks2 = logits2 if logits2.shape[-2:] == size else F.interpolate(
            logits2, size, mode="bilinear", align_corners=False
        )
        return (
            {"masks": masks1, "iou_predictions": stage1.iou, "low_res_logits": stage1.logits},
            {"masks": masks2, "iou_predictions": iou2, "low_res_logits": logits2},
        )

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Stage-3 fused logits [B,K,S,S] = (stage-1 masks + stage-2 masks) / 2, the released default output.

        Runs without gradients and without embedding noise; call ``model.eval()`` first (dropout).
        Argmax over dim 1 gives the label map (0 = background).
        """
        stage1, stage2 = self.forward(images)
        return (stage1["masks"] + stage2["masks"]) / 2

    def merge_lora(self) -> None:
        """Fold every LoRA adapter into its base weight (inference without LoRA overhead)."""
        for module in lora_modules(self):
            module.merge()

    def unmerge_lora(self) -> None:
        """Undo :meth:`merge_lora` exactly."""
        for module in lora_modules(self):
            module.unmerge()

    def parameter_counts(self) -> dict[str, Any]:
        """Parameter counts per part and trainable counts (hsam-model.md §1.8); works on the meta device.

        Keys: ``image_encoder``, ``lora``, ``prompt_encoder``, ``mask_decoder``, ``mask_decoder2``, ``cmattn`` (the
        dead branch, part of ``mask_decoder2``), ``total``, ``trainable``, ``total_without_cmattn``,
        ``trainable_without_cmattn``.
        """
        from hsam.model.cmattn import CMATTN_MODULE_NAMES

        def count(params: Any) -> int:
            return sum(p.numel() for p in params)

        lora = count(p for m in lora_modules(self) for p in m.lora_parameters())
        cmattn = sum(
            count(getattr(self.mask_decoder2, name).parameters())
            for name in CMATTN_MODULE_NAMES
            if hasattr(self.mask_decoder2, name)
        )
        total = count(self.parameters())
        trainable = count(p for p in self.parameters() if p.requires_grad)
        return {
            "image_encoder": count(self.image_encoder.parameters()),
            "lora": lora,
            "prompt_encoder": count(self.prompt_encoder.parameters()),
            "mask_decoder": count(self.mask_decoder.parameters()),
            "mask_decoder2": count(self.mask_decoder2.parameters()),
            "cmattn": cmattn,
            "total": total,
            "trainable": trainable,
            "total_without_cmattn": total - cmattn,
            "trainable_without_cmattn": trainable - cmattn,
        }
