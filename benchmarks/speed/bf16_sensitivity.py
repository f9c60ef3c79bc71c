"""Which part of H-SAM-Lite's TinyViT makes bf16 miss the precision rule? Mixed bf16 with one part kept in fp32.

The ``bf16`` engine runs the whole encoder in bfloat16; it missed issue 30's rule on ``example_ct_sm`` by 0.0002
(pancreas Dice against the reference +0.0102). A mixed engine keeps the "sensitive layers" in fp32: this script
looks for them. For each variant (the whole encoder in bf16 except the named parts, which run in fp32 on fp32 inputs
and hand bf16 on; ``autocast``: PyTorch's CPU autocast policy, fp32 weights and residual stream, bf16 matrix products
and convolutions), on the slices of ``example_ct_sm`` that hold the pancreas: relative L2 error of the embedding and
of the fused logits against eager fp32, voxels with fp32's label, pancreas Dice against fp32. A variant is worth a
full ``benchmarks/precision_rule.py`` run only if it cuts the error well below plain bf16's.

    python benchmarks/speed/bf16_sensitivity.py --json benchmarks/results/issue30_bf16_sensitivity.json

Errors and agreement are what count here; times are from whatever machine ran it (``--time`` adds them).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402 (puts HSAMSlicer on the path)

DATA = common.REPOSITORY.parent / "shared" / "data" / "real" / "totalsegmentator"
PANCREAS = 8
VARIANTS = ("", "patch_embed.seq", "patch_embed.seq,layers.0", "layers.0", "layers.1", "layers.2,layers.3,neck",
            "layers.1,layers.2,layers.3,neck", "neck", "autocast")


class Float32Part(nn.Module):
    """A part of a bf16 encoder run in fp32: bf16 (or fp32) in, fp32 inside, bf16 out."""

    def __init__(self, part: nn.Module) -> None:
        super().__init__()
        self.part = part.float()

    def forward(self, x: Tensor) -> Tensor:
        return self.part(x.float()).to(torch.bfloat16)


class MixedEncoder(nn.Module):
    """``encoder`` in bf16 but for ``keep`` (dotted names of submodules) in fp32. images fp32 -> embedding fp32."""

    def __init__(self, encoder: nn.Module, keep: list[str]) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder).to(torch.bfloat16).eval()
        for name in keep:
            parent, _, leaf = name.rpartition(".")
            owner = self.encoder.get_submodule(parent) if parent else self.encoder
            owner.register_module(leaf, Float32Part(owner.get_submodule(leaf)))  # ModuleList: index as a name
        self.fp32_input = "patch_embed.seq" in keep

    def forward(self, images: Tensor) -> Tensor:
        return self.encoder(images if self.fp32_input else images.to(torch.bfloat16)).float()


class AutocastEncoder(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.encoder(images).float()


def pancreas_images(model, card) -> Tensor:  # noqa: ANN001
    """Model inputs [n,3,S,S] of every third ``example_ct_sm`` slice holding the reference pancreas."""
    import SimpleITK as sitk

    from hsam.pipeline.window import model_images
    from hsam.labels import remap_labels
    from hsam.volume import read_image, to_canonical

    canonical, _ = to_canonical(read_image(DATA / "example_ct_sm.nii.gz"), card.orientation)
    reference, _ = to_canonical(sitk.ReadImage(str(DATA / "example_seg.nii.gz")), card.orientation)
    holding = np.flatnonzero((remap_labels(reference, "totalseg_total") == PANCREAS).reshape(len(reference), -1).any(1))
    return model_images(canonical[holding[::3]], card.window, model.img_size, torch.device("cpu")).contiguous()


def compare(model, encoder: nn.Module, images: Tensor, base: Tensor, base_embedding: Tensor, timed: bool) -> dict:  # noqa: ANN001
    from hsam.engines.vit import with_encoder

    variant = with_encoder(model, encoder)
    started = time.perf_counter()
    logits = variant.predict(images)
    seconds = (time.perf_counter() - started) / len(images)
    embedding = encoder(images)
    labels, reference = logits.argmax(1), base.argmax(1)
    a, b = labels == PANCREAS, reference == PANCREAS
    row = {"embedding_rel_error": round(float((embedding - base_embedding).norm() / base_embedding.norm()), 4),
           "logits_rel_error": round(float((logits - base).norm() / base.norm()), 4),
           "voxels_equal_fp32": round(float((labels == reference).float().mean()), 5),
           "pancreas_dice_vs_fp32": round(float(2 * (a & b).sum() / max(1, int(a.sum() + b.sum()))), 4)}
    return {**row, "s_per_slice_busy": round(seconds, 2)} if timed else row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated; each: comma-separated parts "
                        "kept in fp32 ('' = none: plain bf16), or 'autocast'")
    parser.add_argument("--time", action="store_true", help="also record seconds per slice (not a speed figure)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from hsam.weights.store import load_named_model

    model, card = load_named_model("hsam-lite-demo")
    images = pancreas_images(model, card)
    rows = []
    with torch.inference_mode():
        base, base_embedding = model.predict(images), model.image_encoder(images)
        for variant in args.variants.split(";"):
            keep = [part for part in variant.split(",") if part]
            encoder = AutocastEncoder(model.image_encoder) if variant == "autocast" else MixedEncoder(
                model.image_encoder, keep)
            rows.append({"fp32_parts": variant or "none (plain bf16)",
                         **compare(model, encoder, images, base, base_embedding, args.time)})
            print(json.dumps(rows[-1]), flush=True)
    record = {"command": "python benchmarks/speed/bf16_sensitivity.py " + " ".join(sys.argv[1:]),
              "slices": len(images), "machine": common.machine_record(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
