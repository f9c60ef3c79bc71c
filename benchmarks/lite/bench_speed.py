"""Time per CT slice of H-SAM-Lite (TinyViT, 256) against H-SAM ViT-B (512) on this machine's CPU.

What is timed: ``model.predict`` (both decoders and the stage-3 fusion, as inference runs it) on one windowed slice,
batch 1, under ``torch.inference_mode``, after warm-up. Configurations run in interleaved rounds (A, B, C, A, B, C,
...) so that load from other processes on a shared machine hits them alike; the median over rounds is reported,
together with the load average. ViT-B timing does not depend on the weights (random init, LoRA merged), so no SAM
checkpoint is needed; H-SAM-Lite uses the given model (default: the bundled demo model).

    python benchmarks/lite/bench_speed.py --threads 2 --rounds 7 --json benchmarks/lite/speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch


def lite_model(model: str | None):
    from hsam.model.checkpoint import load_model

    if model is None:
        from hsam.weights.store import load_named_model

        return load_named_model("hsam-lite-demo", device="cpu")[0]
    return load_model(model)[0]


def vit_b_model():
    from hsam.model.build import build_hsam
    from hsam.model.config import load_model_config

    model = build_hsam(load_model_config("vit_b_512"))
    model.merge_lora()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="H-SAM-Lite model folder (default: the installed hsam-lite-demo)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-vit-b", action="store_true", help="skip ViT-B (it needs ~1.1 GB and ~3 s per slice)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lite = lite_model(args.model).eval()
    configs = {
        "lite_fp32": (lite, 256, contextlib.nullcontext),
        "lite_bf16_autocast": (lite, 256, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }
    if not args.no_vit_b:
        configs["vit_b_512_fp32"] = (vit_b_model(), 512, contextlib.nullcontext)
    inputs = {size: torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) for size in (256, 512)}
    times: dict[str, list[float]] = {name: [] for name in configs}
    load_before = os.getloadavg()
    with torch.inference_mode():
        for name, (model, size, autocast) in configs.items():  # warm-up
            for _ in range(2):
                with autocast():
                    model.predict(inputs[size])
        for _ in range(args.rounds):
            for name, (model, size, autocast) in configs.items():
                started = time.perf_counter()
                with autocast():
                    model.predict(inputs[size])
                times[name].append(time.perf_counter() - started)
    load_after = os.getloadavg()
    report = {
        "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "cpu": platform.processor() or
        platform.machine(), "cores": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after,
        "seconds_per_slice": {name: {"median": round(statistics.median(t), 3), "min": round(min(t), 3),
                                     "max": round(max(t), 3)} for name, t in times.items()},
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
