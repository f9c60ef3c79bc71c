"""Batches for one epoch: a seeded shuffle, the global batch split over DDP processes, per-sample seeded augmentation.

Every random draw of the data pipeline is a pure function of (seed, epoch, sample index), so a run gives the same
batches with any number of loader workers or processes, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from hsam.training.augment import AugmentConfig, make_sample
from hsam.training.data import SliceStore


class TrainingSlices(Dataset):
    """Items are addressed as ``(epoch, index)``; returns image [3,S,S], label [S,S], low_res_label [s,s]."""

    def __init__(self, store: SliceStore, img_size: int, low_res: int, augment: AugmentConfig | None, seed: int):
        self.store, self.img_size, self.low_res, self.augment, self.seed = store, img_size, low_res, augment, seed

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        image, label = self.store.get(index)
        rng = np.random.default_rng([self.seed, epoch, index]) if self.augment is not None else None
        img, lab, low = make_sample(image, label, self.img_size, self.low_res, rng, self.augment or AugmentConfig.off())
        return {"image": torch.from_numpy(img), "label": torch.from_numpy(lab), "low_res_label": torch.from_numpy(low),
                "index": torch.tensor(index)}

    def unknown_organs(self, indices) -> torch.Tensor:
        """int64 [B]: per sample a bitmask (bit c = organ c) of the organs its volume did not label (losses.py)."""
        return torch.tensor([sum(1 << c for c in self.store.unknown_organs(int(i))) for i in indices],
                            dtype=torch.int64)


def global_batches(n: int, batch_size: int, epoch: int, seed: int, world_size: int = 1) -> list[np.ndarray]:
    """The epoch's global batches (indices into the dataset): a shuffle seeded by (seed, epoch); the last batch may be
    short (as in the release, no drop_last) but is dropped when it has fewer samples than processes."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in batches if len(b) >= world_size]


def local_batch(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's share of a global batch (contiguous, sizes differ by at most one)."""
    return np.array_split(batch, world_size)[rank]


class EpochBatchSampler:
    """Batch sampler yielding this process's ``[(epoch, index), ...]`` lists for one epoch of ``batches``, the
    epoch's global batches (:func:`global_batches`, or :func:`hsam.training.rehearsal.rehearsal_batches`)."""

    def __init__(self, batches: list[np.ndarray], epoch: int, rank: int = 0, world_size: int = 1):
        self.batches = [local_batch(b, rank, world_size) for b in batches]
        self.global_sizes = [len(b) for b in batches]
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.batches:
            yield [(self.epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


def iterations_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch (the same in every epoch)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= max(1, world_size) else 0)
