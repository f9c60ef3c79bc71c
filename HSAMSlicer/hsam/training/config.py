"""Training configs: JSON data files, the released H-SAM recipe as the defaults.

A config file holds only what differs from :data:`DEFAULTS` (the paper recipe, hsam-model.md §2); it is deep-merged
onto them and every key is checked, so a typo is an error rather than a silent default. Shipped configs live in
``hsam/configs/training/`` and are named by file stem (``hsam train --config synapse_10pct``). ``--set a.b=VALUE``
overrides one key (VALUE parsed as JSON, else taken as a string).

A config file may start from another one: ``"extends": "tiny"`` (a shipped name, or a path relative to the file).

Relative paths inside a user's config file are relative to that file's folder; in shipped configs and ``--set``
values they are relative to the current directory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from hsam.errors import HSAMError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "training"

# The released recipe (hsam-model.md §2) with its bugs fixed; see the module docs of augment/losses/schedule.
DEFAULTS: dict[str, Any] = {
    "name": "hsam-custom",  # id of the resulting model (registered under it)
    "title": "",  # human-readable model title for the model card
    "description": "",
    "model": {
        "config": "vit_b_512",  # a model config name (hsam/configs/model) or a dict of ModelConfig fields
        "init": None,  # {"sam_checkpoint": path} | {"model": id or path} | {"state_dict": path} | None (random)
        "freeze": [],  # parts to keep fixed: image_encoder, lora, prompt_encoder, mask_decoder, mask_decoder2
        "dropout": True,  # False sets every nn.Dropout to p=0 (for exact DDP/equivalence checks)
    },
    "data": {
        "train": None,  # a data source: {"format": "synapse_npz"|"synapse_h5"|"nnunet"|"cases"|"pairs", ...}
        "val": None,  # held-out volumes (a volume source), or None
        "holdout": {"fraction": 0.0, "count": None, "seed": 2345,  # hold out training volumes for validation
                    # with nothing else held out (one case): this share of each case's slices, spread over z
                    "slices": 0.0},
        "label_map": None,  # btcv | totalseg_total | totalseg_total_mr | {source: target} | JSON file
        "window": [-125, 275],  # HU window -> [0, 1] (volume sources; Synapse npz/h5 are already windowed)
        "orientation": "LPS",  # canonical slice layout (model card field)
        "few_shot": None,  # {"fraction": 0.1 | "count": N, "seed": 2345, "oversample_rare": 0.0}
    },
    "augmentation": {
        "p_rotate": 0.45, "p_crop": 0.4125, "p_elastic": 0.116875, "rotate_degrees": 20,
        "crop_scale": [0.2, 0.8], "elastic_alpha": 2.0, "elastic_sigma": 0.08, "elastic_affine": 0.08,
    },  # fmt: skip
    "loss": {"ce_weight": 0.1, "dice_weight": 0.9, "stage_weight_base": 0.6, "stage_weight_decay": 0.99,
             "smooth": 1e-5},
    "optim": {"base_lr": 0.0025, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "warmup_iters": 250,
              "poly_power": 0.9},
    "epochs": 300,
    "batch_size": 16,  # the global batch (all processes together); the release silently doubled it (n_gpu=2)
    "embedding_noise": 0.2,  # N(0,1) * 0.2 * (max - min of the batch embedding) on the stage-2 input
    "seed": 2345,
    "num_workers": 4,
    "amp": True,  # mixed precision on CUDA (bf16 where supported, else fp16 with a grad scaler); ignored on CPU
    # bf16 autocast of the training steps on CPUs with native bf16 (AVX512_BF16/AMX): "auto" there, false = fp32
    "cpu_amp": False,
    "device": "auto",  # auto | cpu | cuda | cuda:N | mps
    "validation": {"every": 0, "batch_size": 8},  # every N epochs (0 = never: the release had no validation)
    "stopping": {"patience": 0},  # stop when validation Dice has not improved for N validations (0 = never)
    # frozen encoder: compute its outputs once per sample and train the decoders on them (hsam.training.frozen);
    # copies: augmented copies per slice (0 = a new one every epoch, as the recipe); precision (auto|fp32|bf16) of
    # every encoder output of the run: training copies and the held-out and reference volumes
    "encoder_cache": {"enabled": False, "copies": 0, "precision": "fp32"},
    "reference": None,  # forgetting guard: a volume source the base model was validated on, scored before and after
    # reference Dice drop allowed (null: the guard only reports): epochs past it are never kept (hsam.training.guard)
    "guard": {"margin": None},
    # rehearsal: ceil(ratio x user samples) slices of the reference cases appended to every batch (training.rehearsal)
    "rehearsal": {"ratio": 0.0},
    "checkpoint_every": 50,  # keep the weights of every N-th epoch (the release did the same)
    # write checkpoints/last.pt (for --resume) after the last epoch and after any epoch ending this many seconds
    # after the previous write (0: after every epoch): a crash loses at most this much work, and a one-minute
    # fine-tune does not spend 3 s writing 130 MB ten times
    "state_every_s": 60,
    "output_dir": None,  # default: runs/<name>
    "card": {"training_data": "", "license": "", "demo": False},
    "tensorboard": True,  # also log to TensorBoard when the package is installed
}

_OPEN_KEYS = {("model", "config"), ("model", "init"), ("data", "train"), ("data", "val"), ("data", "label_map"),
              ("data", "few_shot")}  # values that are free-form dicts (checked where they are used)
_REPLACE_KEYS = {("model", "init")}  # one initial-weights choice at a time: an override replaces it whole
_PATH_KEYS = {"root", "list", "image", "label", "sam_checkpoint", "state_dict", "model"}


def _merge(base: dict, override: Mapping, path: tuple[str, ...] = (), strict: bool = True) -> dict:
    """Deep-merge ``override`` onto ``base``. Known sections reject unknown keys; the free-form values in
    ``_OPEN_KEYS`` (data sources, init, ...) merge key by key when both sides are objects, else are replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        here = path + (key,)
        if strict and key not in base:
            raise HSAMError(f"unknown training config key {'.'.join(here)!r}")
        current = base.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping) and here not in _REPLACE_KEYS:
            out[key] = _merge(current, value, here, strict and here not in _OPEN_KEYS)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_paths(value: Any, folder: Path) -> Any:
    """Make relative data/init paths absolute against ``folder`` (a model id like ``hsam-lite`` is left alone)."""
    if isinstance(value, dict):
        return {k: (_absolute(v, folder) if k in _PATH_KEYS and isinstance(v, str) else _resolve_paths(v, folder))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_paths(v, folder) for v in value]
    return value


