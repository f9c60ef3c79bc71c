"""Official checkpoints: SAM base ``sam_vit_*.pth`` and the released H-SAM ``.pth``, in and out (hsam-model.md §4).

The released H-SAM file is a flat dict of 489 tensors for ViT-B/512/K=9: ``w_a_NNN``/``w_b_NNN`` (LoRA A and B; index
2i = q of block i, 2i+1 = v), then every ``prompt_encoder.*``, ``prompt_encoder2.*`` (the same module again),
``mask_decoder.*`` and ``mask_decoder2.*`` tensor. It holds no encoder weights: those come from SAM's file.

:func:`import_official` reproduces the released loader's effective sequence:

1. :func:`init_from_sam`: the strict load of the SAM file fails but first copies every tensor whose shape fits
   (so stage-1 hyper-MLPs 0-3 and IoU-head layers 0-1 come from SAM; ``mask_tokens``, hyper-MLPs 4.., the last IoU
   layer stay as initialised); the second load adds ``pos_embed`` and the global blocks' ``rel_pos_h/w`` resized to
   the input size (bilinear), leaving out ``mask_tokens``, ``output_hypernetworks_mlps`` and ``iou_prediction_head``.
2. :func:`load_official_tensors`: LoRA from ``w_a/w_b``; every prompt-encoder and decoder tensor from the file
   (a missing one is an error, as in the released loader; ``prompt_encoder2.*`` is loaded last, so it wins).

:func:`export_official` writes the released layout back, bit for bit (same keys, order, values and object types).
Files are read with ``torch.load(weights_only=True, map_location="cpu")`` only.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from hsam.errors import HSAMError
from hsam.model.checkpoint import SYNAPSE_WINDOW, ModelCard, sha256_file
from hsam.model.config import ModelConfig
from hsam.model.lora import LoRAQKV

# Left out of SAM's second load (their shapes depend on the class count).
SAM_EXCLUDED_ON_SECOND_LOAD: tuple[str, ...] = ("mask_tokens", "output_hypernetworks_mlps", "iou_prediction_head")
_QKV = re.compile(r"^(image_encoder\.blocks\.\d+\.attn\.qkv)\.(weight|bias)$")
_REL_POS = re.compile(r"^image_encoder\.blocks\.(\d+)\.attn\.rel_pos_[hw]$")
_LORA_KEY = re.compile(r"^w_([ab])_(\d{3})$")


def load_pth(path: str | os.PathLike[str], what: str) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` dict from a ``.pth`` file, read with ``weights_only=True`` on the CPU.

    ``what`` names the file's role in error messages. Truncated, foreign or pickled-object files raise HSAMError.
    """
    path = Path(path)
    if not path.is_file():
        raise HSAMError(f"{what} not found: {path}")
    try:
        try:  # memory-mapped: tensors are read when copied into the model, not all at once
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in str(error):
            reason = "it contains Python objects, not only tensors (refused: loading it could run code)"
        else:
            reason = f"truncated or not a PyTorch checkpoint ({text[:100]})"
        raise HSAMError(f"{path}: cannot read the {what}: {reason}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise HSAMError(f"{path}: the {what} is not a flat dict of named tensors")
    return dict(state)


# ------------------------------------------------------------------------------------------------ SAM base


def sam_to_model_key(key: str, model_keys: Mapping[str, object]) -> str:
    """SAM key -> our key: ``...attn.qkv.{weight,bias}`` moves under the LoRA wrapper (``...attn.qkv.qkv.*``)."""
    match = _QKV.match(key)
    if match and key not in model_keys:
        return f"{match.group(1)}.qkv.{match.group(2)}"
    return key


def sam_backbone(state: Mapping[str, Tensor], source: str) -> str:
    """The SAM ViT size (``"vit_b"``, ...) of a SAM state dict, from its patch embedding width and block count."""
    from hsam.model.image_encoder import VIT_SPECS

    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        hint = " (it looks like an H-SAM LoRA checkpoint: pass it as the H-SAM file)" if "w_a_000" in state else ""
        raise HSAMError(f"{source}: not a SAM checkpoint, no image_encoder.patch_embed.proj.weight{hint}")
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, spec in VIT_SPECS.items():
        if spec.embed_dim == patch.shape[0] and spec.depth == depth:
            return name
    raise HSAMError(f"{source}: unknown SAM ViT (width {patch.shape[0]}, {depth} blocks)")


@dataclass
class SamInitReport:
    """Which model tensors :func:`init_from_sam` took from SAM (``copied`` as is, ``resized``) and which SAM
    counterparts did not fit and were left as initialised (``kept``)."""

    copied: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@torch.no_grad()
def init_from_sam(
    model: nn.Module,
    sam_state: Mapping[str, Tensor] | str | os.PathLike[str],
    source: str = "SAM checkpoint",
) -> SamInitReport:
    """Initialise an :class:`~hsam.model.hsam.HSAM` from SAM weights as the released ``build_sam`` does (§4 step 1).

    ``sam_state``: a SAM state dict, or the path of a SAM ``.pth`` (read with ``weights_only=True``).
    Also the starting point for training from SAM. LoRA, stage 2, point embeddings 4-10 are never touched.
    """
    from hsam.model.image_encoder import resize_pos_embed, resize_rel_pos

    if isinstance(sam_state, (str, os.PathLike)):
        source = str(sam_state)
        sam_state = load_pth(sam_state, "SAM checkpoint")
    backbone = sam_backbone(sam_state, source)
    if backbone != model.config.backbone:
        raise HSAMError(f"{source} is SAM {backbone} but the model is {model.config.backbone}; use the matching SAM file")
    model.unmerge_lora()
    own = model.state_dict()
    grid = model.grid
    global_blocks = set(model.image_encoder.spec.global_attn_indexes)
    report = SamInitReport()
    pending: dict[str, tuple[str, Tensor]] = {}
    # 1. the strict load: copies every tensor whose name and shape fit, then fails on the rest.
    for sam_key, tensor in sam_state.items():
        key = sam_to_model_key(sam_key, own)
        if key not in own:
            continue
        if tuple(own[key].shape) == tuple(tensor.shape):
            own[key].copy_(tensor)
            report.copied.append(key)
        else:
            pending[key] = (sam_key, tensor)
    # 2. the second load: positional tensors resized to this input size; class-count-dependent heads left out.
    for key, (sam_key, tensor) in pending.items():
        if any(part in sam_key for part in SAM_EXCLUDED_ON_SECOND_LOAD):
            report.kept.append(key)
            continue
        if key == "image_encoder.pos_embed":
            tensor = resize_pos_embed(tensor, grid)
        else:
            match = _REL_POS.match(key)
            if match and int(match.group(1)) in global_blocks:
                tensor = resize_rel_pos(tensor, 2 * grid - 1)
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise HSAMError(
                f"{source}: {sam_key} is {tuple(tensor.shape)} but the model needs {tuple(own[key].shape)}"
            )
        own[key].copy_(tensor)
        report.resized.append(key)
    return report


# ------------------------------------------------------------------------------------------------ H-SAM file


def official_key_map(model: nn.Module) -> list[tuple[str, str]]:
    """``(official key, model key)`` pairs in the released file's order (``prompt_encoder2.*`` maps onto
    ``prompt_encoder.*``)."""
    adapters = [name for name, module in model.named_modules() if isinstance(module, LoRAQKV)]
    pairs_a, pairs_b = [], []
    for name in adapters:
        for part in ("q", "v"):
            pairs_a.append((f"w_a_{len(pairs_a):03d}", f"{name}.linear_a_{part}.weight"))
            pairs_b.append((f"w_b_{len(pairs_b):03d}", f"{name}.linear_b_{part}.weight"))
    keys = list(model.state_dict())
    prompt = [k for k in keys if k.startswith("prompt_encoder.")]
    pairs = pairs_a + pairs_b + [(k, k) for k in prompt]
    pairs += [("prompt_encoder2." + k[len("prompt_encoder.") :], k) for k in prompt]
    pairs += [(k, k) for k in keys if k.startswith("mask_decoder.")]
    pairs += [(k, k) for k in keys if k.startswith("mask_decoder2.")]
    return pairs


@dataclass(frozen=True)
class OfficialLayout:
    """What an official H-SAM file's shapes say about its network."""

    embed_dim: int
    num_blocks: int
    lora_rank: int
    num_outputs: int
    img_size: int

    def describe(self) -> str:
        return (
            f"LoRA for {self.num_blocks} blocks of width {self.embed_dim}, rank {self.lora_rank}, "
            f"{self.num_outputs} outputs, input {self.img_size}"
        )


def inspect_official(state: Mapping[str, Tensor], source: str) -> OfficialLayout:
    """Read backbone width, depth, LoRA rank, K and input size off an official H-SAM state dict."""
    lora = {k for k in state if _LORA_KEY.match(k)}
    if "w_a_000" not in state:
        hint = (
            " (it looks like a SAM base checkpoint: pass it as the SAM file)"
            if "image_encoder.patch_embed.proj.weight" in state
            else ""
        )
        raise HSAMError(f"{source}: not an H-SAM checkpoint, no LoRA tensor w_a_000{hint}")
    count = sum(1 for k in lora if k.startswith("w_a_"))
    if count % 2 or {f"w_{ab}_{i:03d}" for ab in "ab" for i in range(count)} != lora:
        raise HSAMError(f"{source}: incomplete LoRA tensors ({len(lora)} w_a/w_b entries)")
    rank, embed_dim = state["w_a_000"].shape
    tokens = state.get("mask_decoder.mask_tokens.weight")
    width = state.get("mask_decoder2.self_attn.q_proj.weight")
    if tokens is None or width is None:
        missing = "mask_decoder.mask_tokens.weight" if tokens is None else "mask_decoder2.self_attn.q_proj.weight"
        raise HSAMError(f"{source}: not a complete H-SAM checkpoint, {missing} is missing")
    grid = math.isqrt(width.shape[0])
    if grid * grid != width.shape[0]:
        raise HSAMError(f"{source}: CMAttn width {width.shape[0]} is not a square grid; unknown input size")
    return OfficialLayout(int(embed_dim), count // 2, int(rank), int(tokens.shape[0]), grid * 16)


@torch.no_grad()
def load_official_tensors(model: nn.Module, state: Mapping[str, Tensor], source: str = "H-SAM checkpoint") -> None:
    """Fill LoRA, prompt encoder and both decoders of ``model`` from an official H-SAM state dict (§4 step 3).

    Every expected key must be present with its shape, and no other key may be there (one-line HSAMError).
    """
    model.unmerge_lora()
    own = model.state_dict()
    pairs = official_key_map(model)
    _check_layout(model, state, source)
    for official, key in pairs:  # in file order: prompt_encoder2.* after prompt_encoder.*, so it wins
        own[key].copy_(state[official])


def _check_layout(model: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """HSAMError unless ``state`` has exactly the official keys of ``model`` with their shapes."""
    own = model.state_dict()
    expected = {official: own[key] for official, key in official_key_map(model)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        if wrong:
            detail = f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, the model needs {tuple(expected[wrong[0]].shape)}"
        elif missing:
            detail = f"{len(missing)} of {len(expected)} tensors missing, e.g. {missing[0]}"
        else:
            detail = f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
        raise HSAMError(f"{source} does not fit a {_summary(model.config)} H-SAM: {detail}")


def official_layout(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """``{official key: shape}`` of the released H-SAM file for ``config``, in file order (489 keys for ViT-B/512/K=9).
    Built on the meta device: no memory, no initialisation."""
    from hsam.model.build import build_hsam

    model = build_hsam(config, device="meta")
    own = model.state_dict()
    return {official: tuple(own[key].shape) for official, key in official_key_map(model)}


def check_official_file(path: str | os.PathLike[str], config: ModelConfig) -> None:
    """HSAMError unless ``path`` is an official H-SAM checkpoint for ``config``: exactly its keys and shapes, read with
    ``torch.load(weights_only=True)`` (used for files whose SHA-256 cannot be known in advance)."""
    from hsam.model.build import build_hsam

    state = load_pth(path, "H-SAM checkpoint")
    _check_layout(build_hsam(config, device="meta"), state, Path(path).name)


def _summary(config: ModelConfig) -> str:
    return f"{config.backbone}/{config.img_size}/{config.num_outputs}-output/rank-{config.lora_rank}"


def import_official(
    hsam_pth: str | os.PathLike[str],
    sam_pth: str | os.PathLike[str],
    name: str,
    *,
    title: str | None = None,
    classes: list[str] | None = None,
    training_data: str | None = None,
) -> tuple["HSAM", ModelCard]:  # noqa: F821
    """Convert an official H-SAM ``.pth`` plus its SAM base ``.pth`` into an :class:`HSAM` and a :class:`ModelCard`.

    Backbone, input size, class count and LoRA rank are read off the two files and cross-checked; any mismatch
    (wrong ViT size, class count, rank, truncated or foreign file) raises a one-line HSAMError naming the file.
    The model is returned in eval mode with LoRA unmerged; save it with :func:`hsam.model.checkpoint.save_model`.
    ``classes`` defaults to background + the 8 Synapse organs when K = 9.
    """
    from hsam.model.build import build_hsam
    from hsam.model.image_encoder import VIT_SPECS

    hsam_path, sam_path = Path(hsam_pth), Path(sam_pth)
    hsam_state = load_pth(hsam_path, "H-SAM checkpoint")
    layout = inspect_official(hsam_state, str(hsam_path))  # before reading the (larger) SAM file
    sam_state = load_pth(sam_path, "SAM checkpoint")
    backbone = sam_backbone(sam_state, str(sam_path))
    spec = VIT_SPECS[backbone]
    if (layout.embed_dim, layout.num_blocks) != (spec.embed_dim, spec.depth):
        fits = [n for n, s in VIT_SPECS.items() if (s.embed_dim, s.depth) == (layout.embed_dim, layout.num_blocks)]
        raise HSAMError(
            f"{hsam_path}: its LoRA fits {fits[0] if fits else 'an unknown ViT'} ({layout.num_blocks} blocks of width "
            f"{layout.embed_dim}) but {sam_path.name} is SAM {backbone}; use the SAM base file it was trained on"
        )
    if classes is not None and len(classes) != layout.num_outputs:
        raise HSAMError(f"{hsam_path}: it has {layout.num_outputs} outputs but {len(classes)} class names were given")
    config = ModelConfig(
        backbone=backbone,
        img_size=layout.img_size,
        num_classes=layout.num_outputs - 1,
        lora_rank=layout.lora_rank,
        cmattn="constant",
        keep_cmattn_tensors=True,
    )
    # Every tensor is overwritten below (encoder from SAM, the rest from the H-SAM file), so skip random init.
    model = build_hsam(config, device="meta").to_empty(device="cpu")
    report = init_from_sam(model, sam_state, str(sam_path))
    del sam_state
    load_official_tensors(model, hsam_state, str(hsam_path))
    filled = set(report.copied) | set(report.resized) | {key for _, key in official_key_map(model)}
    unfilled = [key for key in model.state_dict() if key not in filled]
    if unfilled:  # cannot happen for SAM ViTs; guards the meta-device shortcut above
        raise RuntimeError(f"import left tensors uninitialised: {unfilled[:3]}")
    model.eval()

    if classes is None:
        from hsam.labels import CLASS_NAMES

        classes = (
            list(CLASS_NAMES)
            if layout.num_outputs == len(CLASS_NAMES)
            else ["background"] + [f"class_{i}" for i in range(1, layout.num_outputs)]
        )
    card = ModelCard(
        name=name,
        title=title or f"H-SAM {backbone} {layout.img_size} (official weights, {hsam_path.name})",
        classes=list(classes),
        window=list(SYNAPSE_WINDOW),
        orientation="LPS",
        training_data=training_data
        or "official H-SAM release (Cheng et al., CVPR 2024), trained on Synapse multi-organ CT (BTCV)",
        license="H-SAM weights: terms of github.com/Cccccczh404/H-SAM; SAM base weights: Apache-2.0 (Meta)",
        extra={
            "source": {
                "hsam_checkpoint": hsam_path.name,
                "hsam_sha256": sha256_file(hsam_path),
                "sam_checkpoint": sam_path.name,
            }
        },
    ).with_config(config)
    return model, card


def official_state(model: nn.Module) -> dict[str, Tensor]:
    """The released file's dict for ``model``: same keys and order, LoRA tensors as ``nn.Parameter`` (as the released
    trainer saved them), ``prompt_encoder2.*`` the very same tensors as ``prompt_encoder.*``."""
    if not model.config.keep_cmattn_tensors:
        raise HSAMError("this model has no CMAttn tensors, which the released H-SAM loader requires; cannot export")
    own = model.state_dict()  # unmerged view
    out: dict[str, Tensor] = {}
    for official, key in official_key_map(model):
        tensor = own[key].detach().to("cpu")
        out[official] = nn.Parameter(tensor.clone()) if _LORA_KEY.match(official) else tensor
    return out


def export_official(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as an official H-SAM ``.pth`` (atomic); the released code loads it with ``--lora_ckpt``."""
    target = Path(path)
    state = official_state(model)
    # torch.save names the archive inside the zip after the file's stem, so the temp file keeps the stem
    # (``epoch_299.tmpNNN`` -> ``epoch_299/``): the result is byte-identical to saving at ``path`` directly.
    temp = target.with_name(f"{target.stem}.tmp{os.getpid()}")
    try:
        torch.save(state, temp)
        os.replace(temp, target)
    finally:
        if temp.exists():
            temp.unlink()
    return target
