"""The models installed on this computer (``HSAM_HOME/models/<id>``) and the ones bundled in the package: list, pick the
default, verify, install atomically, remove, resolve an id or a path, load."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsam.errors import HSAMError
from hsam.paths import hsam_home
from hsam.weights.cache import downloads_dir, ensure_dir, sha256_file
from hsam.weights.manifest import load_manifest

if TYPE_CHECKING:  # pragma: no cover
    from hsam.model.checkpoint import ModelCard
    from hsam.model.hsam import HSAM

MODEL_FILES = ("model.safetensors", "model.json")


def models_dir() -> Path:
    """``HSAM_HOME/models``: one folder per installed model."""
    return hsam_home() / "models"


def bundled_models_dir() -> Path:
    """``hsam/bundled_models``: models shipped inside the package (the H-SAM-Lite demo), available offline after
    ``pip install`` (package data) and in the Slicer extension (its CMake copies ``hsam/**/*.safetensors``) without
    any download. Read-only: an installed model with the same id takes precedence."""
    return Path(__file__).resolve().parents[1] / "bundled_models"


def _model_folders() -> list[Path]:
    """Installed model folders, then bundled ones whose id is not installed."""
    folders = sorted(models_dir().iterdir()) if models_dir().is_dir() else []
    installed = {path.name for path in folders}
    bundled = bundled_models_dir()
    if bundled.is_dir():
        folders += [path for path in sorted(bundled.iterdir()) if path.is_dir() and path.name not in installed]
    return folders


@dataclass(frozen=True)
class InstalledModel:
    """An installed model folder and what its card says (read as JSON, no torch import)."""

    id: str
    path: Path
    title: str
    backbone: str
    img_size: int
    priority: int
    demo: bool
    card: dict[str, Any]


def _read_card(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


_BACKBONE_RANK = {"vit_h": 4, "vit_l": 3, "vit_b": 2, "tiny_vit": 1}


def available_models() -> list[InstalledModel]:
    """Installed models, most accurate first: manifest priority, then backbone size; demo models last."""
    manifest = load_manifest()
    if models_dir().is_dir():
        _tidy_models_dir(models_dir())
    found = []
    for path in _model_folders():
        if path.name.startswith("."):
            continue  # an install in progress or one that was killed (see _tidy_models_dir), never a model
        card = _read_card(path)
        if card is None or not (path / "model.safetensors").is_file():
            continue
        entry = manifest.get(path.name)
        demo = bool(card.get("demo", False))
        priority = entry.priority if entry else int(card.get("priority", 0) or 0)
        found.append(
            InstalledModel(
                id=path.name,
                path=path,
                title=str(card.get("title") or (entry.title if entry else path.name)),
                backbone=str(card.get("backbone", "")),
                img_size=int(card.get("img_size", 0) or 0),
                priority=priority - (1000 if demo else 0),
                demo=demo,
                card=card,
            )
        )
    found.sort(key=lambda m: (m.priority, _BACKBONE_RANK.get(m.backbone, 0), m.id), reverse=True)
    return found


def default_model_id() -> str:
    """The most accurate installed model's id; HSAMError (with what to do) when none is installed."""
    models = available_models()
    if not models:
        raise HSAMError(
            "no segmentation model is installed; see `hsam models list`, then `hsam models download ID` "
            "or `hsam models import-official H-SAM.pth` (or pass --model PATH)"
        )
    return models[0].id


