"""Speed modes of segment_volume on the bundled H-SAM-Lite model vs eager fp32: identical voxels, per-organ Dice, time.

    python benchmarks/lite/agreement.py --modes int8,ort,ort-int8 --json benchmarks/lite/results/agreement.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import SimpleITK as sitk
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--modes", default="int8,ort-int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hsam.evaluation.metrics import dice
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume
    from hsam.weights.store import load_named_model

    model, card = load_named_model("hsam-lite-demo")
    image = sitk.ReadImage(str(args.data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    runs = {}
    for mode in ["eager"] + args.modes.split(","):
        segment_volume(image[:, :, :2], model, card,
                       SegmentOptions(device="cpu", mode=mode))  # build/export the engine first
        started = time.perf_counter()
        result = segment_volume(image, model, card, SegmentOptions(device="cpu", mode=mode))
        runs[mode] = (sitk.GetArrayFromImage(result.labels), time.perf_counter() - started, result.mode)
    reference = runs["eager"][0]
    report = {}
    for mode, (labels, seconds, ran) in runs.items():
        organ_dice = {card.classes[k]: dice(labels == k, reference == k) for k in range(1, 9)}
        lowest = min((v, organ) for organ, v in organ_dice.items() if not math.isnan(v))
        report[mode] = {"ran": ran, "seconds_per_slice": round(seconds / labels.shape[0], 3),
                        "identical_voxels": round(float((labels == reference).mean()), 5),
                        "min_dice_vs_eager": round(lowest[0], 4), "lowest_organ": lowest[1]}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
