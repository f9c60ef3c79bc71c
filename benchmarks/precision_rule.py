"""Issue 30's one precision rule, measured: every speed mode vs eager fp32 *against the reference labels*.

For each labelled real volume and each mode, the whole volume goes through :func:`hsam.pipeline.run.segment_volume`
(slab search off, orientation check off: the network's labels only); per organ present in the reference it records
Dice against the reference for the mode and for fp32, their difference, and the share of voxels whose label equals
fp32's. :func:`hsam.engines.modes.passes_precision_rule` then says which modes pass on every volume. One JSON record
per (volume, mode, organ); fp32's labels are kept in ``--cache`` so ``--slab`` can compare the slab search with them.

    python benchmarks/precision_rule.py --model hsam-lite-demo --modes bf16,ort,ort-int8,int8 \
        --json benchmarks/results/precision_rule_lite.json
    python benchmarks/precision_rule.py --model hsam-lite-demo --slab --json benchmarks/results/slab_lite.json
    python benchmarks/precision_rule.py --summarise benchmarks/results/precision_rule_lite_*.json

Times in the records are from whatever machine ran it (a busy shared one here): not speed figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

CASES = (
    # name, image, reference labels (relative to the data folder), label map, organs scored (None: those present)
    ("lidc", "lidc-idri-0001/ct.nii.gz", "lidc-idri-0001/labels_totalsegmentator.nii.gz", "totalseg_total", None),
    ("ct_sm", "totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz", "totalseg_total", None),
    ("ct", "totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_seg_fast_force_split.nii.gz",
     "totalseg_total", None),
    ("dcmqi_liver", "dcmqi/ct-3slice", "dcmqi/liver_seg.nrrd", {1: 5}, (5,)),  # only the liver is labelled
)
ALL_CASES = ",".join(case[0] for case in CASES)


def load_case(data: Path, image_file: str, label_file: str, label_map) -> tuple[sitk.Image, np.ndarray]:
    from hsam.labels import remap_labels
    from hsam.volume import read_image, same_geometry

    image = read_image(data / image_file)
    labels = sitk.ReadImage(str(data / label_file))
    if not same_geometry(image, labels, tolerance=1e-3):
        raise SystemExit(f"{label_file} is not on the grid of {image_file}")
    return image, remap_labels(sitk.GetArrayFromImage(labels), label_map)


def run(image: sitk.Image, model, card, mode: str, slab: bool) -> tuple[np.ndarray, dict]:
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume

    segment_volume(image[:, :, :1], model, card,
                   SegmentOptions(device="cpu", mode=mode, slab=False,
                                  check_orientation=False))  # build/export the engine outside the timed run
    started = time.perf_counter()
    result = segment_volume(image, model, card,
                            SegmentOptions(device="cpu", mode=mode, slab=slab, check_orientation=False))
    info = {"ran": result.mode, "seconds_busy_machine": round(time.perf_counter() - started, 1),
            "slab": result.slab}
    return sitk.GetArrayFromImage(result.labels), info


def organ_rows(name: str, mode: str, labels: np.ndarray, fp32: np.ndarray, reference: np.ndarray, organs,
               classes: list[str]) -> list[dict]:
    from hsam.evaluation.metrics import dice

    rows = []
    for k in organs:
        mode_dice, fp32_dice = dice(labels == k, reference == k), dice(fp32 == k, reference == k)
        rows.append({"volume": name, "mode": mode, "organ": classes[k],
                     "dice_vs_reference": round(mode_dice, 4), "fp32_dice_vs_reference": round(fp32_dice, 4),
                     "dice_vs_fp32": round(dice(labels == k, fp32 == k), 4),
                     "voxels_equal_fp32": round(float((labels == fp32).mean()), 6)})
    return rows


def summarise(files: list[Path]) -> None:
    """Print the records of several result files as markdown tables and the rule's verdict per mode over all."""
    from hsam.engines.modes import passes_precision_rule

    loaded = [json.loads(f.read_text()) for f in files]
    records = [r for data in loaded for r in data["records"]]
    print("| volume | mode | organ | fp32 Dice vs reference | mode Dice vs reference | change | voxels equal fp32 |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        change = r["dice_vs_reference"] - r["fp32_dice_vs_reference"]
        print(f"| {r['volume']} | {r['mode']} | {r['organ']} | {r['fp32_dice_vs_reference']:.4f} | "
              f"{r['dice_vs_reference']:.4f} | {change:+.4f} | {100 * r['voxels_equal_fp32']:.3f} % |")
    for data in loaded:
        for run in data["runs"]:
            print(json.dumps(run))
    for mode in dict.fromkeys(r["mode"] for r in records):
        print(mode, json.dumps(passes_precision_rule([r for r in records if r["mode"] == mode])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="hsam-lite-demo", help="bundled model name or saved model folder")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--modes", default="bf16,ort,ort-int8,int8", help="modes compared with eager fp32")
    parser.add_argument("--cases", default=ALL_CASES, help=f"comma-separated, in order, from {ALL_CASES}")
    parser.add_argument("--reference", choices=("eager", "ort"), default="eager", help="the fp32 engine compared "
                        "with (ort: fp32 ONNX Runtime, labels identical to eager in RESULTS.md, 1.4x faster)")
    parser.add_argument("--slab", action="store_true", help="instead: the fp32 reference engine with the slab search "
                        "vs without")
    parser.add_argument("--cache", type=Path, default=Path("runs/precision_rule"), help="fp32 labels kept here")
    parser.add_argument("--keep-going", action="store_true", help="also run a mode on the volumes after one where it "
                        "failed the rule (by default it is skipped there: the rule needs every volume)")
    parser.add_argument("--also", type=Path, nargs="*", default=[], help="JSON files of runs on other volumes "
                        "(run in parallel): a mode that failed the rule there is skipped here too")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the results here (resumes from it if it exists)")
    parser.add_argument("--summarise", type=Path, nargs="+", help="only print tables and verdicts of these results")
    args = parser.parse_args()
    if args.summarise:
        return summarise(args.summarise)
    if args.json is None:
        parser.error("--json is needed to run")
    torch.set_num_threads(args.threads)

    from hsam.engines.modes import passes_precision_rule
    from hsam.model.checkpoint import load_model
    from hsam.weights.store import load_named_model

    model, card = load_model(args.model) if Path(args.model).is_dir() else load_named_model(args.model)
    classes = list(card.classes)
    done = json.loads(args.json.read_text()) if args.json.exists() else {}  # resume a run that was stopped
    records: list[dict] = done.get("records", [])
    runs: list[dict] = [r for r in done.get("runs", []) if "skipped" not in r]
    by_name = {case[0]: case for case in CASES}
    for name in args.cases.split(","):  # in the order given: a mode that fails early is skipped on the rest
        _, image_file, label_file, label_map, scored = by_name[name]
        image, reference = load_case(args.data, image_file, label_file, label_map)
        organs = scored or [k for k in range(1, len(classes)) if (reference == k).any()]
        cached = args.cache / f"{Path(args.model).name}_{name}_{args.reference}.npy"
        if cached.exists():
            fp32 = np.load(cached)
        else:
            fp32, info = run(image, model, card, args.reference, slab=False)
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, fp32)
            runs.append({"volume": name, "mode": args.reference, "slices": int(fp32.shape[0]), **info})
        known = records + [r for other in args.also if other.exists()
                           for r in json.loads(other.read_text()).get("records", [])]
        failed = {m for m in dict.fromkeys(r["mode"] for r in known)
                  if not passes_precision_rule([r for r in known if r["mode"] == m])["passes"]}
        for mode in ([f"{args.reference}+slab"] if args.slab else args.modes.split(",")):
            if any(r["volume"] == name and r["mode"] == mode for r in runs):
                continue
            if mode in failed and not args.keep_going:  # the rule needs every volume: one miss decides it
                runs.append({"volume": name, "mode": mode, "skipped": "already failed the rule on another volume"})
                continue
            labels, info = run(image, model, card, mode.split("+")[0], slab=mode.endswith("+slab"))
            runs.append({"volume": name, "mode": mode, "slices": int(labels.shape[0]),
                         "voxels_equal_fp32": round(float((labels == fp32).mean()), 6), **info})
            records += [{**row, "fp32_reference": args.reference}
                        for row in organ_rows(name, mode, labels, fp32, reference, organs, classes)]
            print(json.dumps(runs[-1]), flush=True)
            args.json.write_text(json.dumps({"model": args.model, "runs": runs, "records": records}, indent=1) + "\n")
    verdicts = {mode: passes_precision_rule([r for r in records if r["mode"] == mode])
                for mode in dict.fromkeys(r["mode"] for r in records)}
    args.json.write_text(json.dumps({"model": args.model, "runs": runs, "records": records,
                                     "verdicts": verdicts}, indent=1) + "\n")
    for row in records:
        print(f"| {row['volume']} | {row['mode']} | {row['organ']} | {row['fp32_dice_vs_reference']:.4f} | "
              f"{row['dice_vs_reference']:.4f} | {row['dice_vs_fp32']:.4f} | {row['voxels_equal_fp32']:.5f} |")
    print(json.dumps(verdicts, indent=1))


if __name__ == "__main__":
    main()
