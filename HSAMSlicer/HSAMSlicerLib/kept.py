"""Where a finished automatic run's slice embeddings wait for the prompt process of the same CT (issue 26).

The segmentation job keeps them in its own folder (``hsam segment --keep-embeddings``); when its result is applied,
they move to one folder per volume node under the jobs root, which the prompt process is pointed at (it checks that
they match the CT it opened). Removing the volume or closing the scene removes them; the start-up sweep removes those a
crash left (``job-*``). Torch-free: Slicer's process only moves folders.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

INDEX = "index.json"  # hsam.prompting.kept.INDEX (that module imports torch, which Slicer's process never does)
PREFIX = "job-embeddings-"


def folder_of(root: Path, volume_id: str) -> Path:
    """The kept-embeddings folder of a volume node."""
    return Path(root) / (PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "_", volume_id))


def take(found: str | Path, root: Path, volume_id: str) -> Path | None:
    """Move a job's kept embeddings (``found``, with its index) into the volume's folder, replacing older ones;
    returns that folder, or None when ``found`` holds none."""
    found = Path(found)
    if not (found / INDEX).is_file():
        return None
    target = folder_of(root, volume_id)
    shutil.rmtree(target, ignore_errors=True)
    if target.exists():  # Windows: the prompt process still maps the older ones (their fingerprints say what they are)
        return None
    shutil.move(str(found), str(target))
    return target


def stamp(root: Path, volume_id: str) -> float | None:
    """When the volume's kept embeddings were committed (their index's time), or None when there are none."""
    try:
        return (folder_of(root, volume_id) / INDEX).stat().st_mtime
    except OSError:
        return None


def forget(root: Path, volume_id: str | None = None) -> None:
    """Remove the kept embeddings of one volume node (every volume's when None)."""
    folders = [folder_of(root, volume_id)] if volume_id is not None else Path(root).glob(PREFIX + "*")
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
