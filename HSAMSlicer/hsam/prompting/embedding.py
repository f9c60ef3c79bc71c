"""TinyViT image embeddings of axial slices, cached per slice of one volume.

The prompt decoder reads LiteMedSAM's embedding of a slice windowed to [0, 1] and resized to 256 x 256: exactly the
input the demo model (H-SAM-Lite, frozen LiteMedSAM encoder) builds in :func:`hsam.pipeline.window.model_images` (the
issue-26 measurement found the same Dice with it as with LiteMedSAM's own padding preprocessing). An automatic run of
a Lite model hands its embeddings over: in the same process (:meth:`SliceEmbeddings.put`, the refine stage) or on
disk (:mod:`hsam.prompting.kept`, ``SliceEmbeddings.kept``), so they are not computed twice.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from torch import nn

from hsam.prompting.decoder import INPUT_SIZE
from hsam.prompting.kept import KeptEmbeddings

# LiteMedSAM's CT window (level 40, width 400), used when the model card's encoder is not LiteMedSAM's
LITEMEDSAM_WINDOW_HU = (-160.0, 240.0)
DEFAULT_CACHE_SLICES = 160  # 4 MB each: about 640 MB at most


def litemedsam_encoder() -> nn.Module:
    """LiteMedSAM's TinyViT with the installed, SHA-256-checked weights (for models with another backbone)."""
    from hsam.model.tiny_vit import TinyViT, load_litemedsam_encoder

    return load_litemedsam_encoder(TinyViT()).eval()


class SliceEmbeddings:
    """Embeddings [256, 64, 64] of the slices of one canonical volume [D, H, W] (HU), computed on demand.

    ``encoder``: a TinyViT (images [B,3,256,256] -> [B,256,64,64]); ``window_hu``: its intensity window. Keeps the
    ``max_slices`` most recently used embeddings (fp32, on the CPU); ``kept``: an automatic run's embeddings of this
    volume on disk, read before the encoder runs.
    """

    def __init__(self, volume: np.ndarray, encoder: nn.Module, window_hu: Sequence[float] = LITEMEDSAM_WINDOW_HU,
                 max_slices: int = DEFAULT_CACHE_SLICES, kept: KeptEmbeddings | None = None) -> None:
        self.volume = volume
        self.encoder = encoder
        self.window_hu = (float(window_hu[0]), float(window_hu[1]))
        self.max_slices = max(1, int(max_slices))
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.kept = kept
        self.computed = 0  # slices this object ran the encoder for (the rest came from the cache, put() or kept)

    def __contains__(self, z: int) -> bool:
        return int(z) in self._cache

    def items(self) -> list[tuple[int, torch.Tensor]]:
        """The cached (slice, embedding) pairs."""
        return list(self._cache.items())

    def put(self, z: int, embedding: torch.Tensor) -> None:
        """Store a slice's embedding [256,64,64] computed elsewhere (the automatic run's encoder pass)."""
        self._cache[int(z)] = embedding.detach().float().cpu()
        self._cache.move_to_end(int(z))
        while len(self._cache) > self.max_slices:
            self._cache.popitem(last=False)

    def get(self, z: int) -> torch.Tensor:
        """The embedding [256, 64, 64] of slice ``z`` (computed and cached on first use)."""
        z = int(z)
        if not 0 <= z < self.volume.shape[0]:
            raise IndexError(f"slice {z} is outside the volume (0..{self.volume.shape[0] - 1})")
        if z not in self._cache and self.kept is not None and z in self.kept:
            self.put(z, self.kept.get(z))
        elif z not in self._cache:
            from hsam.pipeline.window import model_images

            images = model_images(self.volume[z : z + 1], self.window_hu, INPUT_SIZE, torch.device("cpu"))
            with torch.inference_mode():
                self.put(z, self.encoder(images)[0])
            self.computed += 1
        self._cache.move_to_end(z)
        return self._cache[z]
