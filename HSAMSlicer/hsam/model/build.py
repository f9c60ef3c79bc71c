"""Build an H-SAM network from a :class:`~hsam.model.config.ModelConfig`, with a registry of backbones.

A backbone factory takes the config and returns an ``nn.Module`` mapping images [B,3,S,S] in [0,1] to an embedding
[B,256,S/stride,S/stride] and exposing ``stride`` (int). It sets ``requires_grad`` of its own parameters (the SAM ViTs
freeze their base weights and train LoRA). Register more with :func:`register_backbone`, e.g. the Lite TinyViT::

    register_backbone("tiny_vit", lambda config: TinyViT())
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hsam.model.config import ModelConfig

BackboneFactory = Callable[[ModelConfig], nn.Module]
_BACKBONES: dict[str, BackboneFactory] = {}


def register_backbone(name: str, factory: BackboneFactory, *, replace: bool = False) -> None:
    """Make ``ModelConfig(backbone=name)`` buildable. Re-registering a name needs ``replace=True``."""
    if name in _BACKBONES and not replace:
        raise ValueError(f"backbone {name!r} is already registered")
    _BACKBONES[name] = factory


def available_backbones() -> list[str]:
    """Registered backbone names."""
    _register_builtin()
    return sorted(_BACKBONES)


def _sam_vit_factory(name: str) -> BackboneFactory:
    def factory(config: ModelConfig) -> nn.Module:
        from hsam.model.image_encoder import build_sam_vit

        return build_sam_vit(name, config.img_size, config.lora_rank)

    return factory


def _register_builtin() -> None:
    for name in ("vit_b", "vit_l", "vit_h", "vit_tiny"):
        if name not in _BACKBONES:
            _BACKBONES[name] = _sam_vit_factory(name)
    if "tiny_vit" not in _BACKBONES:
        try:  # the Lite backbone module registers itself when it provides ``register()``
            from hsam.model import tiny_vit

            register = getattr(tiny_vit, "register", None)
            if register is not None:
                register()
        except ImportError:
            pass


def build_backbone(config: ModelConfig) -> nn.Module:
    """The image encoder for ``config.backbone`` (see the module docstring for the contract)."""
    _register_builtin()
    try:
        factory = _BACKBONES[config.backbone]
    except KeyError:
        raise ValueError(f"unknown backbone {config.backbone!r}; registered: {', '.join(sorted(_BACKBONES))}") from None
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
