"""The two registries of :mod:`hsam.model`: backbones by name and frozen base weights by name.

Both the builder (:mod:`hsam.model.build`, which registers the built-in backbones) and the checkpoint format
(:mod:`hsam.model.checkpoint`, which looks base weights up) import this module; it imports no backbone itself, so the
imports run one way: backbone modules <- build -> registry <- checkpoint.

A backbone factory takes the config and returns an ``nn.Module`` mapping images [B,3,S,S] in [0,1] to an embedding
[B,256,S/stride,S/stride] and exposing ``stride`` (int). It sets ``requires_grad`` of its own parameters (the SAM ViTs
freeze their base weights and train LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from hsam.model.config import ModelConfig

BackboneFactory = Callable[[ModelConfig], nn.Module]
_BACKBONES: dict[str, BackboneFactory] = {}


@dataclass(frozen=True)
class BaseWeights:
    """Frozen tensors a model file may leave out: every state-dict key under ``prefix`` comes from ``load()``.

    ``load()`` returns those tensors with the prefix removed, verified against a pinned SHA-256; it raises
    ``FileNotFoundError`` (saying how to install the source) or ``ValueError`` (a file that fails its check).
    """

    prefix: str
    load: Callable[[], Mapping[str, torch.Tensor]]


_BASE_WEIGHTS: dict[str, BaseWeights] = {}


def register_backbone(name: str, factory: BackboneFactory, *, replace: bool = False) -> None:
    """Make ``ModelConfig(backbone=name)`` buildable. Re-registering a name needs ``replace=True``."""
    if name in _BACKBONES and not replace:
        raise ValueError(f"backbone {name!r} is already registered")
    _BACKBONES[name] = factory


def backbone_factories() -> dict[str, BackboneFactory]:
    """The registered backbones by name (a copy: register with :func:`register_backbone`)."""
    return dict(_BACKBONES)


def register_base_weights(name: str, base: BaseWeights) -> None:
    """Make ``save_model(..., base_weights=name)`` and cards with ``"base_weights": name`` usable."""
    _BASE_WEIGHTS[name] = base


def registered_base_weights(name: str) -> BaseWeights | None:
    """The base weights registered as ``name``, or None."""
    return _BASE_WEIGHTS.get(name)
