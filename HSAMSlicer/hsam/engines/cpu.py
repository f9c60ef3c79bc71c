"""What this processor computes fast: the instruction sets that decide which CPU engine ``auto`` picks.

bf16 and int8 are only faster than fp32 where the processor has instructions for them (AVX512_BF16 or AMX for
bfloat16 dot products, VNNI or AMX for int8); elsewhere they are emulated and slower. Linux reports every flag in
``/proc/cpuinfo``; on other systems NumPy's runtime dispatch table gives the same answer for x86 (it knows no AMX).
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# flags as /proc/cpuinfo spells them
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
_NUMPY_NAMES = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512BF16": "avx512_bf16", "AVX512VNNI": "avx512_vnni"}
# what a Processor property needs, in words (for the reason auto gives)
FEATURE_NEEDS = {"native_bf16": "AVX512_BF16 or AMX", "native_int8": "AVX512_VNNI or AMX"}
_SHOWN = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512_BF16", "avx512_vnni": "VNNI", "amx_bf16": "AMX"}


@dataclass(frozen=True)
class Processor:
    name: str
    flags: frozenset[str]  # the subset of FLAGS this processor has

    @property
    def native_bf16(self) -> bool:
        """bfloat16 dot products in hardware (AVX512_BF16 or AMX)."""
        return bool(self.flags & {"avx512_bf16", "amx_bf16"})

    @property
    def native_int8(self) -> bool:
        """int8 dot products in hardware (AVX512_VNNI or AMX)."""
        return bool(self.flags & {"avx512_vnni", "amx_int8"})

    def describe(self) -> str:
        shown = [label for flag, label in _SHOWN.items() if flag in self.flags]
        if "avx512f" in self.flags and "avx2" in self.flags:
            shown.remove("AVX2")
        return f"{self.name} ({', '.join(shown) or 'no AVX2'})"


def parse_cpuinfo(text: str) -> Processor:
    """A :class:`Processor` from the text of ``/proc/cpuinfo`` (its first processor)."""
    name, flags = "unknown CPU", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown CPU":
            name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split()) & frozenset(FLAGS)
    return Processor(name, flags)


def _from_numpy() -> Processor:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    flags = frozenset(ours for theirs, ours in _NUMPY_NAMES.items() if features.get(theirs))
    return Processor(platform.processor() or platform.machine() or "unknown CPU", flags)


@functools.cache
def processor() -> Processor:
    """This machine's processor (read once per process)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        try:
            return parse_cpuinfo(cpuinfo.read_text())
        except OSError:
            pass
    return _from_numpy()
