"""Choose propagation's stop rule on several labelled CTs at once: record each organ's propagation beyond the
outermost boxes of bench_boxes.py's "half+prop" arm WITHOUT stopping (up to 12 slices past the organ's reference
end), then score any stop rule on the recorded runs without decoding again.

Per run and slice: mask area, the previous slice's area, the decoder's IoU estimate, the mask's IoU with the previous
slice's mask, and its overlap with the reference. A rule accepts slices until the first that breaks it; its errors
are the false-positive pixels of the accepted slices plus the reference pixels beyond the start it did not cover.

    python benchmarks/prompting/tune_propagation.py record --data ../shared/data/real --cache CACHE \
        --case lidc-idri-0001 --margin-mm 3.5 --json runs/prop_lidc.json
    python benchmarks/prompting/tune_propagation.py score runs/prop_lidc.json runs/prop_ts.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_boxes  # noqa: E402
from cases import load_case  # noqa: E402
from embeddings_cache import load_into, save_from  # noqa: E402

from hsam.prompting.build import session_on  # noqa: E402
from hsam.prompting.propagation import PropagationRule  # noqa: E402
from hsam.prompting.session import PromptSession, SlicePrompt, box_of  # noqa: E402

OVERSHOOT = 12  # slices recorded past the organ's reference end


def record_run(session: PromptSession, truth: np.ndarray, start: int, step: int, margin_px: float,
               first: np.ndarray) -> list[dict]:
    """Propagate from ``first`` (the mask on slice ``start``) towards ``step`` without a stop rule."""
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    cap = slices[0] - OVERSHOOT if step < 0 else slices[-1] + OVERSHOOT
    previous, z, run = first, start + step, []
    while 0 <= z < session.shape[0] and (z - cap) * step <= 0 and previous.any():
        (logits, iou), = session.decode(z, [SlicePrompt(box_of(previous, margin_px))])
        current = logits > 0
        run.append({"area": int(current.sum()), "previous": int(previous.sum()), "iou": round(iou, 3),
                    "overlap": round(float((current & previous).sum() / max(1, (current | previous).sum())), 3),
                    "hit": int((current & truth[z]).sum())})
        previous, z = current, z + step
    return run


def record(args: argparse.Namespace) -> None:
    case = load_case(args.data, args.case)
    session = session_on(case.canonical, case.how)
    load_into(session.embeddings, args.cache, case.name)
    organs, plan = bench_boxes.default_plan(case, "half+prop")
    margin_px = args.margin_mm / float(np.mean(case.pixel_mm)) if args.margin_mm else args.margin_px
    runs = {}
    for name, organ in organs.items():
        truth = bench_boxes.truth(case, organ)
        prompted = sorted(z for (o, z) in plan.prompts if o == organ)
        for start, step in ((prompted[0], -1), (prompted[-1], 1)):
            (logits, _), = session.decode(start, [plan.prompts[(organ, start)]])
            beyond = [z for z in np.flatnonzero(truth.any(axis=(1, 2))) if (z - start) * step > 0]
            runs[f"{name}:{step:+d}"] = {"slices": record_run(session, truth, start, step, margin_px, logits > 0),
                                        "reference_beyond": int(truth[beyond].sum()),
                                        "pixel_mm2": float(np.prod(case.pixel_mm))}
            print(name, step, len(runs[f"{name}:{step:+d}"]["slices"]), "slices", flush=True)
    save_from(session.embeddings, args.cache, case.name)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"case": case.name, "margin_px": margin_px, "runs": runs}) + "\n")


def accepted(run: dict, rule: dict) -> int:
    """How many recorded slices ``rule`` accepts (it stops at the first one that breaks it)."""
    for count, s in enumerate(run["slices"]):
        if (s["area"] * run["pixel_mm2"] < rule["min_area_mm2"] or s["area"] < rule["min_ratio"] * s["previous"]
                or s["overlap"] < rule["min_overlap"] or s["iou"] < rule["min_iou"]):
            return count
    return len(run["slices"])


def errors(runs: dict, rule: dict) -> dict[str, tuple[int, int, int]]:
    """Per run: (true-positive, false-positive, false-negative pixels) beyond the start."""
    out = {}
    for key, run in runs.items():
        kept = run["slices"][:accepted(run, rule)]
        hit = sum(s["hit"] for s in kept)
        out[key] = (hit, sum(s["area"] - s["hit"] for s in kept), run["reference_beyond"] - hit)
    return out


def score(args: argparse.Namespace) -> None:
    records = [json.loads(Path(path).read_text()) for path in args.records]
    base = {"min_area_mm2": 25.0, "min_ratio": 0.25, "min_overlap": 0.0, "min_iou": 0.5}
    grid = [dict(base, min_ratio=r, min_iou=i, min_overlap=o)
            for r, i, o in itertools.product((0.25, 0.4, 0.5), (0.5, 0.6, 0.7, 0.8), (0.0, 0.3, 0.4, 0.5, 0.6))]

    def total(rule: dict) -> list[int]:
        return [sum(fp + fn for _, fp, fn in errors(r["runs"], rule).values()) for r in records]

    baseline = total(base)
    ranked = sorted(grid, key=lambda rule: max(e / b for e, b in zip(total(rule), baseline)))
    print("errors (FP + FN pixels beyond the outermost boxes) of", base, ":", baseline)
    for rule in ranked[:8]:
        print([round(e / b, 3) for e, b in zip(total(rule), baseline)], rule)
    chosen = {key: getattr(PropagationRule(), key) for key in base}
    print("hsam.prompting.propagation.PropagationRule:", chosen, [round(e / b, 3) for e, b in
                                                               zip(total(chosen), baseline)])
    for r in records:
        print(r["case"], f"(margin {r['margin_px']:.2f} px): Dice beyond the outermost boxes, base | PropagationRule")
        for organ in sorted({key.split(":")[0] for key in r["runs"]}):
            row = []
            for rule in (base, chosen):
                hit, fp, fn = np.sum([v for k, v in errors(r["runs"], rule).items() if k.startswith(organ + ":")], 0)
                row.append(f"{2 * hit / max(1, 2 * hit + fp + fn):.3f}")
            print(f"  {organ:13s}", " | ".join(row))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    rec = commands.add_parser("record")
    rec.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    rec.add_argument("--cache", type=Path, default=None)
    rec.add_argument("--case", required=True)
    rec.add_argument("--margin-mm", type=float, default=None, help="box margin in mm (else --margin-px)")
    rec.add_argument("--margin-px", type=float, default=5.0)
    rec.add_argument("--json", type=Path, required=True)
    sco = commands.add_parser("score")
    sco.add_argument("records", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    record(args) if args.command == "record" else score(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
