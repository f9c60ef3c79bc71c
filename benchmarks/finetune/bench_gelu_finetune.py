"""A whole few-shot fine-tune with the decoders' GELU as ``nn.GELU`` against :class:`hsam.model.common.GELU`.

:mod:`bench_decoder_step` times the step with both GELUs switched inside one process; this runs the whole
``hsam finetune`` (one case, nothing held out, all 10 epochs) in a fresh process per run, the two variants
alternating, and reports the wall time and the sum of epochs 2-10 (the decoder steps only: epoch 1 also encodes the
slices, which the GELU does not touch). Usage (repository root; the case folder from bench_finetune.py):

    python benchmarks/finetune/bench_gelu_finetune.py --cases /tmp/s5/f4/cases/train --rounds 3 \
        --json benchmarks/finetune/results/gelu_finetune.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_RUN = """
import contextlib, io, json, sys, time
import torch
from hsam.model import common
if sys.argv[1] == "nn.GELU":
    common.GELU.forward = torch.nn.GELU.forward
from hsam.cli import main
lines = io.StringIO()
started = time.perf_counter()
with contextlib.redirect_stdout(lines):
    main(["finetune", "--model", "hsam-lite-demo", "--cases", sys.argv[2], "--val-cases", "0", "--name", "gelu",
          "--output", sys.argv[3], "--no-register", "--device", "cpu", "--progress", "json"])
wall = time.perf_counter() - started
epochs = [json.loads(line)["seconds"] for line in lines.getvalue().splitlines() if '"epoch"' in line]
print(json.dumps({"wall_s": round(wall, 1), "epoch_s": epochs}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=Path, required=True, help="a case folder of 10 slices (one case)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            for variant in ("hsam GELU", "nn.GELU"):
                output = Path(folder) / f"run-{round_index}-{variant.replace(' ', '_')}"
                load_before = Path("/proc/loadavg").read_text().split()[:3]
                done = subprocess.run([sys.executable, "-c", _RUN, variant, str(args.cases), str(output)],
                                      capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.splitlines()[-1])
                row.update(variant=variant, round=round_index, load_before=load_before,
                           load_after=Path("/proc/loadavg").read_text().split()[:3],
                           epochs_2_to_10_s=round(sum(row["epoch_s"][1:]), 2))
                runs.append(row)
                print(json.dumps({k: row[k] for k in ("variant", "round", "wall_s", "epochs_2_to_10_s")}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
