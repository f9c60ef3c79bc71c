"""Per-organ Dice of an H-SAM(-Lite) model on the shared real volumes, through the product pipeline.

Each volume goes through :func:`hsam.pipeline.run.segment_volume` (reorientation, the card's window, resize to S, resize
back, argmax); Dice is computed per organ on the whole 3-D volume against the TotalSegmentator pseudo-labels mapped to
the H-SAM organs (``nan``: organ absent from both). ``dcmqi_liver`` is a patient no model here was trained on
(dcmqi's 3-slice GE CT at the liver dome, 512x512, 0.81 mm, with a manual liver segmentation): only the liver is
labelled there, so only the liver is scored. ``stress_ct`` is the training patient re-framed as the hidden patient of
issue 15 (512x512, 0.98 mm, arms down, table, arterial aorta, water-filled stomach; ``benchmarks/lite/stress.py``
writes it): robustness to framing and contrast, not generalisation. ``unseen_venous`` / ``unseen_native`` are another
anatomy in that setting: the MR patient's label map drawn as contrast-enhanced / plain CT (synthetic images). Recall
(share of the reference found) and precision (share of the prediction that is right) are reported next to Dice:
under- and over-segmentation differ.

``--output stage1`` replaces the stage-3 fusion by the stage-1 decoder alone (the SAMed-style ablation);
``--state`` loads the trainable tensors of a training checkpoint (``checkpoints/last.pt`` or ``epoch_N.pt``) into the
model first, so runs can be compared at the same step.

    python benchmarks/lite/evaluate_lite.py --model HSAMSlicer/hsam/models/hsam-lite-demo --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

CASES = (
    # name, image, labels (both relative to the data folder), label map, scored organs, what it shows
    ("ct_sm", "totalsegmentator/example_ct_sm.nii.gz", "totalsegmentator/example_seg.nii.gz", "totalseg_total",
     range(1, 9), "training patient, upper abdomen"),
    ("ct", "totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_seg_fast_force_split.nii.gz",
     "totalseg_total", range(1, 9), "training patient, whole scan, --fast labels"),
    ("mr", "totalsegmentator/example_mr_sm.nii.gz", "totalsegmentator/example_seg_mr.nii.gz", "totalseg_total_mr",
     range(1, 9), "MR: another modality (domain shift)"),
    ("dcmqi_liver", "dcmqi/ct-3slice", "dcmqi/liver_seg.nrrd", {1: 5}, (5,),
     "unseen patient: 3 CT slices at the liver dome, 512x512, manual liver label"),
    ("stress_ct", "STRESS/stress_ct_image.nii.gz", "STRESS/stress_ct_label.nii.gz", {k: k for k in range(1, 9)},
     range(1, 9), "training patient at 512x512 / 0.98 mm with arms, table, another contrast phase (stress.py)"),
    *((f"unseen_{phase}", f"STRESS/unseen_{phase}_image.nii.gz", f"STRESS/unseen_{phase}_label.nii.gz",
       {k: k for k in range(1, 9)}, range(1, 9),
       f"the MR patient's anatomy drawn as {phase}-phase CT, framed as stress_ct (stress.py; held out only from "
       "models trained without the MR anatomy)") for phase in ("venous", "native")),
)
ALL_CASES = ",".join(case[0] for case in CASES)


def load(model_dir: str, state: str | None, output: str):
    from hsam.model.checkpoint import load_model

    model, card = load_model(model_dir)
    if state:
        from hsam.training.state import load_state

        tensors = load_state(Path(state))["model"]
        model.unmerge_lora()
        missing = model.load_state_dict(tensors, strict=False)
        if missing.unexpected_keys:
            raise SystemExit(f"{state}: unexpected tensors {missing.unexpected_keys[:3]}")
        model.merge_lora()
        model.eval()
    if output == "stage1":
        model.predict = torch.no_grad()(lambda images: model.forward(images)[0]["masks"])  # type: ignore[method-assign]
    elif output == "stage2":
        model.predict = torch.no_grad()(lambda images: model.forward(images)[1]["masks"])  # type: ignore[method-assign]
    return model, card


def recall_precision(prediction: np.ndarray, reference: np.ndarray, organ: int) -> tuple[float | None, float | None]:
    p, r = prediction == organ, reference == organ
    hit = float(np.logical_and(p, r).sum())
    return (hit / r.sum() if r.any() else None), (hit / p.sum() if p.any() else None)


def organ_voxels_in(prediction: np.ndarray, mask_file: Path, classes: list[str]) -> dict[str, int]:
    """Predicted organ voxels inside a stress case's added arms and table, per organ (all should be 0)."""
    added = sitk.GetArrayFromImage(sitk.ReadImage(str(mask_file))).astype(bool)
    counts = np.bincount(prediction[added], minlength=len(classes))
    return {classes[k]: int(counts[k]) for k in range(1, len(classes)) if counts[k]}


POST = ("none", "body", "lcc", "body+lcc")  # post-processing variants scored from one inference


