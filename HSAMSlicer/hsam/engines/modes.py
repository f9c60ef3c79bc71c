"""Engines ("speed modes"): how :func:`hsam.pipeline.run.segment_volume` runs the network on a device.

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

``auto`` (:func:`choose_engine`) applies one precision rule on every device (issue 30): a reduced-precision or
quantised engine may be the default only if, on every labelled real CT measured, each organ's Dice *against the
reference labels* is within 0.01 of eager fp32's and >= 99.5 % of voxels carry fp32's label
(:func:`passes_precision_rule`, measured by benchmarks/precision_rule.py). Among the engines the processor can run
and that met the rule, the fastest (quiet 2-core speed-up, benchmarks/RESULTS.md) runs; the rows of
:data:`CPU_AUTO` and :data:`GPU_AUTO` are that evidence and the reason shown to the user quotes them.
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
FAMILY_LABELS = {"sam_vit": "ViT-B", "tiny_vit": "H-SAM-Lite", "any": "every model"}

# The one precision rule (issue 30), for every device class.
RULE_MAX_DICE_CHANGE = 0.01  # |organ Dice vs reference labels - fp32's|, every organ of every volume
RULE_MIN_VOXELS_EQUAL = 0.995  # share of voxels with fp32's label, every volume


def within_rule(dice_change: float | None, voxels_equal: float | None) -> bool:
    """The rule on one summary; None (not measured) fails."""
    return (dice_change is not None and voxels_equal is not None and dice_change <= RULE_MAX_DICE_CHANGE
            and voxels_equal >= RULE_MIN_VOXELS_EQUAL)


def passes_precision_rule(rows: list[dict]) -> dict:
    """The one precision rule over the measured rows of one mode (benchmarks/precision_rule.py records, one per
    volume and organ: ``volume``, ``organ``, ``dice_vs_reference``, ``fp32_dice_vs_reference``,
    ``voxels_equal_fp32``).

    Returns ``{"passes", "dice_change", "voxels_equal", "worst"}``: the largest Dice change against the reference
    (either way), the lowest share of voxels equal to fp32's, and a text naming where they occur. No rows fail.
    """
    if not rows:
        return {"passes": False, "dice_change": None, "voxels_equal": None, "worst": "not measured"}
    change = max(rows, key=lambda r: abs(r["dice_vs_reference"] - r["fp32_dice_vs_reference"]))
    equal = min(rows, key=lambda r: r["voxels_equal_fp32"])
    moved = round(abs(change["dice_vs_reference"] - change["fp32_dice_vs_reference"]), 4)
    worst = (f"{change['organ']} Dice vs reference {change['dice_vs_reference']:.3f} against fp32's "
             f"{change['fp32_dice_vs_reference']:.3f} on {change['volume']}; voxels equal to fp32 "
             f"{100 * equal['voxels_equal_fp32']:.2f} % on {equal['volume']}")
    return {"passes": within_rule(moved, equal["voxels_equal_fp32"]), "dice_change": moved,
            "voxels_equal": equal["voxels_equal_fp32"], "worst": worst}


@dataclass(frozen=True)
class Evidence:
    """One measured engine: where it is fast, how fast, and how it did under the precision rule."""

    feature: str  # CPU: hsam.engines.cpu.Processor feature it needs ("" = any); GPU: "cuda" / "mps" (+ ":bf16")
    family: str  # encoder family (encoder_family) or "any"
    mode: str  # speed mode; on GPUs the autocast precision is in ``precision``
    precision: str  # "fp32", "bf16", "fp16", "int8"
    speedup: float | None  # vs eager fp32, quiet machine (benchmarks/RESULTS.md; None: not measured): the order
    dice_change: float | None  # the rule's measure (None: not measured against reference labels)
    voxels_equal: float | None
    evidence: str  # what was measured, quoted in the reason

    @property
    def passes(self) -> bool:
        return within_rule(self.dice_change, self.voxels_equal)

    @property
    def name(self) -> str:
        return f"{self.mode} {self.precision} autocast" if self.mode == "fast" else self.mode

    @property
    def speed(self) -> str:
        return "speed not measured" if self.speedup is None else f"{self.speedup:.1f}x eager fp32"

    def summary(self) -> str:
        verdict = "meets" if self.passes else "fails"
        return (f"{self.name} ({self.speed}) {verdict} the precision rule for "
                f"{FAMILY_LABELS.get(self.family, self.family)}: {self.evidence}")


# CPU evidence (benchmarks/RESULTS.md, "Speed per processor" for the speed-ups on a quiet 2-core AVX-512/AMX Xeon,
# "One precision rule" for the Dice against the reference labels: benchmarks/results/precision_rule_lite*.json).
CPU_AUTO: tuple[Evidence, ...] = (
    Evidence("", "any", "ort", "fp32", 1.43, 0.0, 1.0,
             "fp32 ONNX Runtime, labels identical to eager fp32 (ViT-B/512 and H-SAM-Lite, Xeon and EPYC)"),
    Evidence("native_bf16", "sam_vit", "bf16", "bf16", 2.39, None, 0.99819,
             "not measured against reference labels (no trained ViT-B here); vs fp32 pancreas Dice 0.966"),
    Evidence("native_bf16", "tiny_vit", "bf16", "bf16", 1.71, 0.0102, 0.998877,
             "pancreas Dice vs reference 0.717 against fp32's 0.707 on example_ct_sm (+0.0102: the rule is two-sided), "
             "99.89 % of voxels as fp32"),
    Evidence("native_int8", "sam_vit", "ort-int8", "int8", 2.94, None, 0.99589,
             "not measured against reference labels (no trained ViT-B here); vs fp32 pancreas Dice 0.965"),
    Evidence("native_int8", "tiny_vit", "ort-int8", "int8", 1.85, 0.0257, 0.997065,
             "pancreas Dice vs reference 0.681 against fp32's 0.707 on example_ct_sm, 99.71 % of voxels as fp32"),
    Evidence("native_int8", "sam_vit", "int8", "int8", 2.03, None, 0.99536,
             "not measured against reference labels (no trained ViT-B here); vs fp32 pancreas Dice 0.937"),
    Evidence("native_int8", "tiny_vit", "int8", "int8", 1.15, None, 0.99767,
             "slower than ort (0.89 against 0.76 s per slice), so not measured against reference labels"),
)
# GPU evidence: autocast precisions of the ``fast`` engine. None has been measured against reference labels on a GPU
# (benchmarks/gpu_check.sh, issue 30 item 5), so ``auto`` runs fp32 there until a row meets the rule.
GPU_AUTO: tuple[Evidence, ...] = (
    Evidence("cuda:bf16", "any", "fast", "bf16", None, None, None, "not measured against reference labels on a GPU"),
    Evidence("cuda", "any", "fast", "fp16", None, None, None, "not measured against reference labels on a GPU"),
    Evidence("mps", "any", "fast", "fp16", None, None, None, "not measured against reference labels on a GPU"),
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


def pick(rows: tuple[Evidence, ...] | list[Evidence], family: str, has: Callable[[str], bool],
         runnable: Callable[[Evidence], bool] = lambda row: True) -> tuple[Evidence | None, list[str]]:
    """The fastest row for ``family`` whose feature ``has`` and that meets the precision rule (and is ``runnable``),
    and the notes on faster rows that were not taken (failed the rule, or could not run here)."""
    usable = [r for r in rows if r.family in ("any", family) and (not r.feature or has(r.feature))]
    speed = lambda row: row.speedup or 0.0  # noqa: E731 (unmeasured speed sorts last)
    chosen = max((r for r in usable if r.passes and runnable(r)), key=speed, default=None)
    notes = []
    for row in sorted(usable, key=lambda r: -speed(r)):
        if row is chosen or (chosen is not None and speed(row) <= speed(chosen)):
            continue
        notes.append(row.summary() if not row.passes else f"{row.mode} needs packages that are not installed")
    return chosen, notes


def _cpu_auto(family: str) -> EngineChoice:
    from hsam.engines.cpu import processor

    cpu = processor()
    chosen, notes = pick(CPU_AUTO, family, lambda feature: bool(getattr(cpu, feature)),
                         lambda row: _runnable(row.mode))
    if chosen is None:
        return EngineChoice("fast", "; ".join([f"{cpu.describe()}: fast, exact PyTorch rewrites", *notes]))
    head = f"{cpu.describe()}: {chosen.mode}, {chosen.speed}, {chosen.evidence}"
    return EngineChoice(chosen.mode, "; ".join([head, *notes]))


def gpu_precision(device_type: str, bf16_supported: bool, family: str = "any") -> tuple[str, str]:
    """(autocast precision, why) that ``auto`` uses on a GPU of ``device_type``: the fastest :data:`GPU_AUTO` row
    meeting the precision rule, else fp32."""
    features = {device_type} | ({f"{device_type}:bf16"} if bf16_supported else set())
    chosen, notes = pick(GPU_AUTO, family, lambda feature: feature in features)
    if chosen is None:
        return "fp32", "; ".join([f"{device_type}: fast in fp32 (no half precision has met the precision rule on "
                                  "a GPU yet)", *notes])
    return chosen.precision, f"{device_type}: fast in {chosen.precision}, {chosen.evidence}"


def choose_engine(mode: str | None, device: torch.device, family: str = "other") -> EngineChoice:
    """The concrete engine for ``mode`` ("auto" or a name from :data:`MODES`) on ``device`` for a model whose
    encoder is of ``family`` (:func:`encoder_family`).

    ``auto`` follows the precision rule over :data:`CPU_AUTO` (this processor) or :data:`GPU_AUTO`; an explicit mode
    is checked (HSAMError if unknown, CPU-only on another device, or its packages are missing).
    """
    name = (mode or "auto").lower()
    if name not in MODES:
        raise HSAMError(f"unknown speed mode {mode!r}; use one of {', '.join(MODES)}")
    if name == "auto":
        if device.type == "cpu":
            return _cpu_auto(family)
        if device.type not in ("cuda", "mps"):
            return EngineChoice("eager", f"{device.type}: eager (no measured engine for this device)")
        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return EngineChoice("fast", gpu_precision(device.type, bf16, family)[1] + " (unless --precision is given)")
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
