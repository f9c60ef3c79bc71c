"""The authors' H-SAM checkpoints: downloaded (structure-checked where no hash is published), converted into our
format with their SAM base weights, and installed as a model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hsam.errors import HSAMError
from hsam.weights.cache import base_file, ensure_dir, partial_dir, sha256_file
from hsam.weights.download import Progress, download_file
from hsam.weights.manifest import ManifestEntry, load_manifest
from hsam.weights.store import install_folder
from hsam.weights.trust import trust_first_use


def _official_config(entry: ManifestEntry) -> Any:
    """The network an ``import-official`` entry's checkpoint must fit (backbone, input size, classes, LoRA rank)."""
    from hsam.model.config import ModelConfig

    classes = entry.extra.get("classes") or []
    return ModelConfig(backbone=entry.backbone, img_size=int(entry.extra.get("img_size", 512)),
                       num_classes=max(1, len(classes) - 1) if classes else 8,
                       lora_rank=int(entry.extra.get("lora_rank", 5)), cmattn="constant", keep_cmattn_tensors=True)


def download_official(entry: ManifestEntry, progress: Progress | None) -> Path:
    """Download an official checkpoint (its base weights must be there already), then convert and install it.

    A checkpoint without a published SHA-256 (the authors' Google Drive file) is checked for its exact structure
    (keys and shapes, read with ``weights_only=True``); its SHA-256 is recorded at the first download (trust on
    first use: a later download must match it) and written into the model card's provenance.
    """
    from hsam.model.official import check_official_file

    f = entry.files[0]
    config = _official_config(entry)
    path = download_file(f.url, f.name, f.sha256, size=f.size, progress=progress,  # type: ignore[arg-type]
                         verify=None if f.sha256 else (lambda candidate: check_official_file(candidate, config)))
    digest = sha256_file(path)
    trust = "published in the manifest" if f.sha256 else trust_first_use(path, f.name, digest)
    return import_official(path, None, entry.id, provenance={"url": f.url, "hsam_sha256_check": trust})


def import_official(
    hsam_checkpoint: str | os.PathLike[str],
    sam_checkpoint: str | os.PathLike[str] | None = None,
    model_id: str = "hsam-vitb-synapse",
    provenance: dict[str, str] | None = None,
) -> Path:
    """Convert an official H-SAM ``.pth`` (+ SAM base ``.pth``) into our format and install it as ``model_id``.

    The SAM base file defaults to the downloaded ``sam-vit-b``; it must match a SHA-256 in the manifest. Both files
    are read with ``torch.load(weights_only=True)`` by :func:`hsam.model.official.import_official`. ``provenance``
    is added to the card's ``source`` record (where the checkpoint came from, how its hash was checked).
    """
    from hsam.model.checkpoint import save_model
    from hsam.model.official import import_official as convert

    manifest = load_manifest()
    entry = manifest.get(model_id)
    hsam_path = Path(hsam_checkpoint)
    if not hsam_path.is_file():
        raise HSAMError(f"H-SAM checkpoint not found: {hsam_path}")
    if sam_checkpoint is None:
        base_id = (entry.requires[0] if entry and entry.requires else "sam-vit-b")
        found = base_file(base_id)
        if found is None:
            raise HSAMError(f"the SAM base weights are missing: run `hsam models download {base_id}` or pass --sam PATH")
        sam_path = found
    else:
        sam_path = Path(sam_checkpoint)
        if not sam_path.is_file():
            raise HSAMError(f"SAM checkpoint not found: {sam_path}")
    known = {f.sha256: e.id for e in manifest.values() if e.kind == "base" for f in e.files if f.sha256}
    digest = sha256_file(sam_path)
    if digest not in known:
        raise HSAMError(
            f"{sam_path.name} is not an official SAM base file (SHA-256 {digest[:12]}... is not in the manifest); "
            "download it with `hsam models download sam-vit-b`"
        )
    try:
        model, card = convert(str(hsam_path), str(sam_path), model_id)
    except HSAMError:
        raise
    except (KeyError, RuntimeError, ValueError) as error:
        raise HSAMError(f"{hsam_path.name} is not a compatible H-SAM checkpoint for {model_id}: {str(error)[:160]}") from None
    source = card.extra.setdefault("source", {})
    source.update({"sam_sha256": digest, **(provenance or {})})
    if entry is not None and entry.extra.get("orientation"):
        card.orientation = str(entry.extra["orientation"])
    ensure_dir(partial_dir())
    staging = Path(tempfile.mkdtemp(prefix=f"{model_id}-", dir=partial_dir()))
    try:
        save_model(model, card, staging)
        return install_folder(staging, model_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
