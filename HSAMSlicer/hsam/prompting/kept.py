"""Slice embeddings kept on disk by an automatic run, for the prompt tools (issue 26: "keep them").

``hsam segment --keep-embeddings DIR`` writes the TinyViT embedding [256, 64, 64] of every slice its encoder ran on
(float16, ``DIR/slices.npy``, one row per canonical slice) and, last, ``DIR/index.json``: the slices written and the
fingerprints of the canonical volume, the encoder's weights and the window. ``hsam serve`` (``"embeddings"`` in its
"open" request) and ``hsam prompt --embeddings DIR`` read a slice from there instead of running the encoder (0.6 s a
slice on 2 CPU cores) only when all three fingerprints match what they opened; anything else is ignored with a reason.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from hsam.atomic import write_text

FORMAT = "hsam-slice-embeddings/1"
INDEX, ARRAY = "index.json", "slices.npy"


def volume_fingerprint(volume: np.ndarray) -> str:
    """SHA-256 of a canonical volume [D, H, W]: its shape and its values as float32 (any stored type)."""
    digest = hashlib.sha256(repr(tuple(volume.shape)).encode())
    for plane in volume:  # a slice at a time: no float32 copy of a whole CT
        digest.update(np.ascontiguousarray(plane, dtype=np.float32).tobytes())
    return digest.hexdigest()


def encoder_fingerprint(encoder: nn.Module) -> str:
    """SHA-256 of an encoder's weights (names and float32 values): another encoder makes other embeddings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def identity(volume: np.ndarray, encoder: nn.Module, window_hu: Sequence[float]) -> dict:
    """What a kept embedding depends on: the volume, the encoder and the window."""
    return {"volume": volume_fingerprint(volume), "encoder": encoder_fingerprint(encoder),
            "window": [float(window_hu[0]), float(window_hu[1])]}


class EmbeddingWriter:
    """Writes the embeddings of one canonical volume [D, H, W] as they are computed; :meth:`close` commits them.

    The old index is removed first, so no reader trusts the folder while it is rewritten; the index is written
    last (atomically), naming only the slices written.
    """

    def __init__(self, folder: str | Path, volume: np.ndarray, encoder: nn.Module, window_hu: Sequence[float]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / INDEX).unlink(missing_ok=True)
        self.depth = int(volume.shape[0])
        self.identity = identity(volume, encoder, window_hu)
        self.slices: set[int] = set()
        self._array: np.ndarray | None = None

    def put(self, slices: Sequence[int], embeddings: torch.Tensor) -> None:
        """Store embeddings [b, C, h, w] of canonical ``slices`` (b numbers)."""
        if self._array is None:
            shape = (self.depth,) + tuple(embeddings.shape[1:])
            self._array = np.lib.format.open_memmap(self.folder / ARRAY, mode="w+", dtype=np.float16, shape=shape)
        self._array[list(slices)] = embeddings.detach().float().cpu().numpy().astype(np.float16)
        self.slices.update(int(z) for z in slices)

    def close(self) -> Path:
        """Flush the slices and write the index; returns the folder."""
        if self._array is not None:
            self._array.flush()
            self._array = None
        write_text(self.folder / INDEX, json.dumps({"format": FORMAT, **self.identity, "depth": self.depth,
                                                    "slices": sorted(self.slices)}))
        return self.folder


class KeptEmbeddings:
    """The embeddings an automatic run kept for this volume, read a slice at a time (memory-mapped)."""

    def __init__(self, array: np.ndarray, slices: Sequence[int]) -> None:
        self.array = array
        self.slices = frozenset(int(z) for z in slices)

    def __contains__(self, z: int) -> bool:
        return int(z) in self.slices

    def __len__(self) -> int:
        return len(self.slices)

    def get(self, z: int) -> torch.Tensor:
        """The embedding [C, h, w] (float32) of slice ``z``."""
        return torch.from_numpy(np.asarray(self.array[int(z)], dtype=np.float32))

    @classmethod
    def open(cls, folder: str | Path, volume: np.ndarray, encoder: nn.Module, window_hu: Sequence[float]
             ) -> tuple["KeptEmbeddings | None", str]:
        """(the kept embeddings, "") when ``folder`` holds them for exactly this volume, encoder and window; else
        (None, why not)."""
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, f"no kept embeddings in {folder} (an automatic run writes them with --keep-embeddings)"
        except (OSError, ValueError) as error:
            return None, f"kept embeddings in {folder} are unreadable ({error})"
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            return None, f"{folder / INDEX} is not an index of kept embeddings ({FORMAT})"
        wanted = identity(volume, encoder, window_hu)
        differ = [key for key in ("volume", "encoder", "window") if index.get(key) != wanted[key]]
        if differ:
            return None, f"kept embeddings in {folder} were made for another {' and '.join(differ)}"
        try:
            array = np.load(folder / ARRAY, mmap_mode="r")
        except (OSError, ValueError) as error:
            return None, f"kept embeddings in {folder} are unreadable ({error})"
        slices = [z for z in index.get("slices", []) if isinstance(z, int) and 0 <= z < len(array)]
        if array.shape[0] != volume.shape[0]:
            return None, f"kept embeddings in {folder} have {array.shape[0]} slices, the volume {volume.shape[0]}"
        return cls(array, slices), ""
