"""``hsam models list | download | import | import-official | remove``: manage the model cache (``$HSAM_HOME``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hsam.cli import progress
from hsam.errors import HSAMError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command and its sub-commands (no torch import here)."""
    parser = subparsers.add_parser("models", help="list, download, import and remove models",
                                   description="Manage segmentation models and base weights in $HSAM_HOME (~/.hsam).")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="models in the manifest and installed ones; * marks the default")
    listing.set_defaults(run=run_list)

    download = actions.add_parser("download", help="download a manifest entry (verified, resumable); for "
                                 "hsam-vitb-synapse also its SAM base, then convert and install it")
    download.add_argument("id")
    progress.add_option(download)
    download.set_defaults(run=run_download)

    imported = actions.add_parser("import", help="install a saved model folder (model.json + model.safetensors)")
    imported.add_argument("path")
    imported.add_argument("--id", default=None, help="id to install it as (default: the card's name)")
    progress.add_option(imported)
    imported.set_defaults(run=run_import)

    official = actions.add_parser("import-official", help="convert an official H-SAM .pth checkpoint and install it")
    official.add_argument("checkpoint", nargs="?", help="official H-SAM LoRA checkpoint, e.g. 220_epoch_299.pth")
    official.add_argument("--hsam", default=None, help="the same checkpoint given as an option")
    official.add_argument("--sam", default=None,
                          help="SAM base .pth (default: the downloaded sam-vit-b, downloaded first when missing)")
    official.add_argument("--id", "--name", dest="id", default="hsam-vitb-synapse", help="id to install it as")
    progress.add_option(official)
    official.set_defaults(run=run_import_official)

    remove = actions.add_parser("remove", help="delete an installed model or a downloaded base file")
    remove.add_argument("id")
    remove.set_defaults(run=run_remove)


def run_list(args: argparse.Namespace) -> int:
    """Print the manifest and installed models as a table."""
    from hsam.weights.cache import base_file
    from hsam.weights.manifest import load_manifest
    from hsam.weights.store import available_models

    manifest = load_manifest()
    installed = {m.id: m for m in available_models()}
    default = next(iter(installed), None)
    rows = []
    for entry in manifest.values():
        if entry.kind == "base":
            state = "downloaded" if base_file(entry.id) else "-"
        else:
            state = "installed" if entry.id in installed else "-"
        rows.append(("*" if entry.id == default else " ", entry.id, entry.kind, entry.backbone, state, entry.title))
    for model in installed.values():
        if model.id not in manifest:
            kind = "demo" if model.demo else "user"
            rows.append(("*" if model.id == default else " ", model.id, kind, model.backbone, "installed", model.title))
    widths = [max(len(r[i]) for r in rows + [("", "id", "kind", "backbone", "state", "")]) for i in range(5)]
    print(f"  {'id':<{widths[1]}}  {'kind':<{widths[2]}}  {'backbone':<{widths[3]}}  {'state':<{widths[4]}}  title")
    for row in rows:
        print(f"{row[0]} " + "  ".join(f"{v:<{w}}" for v, w in zip(row[1:5], widths[1:5])) + f"  {row[5]}")
    if default is None:
        print("no segmentation model installed: hsam models download ID, or hsam models import-official FILE.pth",
              file=sys.stderr)
    return 0


def run_download(args: argparse.Namespace) -> int:
    """Download a manifest entry with a byte progress bar."""
    from hsam.weights.fetch import fetch
    from hsam.weights.manifest import load_manifest

    entry = load_manifest().get(args.id)
    if entry is not None and entry.license_text:  # shown before anything is fetched (the Slicer module asks first)
        print(f"{args.id}: terms of use\n{entry.license_text}\n", file=sys.stderr)
    path = fetch(args.id, progress=progress.download_progress(args.reporter, args.id))
    args.reporter.close_bar()
    print(f"{args.id}: {path}")
    args.reporter.finished(id=args.id, path=str(path))
    return 0


def run_import(args: argparse.Namespace) -> int:
    """Install a saved model folder into the cache."""
    from hsam.weights.store import import_model

    args.reporter.status(f"Installing {args.path}", "install")
    folder = import_model(args.path, args.id)
    print(f"installed {folder}")
    args.reporter.finished(id=folder.name, path=str(folder))
    return 0


def run_import_official(args: argparse.Namespace) -> int:
    """Convert and install an official H-SAM checkpoint (downloading the SAM base weights first when missing)."""
    from hsam.weights.cache import base_file
    from hsam.weights.fetch import fetch
    from hsam.weights.manifest import load_manifest
    from hsam.weights.official import import_official

    if (args.checkpoint is None) == (args.hsam is None):
        raise HSAMError("give the official H-SAM checkpoint once: hsam models import-official FILE.pth (or --hsam FILE.pth)")
    if not Path(args.checkpoint or args.hsam).is_file():
        raise HSAMError(f"H-SAM checkpoint not found: {args.checkpoint or args.hsam}")
    if args.sam is None:
        entry = load_manifest().get(args.id)
        base_id = entry.requires[0] if entry is not None and entry.requires else "sam-vit-b"
        if base_file(base_id) is None:
            fetch(base_id, progress=progress.download_progress(args.reporter, f"the {base_id} base weights"))
            args.reporter.close_bar()
    args.reporter.status(f"Converting {args.checkpoint or args.hsam} to an HSAMSlicer model", "install")
    folder = import_official(args.checkpoint or args.hsam, args.sam, args.id)
    print(f"installed {folder}")
    args.reporter.finished(id=folder.name, path=str(folder))
    return 0


def run_remove(args: argparse.Namespace) -> int:
    """Remove an installed model or base file."""
    from hsam.weights.store import remove_model

    print(f"removed {remove_model(args.id)}")
    return 0
