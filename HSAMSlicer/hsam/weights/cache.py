"""The downloads cache under ``HSAM_HOME``: verified raw files in ``downloads/``, downloads in progress in ``partial/``,
and the SHA-256 of a file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hsam.paths import hsam_home
from hsam.weights.manifest import load_manifest

CHUNK = 1 << 20


def downloads_dir() -> Path:
    """``HSAM_HOME/downloads``: verified raw files (base weights, official checkpoints)."""
    return hsam_home() / "downloads"


def partial_dir() -> Path:
    """``HSAM_HOME/partial``: downloads in progress (resumable); never read as finished files."""
    return hsam_home() / "partial"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_file(model_id: str) -> Path | None:
    """The verified local path of a base-weights entry's first file (``downloads/<name>``), or None if absent."""
    entry = load_manifest().get(model_id)
    if entry is None or not entry.files:
        return None
    path = downloads_dir() / entry.files[0].name
    return path if path.is_file() else None


def ensure_dir(folder: Path) -> Path:
    """``folder``, created with its parents if missing."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder
