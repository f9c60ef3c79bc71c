"""Seeded splits: few-shot slice subsets (H-SAM's "10% of slices"), held-out validation volumes, and held-out
slices spread over z when a fine-tune has a single case.

The released 10% list (``train_220.txt``) was drawn without a seed; here the seed, the fraction and the per-organ slice
counts are written next to the list so a split can be reproduced and audited.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hsam import atomic
from hsam.errors import HSAMError
from hsam.training.data import SliceStore, Volume


@dataclass(frozen=True)
class Split:
    """A chosen list of slice names (repeats = oversampling) and how it was made."""

    names: list[str]
    meta: dict


def few_shot_split(
    store: SliceStore,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 2345,
    oversample_rare: float = 0.0,
    max_repeat: int = 4,
) -> Split:
    """Choose ``fraction`` (or ``count``) of the slices uniformly at random with ``seed``.

    ``oversample_rare`` > 0 repeats the chosen slices that show a rare organ: every organ present in fewer than
    ``oversample_rare * n`` chosen slices has its slices repeated until it reaches that share (at most ``max_repeat``
    copies of a slice). Background-only slices stay in, as in the released split.
    """
    total = len(store)
    if total == 0:
        raise HSAMError("no slices to split")
    if count is None:
        if fraction is None or not 0 < fraction <= 1:
            raise HSAMError(f"few-shot fraction must be in (0, 1], got {fraction}")
        count = max(1, int(round(fraction * total)))
    if not 1 <= count <= total:
        raise HSAMError(f"few-shot count must be between 1 and {total}, got {count}")
    rng = np.random.default_rng(seed)
    chosen = sorted(int(i) for i in rng.choice(total, size=count, replace=False))
    organs = {i: store.organs(i) for i in chosen}
    presence = _presence(organs.values())
    repeats = {i: 1 for i in chosen}
    if oversample_rare > 0:
        target = oversample_rare * count
        for organ, n in presence.items():
            if n < target:
                factor = min(max_repeat, math.ceil(target / n))
                for i in chosen:
                    if organ in organs[i]:
                        repeats[i] = max(repeats[i], factor)
    names = [store.ids[i] for i in chosen for _ in range(repeats[i])]
    meta = {
        "seed": seed,
        "fraction": fraction,
        "count": count,
        "of_total": total,
        "oversample_rare": oversample_rare,
        "max_repeat": max_repeat,
        "entries_after_oversampling": len(names),
        "slices_per_organ": {str(k): v for k, v in sorted(presence.items())},
        "background_only_slices": sum(1 for i in chosen if not organs[i]),
    }
    return Split(names, meta)


def _presence(organ_sets) -> dict[int, int]:
    presence: dict[int, int] = {}
    for present in organ_sets:
        for organ in present:
            presence[organ] = presence.get(organ, 0) + 1
    return presence


def split_cases(names: Sequence[str], fraction: float = 0.0, count: int | None = None,
                seed: int = 2345) -> tuple[list[str], list[str]]:
    """``(train, held_out)`` case names: ``count`` (or ``round(fraction * n)``) cases held out, chosen with ``seed``.

    At least one case always stays for training.
    """
    names = list(names)
    n_out = count if count is not None else int(round(fraction * len(names)))
    n_out = max(0, min(n_out, len(names) - 1))
    if n_out == 0:
        return names, []
    rng = np.random.default_rng(seed)
    out = set(int(i) for i in rng.choice(len(names), size=n_out, replace=False))
    return [n for i, n in enumerate(names) if i not in out], [n for i, n in enumerate(names) if i in out]


def write_list(path: str | os.PathLike[str], names: Sequence[str], meta: dict | None = None) -> Path:
    """Write a list file (one name per line, TransUNet style) and, with ``meta``, a ``.json`` beside it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(target, "".join(f"{n}\n" for n in names))
    if meta is not None:
        atomic.write_text(target.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return target


def spread_indices(depth: int, count: int) -> list[int]:
    """``count`` slice indices of ``depth`` spread evenly over z (the middle of each of ``count`` equal parts)."""
    count = max(0, min(count, depth - 1))
    return sorted({int((i + 0.5) * depth / count) for i in range(count)}) if count else []


def hold_out_slices(volumes: Sequence[Volume], fraction: float) -> tuple[list[Volume], list[Volume], dict]:
    """Split each volume along z: ``round(fraction * depth)`` slices (at least 1 when ``fraction`` > 0, never all),
    spread over z by :func:`spread_indices`, go to a held-out volume ``<name>_heldout``; the rest stay for training.
    Returns ``(train volumes, held-out volumes, {case: held-out z list})``; used when a user gives a single case, so
    early stopping and the held-out figure come from the same patient without a second case."""
    train, held, where = [], [], {}
    for volume in volumes:
        depth = volume.image.shape[0]
        out = spread_indices(depth, max(1, int(round(fraction * depth)))) if fraction > 0 else []
        if not out:
            train.append(volume)
            continue
        keep = [z for z in range(depth) if z not in set(out)]
        train.append(Volume(volume.name, volume.image[keep], volume.label[keep], volume.spacing, volume.source))
        held.append(Volume(f"{volume.name}_heldout", volume.image[out], volume.label[out], volume.spacing,
                           volume.source))
        where[volume.name] = out
    return train, held, where
