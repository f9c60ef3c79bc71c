"""LoRA on the fused qkv projection of a ViT block: q and v adapted, k and the base weights frozen.

``blk.attn.qkv`` (an ``nn.Linear(C, 3C)``) is replaced by :class:`LoRAQKV`, which keeps the original layer as
``.qkv`` and adds ``linear_a_q/linear_b_q/linear_a_v/linear_b_v``. Module state-dict keys are therefore
``...attn.qkv.qkv.{weight,bias}`` and ``...attn.qkv.linear_{a,b}_{q,v}.weight``, the layout of the released H-SAM
model, so the official ``w_a_NNN``/``w_b_NNN`` tensors map onto them one to one.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import nn


class LoRAQKV(nn.Module):
    """qkv(x) + [B_q A_q x, 0, B_v A_v x] with no scaling and no dropout (hsam-model.md §1.1).

    Input x: [..., C]; output: [..., 3C] (q, k, v concatenated, as the wrapped ``nn.Linear``).
    A (C->r) starts Kaiming-uniform (a=sqrt 5), B (r->C) starts at zero, so a fresh adapter changes nothing.

    :meth:`merge` folds both adapters into the base weight so inference costs nothing extra; the unmerged base
    weight is kept aside so :meth:`unmerge` restores it bit for bit and ``state_dict()`` always holds the unmerged
    base weight (saved files do not depend on whether the model was merged).
    """

    def __init__(self, qkv: nn.Linear, rank: int) -> None:
        super().__init__()
        if qkv.out_features != 3 * qkv.in_features:
            raise ValueError(f"expected a fused qkv Linear(C, 3C), got Linear({qkv.in_features}, {qkv.out_features})")
        dim = qkv.in_features
        self.dim = dim
        self.rank = rank
        self.qkv = qkv
        device = qkv.weight.device
        self.linear_a_q = nn.Linear(dim, rank, bias=False, device=device)
        self.linear_b_q = nn.Linear(rank, dim, bias=False, device=device)
        self.linear_a_v = nn.Linear(dim, rank, bias=False, device=device)
        self.linear_b_v = nn.Linear(rank, dim, bias=False, device=device)
        self._base_weight: torch.Tensor | None = None  # set while merged
        self.reset_lora_parameters()
        # public name from torch 2.5 on; older versions have the same hook under a private name
        register = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
        register(_unmerged_state_dict_hook)
        self._register_load_state_dict_pre_hook(self._unmerge_before_load)

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (a=sqrt 5); B: zeros."""
        for a in (self.linear_a_q, self.linear_a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.linear_b_q, self.linear_b_v):
            nn.init.zeros_(b.weight)

    @property
    def merged(self) -> bool:
        return self._base_weight is not None

    def lora_parameters(self) -> Iterator[nn.Parameter]:
        """The four adapter weights (A_q, B_q, A_v, B_v)."""
        for layer in (self.linear_a_q, self.linear_b_q, self.linear_a_v, self.linear_b_v):
            yield layer.weight

    def _delta(self) -> torch.Tensor:
        """[3C, C] weight update: B_q A_q in the q rows, zeros for k, B_v A_v in the v rows."""
        dq = self.linear_b_q.weight @ self.linear_a_q.weight
        dv = self.linear_b_v.weight @ self.linear_a_v.weight
        return torch.cat([dq, torch.zeros_like(dq), dv], dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapters into ``qkv.weight`` (no-op if already merged)."""
        if self.merged:
            return
        base = self.qkv.weight.data
        self._base_weight = base
        self.qkv.weight.data = base + self._delta().to(base.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact unmerged base weight (no-op if not merged)."""
        if not self.merged:
            return
        self.qkv.weight.data = self._base_weight
        self._base_weight = None

    def _unmerge_before_load(self, *args: Any, **kwargs: Any) -> None:
        # Loading a state dict always sets unmerged base weights; drop the merged copy first.
        self.unmerge()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "LoRAQKV":
        # .to()/.half() while merged would leave the stored base weight behind on the old device/dtype.
        was_merged = self.merged
        self.unmerge()
        result = super()._apply(fn, *args, **kwargs)
        if was_merged:
            self.merge()
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.qkv(x)
        if self.merged:
            return out
        dim = self.dim
        # In-place slice updates on the fresh Linear output, as the released code does (autograd-safe).
        out[..., :dim] += self.linear_b_q(self.linear_a_q(x))
        out[..., -dim:] += self.linear_b_v(self.linear_a_v(x))
        return out


def _unmerged_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    if isinstance(module, LoRAQKV) and module.merged:
        state_dict[prefix + "qkv.weight"] = module._base_weight


def apply_lora(encoder: nn.Module, rank: int) -> list[LoRAQKV]:
    """Replace ``blocks[i].attn.qkv`` of a SAM ``ImageEncoderViT`` by :class:`LoRAQKV` (rank r) in every block.

    Returns the adapters in block order. The caller freezes the base weights.
    """
    adapters = []
    for block in encoder.blocks:
        adapter = LoRAQKV(block.attn.qkv, rank)
        block.attn.qkv = adapter
        adapters.append(adapter)
    return adapters


def lora_modules(model: nn.Module) -> list[LoRAQKV]:
    """All :class:`LoRAQKV` modules of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, LoRAQKV)]
