"""Speed modes: how :func:`hsam.inference.segment_volume` runs the network on a device.

==========  ======  ======================================================================================
mode        where   what
==========  ======  ======================================================================================
eager       any     ``model.predict`` as built (fp32, or fp16/bf16 autocast on GPUs): the reference
fast        any     exact rewrites of the SAM ViT (:mod:`hsam.speed.vit`): no work on window padding, fused
                    attention with relative positions; same labels as eager
int8        CPU     ``fast`` + dynamic int8 ``nn.Linear`` in the encoder blocks (PyTorch, fbgemm)
ort         CPU     the whole network through ONNX Runtime fp32 (onnxruntime + onnx; the CPU default)
ort-int8    CPU     ONNX Runtime with int8 per-channel weights in the encoder blocks' linear layers
compile     GPU     ``fast`` under ``torch.compile`` (pays a compile on first use)
==========  ======  ======================================================================================

``auto`` picks :data:`DEFAULT_MODES` for the device (the fastest mode that met the agreement bar in
benchmarks/RESULTS.md: >= 99.5 % voxels identical to eager fp32 and per-organ Dice >= 0.99; on the 2-core CPU that is
``ort``, about 1.35-1.45x eager per slice on a quiet machine with identical labels, while both int8 modes missed the
Dice bar), falling back along :data:`FALLBACKS` when onnxruntime/onnx are missing. Models whose encoder is not a SAM ViT (H-SAM-Lite) run
eager in ``fast``/``compile`` (nothing to rewrite) and support the ONNX modes too.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch
from torch import Tensor, nn

from hsam.errors import HSAMError

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("auto", "eager", "fast", "int8", "ort", "ort-int8", "compile")
CPU_ONLY = ("int8", "ort", "ort-int8")
# Measured defaults (benchmarks/RESULTS.md, section "Speed"): what ``auto`` means on each device type.
DEFAULT_MODES: dict[str, str] = {"cpu": "ort", "cuda": "fast", "mps": "fast"}
# When a mode cannot run here (missing onnxruntime), ``auto`` tries the next one.
FALLBACKS: dict[str, str] = {"ort-int8": "int8", "ort": "fast", "int8": "fast"}

Predictor = Callable[[Tensor], Tensor]  # images [B,3,S,S] in [0,1] -> fused logits [B,K,S,S]

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _runnable(mode: str) -> bool:
    if mode.startswith("ort"):
        from hsam.speed import ort

        return ort.available()
    if mode == "int8":
        return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines
    return True


def resolve_mode(mode: str | None, device: torch.device) -> str:
    """The concrete mode for ``mode`` ("auto" or a name from :data:`MODES`) on ``device``; HSAMError if invalid."""
    name = (mode or "auto").lower()
    if name not in MODES:
        raise HSAMError(f"unknown speed mode {mode!r}; use one of {', '.join(MODES)}")
    if name == "auto":
        name = DEFAULT_MODES.get(device.type, "eager")
        while not _runnable(name):
            name = FALLBACKS.get(name, "eager")
        return name
    if name in CPU_ONLY and device.type != "cpu":
        raise HSAMError(f"mode {name} runs on the CPU only; use --mode fast (or auto) on {device.type}")
    if name.startswith("ort"):
        from hsam.speed import ort

        ort.require()
    return name


def _weights_version(model: nn.Module) -> tuple:
    """Changes when a parameter is modified in place (load_state_dict, optimiser step), moved or cast, or LoRA is
    merged/unmerged, so cached engines are rebuilt. Not the data pointer: ``model.to()`` re-merges LoRA into fresh
    tensors of the same values on every call, which must not throw the engines away (ONNX caches are content-keyed).
    """
    from hsam.model.lora import lora_modules

    params = tuple((id(p), p._version, p.device.type, p.dtype) for p in model.parameters())
    return params, tuple(m.merged for m in lora_modules(model))


def _fast_model(model: nn.Module) -> nn.Module:
    from hsam.speed.vit import FastEncoder, is_sam_vit, with_encoder

    if not is_sam_vit(model.image_encoder):
        return model
    return with_encoder(model, FastEncoder(model.image_encoder))


def _int8_model(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    from hsam.speed.vit import FastEncoder, with_encoder

    from hsam.model.tiny_vit import TinyViT

    fast = _fast_model(model)
    lite = isinstance(fast.image_encoder, TinyViT)  # H-SAM-Lite: the same recipe on TinyViT's attention/MLP linears
    if not isinstance(fast.image_encoder, FastEncoder) and not lite:
        raise HSAMError("mode int8 needs a SAM ViT or TinyViT encoder; use --mode ort-int8 or fast for this model")
    engines = torch.backends.quantized.supported_engines
    torch.backends.quantized.engine = "x86" if "x86" in engines else "fbgemm"
    from torch.ao.quantization import per_channel_dynamic_qconfig

    # only the encoder's linear layers (qkv, proj, MLP: 89 % of its FLOPs), int8 weights per output channel,
    # activations quantized per call; the decoders stay fp32
    encoder = quantize_dynamic(fast.image_encoder, {nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
    return with_encoder(model, encoder)


def prepare(model: nn.Module, mode: str, device: torch.device, *, say: Callable[[str], None] | None = None,
            cache: bool = True) -> Predictor:
    """A predictor for ``model`` (put in eval mode, already on ``device``) in the concrete ``mode``.

    Built once per (model weights, mode, device) and cached; ``model`` itself is never modified.
    """
    if mode not in MODES or mode == "auto":
        raise ValueError(f"prepare needs a concrete mode, got {mode!r}")
    model.eval()  # LoRA is not merged here (a training caller's model must stay as it is); load_model merges
    key = (mode, str(device))
    version = _weights_version(model)
    entries = _CACHE.setdefault(model, {}) if cache else {}
    hit = entries.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]

    if mode == "eager":
        predictor: Predictor = model.predict
    elif mode == "fast":
        predictor = _fast_model(model).predict
    elif mode == "compile":
        fast = _fast_model(model)
        predictor = torch.compile(fast.predict, dynamic=False)
    elif mode == "int8":
        predictor = _int8_model(model).predict
    elif mode in ("ort", "ort-int8"):
        from hsam.speed import ort

        predictor = ort.build(_fast_model(model), model, int8=mode == "ort-int8", say=say)
    else:  # pragma: no cover (MODES is closed)
        raise ValueError(mode)
    entries[key] = (version, predictor)
    return predictor
