"""Peak memory of ``segment_volume`` on a 512 x 512 x 300 CT-like volume, above the loaded model.

Measures host RSS with the kernel's high-water mark (VmHWM), reset after the model is loaded (``/proc/self/clear_refs``,
Linux), so the number is what the pipeline adds on top of the model: the input volume, its canonical copy, the uint8
label and confidence volumes, per-batch tensors and the output images. On CUDA it also reports the GPU's peak
allocation above the model's weights. The contract (issue 3) is <= 2 GB above the model.

    python benchmarks/bench_memory.py --config vit_tiny --device cpu
    python benchmarks/bench_memory.py --config vit_b_512 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "HSAMSlicer"))

GIB = 1024**3


def _status(field: str) -> int:
    """A VmRSS/VmHWM value from /proc/self/status in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def phantom(shape_zyx: tuple[int, int, int], seed: int = 0):
    """A CT-like int16 volume (air, body ellipse with organ-like blobs, noise) in LPS with 0.8 x 0.8 x 1.0 mm voxels."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = shape_zyx
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.38 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    liver = ((yy - 0.45 * y) / (0.15 * y)) ** 2 + ((xx - 0.33 * x) / (0.16 * x)) ** 2 <= 1
    volume = np.full(shape_zyx, -1000, dtype=np.int16)
    for k in range(z):
        s = volume[k]
        s[body] = 40
        if 0.3 * z < k < 0.8 * z:
            s[liver] = 60
        s += rng.integers(-20, 21, size=(y, x), dtype=np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 1.0))
    return image


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vit_tiny", help="model config name (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    parser.add_argument("--no-warmup", action="store_true",
                        help="on CUDA, do not run one batch before the baseline (then CUDA/cuBLAS/cuDNN start-up "
                        "memory counts as pipeline memory)")
    args = parser.parse_args()

    import torch

    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume
    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config

    torch.manual_seed(0)
    config = load_model_config(args.config)
    model = build_hsam(config).eval()
    card = ModelCard.for_config(config, f"{args.config}-random", classes=list(CLASS_NAMES), demo=True)
    cuda = args.device.startswith("cuda")
    if cuda:
        model.to(args.device)
        if not args.no_warmup:  # initialise CUDA libraries so their host memory is part of the baseline
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model.predict(torch.zeros(1, 3, config.img_size, config.img_size, device=args.device))
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        gpu_model = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    rss_model = _status("VmRSS")
    reset = _reset_peak()

    started = time.perf_counter()
    image = phantom((args.slices, args.size, args.size))
    result = segment_volume(image, model, card,
                            SegmentOptions(device=args.device, batch_size=args.batch_size, precision=args.precision))
    seconds = time.perf_counter() - started
    peak = _status("VmHWM") if reset else None
    record = {
        "config": args.config,
        "volume": [args.size, args.size, args.slices],
        "device": result.device,
        "precision": result.precision,
        "mode": getattr(result, "mode", "eager"),
        "batch_size": result.batch_size,
        "seconds_total": round(seconds, 2),
        "seconds_segment": round(result.seconds, 2),
        "rss_with_model_gib": round(rss_model / GIB, 3),
        "peak_rss_above_model_gib": round((peak - rss_model) / GIB, 3) if peak else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs",
        "warmup": bool(cuda and not args.no_warmup),
    }
    if cuda:
        record["gpu"] = torch.cuda.get_device_name()
        record["gpu_model_gib"] = round(gpu_model / GIB, 3)
        record["gpu_peak_above_model_gib"] = round((torch.cuda.max_memory_allocated() - gpu_model) / GIB, 3)
    print(json.dumps(record, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    ok = record["peak_rss_above_model_gib"] is not None and record["peak_rss_above_model_gib"] <= 2.0
    print("within 2 GB above the model" if ok else "NOT within 2 GB above the model (or peak unavailable)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