def verify_model_folder(folder: Path) -> None:
    """Check that ``folder`` holds model.json + model.safetensors and that the tensors match the card's SHA-256."""
    tensors = folder / "model.safetensors"
    card = _read_card(folder)
    if card is None or not tensors.is_file():
        raise HSAMError(f"{folder} is not a model folder (needs model.json and model.safetensors)")
    expected = str(card.get("sha256") or "").lower()
    if not expected:
        raise HSAMError(f"model card {folder / 'model.json'} has no sha256; re-export the model with hsam")
    actual = sha256_file(tensors)
    if actual != expected:
        raise HSAMError(
            f"{tensors} does not match its card (SHA-256 {actual[:12]}... != {expected[:12]}...); "
            "the file is corrupt or was changed: export or download it again"
        )


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _tidy_models_dir(folder: Path) -> None:
    """Repair what an install killed mid-way (SIGKILL, power loss) left in ``models/``.

    ``.staging-<host>-<pid>-<id>-*`` is a copy in progress, ``.old-<host>-<pid>-<id>-*/<id>`` the copy it replaces.
    For installs of this host whose process is gone: a replaced copy whose successor never arrived (killed between
    the two renames) is moved back, and the leftovers are deleted. Running installs and other hosts are left alone.
    """
    host = _host_tag()
    try:
        leftovers = [p for p in folder.iterdir() if p.name.startswith((f".staging-{host}-", f".old-{host}-"))]
    except OSError:
        return
    for path in leftovers:
        try:
            os.kill(int(path.name.split("-")[2]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        if path.name.startswith(".old-") and path.is_dir():
            for inner in path.iterdir():
                if not (folder / inner.name).exists():
                    os.replace(inner, folder / inner.name)
        shutil.rmtree(path, ignore_errors=True)


def install_folder(source: Path, model_id: str) -> Path:
    """Verify a model folder and copy it into ``models/<id>`` atomically (replacing an older copy)."""
    verify_model_folder(source)
    target = models_dir() / model_id
    ensure_dir(models_dir())
    _tidy_models_dir(models_dir())
    tag = f"{_host_tag()}-{os.getpid()}-{model_id}-"  # lets a later run tell a dead install from a running one
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{tag}", dir=models_dir()))
    try:
        for name in MODEL_FILES:
            shutil.copy2(source / name, staging / name)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{tag}", dir=models_dir()))
            os.replace(target, old / model_id)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _valid_id(model_id: str) -> str:
    if not model_id or any(c in model_id for c in "/\\:") or model_id.startswith("."):
        raise HSAMError(f"invalid model id {model_id!r}: use letters, digits, '-', '_' and '.'")
    return model_id


def import_model(source: str | os.PathLike[str], model_id: str | None = None) -> Path:
    """Install a saved model (a folder with model.json + model.safetensors, or either file in it) into the cache."""
    path = Path(source)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise HSAMError(f"model not found: {source}")
    card = _read_card(path)
    if card is None:
        raise HSAMError(f"{path} has no readable model.json; give a folder written by hsam (save_model / hsam finetune)")
    return install_folder(path, _valid_id(model_id or str(card.get("name") or path.name)))


def remove_model(model_id: str) -> Path:
    """Delete an installed model folder or a downloaded base file; returns what was removed."""
    folder = models_dir() / _valid_id(model_id)
    if folder.is_dir():
        shutil.rmtree(folder)
        return folder
    entry = load_manifest().get(model_id)
    if entry is not None and entry.kind == "base":
        removed = [downloads_dir() / f.name for f in entry.files if (downloads_dir() / f.name).is_file()]
        for path in removed:
            path.unlink()
        if removed:
            return removed[0]
    raise HSAMError(f"{model_id} is not installed (see: hsam models list)")


def needs_download(model_id: str) -> bool:
    """True for a manifest model that is not installed yet and can be downloaded (paths and installed ids: False)."""
    if "/" in model_id or "\\" in model_id or (models_dir() / model_id / "model.json").is_file():
        return False
    if (bundled_models_dir() / model_id / "model.json").is_file():
        return False
    entry = load_manifest().get(model_id)
    return entry is not None and entry.kind == "hsam" and entry.verified_download


def resolve_model(id_or_path: str | os.PathLike[str] | None = None) -> tuple[str, Path]:
    """``(model id, folder)`` for an installed id, a model folder or a model file; None means the default model."""
    if id_or_path is None:
        model_id = default_model_id()
        installed = models_dir() / model_id
        return model_id, installed if installed.is_dir() else bundled_models_dir() / model_id
    text = str(id_or_path)
    if models_dir().is_dir():
        _tidy_models_dir(models_dir())
    installed = models_dir() / text
    if "/" not in text and "\\" not in text and (installed / "model.json").is_file():
        return text, installed
    bundled = bundled_models_dir() / text
    if "/" not in text and "\\" not in text and not text.startswith(".") and (bundled / "model.json").is_file():
        return text, bundled
    path = Path(text).expanduser()
    if path.exists():
        folder = path.parent if path.is_file() else path
        return (str((_read_card(folder) or {}).get("name") or folder.name)), folder
    manifest = load_manifest()
    if text in manifest:
        raise HSAMError(f"model {text} is not installed; run `hsam models download {text}` (see: hsam models list)")
    raise HSAMError(f"no model {text!r}: not an installed id and not a path (see: hsam models list)")


def load_named_model(id_or_path: str | os.PathLike[str] | None = None, device: str = "cpu") -> tuple["HSAM", "ModelCard"]:
    """Load an installed model by id, or a saved model by path (the default model when None).

    :func:`hsam.model.checkpoint.load_model` checks the tensors' SHA-256 against the card on every load.
    """
    from hsam.model.checkpoint import load_model

    _, folder = resolve_model(id_or_path)
    try:
        return load_model(folder, device=device)
    except HSAMError:
        raise
    except (KeyError, RuntimeError, ValueError, OSError) as error:
        raise HSAMError(f"could not load the model in {folder}: {str(error)[:200]}") from None
