"""Prompt variants for one organ with the simulated "boxes" arm of bench_boxes.py (the stomach's missing 0.03 on
lidc-idri-0001). Per boxed or interpolated slice, the organ's own mask (not merged with other organs) from:
  single      SAM's single-mask output (what hsam.prompting uses);
  m1, m2, m3  each of SAM's three multimask outputs; multi_best: the one with the highest predicted IoU;
  maskprev    the box plus the previous slice's single-mask logits as SAM's dense mask prompt;
  centre_pt   the box plus a positive point at its centre.
Dice over all the organ's prompted slices together.

    python benchmarks/prompting/diagnose_prompt_variants.py --data ../shared/data/real --cache CACHE \
        --case lidc-idri-0001 --organ 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_boxes  # noqa: E402
from cases import load_case  # noqa: E402
from embeddings_cache import load_into  # noqa: E402

from hsam.prompting.build import session_on  # noqa: E402
from hsam.prompting.session import PromptSession, model_box  # noqa: E402

VARIANTS = ("single", "m1", "m2", "m3", "multi_best", "maskprev", "centre_pt")


def decode_all(session: PromptSession, z: int, box, mask: torch.Tensor | None = None,  # noqa: ANN001
               point: tuple[float, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [4, 256, 256] (single, then the three multimask outputs) and their predicted IoUs [4]."""
    decoder = session.decoder
    boxes = torch.tensor([model_box(box, *session.shape[1:])])
    points = None if point is None else (torch.tensor([[point]]), torch.ones(1, 1, dtype=torch.int32))
    outputs = []
    with torch.inference_mode():
        sparse, dense = decoder.prompt_encoder(points=points, boxes=boxes, masks=mask)
        for multimask in (False, True):
            outputs.append(decoder.mask_decoder(
                image_embeddings=session.embeddings.get(z)[None], image_pe=decoder.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask))
    return torch.cat([outputs[0][0], outputs[1][0]], 1)[0], torch.cat([outputs[0][1], outputs[1][1]], 1)[0]


def variants_of_slice(session: PromptSession, z: int, box, previous: torch.Tensor | None  # noqa: ANN001
                      ) -> dict[str, torch.Tensor]:
    """Logits [256, 256] of every variant on slice ``z``."""
    logits, iou = decode_all(session, z, box)
    out = {"single": logits[0], "m1": logits[1], "m2": logits[2], "m3": logits[3],
           "multi_best": logits[1 + int(iou[1:].argmax())]}
    out["maskprev"] = logits[0] if previous is None else decode_all(session, z, box, previous[None, None])[0][0]
    x0, y0, x1, y1 = model_box(box, *session.shape[1:])
    out["centre_pt"] = decode_all(session, z, box, point=((x0 + x1) / 2, (y0 + y1) / 2))[0][0]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--case", default="lidc-idri-0001")
    parser.add_argument("--organ", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    case = load_case(args.data, args.case)
    session = session_on(case.canonical, case.how)
    load_into(session.embeddings, args.cache, case.name)
    _, plan = bench_boxes.default_plan(case, "boxes")
    truth = bench_boxes.truth(case, args.organ)
    counts = {name: np.zeros(3) for name in VARIANTS}  # overlap, mask, reference pixels
    previous = None
    for z in sorted(z for (organ, z) in plan.prompts if organ == args.organ):
        variants = variants_of_slice(session, z, plan.prompts[(args.organ, z)].box, previous)
        previous = variants["single"]
        for name, logits in variants.items():
            mask = F.interpolate(logits[None, None], session.shape[1:], mode="bilinear",
                                 align_corners=False)[0, 0].numpy() > 0
            counts[name] += ((mask & truth[z]).sum(), mask.sum(), truth[z].sum())
    print(args.case, "organ", args.organ)
    for name, (overlap, mask, reference) in counts.items():
        print(f"  {name:12s} Dice {2 * overlap / (mask + reference):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
