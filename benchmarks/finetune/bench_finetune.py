"""Few-shot fine-tuning benchmark (issue 17): time per epoch, time to the final model, Dice before/after.

Cases (from shared/data/real/totalsegmentator, TotalSegmentator labels mapped to H-SAM), ``--volume``:
- ``ct`` (default): the 112-slice example_ct (`total --fast` labels) cut along z into a training case of 10 slices
  (z 82-91) and a held-out case (z 92-101, the next 10 slices): the demo model's own patient;
- ``mr``: the 20-slice example_mr_sm (`total_mr` labels), z 0-9 for training, z 10-19 held out: an image the demo
  model has never seen (mean Dice 0.25), the "wrong on my scanner" case where the fine-tune has something to learn.
Both are resampled in-plane to 512x512 (padded to a square field of view first), the size of a clinical slice, so the
augmentation and resizing cost what they cost on real exports. The held-out slices are never trained on. The
forgetting guard's reference is the model's own reference case (for hsam-lite-demo: example_ct_sm, the case its
RESULTS row was measured on).

Arms run interleaved (A B A B ...) so that both see the same machine load; every run records /proc/loadavg before
and after. A ``--cold`` arm deletes the cached encoder outputs of the reference cases before each run (a user's
first fine-tune on this encoder). Usage (repository root):

    python benchmarks/finetune/bench_finetune.py --out runs/ft-bench --rounds 2 \
        --arm "recipe=--config finetune --epochs 10" --arm "fewshot=" --json benchmarks/finetune/results/bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import SimpleITK as sitk

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real" / "totalsegmentator"


def _square_512(image: sitk.Image, labels: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """Pad x/y to a square field of view, then resample to 512x512 (image linear, labels nearest)."""
    size, spacing = image.GetSize(), image.GetSpacing()
    side = max(size[0] * spacing[0], size[1] * spacing[1])
    new_spacing = (side / 512, side / 512, spacing[2])
    origin = image.TransformContinuousIndexToPhysicalPoint(
        (-(side / spacing[0] - size[0]) / 2 - 0.5 + new_spacing[0] / spacing[0] / 2,
         -(side / spacing[1] - size[1]) / 2 - 0.5 + new_spacing[1] / spacing[1] / 2, 0))
    grid = sitk.Image(512, 512, size[2], sitk.sitkFloat32)
    grid.SetSpacing(new_spacing)
    grid.SetOrigin(origin)
    grid.SetDirection(image.GetDirection())
    out_image = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkInt16)
    out_labels = sitk.Resample(labels, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return out_image, out_labels


def _write_case(folder: Path, image: sitk.Image, labels: sitk.Image, note: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    (folder / "provenance.json").write_text(json.dumps({"note": note}) + "\n", encoding="utf-8")


# the volumes a bench can cut into a training and a held-out case: files, label map, training z range, held-out z range
VOLUMES = {
    "ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz", "totalseg_total", (82, 92), (92, 102)),
    "mr": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "totalseg_total_mr", (0, 10), (10, 20)),
}


def prepare(out: Path, volume: str) -> tuple[Path, Path]:
    """Training case folder and held-out case folder (512x512 slices) of ``volume`` (a key of VOLUMES)."""
    from hsam.labels import remap_labels

    image_file, label_file, label_map, train, held = VOLUMES[volume]
    image = sitk.ReadImage(str(DATA / image_file))
    reference = sitk.ReadImage(str(DATA / label_file))
    labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(reference), label_map))
    labels.CopyInformation(reference)
    stem = image_file.split(".")[0]
    folders = []
    for name, (a, b) in {"train": train, "heldout": held}.items():
        big_image, big_labels = _square_512(image[:, :, a:b], labels[:, :, a:b])
        folder = out / name / f"{stem}_z{a}-{b - 1}"
        _write_case(folder, big_image, big_labels, f"{stem} z {a}-{b - 1}, resampled to 512x512")
        folders.append(out / name)
    return folders[0], folders[1]


def timed_child(command: list[str], source: Path | None) -> tuple[subprocess.CompletedProcess, float, list[str],
                                                                   list[str]]:
    """Run ``command`` (with the ``hsam`` package in ``source`` first on the path when given): the finished process
    (output captured), its wall seconds, and the load averages (1, 5, 15 min) before and after."""
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    started = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])) \
        if source else None
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    return process, wall, load_before, Path("/proc/loadavg").read_text().split()[:3]


def run_arm(name: str, args: list[str], cases: Path, heldout: Path | None, out: Path, model: str,
            source: Path | None = None) -> dict:
    run_dir = out / f"run-{name}-{time.strftime('%H%M%S')}"
    validation = [] if heldout is None else [
        "--set", json.dumps({"format": "cases", "root": str(heldout)}).join(["data.val=", ""]),
        "--set", "validation.every=1"]
    command = [sys.executable, "-m", "hsam", "finetune", "--model", model, "--cases", str(cases), "--val-cases", "0",
               *validation, "--name", f"bench-{name}", "--output", str(run_dir), "--no-register",
               "--device", "cpu", "--progress", "json", *args]
    process, wall, load_before, load_after = timed_child(command, source)
    if process.returncode != 0:
        raise SystemExit(f"{name} failed:\n{process.stderr[-3000:]}")
    events = [json.loads(line) for line in process.stdout.splitlines() if line.strip()]
    epochs = [e for e in events if "epoch" in e]
    last = events[-1]
    return {"arm": name, "args": args, "command": shlex.join(command), "source": str(source) if source else None,
            "wall_s": round(wall, 1),
            "epoch_s": [e.get("seconds") for e in epochs], "val_dice": [e.get("val_dice") for e in epochs],
            "final": last, "load_before": load_before, "load_after": load_after,
            "contended": max(float(x) for x in load_before[:1] + load_after[:1]) > 1.5}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ft-bench"))
    parser.add_argument("--model", default="hsam-lite-demo")
    parser.add_argument("--volume", choices=sorted(VOLUMES), default="ct",
                        help="ct: example_ct z 82-91 / 92-101 (the demo model's own patient); mr: example_mr_sm "
                             "z 0-9 / 10-19 (an MR the demo model has never seen as an image: a scanner it is wrong on)")
    parser.add_argument("--arm", action="append", required=True, help="NAME=extra hsam finetune arguments")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--source", action="append", default=[], metavar="NAME=DIR",
                        help="run arm NAME with the hsam package found in DIR (e.g. a git worktree's HSAMSlicer "
                             "folder at the baseline commit), so old and new code run interleaved")
    parser.add_argument("--single-case", action="store_true",
                        help="no held-out case: the flow of one exported case (no validation, no early stop)")
    parser.add_argument("--cold", action="append", default=[], metavar="NAME",
                        help="arm that runs cold: the reference cases' cached encoder outputs are deleted first")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cases, heldout = prepare(args.out / "cases", args.volume)
    arms = [(a.split("=", 1)[0], shlex.split(a.split("=", 1)[1])) for a in args.arm]
    sources = {name: Path(folder).resolve() for name, folder in (s.split("=", 1) for s in args.source)}
    from hsam.engines.cpu import processor

    flags = sorted(processor().flags)
    results = []
    for round_index in range(args.rounds):
        for name, extra in arms:
            if name in args.cold:
                from hsam.training.frozen import encoder_outputs_dir

                shutil.rmtree(encoder_outputs_dir(), ignore_errors=True)
            row = run_arm(name, extra, cases, None if args.single_case else heldout, args.out, args.model,
                          sources.get(name))
            row["cold"] = name in args.cold
            row["round"] = round_index
            results.append(row)
            final = row["final"]
            print(json.dumps({k: row[k] for k in ("arm", "round", "wall_s", "epoch_s", "val_dice", "load_before",
                                                  "load_after")}), flush=True)
            print("   ", json.dumps({k: final.get(k) for k in ("held_out", "forgetting_guard", "fewshot", "best")}),
                  flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": processor().describe(), "cpu_flags": flags, "runs": results}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
