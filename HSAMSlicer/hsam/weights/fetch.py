"""``hsam models download``: every file of a manifest entry, downloaded, verified and installed."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hsam.errors import HSAMError
from hsam.weights.cache import ensure_dir, partial_dir
from hsam.weights.download import Progress, download_file
from hsam.weights.manifest import load_manifest
from hsam.weights.official import download_official
from hsam.weights.store import MODEL_FILES, install_folder

def fetch(model_id: str, progress: Progress | None = None) -> Path:
    """Download every file of a manifest entry; returns the installed model folder or the downloaded base file.

    Entries of kind ``hsam`` whose files are ``model.safetensors`` + ``model.json`` are installed as a model.
    Entries whose files have no URL raise HSAMError saying where to get them and what to run.
    """
    manifest = load_manifest()
    if model_id not in manifest:
        raise HSAMError(f"unknown model {model_id!r}; known: {', '.join(manifest)} (see: hsam models list)")
    entry = manifest[model_id]
    missing = [f for f in entry.files if not f.url or not (f.sha256 or f.check)]
    if missing:
        f = missing[0]
        how = {
            "import-official": f"then run: hsam models import-official {f.name}",
            "pip": "nothing to import: hsam reads it from the installed package",
        }.get(entry.install, "then run: hsam models import PATH")
        needs = f" (it also needs: hsam models download {' '.join(entry.requires)})" if entry.requires else ""
        raise HSAMError(f"{model_id} cannot be downloaded automatically: get {f.name} from {f.where or entry.homepage}, {how}{needs}")
    if entry.install == "import-official":
        for base in entry.requires:
            fetch(base, progress)
        return download_official(entry, progress)
    if entry.kind == "hsam" and {f.name for f in entry.files} == set(MODEL_FILES):
        staging = Path(tempfile.mkdtemp(prefix=f"{model_id}-", dir=ensure_dir(partial_dir())))
        try:
            for f in entry.files:
                download_file(f.url, f"{model_id}-{f.name}", f.sha256, size=f.size, progress=progress,  # type: ignore[arg-type]
                              destination=staging / f.name)
            return install_folder(staging, model_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    paths = [download_file(f.url, f.name, f.sha256, size=f.size, progress=progress) for f in entry.files]  # type: ignore[arg-type]
    return paths[0]