def _absolute(value: str, folder: Path) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    candidate = folder / path
    # a bare name that is not a file there (e.g. a registered model id) stays as written
    if "/" not in value and "\\" not in value and not candidate.exists():
        return value
    return str(candidate.resolve())


def available_training_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=VALUE"`` -> (["a", "b"], VALUE parsed as JSON, or the raw string)."""
    if "=" not in text:
        raise HSAMError(f"--set needs KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip().split("."), value


def _nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def _find_config(name_or_path: str | Path) -> tuple[Path, Path]:
    """(file, folder its relative paths are resolved against) for a config file path or a shipped config name."""
    path = Path(name_or_path)
    shipped = CONFIG_DIR / f"{name_or_path}.json"
    if path.suffix == ".json" and path.is_file():
        return path, path.resolve().parent
    if shipped.is_file():
        return shipped, Path.cwd()
    raise HSAMError(f"no training config {str(name_or_path)!r}: give a JSON file or one of "
                    f"{', '.join(available_training_configs())}")


def _apply_file(config: dict, name_or_path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """Merge a config file onto ``config``; a file may name a base config with ``"extends": NAME_OR_PATH``
    (a path relative to the file), applied first."""
    path, folder = _find_config(name_or_path)
    if path.resolve() in seen:
        raise HSAMError(f"config {path} extends itself")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise HSAMError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise HSAMError(f"{path} must hold a JSON object")
    base = data.pop("extends", None)
    if base is not None:
        candidate = Path(base) if Path(base).is_absolute() else path.parent / base
        config = _apply_file(config, candidate if candidate.suffix == ".json" and candidate.is_file() else base,
                             seen + (path.resolve(),))
    return _merge(config, _resolve_paths(data, folder))


def load_training_config(name_or_path: str | Path | Mapping[str, Any] | None,
                         overrides: Iterable[str] = (), extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full config dict: defaults <- config file (and the configs it extends) <- ``extra`` <- ``--set``."""
    config = copy.deepcopy(DEFAULTS)
    if isinstance(name_or_path, Mapping):
        data = dict(name_or_path)
        base = data.pop("extends", None)
        if base is not None:
            config = _apply_file(config, base)
        config = _merge(config, _resolve_paths(data, Path.cwd()))
    elif name_or_path is not None:
        config = _apply_file(config, name_or_path)
    if extra:
        config = _merge(config, _resolve_paths(dict(extra), Path.cwd()))
    for text in overrides:
        keys, value = parse_override(text)
        config = _merge(config, _resolve_paths(_nest(keys, value), Path.cwd()))
    validate(config)
    return config


def with_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config saved by an older version, with the keys added since at their defaults: a key is added with the
    default that keeps the old behaviour, so an older run resumes under the config it actually ran with."""
    return _merge(DEFAULTS, saved, strict=False)


def validate(config: Mapping[str, Any]) -> None:
    """Range checks that do not need data or torch."""
    if not isinstance(config["epochs"], int) or config["epochs"] < 1:
        raise HSAMError(f"epochs must be a positive integer, got {config['epochs']!r}")
    if not isinstance(config["batch_size"], int) or config["batch_size"] < 1:
        raise HSAMError(f"batch_size must be a positive integer, got {config['batch_size']!r}")
    if config["optim"]["base_lr"] <= 0:
        raise HSAMError("optim.base_lr must be > 0")
    if config["embedding_noise"] < 0:
        raise HSAMError("embedding_noise must be >= 0")
    if not isinstance(config["validation"]["every"], int) or config["validation"]["every"] < 0:
        raise HSAMError("validation.every must be an integer >= 0")
    if not isinstance(config["checkpoint_every"], int) or config["checkpoint_every"] < 0:
        raise HSAMError(f"checkpoint_every must be an integer >= 0 (0: no epoch checkpoints), "
                        f"got {config['checkpoint_every']!r}")
    every_s = config["state_every_s"]
    if isinstance(every_s, bool) or not isinstance(every_s, (int, float)) or every_s < 0:
        raise HSAMError(f"state_every_s must be a number of seconds >= 0, got {every_s!r}")
    margin = config["guard"]["margin"]
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin < 0):
        raise HSAMError(f"guard.margin must be a Dice drop >= 0 or null, got {margin!r}")
    ratio = config["rehearsal"]["ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0:
        raise HSAMError(f"rehearsal.ratio must be a number >= 0, got {ratio!r}")
    slices = config["data"]["holdout"]["slices"]
    if isinstance(slices, bool) or not isinstance(slices, (int, float)) or not 0 <= slices < 1:
        raise HSAMError(f"data.holdout.slices must be a share of a case's slices in [0, 1), got {slices!r}")
    parts = {"image_encoder", "lora", "prompt_encoder", "mask_decoder", "mask_decoder2"}
    bad = set(config["model"]["freeze"]) - parts
    if bad:
        raise HSAMError(f"model.freeze names unknown parts {sorted(bad)}; use {sorted(parts)}")
    window = config["data"]["window"]
    if not (isinstance(window, list) and len(window) == 2 and window[1] > window[0]):
        raise HSAMError(f"data.window must be [low, high] with high > low, got {window!r}")
    train = config["data"]["train"]
    if train is not None and not (isinstance(train, Mapping) and "format" in train):
        raise HSAMError("data.train must be a data source object with a 'format' key")
