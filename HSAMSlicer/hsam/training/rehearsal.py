"""Rehearsal: slices of the cases the base model was validated on, mixed into every fine-tuning batch.

A few-shot fine-tune on one new patient pulls the decoders towards that patient and away from what the base model
was good at (issue 28 measured the demo model's reference Dice falling from 0.893 to 0.520 after 20 steps on ten
slices). Mixing slices of the base model's own data into every batch is the standard remedy. ``rehearsal.ratio``
sets how many: ``ceil(ratio * user samples)`` rehearsal samples are appended to each batch of user samples, so the
number of steps per epoch and the user's share of each epoch stay as without rehearsal. Rehearsal slices are taken in
a seeded order that walks through all of them before repeating, and go through the same augmentation as the user's.

The dataset index space is the user's slices first (``0 .. n_user-1``) and the rehearsal slices after them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from hsam.training.data import SliceStore
from hsam.training.loader import global_batches


class JoinedSlices(SliceStore):
    """The slices of several stores one after the other (user slices, then rehearsal slices)."""

    def __init__(self, stores: Sequence[SliceStore]) -> None:
        self.stores = list(stores)
        self.ids = [name for store in self.stores for name in store.ids]
        self._where = [(s, i) for s, store in enumerate(self.stores) for i in range(len(store))]

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        store, index = self._where[i]
        return self.stores[store].get(index)


def rehearsal_count(user_samples: int, ratio: float) -> int:
    """Rehearsal samples added to a batch of ``user_samples`` user samples: ``ceil(ratio * user_samples)``."""
    return math.ceil(ratio * user_samples - 1e-9) if ratio > 0 and user_samples > 0 else 0


def rehearsal_batches(n_user: int, n_rehearsal: int, batch_size: int, ratio: float, epoch: int, seed: int,
                      world_size: int = 1) -> list[np.ndarray]:
    """The epoch's global batches: the user batches of :func:`hsam.training.loader.global_batches` (same shuffle),
    each followed by its rehearsal indices (``n_user + j``), drawn from a seeded per-epoch walk over all rehearsal
    slices."""
    users = global_batches(n_user, batch_size, epoch, seed, world_size)
    if n_rehearsal == 0 or ratio <= 0:
        return users
    counts = [rehearsal_count(len(b), ratio) for b in users]
    rng = np.random.default_rng([seed, epoch, 0x8E4EA5])
    walk = np.concatenate([rng.permutation(n_rehearsal) for _ in range(math.ceil(sum(counts) / n_rehearsal))])
    batches, used = [], 0
    for batch, count in zip(users, counts):
        batches.append(np.concatenate([batch, n_user + walk[used:used + count]]))
        used += count
    return batches
