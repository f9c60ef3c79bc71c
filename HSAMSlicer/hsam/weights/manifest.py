"""The model manifest (``Resources/models.json``, or ``$HSAM_MANIFEST``): which models and base weights exist, where
to get their files and how to check them."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsam.errors import HSAMError
from hsam.paths import resources_dir

MANIFEST_ENV = "HSAM_MANIFEST"
"""Environment variable naming another manifest JSON (a mirror, or a test server)."""
MANIFEST_FILENAME = "models.json"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class ManifestFile:
    """One file of a manifest entry: where to get it and how to check it."""

    name: str
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    where: str | None = None  # how to obtain it by hand when there is no url
    check: str | None = None  # "hsam-official": no published SHA-256; structure-checked, hash recorded at first download


@dataclass(frozen=True)
class ManifestEntry:
    """A model (kind ``"hsam"``) or base weights (kind ``"base"``) listed in ``Resources/models.json``."""

    id: str
    title: str
    kind: str
    backbone: str
    priority: int = 0
    install: str = "download"  # "download" | "import-official" | "pip"
    license: str = ""
    license_text: str = ""  # terms a user must see and accept before the download (empty: none to accept)
    homepage: str = ""
    requires: tuple[str, ...] = ()
    files: tuple[ManifestFile, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def downloadable(self) -> bool:
        """Whether ``hsam models download <id>`` can get every file (a URL and a SHA-256 or a structure check)."""
        return bool(self.files) and all(f.url and (f.sha256 or f.check) for f in self.files)

    @property
    def verified_download(self) -> bool:
        """Whether every file has a URL and a published SHA-256: the download can be repeated to the same bytes, so it
        may happen without asking (first use) and the installed copy may be deleted and fetched again."""
        return bool(self.files) and all(f.url and f.sha256 for f in self.files)


def manifest_path() -> Path:
    """``$HSAM_MANIFEST`` if set, else the shipped ``Resources/models.json``."""
    override = os.environ.get(MANIFEST_ENV)
    return Path(override) if override else resources_dir() / MANIFEST_FILENAME


def load_manifest(path: str | os.PathLike[str] | None = None) -> dict[str, ManifestEntry]:
    """Read the manifest into ``{id: ManifestEntry}`` (insertion order kept)."""
    source = Path(path) if path else manifest_path()
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise HSAMError(f"cannot read the model manifest {source}: {error}") from None
    try:
        entries: dict[str, ManifestEntry] = {}
        known = {"id", "title", "kind", "backbone", "priority", "install", "license", "license_text", "homepage",
                 "requires", "files"}
        for item in data.get("models", []):
            files = tuple(ManifestFile(**{k: f.get(k) for k in ("name", "url", "size", "sha256", "where", "check")})
                          for f in item.get("files", []))
            entries[item["id"]] = ManifestEntry(
                id=item["id"],
                title=item.get("title", item["id"]),
                kind=item.get("kind", "hsam"),
                backbone=item.get("backbone", ""),
                priority=int(item.get("priority", 0)),
                install=item.get("install", "download"),
                license=item.get("license", ""),
                license_text=item.get("license_text", ""),
                homepage=item.get("homepage", ""),
                requires=tuple(item.get("requires", ())),
                files=files,
                extra={k: v for k, v in item.items() if k not in known},
            )
    except (KeyError, TypeError, AttributeError, ValueError) as error:  # a damaged or hostile mirror manifest
        raise HSAMError(f"the model manifest {source} is malformed ({type(error).__name__}: {str(error)[:80]})") from None
    for entry in entries.values():
        for f in entry.files:  # a file without a published hash is only accepted where its structure can be checked
            if f.check is not None and (f.check != "hsam-official" or entry.install != "import-official"):
                raise HSAMError(f"the model manifest {source}: {entry.id}/{f.name} has check {f.check!r}; only "
                                "'hsam-official' on an import-official entry is known")
    for entry in entries.values():  # ids and file names become paths in the cache: no separators, no dot files
        for name in (entry.id, *(f.name for f in entry.files)):
            if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
                raise HSAMError(f"the model manifest {source} names {name!r}: not a plain file name; fix the manifest")
    return entries
