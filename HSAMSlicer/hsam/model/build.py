"""Build an H-SAM network from a :class:`~hsam.model.config.ModelConfig`: the built-in backbones (SAM's ViTs and the
Lite TinyViT, with LiteMedSAM's frozen encoder as base weights) go into :mod:`hsam.model.registry`, which also takes
more, e.g.::

    register_backbone("my_backbone", lambda config: MyEncoder())
"""

from __future__ import annotations

import torch
from torch import nn

from hsam.model.config import ModelConfig
from hsam.model.registry import (
    BackboneFactory,
    BaseWeights,
    backbone_factories,
    register_backbone,
    register_base_weights,
)


def available_backbones() -> list[str]:
    """Registered backbone names (the built-in ones included)."""
    register_builtin()
    return sorted(backbone_factories())


def _sam_vit_factory(name: str) -> BackboneFactory:
    def factory(config: ModelConfig) -> nn.Module:
        from hsam.model.image_encoder import build_sam_vit

        return build_sam_vit(name, config.img_size, config.lora_rank)

    return factory


def register_builtin() -> None:
    """Register SAM's ViTs, the Lite TinyViT and LiteMedSAM's encoder (base weights ``"litemedsam"``: models saved
    with it leave out their frozen encoder); names already registered are kept."""
    from hsam.model import tiny_vit

    registered = backbone_factories()
    for name in ("vit_b", "vit_l", "vit_h", "vit_tiny"):
        if name not in registered:
            register_backbone(name, _sam_vit_factory(name))
    if "tiny_vit" not in registered:
        register_backbone("tiny_vit", tiny_vit.build_lite_backbone)
        register_base_weights("litemedsam", BaseWeights("image_encoder.", tiny_vit.litemedsam_encoder_state))


def build_backbone(config: ModelConfig) -> nn.Module:
    """The image encoder for ``config.backbone`` (see :mod:`hsam.model.registry` for the contract)."""
    register_builtin()
    factories = backbone_factories()
    try:
        factory = factories[config.backbone]
    except KeyError:
        raise ValueError(f"unknown backbone {config.backbone!r}; registered: {', '.join(sorted(factories))}") from None
    return factory(config)


def build_hsam(config: ModelConfig, device: torch.device | str | None = None) -> "HSAM":  # noqa: F821
    """A freshly initialised :class:`~hsam.model.hsam.HSAM` (train mode, LoRA unmerged).

    ``device="meta"`` builds shapes only (no memory, no init cost), e.g. for parameter counts or to
    ``load_state_dict(..., assign=True)`` afterwards.
    """
    from hsam.model.hsam import HSAM

    if device is None:
        return HSAM(config, build_backbone(config))
    with torch.device(device):
        return HSAM(config, build_backbone(config))
