"""What every issue-30 speed script records beside its times: the processor's flags, the load, the emulation."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY / "HSAMSlicer"))
# the flags issue 30's targets are stated for, read exactly as the brief's command reads them
FLAGS_COMMAND = r"grep -o -w -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_bf16' /proc/cpuinfo | sort -u"
# a run whose 1-minute load average before or after is above this (2 cores) shared the machine: not a speed result
CONTENDED_LOAD = 1.5
EMULATION_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def cpu_flags() -> list[str]:
    """The flags of :data:`FLAGS_COMMAND` ([] where /proc/cpuinfo does not exist)."""
    if not Path("/proc/cpuinfo").is_file():
        return []
    done = subprocess.run(["bash", "-c", FLAGS_COMMAND], capture_output=True, text=True, check=False)
    return done.stdout.split()


def machine_class(flags: list[str]) -> str:
    """The issue's processor class: "avx512-bf16-amx", "avx512", "avx2" or "other", taking the AVX2 emulation
    (:data:`EMULATION_VARIABLES`) into account."""
    if os.environ.get("ATEN_CPU_CAPABILITY", "").lower() == "avx2":
        return "avx2 (emulated: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2; ONNX Runtime's MLAS is not capped)"
    if "avx512f" in flags and ({"avx512_bf16", "amx_bf16"} & set(flags)):
        return "avx512-bf16-amx"
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def machine_record() -> dict:
    """Flags, class, cores, load average now, torch's kernel level and the emulation variables set."""
    flags = cpu_flags()
    record = {"cpu_flags_command": FLAGS_COMMAND, "cpu_flags": flags, "machine_class": machine_class(flags),
              "cores": os.cpu_count(), "python": sys.version.split()[0],
              "emulation": {name: os.environ[name] for name in EMULATION_VARIABLES if name in os.environ}}
    try:
        import torch

        record["torch"] = torch.__version__
        record["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        record["threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover (torch is a dependency)
        pass
    return record


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()]


def contended(before: list[float], after: list[float]) -> bool:
    return max(before[0], after[0]) > CONTENDED_LOAD


def spread(values: list[float]) -> dict:
    """Median, min, max (and all values) of a list of seconds."""
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "values": [round(v, 3) for v in values]}
