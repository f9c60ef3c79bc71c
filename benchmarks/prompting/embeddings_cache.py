"""On-disk cache of slice embeddings for the benchmarks (float16, one file per case), so that reruns skip the
encoder. Delete the folder to recompute; the numbers in RESULTS.md were made through this cache."""

from __future__ import annotations

from pathlib import Path

import torch

from hsam.prompting.embedding import SliceEmbeddings
from hsam.prompting.zoom import Frame, FrameEmbeddings


def load_into(embeddings: SliceEmbeddings, folder: Path | None, name: str) -> int:
    """Put the cached embeddings of case ``name`` into ``embeddings``; returns how many."""
    path = None if folder is None else Path(folder) / f"{name}.pt"
    if path is None or not path.is_file():
        return 0
    stored = torch.load(path, map_location="cpu", weights_only=True)
    for z, value in stored.items():
        embeddings.put(int(z), value.float())
    return len(stored)


def save_from(embeddings: SliceEmbeddings, folder: Path | None, name: str) -> None:
    """Save every embedding ``embeddings`` holds (float16) for case ``name``."""
    if folder is None:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / f"{name}.pt"
    previous = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else {}
    previous.update({z: value.half() for z, value in embeddings.items()})
    torch.save(previous, path)


def _frames_path(folder: Path, name: str, tag: str) -> Path:
    return Path(folder) / f"{name}-frames-{tag}.pt"


def load_frames_into(frames: FrameEmbeddings, folder: Path | None, name: str, tag: str) -> int:
    """Put the cached crop embeddings of case ``name`` (one file per zoom setting ``tag``) into ``frames``."""
    if folder is None or not _frames_path(folder, name, tag).is_file():
        return 0
    stored = torch.load(_frames_path(folder, name, tag), map_location="cpu", weights_only=True)
    for key, value in stored.items():
        z, top, left, height, width = (int(v) for v in key.split(":"))
        frames.put(z, Frame(top, left, height, width), value.float())
    return len(stored)


def save_frames_from(frames: FrameEmbeddings, folder: Path | None, name: str, tag: str) -> None:
    """Save every crop embedding ``frames`` holds (float16) for case ``name`` and zoom setting ``tag``."""
    if folder is None:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    stored = {f"{z}:{f.top}:{f.left}:{f.height}:{f.width}": value.half() for (z, f), value in frames.items()}
    torch.save(stored, _frames_path(folder, name, tag))
