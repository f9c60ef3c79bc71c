"""Reproduce the columns of Table 1 of the H-SAM paper (Synapse, 10 % of the training slices, ViT-B) with the released
test protocol: the released test pipeline (:mod:`hsam.pipeline.reference`) and the released scoring (Dice and HD95 in voxels per
volume, the empty-prediction rules; ``hsam evaluate --protocol reference``).

Two commands, with network access and the Synapse test set of the H-SAM README (``test_vol_h5``, 12 volumes
``caseXXXX.npy.h5`` holding ``image`` [D, 512, 512] in [0, 1] and ``label``):

    hsam models download hsam-vitb-synapse
    python benchmarks/paper/reproduce_table1.py --data testset/test_vol_h5 -o benchmarks/paper/results

Writes ``table1.csv`` (one line per case and organ), ``table1.md`` (per-organ Dice next to the paper's) and
``table1.json``; prints the table. ``--save-predictions DIR`` also writes each predicted label volume as
``caseXXXX_pred.nii.gz`` (spacing 1, as the released ``--is_savenii``), for ``hsam evaluate --protocol reference``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from hsam.errors import HSAMError

# Table 1 of the paper, the H-SAM row for 10 % of the data with ViT-B: mean Dice (%), mean HD95 (voxels), per-organ
# Dice (%) in the label order 1..8.
PAPER = {
    "mean_dice": 80.35,
    "mean_hd95": 15.54,
    "dice": {"spleen": 90.21, "kidney_right": 84.16, "kidney_left": 85.65, "gallbladder": 70.70, "liver": 94.29,
             "stomach": 76.10, "aorta": 85.54, "pancreas": 56.17},
}
ORGANS = tuple(range(1, 9))


def test_cases(data: Path, list_file: Path | None) -> list[tuple[str, Path]]:
    """``(case, file)`` for every test volume: the names in ``list_file`` (``test_vol.txt``) or all ``*.npy.h5``."""
    if not data.is_dir():
        raise HSAMError(f"{data} is not a folder; give the unzipped test_vol_h5 folder of the H-SAM README")
    if list_file is not None:
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        files = [(name, data / f"{name}.npy.h5") for name in names]
        missing = [str(path) for _, path in files if not path.is_file()]
        if missing:
            raise HSAMError(f"{len(missing)} test volume(s) of {list_file} are missing, e.g. {missing[0]}")
        return files
    files = sorted(data.glob("*.npy.h5"))
    if not files:
        raise HSAMError(f"{data} holds no caseXXXX.npy.h5 files (the released test_vol_h5 layout)")
    return [(path.name[: -len(".npy.h5")], path) for path in files]


def read_case(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The released h5 layout: ``image`` [D, H, W] windowed to [0, 1] and ``label`` [D, H, W] (organ indices 0-8)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            image = np.asarray(handle["image"][:], dtype=np.float32)
            label = np.asarray(handle["label"][:]).astype(np.uint8)
    except (OSError, KeyError) as error:
        raise HSAMError(f"{path}: not a test volume with 'image' and 'label' datasets ({error})") from None
    if image.shape != label.shape or image.ndim != 3:
        raise HSAMError(f"{path}: image {image.shape} and label {label.shape} must be equal 3-D shapes")
    return image, label


def run(args: argparse.Namespace) -> dict:
    """Segment and score every test case; write the reports; return the summary."""
    import SimpleITK as sitk
    import torch

    from hsam.evaluation import markdown_summary, write_csv
    from hsam.evaluation.report import Row, summarize
    from hsam.pipeline.device import select_device
    from hsam.evaluation.metrics import score_volume
    from hsam.labels import ORGANS as ORGAN_TABLE
    from hsam.pipeline.reference import predict_volume_reference
    from hsam.weights.store import load_named_model, resolve_model

    cases = test_cases(Path(args.data), Path(args.list) if args.list else None)
    model_id, _ = resolve_model(args.model)
    model, card = load_named_model(args.model)
    device = select_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {o.index: o.name for o in ORGAN_TABLE}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    saved = Path(args.save_predictions) if args.save_predictions else None
    if saved:
        saved.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    started = time.perf_counter()
    for number, (case, path) in enumerate(cases, 1):
        image, label = read_case(path)
        tick = time.perf_counter()
        prediction, _ = predict_volume_reference(model, image, input_size=args.input_size, device=device,
                                                 batch_size=args.batch_size)
        scores = score_volume(prediction, label, ORGANS, None, "reference")
        rows += [Row(case, s.organ, names[s.organ], s) for s in scores]
        mean = 100 * float(np.mean([s.dice for s in scores]))
        print(f"[{number}/{len(cases)}] {case}: {image.shape[0]} slices, {time.perf_counter() - tick:.1f} s, "
              f"mean Dice {mean:.2f}", file=sys.stderr, flush=True)
        if saved:
            sitk.WriteImage(sitk.GetImageFromArray(prediction), str(saved / f"{case}_pred.nii.gz"))
    write_csv(rows, out / "table1.csv", "reference")
    summaries, mean_dice, mean_hd = summarize(rows)
    ours = {names[s.organ]: 100 * s.dice_mean for s in summaries}
    summary = {
        "model": model_id, "input_size": args.input_size, "cases": [c for c, _ in cases],
        "seconds": round(time.perf_counter() - started, 1),
        "mean_dice": round(100 * mean_dice, 2), "mean_hd95": round(mean_hd, 2),
        "dice": {k: round(v, 2) for k, v in ours.items()}, "paper": PAPER,
    }
    lines = ["| | mean Dice | mean HD95 | " + " | ".join(ours) + " |", "|---" * (3 + len(ours)) + "|",
             f"| this run ({model_id}, input {args.input_size}) | {100 * mean_dice:.2f} | {mean_hd:.2f} | "
             + " | ".join(f"{v:.2f}" for v in ours.values()) + " |",
             f"| paper, Table 1 (H-SAM, 10 %, ViT-B) | {PAPER['mean_dice']:.2f} | {PAPER['mean_hd95']:.2f} | "
             + " | ".join(f"{PAPER['dice'][k]:.2f}" for k in ours) + " |"]
    table = "\n".join(lines) + "\n"
    (out / "table1.md").write_text(table + "\n" + markdown_summary(rows, "reference"))
    (out / "table1.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(table, end="")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the test_vol_h5 folder (caseXXXX.npy.h5)")
    parser.add_argument("--list", default=None, help="test_vol.txt (case names); default: every *.npy.h5 in --data")
    parser.add_argument("--model", default="hsam-vitb-synapse", help="installed model id or folder")
    parser.add_argument("--input-size", type=int, default=224,
                        help="the released test.py's --input_size (default 224: slices go 512 -> 224 -> 512)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--save-predictions", default=None, metavar="DIR")
    parser.add_argument("-o", "--output", default="benchmarks/paper/results")
    args = parser.parse_args(argv)
    try:
        run(args)
    except HSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
