"""Fine-tuning on a patient no model saw (issue 28): the loop the user runs, scored on slices it never trained on.

Data: ``shared/data/real/lidc-idri-0001`` (real contrast CT, 512x512, 2.5 mm, TotalSegmentator ``total`` labels
mapped to H-SAM with ``totalseg_total``; no gallbladder). The 20 consecutive axial slices with the most
(slice, organ) hits of spleen, liver, stomach and aorta are cut out; slices 0-9 of them (the lower 10) are written as
ONE corrected case (``image.nii.gz``, ``labels.nii.gz``, ``provenance.json``: what ``hsam finetune --cases`` reads)
and slices 10-19 are held out: never given to the run, scored afterwards.

Each arm runs ``hsam finetune --model MODEL --cases <the one case> --no-register --progress json ARGS`` as a child
process (exactly the user's command, plus the arm's ARGS), then scores, in this process, the base model and the
fine-tuned model (fp32, the same encoder outputs for both) on:

- ``held_out``: the 10 held-out slices of the unseen patient (Dice per organ; ``mean4`` = liver, spleen, stomach,
  aorta, the issue's target; ``mean`` = every organ present);
- ``demo_other``: the 20 slices of the demo model's own patient (``example_ct_sm``) that are NOT in its bundled
  reference case (z 0, 3, ..., 27): forgetting measured on slices no rehearsal or guard ever used.

The run's own forgetting-guard figures (the bundled reference case) come from its ``finished`` line. Wall time and
``/proc/loadavg`` before/after are recorded; on a shared machine times are indicative only. Usage (repository root):

    python benchmarks/finetune/bench_unseen.py --out runs/unseen --arm "default=" \
        --arm "copies0=--set encoder_cache.copies=0" --json benchmarks/finetune/results/unseen.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from bench_finetune import timed_child  # the script's own folder is on sys.path

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
PATIENT = REAL / "lidc-idri-0001"
FOUR = {1: "spleen", 5: "liver", 6: "stomach", 7: "aorta"}  # the target organs (H-SAM indices)
REFERENCE_Z = set(range(0, 30, 3))  # example_ct_sm slices in the demo's bundled reference case


def pick_slices(labels: np.ndarray, count: int = 20) -> int:
    """First z of the ``count`` consecutive slices with the most (slice, organ) hits of the four target organs."""
    hits = np.array([sum(bool((labels[z] == k).any()) for k in FOUR) for z in range(labels.shape[0])])
    windows = [hits[z:z + count].sum() for z in range(labels.shape[0] - count + 1)]
    return int(np.argmax(windows))


def _write_case(folder: Path, image: sitk.Image, labels: sitk.Image, note: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    (folder / "provenance.json").write_text(json.dumps(note) + "\n", encoding="utf-8")


def prepare(out: Path) -> dict[str, Any]:
    """Writes ``out/train/<case>`` (slices 0-9), ``out/heldout/<case>`` (10-19) and ``out/demo_other/<case>``;
    returns where they are and which z they cover."""
    from hsam.labels import remap_labels

    image = sitk.ReadImage(str(PATIENT / "ct.nii.gz"))
    raw = sitk.ReadImage(str(PATIENT / "labels_totalsegmentator.nii.gz"))
    labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(raw), "totalseg_total"))
    labels.CopyInformation(raw)
    start = pick_slices(sitk.GetArrayViewFromImage(labels))
    parts = {"train": (start, start + 10), "heldout": (start + 10, start + 20)}
    for name, (a, b) in parts.items():
        _write_case(out / name / f"lidc0001_z{a}-{b - 1}", image[:, :, a:b], labels[:, :, a:b],
                    {"source": "LIDC-IDRI-0001 (shared/data/real/lidc-idri-0001), TotalSegmentator labels mapped with "
                     f"totalseg_total, z {a}-{b - 1}", "purpose": f"bench_unseen {name}"})
    demo_image = sitk.ReadImage(str(REAL / "totalsegmentator" / "example_ct_sm.nii.gz"))
    demo_raw = sitk.ReadImage(str(REAL / "totalsegmentator" / "example_seg.nii.gz"))
    demo_labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(demo_raw), "totalseg_total"))
    demo_labels.CopyInformation(demo_raw)
    other = [z for z in range(demo_image.GetSize()[2]) if z not in REFERENCE_Z]
    series = sitk.JoinSeries([demo_image[:, :, z] for z in other])
    series_labels = sitk.JoinSeries([demo_labels[:, :, z] for z in other])
    for volume in (series, series_labels):  # JoinSeries keeps the in-plane geometry; z spacing is nominal here
        volume.SetDirection(demo_image.GetDirection())
        volume.SetOrigin(demo_image.GetOrigin())
    _write_case(out / "demo_other" / "example_ct_sm_not_reference", series, series_labels,
                {"source": f"example_ct_sm z {other}", "purpose": "forgetting on slices outside the reference case"})
    return {"start_z": start, "parts": parts, "demo_other_z": other,
            **{name: str(out / name) for name in ("train", "heldout", "demo_other")}}


def run_arm(name: str, extra: list[str], cases: str, out: Path, model: str, source: Path | None) -> dict[str, Any]:
    """One ``hsam finetune`` child process (with the ``hsam`` package in ``source`` when given); its ``finished``
    line, wall time and load."""
    run_dir = out / f"run-{name}-{time.strftime('%H%M%S')}"
    command = [sys.executable, "-m", "hsam", "finetune", "--model", model, "--cases", cases, "--name", f"bench-{name}",
               "--output", str(run_dir), "--no-register", "--device", "cpu", "--progress", "json", *extra]
    process, wall, load_before, load_after = timed_child(command, source)
    (out / f"{run_dir.name}.log").write_text(process.stdout + process.stderr, encoding="utf-8")
    if process.returncode != 0:
        raise SystemExit(f"{name} failed:\n{process.stderr[-3000:]}")
    events = [json.loads(line) for line in process.stdout.splitlines() if line.strip().startswith("{")]
    epochs = [e for e in events if "epoch" in e and "epochs" in e]
    finished = next(e for e in reversed(events) if e.get("finished"))
    return {"arm": name, "args": extra, "command": shlex.join(command), "source": str(source) if source else None,
            "run_dir": str(run_dir),
            "wall_s": round(wall, 1), "load_before": load_before, "load_after": load_after,
            "epochs": [{k: e.get(k) for k in ("epoch", "loss", "val_dice", "reference_dice", "seconds")}
                       for e in epochs],
            "finished": finished, "status": [e["status"] for e in events if "status" in e],
            "warnings": [e["warning"] for e in events if "warning" in e]}


class Scorer:
    """Base-model encoder outputs of a set of volumes (fp32), decoded by any model fine-tuned from that base."""

    def __init__(self, base: Any, card: Any, folder: str, cache: Path) -> None:
        from hsam.training.data import load_source_volumes
        from hsam.training.frozen import EncodedVolumes

        volumes = load_source_volumes({"format": "cases", "root": folder}, card.window, card.orientation, None)
        saved = os.environ.get("HSAM_HOME")
        os.environ["HSAM_HOME"] = str(cache)  # the outputs are kept under the bench folder, not the user's cache
        try:  # keyed by the encoder's weights and the volume: a later bench in the same --out reads them back
            self.encoded = EncodedVolumes(base, volumes, _device(base), cache_as="fp32")
        finally:
            if saved is None:
                del os.environ["HSAM_HOME"]
            else:
                os.environ["HSAM_HOME"] = saved

    def __call__(self, model: Any) -> dict[str, Any]:
        from hsam.labels import CLASS_NAMES

        metrics = self.encoded.dice(model, list(range(1, 9)), batch_size=8)
        organs = {CLASS_NAMES[k]: _round(metrics[f"dice_{k}"]) for k in range(1, 9)}
        four = [metrics[f"dice_{k}"] for k in FOUR]
        return {"organs": organs, "mean4": _round(float(np.mean(four))), "mean": _round(metrics["dice"])}


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def _round(value: float) -> float | None:
    return None if value != value else round(float(value), 4)


def table(paths: list[Path]) -> str:
    """Markdown rows (one per arm, the base model first) of bench records."""
    lines = ["| arm | spleen | liver | stomach | aorta | held-out mean4 | demo, other slices | reference (guard) "
             "before -> after | kept epoch / run | wall s (load) |", "|---|---|---|---|---|---|---|---|---|---|"]
    base_done = False
    for path in paths:
        record = json.loads(path.read_text(encoding="utf-8"))
        rows = [] if base_done else [("base model", record["base"]["held_out"], record["base"]["demo_other"], None)]
        base_done = True
        rows += [(run["arm"], run["held_out"], run["demo_other"], run) for run in record["runs"]]
        for name, held, demo, run in rows:
            organs = held["organs"]
            cells = [name, *(f"{organs[k]:.3f}" for k in ("spleen", "liver", "stomach", "aorta")),
                     f"**{held['mean4']:.3f}**", f"{demo['mean']:.3f}"]
            if run is None:
                cells += ["", "", ""]
            else:
                guard = run["guard"] or {}
                kept = guard.get("kept_epoch")
                cells += [f"{guard.get('dice_before')} -> {guard.get('dice_after')}",
                          f"{'last' if kept is None else kept} / {len(run['epochs'])}",
                          f"{run['wall_s']} ({run['load_before'][0]}-{run['load_after'][0]})"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/unseen"))
    parser.add_argument("--model", default="hsam-lite-demo")
    parser.add_argument("--arm", action="append", default=[], help="NAME=extra hsam finetune arguments")
    parser.add_argument("--table", type=Path, nargs="+", default=None,
                        help="print the markdown table of these bench records (--json files) and exit")
    parser.add_argument("--source", type=Path, default=None,
                        help="run the arms with the hsam package in this folder (e.g. a snapshot of HSAMSlicer/ at "
                        "the baseline commit: git archive COMMIT HSAMSlicer | tar -x -C DIR)")
    parser.add_argument("--json", type=Path, default=None, help="append-safe record: written after every arm")
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    if not args.arm:
        parser.error("give at least one --arm (or --table)")
    import torch

    from hsam.engines.cpu import processor
    from hsam.model.checkpoint import load_model
    from hsam.weights.store import resolve_model

    torch.set_grad_enabled(False)
    data = prepare(args.out / "cases")
    base, card = load_model(resolve_model(args.model)[1])
    scorers = {name: Scorer(base, card, data[folder], args.out / "score-cache")
               for name, folder in (("held_out", "heldout"), ("demo_other", "demo_other"))}
    record: dict[str, Any] = {"cpu": processor().describe(), "torch": torch.__version__, "model": args.model,
                              "data": data, "base": {k: s(base) for k, s in scorers.items()}, "runs": []}
    print(json.dumps({"base": record["base"]}), flush=True)
    for text in args.arm:
        name, _, extra = text.partition("=")
        row = run_arm(name, shlex.split(extra), data["train"], args.out, args.model,
                      args.source.resolve() if args.source else None)
        tuned, _ = load_model(Path(row["run_dir"]) / "model")
        row.update({k: s(tuned) for k, s in scorers.items()})
        row["guard"] = row["finished"].get("forgetting_guard")
        record["runs"].append(row)
        guard = row["guard"] or {}
        print(json.dumps({"arm": name, "wall_s": row["wall_s"], "load": [row["load_before"][0], row["load_after"][0]],
                          "held_out": row["held_out"], "demo_other_mean": row["demo_other"]["mean"],
                          "guard": [guard.get("dice_before"), guard.get("dice_after")]}), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            temp = args.json.with_suffix(".tmp")
            temp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            os.replace(temp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
