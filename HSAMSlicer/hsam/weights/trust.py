"""Trust on first use for files without a published SHA-256 (the authors' H-SAM checkpoint on Google Drive): the hash
of the first download is recorded in ``downloads/trusted-sha256.json`` and every later download must match it."""

from __future__ import annotations

import json
from pathlib import Path

from hsam import atomic
from hsam.errors import HSAMError
from hsam.weights.cache import downloads_dir

TRUSTED_FILE = "trusted-sha256.json"
"""In ``downloads/``: ``{file name: SHA-256}`` recorded at the first download of files without a published hash."""


def recorded_sha256(name: str) -> str | None:
    """The SHA-256 recorded when ``name`` (a manifest file without a published hash) was first downloaded here."""
    try:
        value = json.loads((downloads_dir() / TRUSTED_FILE).read_text(encoding="utf-8")).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _record_sha256(name: str, digest: str) -> None:
    path = downloads_dir() / TRUSTED_FILE
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known[name] = digest
    atomic.write_text(path, json.dumps(known, indent=1, sort_keys=True) + "\n")


def trust_first_use(path: Path, name: str, digest: str) -> str:
    """Check ``path`` (downloaded as ``name``, SHA-256 ``digest``) against the hash recorded at its first download here,
    recording it if there is none; returns how the hash was checked (for the model card). A mismatch deletes
    ``path`` and raises HSAMError."""
    recorded = recorded_sha256(name)
    if recorded is None:
        _record_sha256(name, digest)
        return "recorded at the first download on this computer (no published hash; structure checked)"
    if recorded != digest:
        path.unlink()
        raise HSAMError(
            f"{name} differs from the copy first downloaded on this computer (SHA-256 {digest[:12]}... != "
            f"recorded {recorded[:12]}...); the file was discarded; if its authors replaced it on purpose, remove "
            f"its line from {downloads_dir() / TRUSTED_FILE} and run the same command again"
        )
    return "matches the hash recorded at the first download on this computer (structure checked)"
