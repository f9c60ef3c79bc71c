"""Engines ("speed modes"): how :func:`hsam.inference.segment_volume` runs the network on a device.

==========  ======  ======================================================================================
mode        where   what
==========  ======  ======================================================================================
eager       any     ``model.predict`` as built (fp32, or fp16/bf16 autocast on GPUs): the reference
fast        any     exact rewrites of the SAM ViT (:mod:`hsam.engines.vit`): no work on window padding, fused
                    attention with relative positions; same labels as eager
bf16        CPU     ``fast`` with the image encoder in bfloat16 (:mod:`hsam.engines.bf16`); fast only on CPUs
                    with AVX512_BF16 or AMX
int8        CPU     ``fast`` + dynamic int8 ``nn.Linear`` in the encoder blocks (PyTorch, fbgemm)
ort         CPU     the whole network through ONNX Runtime fp32 (onnxruntime + onnx)
ort-int8    CPU     ONNX Runtime with int8 per-channel weights in the encoder blocks' linear layers
compile     GPU     ``fast`` under ``torch.compile`` (pays a compile on first use)
==========  ======  ======================================================================================

``auto`` (:func:`choose_engine`) picks, per device, processor and encoder family, the fastest mode that met the
agreement bar in benchmarks/RESULTS.md (>= 99.5 % voxels identical to eager fp32 and per-organ Dice >= 0.99 on real
CT with trained weights) and says why. On CPUs the rows of :data:`CPU_AUTO` are that evidence.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from hsam.errors import HSAMError

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("auto", "eager", "fast", "bf16", "int8", "ort", "ort-int8", "compile")
CPU_ONLY = ("bf16", "int8", "ort", "ort-int8")
GPU_AUTO: dict[str, str] = {"cuda": "fast", "mps": "fast"}  # exact rewrites; precision is the autocast choice
# What ``auto`` runs on a CPU: the first row whose processor feature (hsam.engines.cpu.Processor) is present and whose
# encoder family matches ("any" matches every family). Evidence: benchmarks/RESULTS.md, "Speed per processor": on a
# 2-core AVX-512/AMX Xeon and a 2-core AVX2 EPYC only ONNX Runtime fp32 kept the agreement bar.
CPU_AUTO: tuple[tuple[str, str, str, str], ...] = (
    # (processor feature or "", encoder family, mode, what it measured)
    ("", "any", "ort", "1.4x eager fp32 on 2 cores for ViT-B/512 and H-SAM-Lite, labels identical to eager"),
)
# Faster modes this processor could run that missed the agreement bar, shown with the choice: (feature, family, text).
CPU_MISSED: tuple[tuple[str, str, str], ...] = (
    ("native_bf16", "sam_vit", "bf16 (2.4x) missed the agreement bar for ViT-B: pancreas Dice 0.966 vs fp32"),
    ("native_bf16", "tiny_vit", "bf16 (1.7x) missed the agreement bar for H-SAM-Lite: pancreas Dice 0.968 vs fp32"),
    ("native_int8", "sam_vit", "ort-int8 (2.9x) missed the agreement bar for ViT-B: pancreas Dice 0.965 vs fp32"),
    ("native_int8", "tiny_vit", "ort-int8 (1.9x) missed the agreement bar for H-SAM-Lite: pancreas Dice 0.905 vs fp32"),
)

Predictor = Callable[[Tensor], Tensor]  # images [B,3,S,S] in [0,1] -> fused logits [B,K,S,S]


@dataclass(frozen=True)
class EngineChoice:
    mode: str  # a concrete mode of MODES (never "auto")
    reason: str  # one line for the user: why this engine runs here


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _runnable(mode: str) -> bool:
    if mode.startswith("ort"):
        from hsam.engines import ort

        return ort.available()
    if mode == "int8":
        return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines
    return True


def encoder_family(model: nn.Module | None) -> str:
    """"sam_vit" (H-SAM ViT-B/L/H), "tiny_vit" (H-SAM-Lite) or "other"."""
    from hsam.engines.vit import is_sam_vit
    from hsam.model.tiny_vit import TinyViT

    encoder = getattr(model, "image_encoder", None)
    if encoder is None:
        return "other"
    if is_sam_vit(encoder):
        return "sam_vit"
    return "tiny_vit" if isinstance(encoder, TinyViT) else "other"


def _cpu_auto(family: str) -> EngineChoice:
    from hsam.engines.cpu import FEATURE_NEEDS, processor

    cpu = processor()
    notes = [text for feature, fam, text in CPU_MISSED if fam == family and getattr(cpu, feature)]
    for feature, families, mode, evidence in CPU_AUTO:
        if families not in ("any", family):
            continue
        if feature and not getattr(cpu, feature):
            notes.append(f"{mode} would need {FEATURE_NEEDS[feature]}")
            continue
        if not _runnable(mode):
            notes.append(f"{mode} needs packages that are not installed (onnxruntime, onnx)")
            continue
        return EngineChoice(mode, "; ".join([f"{cpu.describe()}: {mode}, {evidence}", *notes]))
    return EngineChoice("fast", "; ".join([f"{cpu.describe()}: fast, exact PyTorch rewrites", *notes]))


def choose_engine(mode: str | None, device: torch.device, family: str = "other") -> EngineChoice:
    """The concrete engine for ``mode`` ("auto" or a name from :data:`MODES`) on ``device`` for a model whose
    encoder is of ``family`` (:func:`encoder_family`).

    ``auto`` on a CPU follows :data:`CPU_AUTO` for this processor and family; an explicit mode is checked (HSAMError
    if unknown, CPU-only on another device, or its packages are missing).
    """
    name = (mode or "auto").lower()
    if name not in MODES:
        raise HSAMError(f"unknown speed mode {mode!r}; use one of {', '.join(MODES)}")
    if name == "auto":
        if device.type == "cpu":
            return _cpu_auto(family)
        name = GPU_AUTO.get(device.type, "eager")
        return EngineChoice(name, f"{device.type}: exact PyTorch rewrites with {name} (precision by --precision)")
    if name in CPU_ONLY and device.type != "cpu":
        raise HSAMError(f"mode {name} runs on the CPU only; use --mode fast (or auto) on {device.type}")
    if name.startswith("ort"):
        from hsam.engines import ort

        ort.require()
    return EngineChoice(name, "chosen with --mode")


def _weights_version(model: nn.Module) -> tuple:
    """Changes when a parameter is modified in place (load_state_dict, optimiser step), moved or cast, or LoRA is
    merged/unmerged, so cached engines are rebuilt. Not the data pointer: ``model.to()`` re-merges LoRA into fresh
    tensors of the same values on every call, which must not throw the engines away (ONNX caches are content-keyed).
    """
    from hsam.model.lora import lora_modules

    params = tuple((id(p), p._version, p.device.type, p.dtype) for p in model.parameters())
    return params, tuple(m.merged for m in lora_modules(model))


def _fast_model(model: nn.Module) -> nn.Module:
    from hsam.engines.vit import FastEncoder, is_sam_vit, with_encoder

    if not is_sam_vit(model.image_encoder):
        return model
    return with_encoder(model, FastEncoder(model.image_encoder))


def _int8_model(model: nn.Module) -> nn.Module:
    from torch.ao.quantization import quantize_dynamic

    from hsam.engines.vit import FastEncoder, with_encoder

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
    elif mode == "bf16":
        from hsam.engines.bf16 import bf16_model

        predictor = bf16_model(_fast_model(model)).predict
    elif mode == "int8":
        predictor = _int8_model(model).predict
    elif mode in ("ort", "ort-int8"):
        from hsam.engines import ort

        predictor = ort.build(_fast_model(model), model, int8=mode == "ort-int8", say=say)
    else:  # pragma: no cover (MODES is closed)
        raise ValueError(mode)
    entries[key] = (version, predictor)
    return predictor
