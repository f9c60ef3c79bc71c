"""What a user waits for: `hsam segment` on a 512x512x150 CT, per model and engine, as a fresh process.

For each (model, mode) the command runs as the Slicer module runs it (``python -m hsam segment ... --progress json``),
in a fresh process with an empty engine cache (``HSAM_HOME`` in a temp folder: the first run a user makes, ONNX
export included) and again with that cache filled. Recorded from the JSON progress lines: seconds to the first
segmented slices and to the end; from ``wait4``: the process's peak resident memory. Each run also records the load
average before and after; a run that starts above 1.5 (on 2 cores) is marked contended and is not a result.

The volume is the shared real CT (``example_ct``, 122x101x112 at 3 mm) resampled to 512x512x150 (0.71 mm pixels,
2.24 mm slices): the shape of a typical abdominal CT, with real anatomy.

    python benchmarks/user_times.py --models hsam-lite-demo --modes ort,bf16 --json benchmarks/results/user_times.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "HSAMSlicer"))
CT = REPOSITORY.parent / "shared" / "data" / "real" / "totalsegmentator" / "example_ct.nii.gz"
CONTENDED_LOAD = 1.5


def typical_ct(folder: Path, shape: tuple[int, int, int]) -> Path:
    """The shared CT resampled (linear) to ``shape`` (x, y, z) over the same physical extent."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(CT))
    extent = [n * s for n, s in zip(image.GetSize(), image.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, shape)]
    resampled = sitk.Resample(image, list(shape), sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                              image.GetDirection(), -1024.0, sitk.sitkInt16)
    path = folder / f"ct_{'x'.join(map(str, shape))}.nrrd"
    sitk.WriteImage(resampled, str(path))
    return path


def one_run(volume: Path, model: str, mode: str, home: Path, out: Path) -> dict:
    """One ``hsam segment`` child: seconds to milestones, peak RSS, load before/after."""
    load_before = os.getloadavg()[0]
    command = [sys.executable, "-m", "hsam", "segment", str(volume), "-o", str(out), "--model", model, "--device",
               "cpu", "--mode", mode, "--progress", "json"]
    env = {**os.environ, "HSAM_HOME": str(home), "PYTHONPATH": str(REPOSITORY / "HSAMSlicer")}
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    marks: dict[str, float] = {}
    finished: dict = {}
    for line in child.stdout:
        now = time.perf_counter() - started
        message = json.loads(line)
        if message.get("stage") == "segment" and message.get("done"):
            marks.setdefault("first_slices_s", now)
            marks.setdefault("first_slices_count", message["done"])
        if message.get("finished"):
            finished = message
    _, status, usage = os.wait4(child.pid, 0)
    marks["total_s"] = time.perf_counter() - started
    if status != 0 or not finished:
        raise RuntimeError(f"{' '.join(command)} failed (status {status})")
    load_after = os.getloadavg()[0]
    return {
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in marks.items()},
        "segment_s": finished["result"]["seconds"],
        "mode": finished["result"]["mode"],
        "mode_reason": finished["result"].get("mode_reason", ""),
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / 1024**3, 2),  # ru_maxrss is in KiB on Linux
        "load_before": round(load_before, 2),
        "load_after": round(load_after, 2),
        "contended": load_before > CONTENDED_LOAD,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="hsam-lite-demo", help="comma-separated model ids or folders")
    parser.add_argument("--modes", default="ort,bf16", help="comma-separated engines (auto allowed)")
    parser.add_argument("--shape", default="512,512,150", help="volume size x,y,z")
    parser.add_argument("--json", default=None, help="write the record here")
    args = parser.parse_args()

    from hsam.engines.cpu import processor

    shape = tuple(int(v) for v in args.shape.split(","))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hsam-user-times-") as temp:
        folder = Path(temp)
        volume = typical_ct(folder, shape)
        for model in [m for m in args.models.split(",") if m]:
            for mode in [m for m in args.modes.split(",") if m]:
                home = folder / f"home-{len(rows)}"
                for cache in ("cold", "warm"):
                    row = {"model": Path(model).name, "mode_asked": mode, "engine_cache": cache,
                           **one_run(volume, model, mode, home, folder / "labels.nrrd")}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if row["mode"] not in ("ort", "ort-int8"):
                        break  # no engine cache: a second run would measure the same thing
    record = {
        "cpu": processor().describe(),
        "flags": sorted(processor().flags),
        "threads": os.cpu_count(),
        "volume": f"{CT.name} resampled to {shape}",
        "runs": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
