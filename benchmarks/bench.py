"""Speed benchmark of H-SAM's speed modes against eager fp32 of the same model, in one process.

Same as ``hsam bench`` (see ``hsam bench --help``); kept here so the benchmark runs from a source checkout:

    python benchmarks/bench.py --config vit_b_512 --rounds 3 --volume-slices 16        # random weights: speed
    python benchmarks/bench.py --model /path/to/trained/model --json out.json            # trained: agreement too
    python benchmarks/bench.py --device cuda --modes fast,compile --precision bf16       # GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "HSAMSlicer"))

if __name__ == "__main__":
    from hsam.cli import main

    sys.exit(main(["bench", *sys.argv[1:]]))
