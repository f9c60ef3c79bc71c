"""Where propagation goes wrong: from an organ's middle slice (exact box, widened 5 px) upward, per slice the
reference area, the propagated mask's area, the decoder's IoU estimate and the slice Dice (lidc-idri-0001).

    python benchmarks/prompting/diagnose_propagation.py --data ../shared/data/real --cache CACHE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import aorta_below_arch, load_case  # noqa: E402
from embeddings_cache import load_into  # noqa: E402

from hsam.prompting.build import session_on  # noqa: E402
from hsam.prompting.session import SlicePrompt, box_of  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--organs", type=int, nargs="+", default=[5, 7, 6, 2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    case = load_case(args.data, "lidc-idri-0001")
    session = session_on(case.canonical, case.how)
    load_into(session.embeddings, args.cache, case.name)
    for organ in args.organs:
        truth = aorta_below_arch(case.reference) if organ == 7 else case.reference == organ
        slices = np.flatnonzero(truth.any(axis=(1, 2)))
        middle = int(slices[len(slices) // 2])
        previous = session.set_prompt(organ, middle, SlicePrompt(box_of(truth[middle], 5)))
        print(f"organ {organ}: reference slices {slices[0]}-{slices[-1]}, start {middle}")
        for z in range(middle + 1, min(case.canonical.shape[0], int(slices[-1]) + 6)):
            (logits, iou), = session.decode(z, [SlicePrompt(box_of(previous, 5))])
            current = logits > 0
            reference = truth[z]
            dice = 2 * (current & reference).sum() / max(1, current.sum() + reference.sum())
            print(f"  z {z}: reference {int(reference.sum())} px, mask {int(current.sum())} px, "
                  f"IoU estimate {iou:.2f}, Dice {dice:.2f}")
            if not current.any():
                break
            previous = current
    return 0


if __name__ == "__main__":
    sys.exit(main())
