"""Automatic refinement (issue 26): the demo model's prompt-free labels vs the same refined by LiteMedSAM's prompt
decoder (:mod:`hsam.prompting.refine`), Dice per organ against the reference labels of the labelled CTs.

Both arms run on the same TinyViT embeddings (the demo model's frozen encoder = LiteMedSAM's): the automatic labels
are the demo's fused logits resized to the slice, softmax argmax (as :func:`hsam.pipeline.predict.predict_slices`, eager
fp32), both then cleared outside the trunk (``hsam segment``'s default body mask).

    python benchmarks/prompting/bench_refine.py --data ../shared/data/real --cache runs/prompt-embeddings \
        --json benchmarks/prompting/results/refine.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, Case, aorta_below_arch, dice, load_case  # noqa: E402
from embeddings_cache import load_into, save_from  # noqa: E402

from hsam.checks.body_mask import clear_outside_trunk, tissue_threshold, trunk_mask_slice  # noqa: E402
from hsam.prompting.decoder import load_prompt_decoder  # noqa: E402
from hsam.prompting.embedding import SliceEmbeddings  # noqa: E402
from hsam.prompting.refine import RefineRule, refine_batch  # noqa: E402
from hsam.weights.store import load_named_model  # noqa: E402

NAMES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "aorta",
         8: "pancreas"}


def run_case(case: Case, model, card, decoder, args: argparse.Namespace) -> dict:  # noqa: ANN001
    window = card.window
    embeddings = SliceEmbeddings(case.canonical, model.image_encoder, window, max_slices=10_000)
    load_into(embeddings, args.cache, case.name)
    depth = min(case.canonical.shape[0], args.max_slices or case.canonical.shape[0])
    size = case.canonical.shape[1:]
    automatic = np.zeros((depth,) + size, dtype=np.uint8)
    refined = np.zeros_like(automatic)
    tissue = tissue_threshold(window[0])
    for z in range(depth):
        embedding = embeddings.get(z)
        with torch.inference_mode():
            stage1, stage2 = model.decode(embedding[None])
            logits = (stage1["masks"] + stage2["masks"]) / 2
            automatic[z] = F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax(dim=1)[0].numpy()
        trunk = trunk_mask_slice(case.canonical[z], case.pixel_mm, tissue_hu=tissue)[None]
        refined[z] = refine_batch(decoder, embedding[None], logits, trunk, range(1, 9), size, args.rule)[0][0]
    save_from(embeddings, args.cache, case.name)
    hu = case.canonical[:depth]
    for labels in (automatic, refined):
        clear_outside_trunk(labels, hu, case.pixel_mm, tissue_hu=tissue)
    reference = case.reference[:depth]
    below_arch = aorta_below_arch(case.reference)[:depth]
    table = {}
    for value, name in NAMES.items():
        if not (reference == value).any():
            continue
        table[name] = {"automatic": round(dice(automatic == value, reference == value), 4),
                       "refined": round(dice(refined == value, reference == value), 4)}
        if value == 7:
            table["aorta_below_arch"] = {arm: round(dice((labels == 7) & below_arch, below_arch), 4)
                                         for arm, labels in (("automatic", automatic), ("refined", refined))}
    print(case.name, json.dumps(table), flush=True)
    return {"case": case.name, "slices": depth, "dice": table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--max-slices", type=int, default=None, help="score slices 0..N-1 only (lidc: 80)")
    parser.add_argument("--model", default="hsam-lite-demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="folder of cached slice embeddings (float16)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.rule = RefineRule()
    torch.set_num_threads(args.threads)
    model, card = load_named_model(args.model)
    model.eval()
    decoder = load_prompt_decoder()
    results = [run_case(load_case(args.data, name), model, card, decoder, args) for name in args.cases]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "rule"}
        args.json.write_text(json.dumps({"settings": {**settings, "rule": vars(args.rule)}, "results": results},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
