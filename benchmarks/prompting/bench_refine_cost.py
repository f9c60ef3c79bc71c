"""The refine stage's cost per slice on every labelled CT here (issue 30 item 3: at most 25 % on top of
``hsam segment``'s time per slice), measured through ``segment_volume`` itself.

Run on a QUIET machine (the numbers are a speed claim only then), from the repository root:

    python benchmarks/prompting/bench_refine_cost.py --data ../shared/data/real --rounds 1 --threads 2 \
        --json benchmarks/prompting/results/refine_cost.json

Per case (the whole volume), per round: the CPU default mode without refine, then with ``--refine``, back to back
(:func:`bench_latency.segment_round`; orientation self-check off: issue 30 counts it apart). Reported per case:
seconds per slice of each, the added share (with / without - 1), median/min/max over rounds, and the machine (CPU
flags, threads, load average before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import machine, segment_round, summary, write_report  # noqa: E402
from cases import CASES, load_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from hsam.weights.store import load_named_model

    load_before = os.getloadavg()
    model, card = load_named_model("hsam-lite-demo")
    modes = [("default", "auto", False), ("default_refine", "auto", True)]
    per_case = {}
    for name in args.cases:
        image = load_case(args.data, name).image
        segment_round(image[:, :, :1], model, card, modes)  # warm-up: engine prepared, weights paged in
        rounds = [segment_round(image, model, card, modes) for _ in range(args.rounds)]
        per_case[name] = {"slices": image.GetSize()[2], **summary(rounds)}
        print(f"{name}: " + json.dumps({k: v["median"] for k, v in summary(rounds).items()}), flush=True)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "cases": per_case}
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
