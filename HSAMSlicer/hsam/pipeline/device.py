"""Where a run goes: the device, the precision, and how an out-of-memory error is recognised."""

from __future__ import annotations

import torch

from hsam.errors import HSAMError

DEFAULT_BATCH = {"cuda": 8, "mps": 4, "cpu": 2}
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def select_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA, then Apple MPS, then CPU. An explicit device that is not available raises HSAMError."""
    name = (device or "auto").lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HSAMError("--device cuda was requested but PyTorch sees no CUDA GPU; use --device auto or cpu")
    if name == "mps" and not mps_ok:
        raise HSAMError("--device mps was requested but Apple MPS is not available; use --device auto or cpu")
    if not (name == "cpu" or name == "mps" or name.startswith("cuda")):
        raise HSAMError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def select_precision(precision: str, device: torch.device, family: str = "any") -> tuple[str, torch.dtype | None]:
    """``(name, autocast dtype or None)``. ``auto``: fp32 on the CPU; on GPUs the half precision that met the
    precision rule for the encoder ``family`` (:func:`hsam.engines.modes.gpu_precision`), else fp32."""
    name = (precision or "auto").lower()
    if name not in PRECISIONS:
        raise HSAMError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device.type == "cpu":
        if name in ("fp16", "bf16"):
            raise HSAMError(f"{name} runs only on a GPU; use --precision fp32 (or auto) on the CPU")
        return "fp32", None
    if name == "auto":
        from hsam.engines.modes import gpu_precision

        bf16 = device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = gpu_precision(device.type, bf16, family)[0]
    return name, {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def is_oom(error: BaseException) -> bool:
    """True for a GPU out-of-memory error (the type where torch has one, else the message)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def device_name(device: torch.device) -> str:
    """``"cuda:N"`` with the current CUDA index, else the device as given (``"cpu"``, ``"mps"``)."""
    return str(device) if device.type != "cuda" else f"cuda:{torch.cuda.current_device()}"
