"""Fixed cost of a segmentation in the Slicer module's child process, to decide whether a warm worker is worth it.

The module runs ``python -m hsam segment ... --progress json`` once per click (HSAMSlicerLib.process). Its cost is
(fixed: interpreter + imports + model load + engine start) + slices x (time per slice). This script measures both
the way the module runs them (ChildJob, progress read from the JSON lines) on the real sample CT cut to 2 and 10
slices, interleaved over several rounds, after one warm-up run that fills the ONNX Runtime engine cache (as a user's
first run does). The fixed cost is the 2-slice time minus 2 x the per-slice slope between 2 and 10 slices.

    python benchmarks/child_startup.py                      # demo model and a ViT-B/512 with random weights
    python benchmarks/child_startup.py --models demo --rounds 5

Rule (issue 12): keep a warm worker between runs only if the fixed cost exceeds a quarter of a 100-slice run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "HSAMSlicer"))
SAMPLE = REPOSITORY.parent / "shared" / "data" / "real" / "totalsegmentator" / "example_ct_sm.nii.gz"
def cut(sample: Path, slices: int, folder: Path) -> Path:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(sample))
    path = folder / f"ct_{slices}.nrrd"
    sitk.WriteImage(image[:, :, :slices], str(path))
    return path


def vit_b_model(folder: Path) -> Path:
    """A ViT-B/512 H-SAM with random weights, in the real file format (the same compute as the paper's model)."""
    import torch

    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, save_model
    from hsam.model.config import load_model_config

    config = load_model_config("vit_b_512")
    torch.manual_seed(0)
    card = ModelCard.for_config(config, name="vitb-random", title="ViT-B/512, random weights", classes=list(CLASS_NAMES))
    return save_model(build_hsam(config), card, folder / "vitb-random")


def timed_run(volume: Path, model: str, out: Path) -> dict[str, float]:
    """One child run as the module starts it; seconds from start to each milestone."""
    from HSAMSlicerLib.process import ChildJob

    started = time.perf_counter()
    job = ChildJob(["segment", str(volume), "-o", str(out), "--model", model, "--device", "cpu"]).start()
    marks: dict[str, float] = {}
    state = job.poll()
    while not state.done:
        time.sleep(0.01)
        state = job.poll()
        now = time.perf_counter() - started
        if state.stage == "load":
            marks.setdefault("load_started", now)
        if state.stage == "segment" and state.total:
            marks.setdefault("first_progress", now)
            if state.current > 0:
                marks.setdefault("first_slices_done", now)
    marks["total"] = time.perf_counter() - started
    error = state.error
    job.cleanup()
    if error is not None:
        raise SystemExit(f"run failed: {error}")
    return marks


def measure(name: str, model: str, volumes: dict[int, Path], rounds: int, folder: Path) -> dict:
    timed_run(volumes[2], model, folder / "warmup.nrrd")  # fills the engine cache, as a user's first run does
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in volumes}
    for _ in range(rounds):
        for n, volume in volumes.items():  # interleaved: a slow moment hits both sizes alike
            runs[n].append(timed_run(volume, model, folder / f"out_{n}.nrrd"))
    short, long = min(volumes), max(volumes)
    totals = {n: [r["total"] for r in runs[n]] for n in runs}
    slope = (statistics.median(totals[long]) - statistics.median(totals[short])) / (long - short)
    fixed = statistics.median(totals[short]) - short * slope
    hundred = fixed + 100 * slope
    return {
        "model": name, "rounds": rounds,
        "seconds": {str(n): {"median": statistics.median(t), "min": min(t), "max": max(t)} for n, t in totals.items()},
        "to_first_progress_s": statistics.median(r["first_progress"] for r in runs[short]),
        "per_slice_s": slope, "fixed_s": fixed, "hundred_slices_s": hundred, "fixed_share_of_100": fixed / hundred,
        "warm_worker_needed": fixed > 0.25 * hundred,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo,vitb", help="comma-separated: demo (bundled Lite), vitb (random)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=str(REPOSITORY / "benchmarks" / "results" / "child_startup.json"))
    args = parser.parse_args()
    from hsam.engines.cpu import processor

    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        os.environ["HSAM_HOME"] = str(folder / "home")  # a cold cache of its own (engines built by the warm-up run)
        volumes = {n: cut(SAMPLE, n, folder) for n in (2, 10)}
        models = {"demo": "hsam-lite-demo", "vitb": None}
        for name in args.models.split(","):
            model = models[name] or str(vit_b_model(folder))
            results.append(measure(name, model, volumes, args.rounds, folder))
            print(json.dumps(results[-1], indent=1), flush=True)
    load_after = os.getloadavg()
    record = {
        "command": "python benchmarks/child_startup.py " + " ".join(sys.argv[1:]),
        "cpu": processor().describe(), "cpu_flags": sorted(processor().flags), "cores": os.cpu_count(),
        "load_average_before": load_before[0], "load_average_after": load_after[0],
        "contended": max(load_before[0], load_after[0]) > 1.5, "results": results,
        "python": sys.version.split()[0],
        "torch": subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                                text=True).stdout.strip(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}; contended: {record['contended']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
