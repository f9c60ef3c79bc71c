"""Automatic refinement (issue 26): the demo model's prompt-free labels vs the same refined by LiteMedSAM's prompt
decoder (:mod:`hsam.prompting.refine`) under one or more rules (arms), Dice per organ against the reference labels,
and the decoder's work per slice (calls and decoded boxes: what the stage's cost is made of).

Every arm runs on the same TinyViT embeddings (the demo model's frozen encoder = LiteMedSAM's): the automatic labels
are the demo's fused logits resized to the slice, softmax argmax (as :func:`hsam.pipeline.predict.predict_slices`,
eager fp32), every arm then cleared outside the trunk (``hsam segment``'s default body mask). A box decoded once on a
slice is reused by every arm that sends the same box (the counts are of what each arm's stage sends). An arm is
``NAME`` (one of ``ARMS``) or ``NAME=FIELD=VALUE,...`` with :class:`RefineRule` fields (``none`` for None, organs
joined by ``+``), e.g. ``--arms stage add05=add_floor=0.05,rebox_px=none``.

    python benchmarks/prompting/bench_refine.py --data ../shared/data/real --cache runs/prompt-embeddings \
        --json benchmarks/prompting/results/refine.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, OTHER_ANATOMY, Case, aorta_below_arch, dice, load_case  # noqa: E402
from embeddings_cache import load_into, save_from  # noqa: E402

from hsam.checks.body_mask import clear_outside_trunk, tissue_threshold, trunk_mask_slice  # noqa: E402
from hsam.prompting.decoder import Decoded, load_prompt_decoder  # noqa: E402
from hsam.prompting.embedding import SliceEmbeddings  # noqa: E402
from hsam.prompting.refine import RefineRule, refine_batch  # noqa: E402
from hsam.weights.store import load_named_model  # noqa: E402

NAMES = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach", 7: "aorta",
         8: "pancreas"}
MEAN_OF = ("liver", "spleen", "stomach", "aorta")  # issue 26's mean
ARMS = {  # named rules: issue 26's measured box rule (the decoder's answer replaces), and the stage's default
    "issue26": RefineRule(min_probability=0.3, widen_px=5.0, min_side_px=20.0, rebox_px=2.5, add_floor=None,
                          max_pixel_mm=None),
    "stage": RefineRule(),
}


def parse_arm(text: str) -> tuple[str, RefineRule]:
    """``NAME`` of ARMS or ``NAME=field=value,...`` -> (name, rule)."""
    name, _, spec = text.partition("=")
    if not spec:
        return name, ARMS[name]
    kinds = {field.name: field.type for field in dataclasses.fields(RefineRule)}
    values = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        if key not in kinds:
            raise SystemExit(f"error: {key!r} is no RefineRule field ({', '.join(kinds)})")
        if value == "none":
            values[key] = None
        elif key == "organs":
            values[key] = tuple(int(v) for v in value.split("+"))
        else:
            values[key] = float(value)
    return name, RefineRule(**values)


class CountingDecoder:
    """The prompt decoder, answering a box it already decoded on the same slice from memory; counts the calls and
    boxes each arm sends (``arm``, ``z`` set by the caller)."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.decoder = decoder
        self.memory: dict[tuple, torch.Tensor] = {}
        self.calls: Counter = Counter()
        self.boxes: Counter = Counter()
        self.arm, self.z = "", 0

    def __call__(self, embedding: torch.Tensor, boxes: torch.Tensor) -> Decoded:
        self.calls[self.arm] += 1
        self.boxes[self.arm] += len(boxes)
        keys = [(self.z, tuple(round(float(v), 4) for v in box)) for box in boxes]
        missing = [n for n, key in enumerate(keys) if key not in self.memory]
        if missing:
            with torch.inference_mode():
                decoded = self.decoder(embedding, boxes[missing]).logits.half()
            for n, logits in zip(missing, decoded):
                self.memory[keys[n]] = logits
        logits = torch.stack([self.memory[key].float() for key in keys])
        return Decoded(logits, torch.zeros(len(keys)))