def score(prediction: np.ndarray, reference: np.ndarray, scored, classes: list[str]) -> dict:
    from hsam.evaluation.metrics import dice_per_organ

    dice = dice_per_organ(prediction, reference, list(scored))
    values = [v for v in dice.values() if not math.isnan(v)]
    out = {"dice": {classes[k]: (None if k not in dice or math.isnan(dice[k]) else round(float(dice[k]), 4))
                    for k in range(1, 9)},
           "mean_dice": round(float(np.mean(values)), 4) if values else None, "recall": {}, "precision": {}}
    for k in scored:
        rec, prec = recall_precision(prediction, reference, k)
        out["recall"][classes[k]] = None if rec is None else round(rec, 4)
        out["precision"][classes[k]] = None if prec is None else round(prec, 4)
    return out


def evaluate(model, card, data: Path, precision: str = "fp32", mode: str = "eager",
             cases: tuple[str, ...] = tuple(ALL_CASES.split(",")), stress: Path = Path("runs/stress"),
             post: tuple[str, ...] = ("body",), crop_to_body: bool = False) -> dict:
    """``{post variant: {case: scores}}``. One ``segment_volume`` run per case without post-processing; each
    variant then applies the same functions segment_volume uses (body mask first, then largest component)."""
    from hsam.checks.body_mask import clear_outside_trunk, tissue_threshold
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.post import keep_largest_components
    from hsam.pipeline.run import segment_volume
    from hsam.labels import remap_labels
    from hsam.volume import read_image, same_geometry

    classes = list(card.classes)
    results: dict = {variant: {} for variant in post}
    for name, image_file, label_file, label_map, scored, what in CASES:
        if name not in cases:
            continue
        image_file, label_file = (Path(str(f).replace("STRESS", str(stress))) if f.startswith("STRESS") else
                                  data / f for f in (image_file, label_file))
        image = read_image(image_file)
        labels = sitk.ReadImage(str(label_file))
        if not same_geometry(image, labels, tolerance=1e-3):
            raise SystemExit(f"{label_file} is not on the grid of {image_file}")
        reference = remap_labels(sitk.GetArrayFromImage(labels), label_map)
        started = time.perf_counter()
        result = segment_volume(image, model, card,
                                SegmentOptions(device="cpu", precision=precision, mode=mode, body_mask=False,
                                               crop_to_body=crop_to_body))
        seconds = time.perf_counter() - started
        raw = sitk.GetArrayFromImage(result.labels)
        hu = sitk.GetArrayFromImage(image)
        for variant in post:
            prediction = raw.copy()
            if "body" in variant:  # axial [z, y, x] arrays: (row, col) spacing is (y, x)
                clear_outside_trunk(prediction, hu, (image.GetSpacing()[1], image.GetSpacing()[0]),
                                    tissue_hu=tissue_threshold(card.window[0]))
            if "lcc" in variant:
                keep_largest_components(prediction, range(1, len(classes)))
            entry = {"what": what, "slices": int(raw.shape[0]), "seconds": round(seconds, 2),
                     **score(prediction, reference, scored, classes)}
            added = label_file.with_name(label_file.name.replace("_label", "_added"))
            if added != label_file and added.exists():  # the stress.py cases: arms and table drawn in
                entry["voxels_on_arms_table"] = organ_voxels_in(prediction, added, classes)
            results[variant][name] = entry
    return results


def markdown(label: str, results: dict, classes: list[str], metric: str = "dice") -> str:
    """Table rows of one metric (dice, recall or precision) per case; the mean is over the organs scored."""
    lines = []
    for name, r in results.items():
        values = r[metric]
        cells = " | ".join("—" if values.get(c) is None else f"{values[c]:.3f}" for c in classes[1:])
        scored = [v for v in values.values() if v is not None]
        mean = f"{np.mean(scored):.3f}" if scored else "—"
        lines.append(f"| {label} | {name} | {metric} | {cells} | {mean} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="saved model folder (model.json + model.safetensors)")
    parser.add_argument("--state", help="training checkpoint whose trainable tensors replace the model's")
    parser.add_argument("--output", choices=("fused", "stage1", "stage2"), default="fused")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--mode", default="eager", help="speed mode of segment_volume (eager: the fp32 reference)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default=ALL_CASES, help=f"comma-separated subset of {ALL_CASES}")
    parser.add_argument("--label", default=None, help="row label in the markdown table")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--stress", type=Path, default=Path("runs/stress"), help="folder written by stress.py")
    parser.add_argument("--crop-to-body", action="store_true", help="segment_volume(crop_to_body=True): slices cropped "
                        "to a square around the trunk before the resize to the model input")
    parser.add_argument("--post", default="body", help=f"comma-separated post-processing variants of {','.join(POST)} "
                        "(body: the trunk mask, segment_volume's default; lcc: largest component per organ)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, card = load(args.model, args.state, args.output)
    post = tuple(args.post.split(","))
    if set(post) - set(POST):
        raise SystemExit(f"--post: choose from {','.join(POST)}")
    results = evaluate(model, card, args.data, args.precision, args.mode, tuple(args.cases.split(",")), args.stress,
                       post, args.crop_to_body)
    label = args.label or f"{Path(args.model).name} {args.output}"
    for variant, per_case in results.items():
        for metric in ("dice", "recall", "precision"):
            print(markdown(f"{label} [{variant}]", per_case, list(card.classes), metric))
        for name, r in per_case.items():
            if "voxels_on_arms_table" in r:
                print(f"{name} [{variant}]: organ voxels on the added arms/table: {r['voxels_on_arms_table']}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "state": args.state, "output": args.output,
                                         "mode": args.mode, "post": list(post),
                                         "crop_to_body": args.crop_to_body,
                                         "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
