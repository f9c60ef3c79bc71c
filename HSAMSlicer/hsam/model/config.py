"""What defines an H-SAM network: :class:`ModelConfig`, and the named configs shipped in ``hsam/configs/model``.

A config fixes every tensor shape of the model; weights live elsewhere (:mod:`hsam.model.checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping

CMAttnMode = Literal["constant", "mask_guided"]
CMATTN_MODES: tuple[str, ...] = ("constant", "mask_guided")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "model"
DEFAULT_MODEL_CONFIG = "vit_b_512"


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one H-SAM network.

    Attributes:
        backbone: image encoder name in the backbone registry (:mod:`hsam.model.build`): ``"vit_b"``, ``"vit_l"``,
            ``"vit_h"`` (SAM ViTs with LoRA), ``"vit_tiny"`` (a 2-block ViT for tests), ``"tiny_vit"`` (Lite).
        img_size: side S of the square input slice in pixels; the outputs are [B, K, S, S].
        num_classes: number of organs; the network outputs K = num_classes + 1 channels, channel 0 = background.
        lora_rank: rank r of the LoRA adapters on q and v of every ViT block (0 = no LoRA).
        cmattn: ``"constant"`` reproduces the released code, where the class-balanced mask-guided self-attention
            reduces to multiplying the stage-2 input by exactly 2 (hsam-model.md §1.5); ``"mask_guided"`` runs a
            real mask-guided, class-balanced self-attention (:mod:`hsam.model.cmattn`) for training experiments.
        keep_cmattn_tensors: keep the 12.6M parameters of the (dead, in ``"constant"`` mode) CMAttn branch so that
            official checkpoints round-trip; ``False`` drops them (only allowed with ``cmattn="constant"``).
    """

    backbone: str = "vit_b"
    img_size: int = 512
    num_classes: int = 8
    lora_rank: int = 5
    cmattn: CMAttnMode = "constant"
    keep_cmattn_tensors: bool = True

    def __post_init__(self) -> None:
        if self.img_size <= 0 or self.img_size % 16:
            raise ValueError(f"img_size must be a positive multiple of 16, got {self.img_size}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        if self.cmattn not in CMATTN_MODES:
            raise ValueError(f"cmattn must be one of {CMATTN_MODES}, got {self.cmattn!r}")
        if self.cmattn == "mask_guided" and not self.keep_cmattn_tensors:
            raise ValueError("cmattn='mask_guided' needs its tensors: set keep_cmattn_tensors=True")

    @property
    def num_outputs(self) -> int:
        """K = num_classes + 1 (background is channel 0)."""
        return self.num_classes + 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - {"name", "description"})
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})


def available_model_configs() -> list[str]:
    """Names of the configs shipped in ``hsam/configs/model`` (file stems)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A shipped config by name (``"vit_b_512"``, ``"vit_tiny"``) or a JSON file path.

    Raises:
        hsam.errors.HSAMError: no such config, or the file is not a valid model config.
    """
    from hsam.errors import HSAMError

    path = Path(name_or_path)
    if not path.suffix == ".json" or not path.is_file():
        shipped = CONFIG_DIR / f"{name_or_path}.json"
        if not shipped.is_file():
            raise HSAMError(
                f"no model config {str(name_or_path)!r}; use a JSON file or one of: {', '.join(available_model_configs())}"
            )
        path = shipped
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise HSAMError(f"{path}: not a valid model config ({error})") from error