def automatic_logits(model, embedding: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """The demo's fused logits [1, K, 256, 256] of one slice's embedding (eager fp32)."""
    with torch.inference_mode():
        stage1, stage2 = model.decode(embedding[None])
        return (stage1["masks"] + stage2["masks"]) / 2


def score(labels: np.ndarray, reference: np.ndarray, below_arch: np.ndarray) -> dict:
    """Dice per organ present in the reference (and the aorta below the arch), the mean of MEAN_OF."""
    table = {}
    for value, name in NAMES.items():
        if (reference == value).any():
            table[name] = round(dice(labels == value, reference == value), 4)
            if value == 7:
                table["aorta_below_arch"] = round(dice((labels == 7) & below_arch, below_arch), 4)
    present = [table[name] for name in MEAN_OF if name in table]
    table["mean4"] = round(float(np.mean(present)), 4)
    return table


def run_case(case: Case, model, card, decoder, args: argparse.Namespace) -> dict:  # noqa: ANN001
    window = card.window
    embeddings = SliceEmbeddings(case.canonical, model.image_encoder, window, max_slices=10_000)
    load_into(embeddings, args.cache, case.name)
    depth = min(case.canonical.shape[0], args.max_slices or case.canonical.shape[0])
    size = case.canonical.shape[1:]
    automatic = np.zeros((depth,) + size, dtype=np.uint8)
    refined = {name: np.zeros_like(automatic) for name in args.arms}
    trunk = np.zeros((depth,) + size, dtype=bool)
    tissue = tissue_threshold(window[0])
    counting = CountingDecoder(decoder)
    for z in range(depth):
        embedding = embeddings.get(z)
        logits = automatic_logits(model, embedding)
        automatic[z] = F.interpolate(logits, size, mode="bilinear", align_corners=False).argmax(dim=1)[0].numpy()
        trunk[z] = trunk_mask_slice(case.canonical[z], case.pixel_mm, tissue_hu=tissue)
        counting.z = z
        for name, rule in args.arms.items():
            counting.arm = name
            refined[name][z] = refine_batch(counting, embedding[None], logits, trunk[z][None], range(1, 9), size,
                                            case.pixel_mm, rule)[0][0]
    save_from(embeddings, args.cache, case.name)
    added_outside = {name: int(((labels > 0) & (automatic == 0) & ~trunk).sum()) for name, labels in refined.items()}
    hu = case.canonical[:depth]
    for labels in (automatic, *refined.values()):
        clear_outside_trunk(labels, hu, case.pixel_mm, tissue_hu=tissue)
    reference = case.reference[:depth]
    below_arch = aorta_below_arch(case.reference)[:depth]
    table = {"automatic": score(automatic, reference, below_arch)}
    table.update({name: score(labels, reference, below_arch) for name, labels in refined.items()})
    result = {"case": case.name, "slices": depth, "dice": table,
              "decoder_calls_per_slice": {name: round(counting.calls[name] / depth, 3) for name in args.arms},
              "boxes_per_slice": {name: round(counting.boxes[name] / depth, 3) for name in args.arms},
              "added_outside_trunk_voxels": added_outside}
    for name in table:
        work = "" if name == "automatic" else f" boxes/slice {result['boxes_per_slice'][name]}"
        print(case.name, name, json.dumps(table[name]) + work, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--cases", nargs="+", default=[*CASES, *OTHER_ANATOMY])
    parser.add_argument("--max-slices", type=int, default=None, help="score slices 0..N-1 only (lidc: 80)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="NAME or NAME=field=value,... (see above)")
    parser.add_argument("--model", default="hsam-lite-demo")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=None, help="folder of cached slice embeddings (float16)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.arms = dict(parse_arm(text) for text in args.arms)
    torch.set_num_threads(args.threads)
    model, card = load_named_model(args.model)
    model.eval()
    decoder = load_prompt_decoder()
    results = [run_case(load_case(args.data, name), model, card, decoder, args) for name in args.cases]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "arms"}
        arms = {name: dataclasses.asdict(rule) for name, rule in args.arms.items()}
        report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": settings, "arms": arms,
                  "results": results}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
