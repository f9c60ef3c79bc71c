"""Resumable training state: model tensors, optimizer, schedule, grad scaler, RNG states, history.

Saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``: only tensors, numbers, strings,
lists and dicts are stored (RNG states converted accordingly), so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hsam import atomic
from hsam.errors import HSAMError

STATE_FORMAT = "hsam-train-state/1"


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, numpy global, Python) as weights_only-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    python = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": [python[0], list(python[1]), python[2]],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that training changes: parameters with ``requires_grad`` and all buffers."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}


def frozen_fingerprint(model: torch.nn.Module) -> dict[str, float]:
    """A cheap signature (sum, sum of squares) of the frozen parameters, to refuse resuming onto other base weights."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            data = p.detach().double()
            out[name] = float(data.sum()) + 1e-3 * float((data * data).sum())
    return out


def same_frozen_base(saved: dict[str, float], current: dict[str, float], rel_tol: float = 1e-9) -> bool:
    """Whether ``current`` (:func:`frozen_fingerprint` of the model now) matches the run's ``saved`` one. Every frozen
    tensor of the model must be in the run with the same signature up to summation order; a frozen tensor the run had
    and the model no longer builds (an unused head dropped since) does not matter to training."""
    return all(name in saved and math.isclose(saved[name], value, rel_tol=rel_tol, abs_tol=1e-12)
               for name, value in current.items())


def save_state(path: Path, state: dict[str, Any]) -> Path:
    """Write atomically (temp file in the same folder, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as temp:
        torch.save({"format": STATE_FORMAT, **state}, temp)
    return path


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt/truncated file, or one holding objects weights_only refuses
        raise HSAMError(f"cannot read training state {path}: {str(error).splitlines()[0][:160]}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise HSAMError(f"{path} is not an hsam training checkpoint")
    return state
