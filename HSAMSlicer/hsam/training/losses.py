"""H-SAM's training loss (hsam-model.md §2.3): per stage 0.1·CE + 0.9·soft Dice, stages mixed by w = 0.6^(0.99^epoch).

The soft Dice is computed over the whole (global) batch per class, with a squared-sum denominator and smoothing
1e-5, then averaged over all classes including background. Under DDP the per-class sums are all-reduced with
autograd support, so a run on N processes optimises exactly the loss of one process with the same global batch.

Partial labels (``unknown``: per sample a bitmask of organs nobody labelled, e.g. a liver-only export): such an organ
may be anywhere in the "background" of that sample, so the loss never calls it background. Cross entropy scores a
background voxel by the summed probability of background and the unknown organs (the marginal loss of Shi et al.,
MedIA 2021); Dice merges them into background the same way and leaves the unknown organs out of that sample's sums.
With no unknown organ both are exactly the losses above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossConfig:
    ce_weight: float = 0.1
    dice_weight: float = 0.9
    stage_weight_base: float = 0.6  # w = base ** (decay ** epoch)
    stage_weight_decay: float = 0.99
    smooth: float = 1e-5

    @classmethod
    def from_dict(cls, data: dict | None) -> "LossConfig":
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            from hsam.errors import HSAMError

            raise HSAMError(f"unknown loss setting(s) {sorted(unknown)} in the training config")
        return cls(**data)


def stage_weight(epoch: int, base: float = 0.6, decay: float = 0.99) -> float:
    """Weight of the stage-2 loss at ``epoch`` (from 0): 0.60 at 0, 0.83 at 100, 0.975 at 299."""
    return base ** (decay**epoch)


_REDUCE_GROUP = None  # a process group of its own, so these all-reduces never interleave with DDP's bucket ones


def use_reduce_group(group) -> None:
    """Set the process group the Dice sums are all-reduced over (the trainer makes one per run; None = default)."""
    global _REDUCE_GROUP
    _REDUCE_GROUP = group


def _global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all DDP processes with a gradient (identity when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(tensor, group=_REDUCE_GROUP or dist.group.WORLD)
    return tensor


def unknown_classes(unknown: torch.Tensor | None, classes: int) -> torch.Tensor | None:
    """bool [B, K]: class c is unknown in sample b (bit c of ``unknown[b]``, int64 [B]); background never is. None when
    no sample has an unknown class."""
    if unknown is None or not bool(unknown.any()):
        return None
    bits = (unknown.long()[:, None] >> torch.arange(classes, device=unknown.device)) & 1
    found = bits.bool()
    found[:, 0] = False
    return found


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
              unknown: torch.Tensor | None = None) -> torch.Tensor:
    """Soft Dice loss: logits [B, K, H, W], target [B, H, W] int64 -> scalar, mean over the K classes. ``unknown``
    (int64 [B] bitmasks): organs merged into background and left out of that sample's sums (module docstring)."""
    probs = torch.softmax(logits.float(), dim=1)
    one_hot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    missing = unknown_classes(unknown, probs.shape[1])
    if missing is not None:
        missing = missing.to(probs.device)
        background = probs[:, :1] + (probs * missing[:, :, None, None]).sum(1, keepdim=True)
        known = (~missing)[:, :, None, None].to(probs.dtype)
        probs = torch.cat([background, probs[:, 1:]], dim=1) * known
        one_hot = one_hot * known
    dims = (0, 2, 3)
    sums = torch.stack([(probs * one_hot).sum(dims), (one_hot * one_hot).sum(dims), (probs * probs).sum(dims)])
    intersect, y_sum, z_sum = _global_sum(sums)
    return (1.0 - (2.0 * intersect + smooth) / (z_sum + y_sum + smooth)).mean()


def ce_loss(logits: torch.Tensor, target: torch.Tensor, share: float = 1.0,
            unknown: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel-mean cross entropy. ``share`` rescales a process's local mean so that DDP's gradient averaging gives
    the mean over the global batch when processes hold unequal numbers of samples (share = local·world/global).
    ``unknown`` (int64 [B] bitmasks): a background voxel scores background + unknown organs (module docstring)."""
    missing = unknown_classes(unknown, logits.shape[1])
    if missing is None:
        return F.cross_entropy(logits.float(), target) * share
    log_p = F.log_softmax(logits.float(), dim=1)
    merged = missing.to(log_p.device)
    merged[:, 0] = True
    background = torch.logsumexp(log_p.masked_fill(~merged[:, :, None, None], float("-inf")), dim=1)
    picked = log_p.gather(1, target[:, None]).squeeze(1)
    return -torch.where(target == 0, background, picked).mean() * share


@dataclass
class LossParts:
    total: torch.Tensor
    stage1: torch.Tensor
    stage2: torch.Tensor
    ce1: torch.Tensor
    dice1: torch.Tensor
    ce2: torch.Tensor
    dice2: torch.Tensor
    weight: float


def hsam_loss(stage1_logits: torch.Tensor, stage2_logits: torch.Tensor, low_res_label: torch.Tensor,
              label: torch.Tensor, epoch: int, config: LossConfig = LossConfig(), ce_share: float = 1.0,
              unknown: torch.Tensor | None = None) -> LossParts:
    """(1−w)·L1 + w·L2 with L = ce·CE + dice·Dice; stage 1 against the S/4 label, stage 2 against the full one.
    ``unknown``: int64 [B] bitmasks of the organs not labelled in each sample (never taught as background)."""
    ce1 = ce_loss(stage1_logits, low_res_label, ce_share, unknown)
    dice1 = dice_loss(stage1_logits, low_res_label, config.smooth, unknown)
    ce2 = ce_loss(stage2_logits, label, ce_share, unknown)
    dice2 = dice_loss(stage2_logits, label, config.smooth, unknown)
    l1 = config.ce_weight * ce1 + config.dice_weight * dice1
    l2 = config.ce_weight * ce2 + config.dice_weight * dice2
    w = stage_weight(epoch, config.stage_weight_base, config.stage_weight_decay)
    return LossParts((1 - w) * l1 + w * l2, l1, l2, ce1, dice1, ce2, dice2, w)
