"""A briefly trained ViT-B/512 H-SAM for the speed benchmark's agreement check (not a usable model).

Random weights give near-tied logits, so label agreement between speed modes means nothing with them. This script
makes the logits decisive cheaply: the encoder (random init, seed 0: no SAM weights offline) is frozen, its
embeddings of a few real CT slices are computed once, and both decoders are trained on them for a few hundred steps
(cross-entropy on the stage-1 and stage-2 outputs against TotalSegmentator's labels mapped to the 8 H-SAM organs).
The embeddings are cached next to ``--out``. The result is saved with ``save_model`` (card ``demo: true``). ``hsam train`` with a frozen encoder does the same
job end to end; this cached-embedding loop is ~20x cheaper on a 2-core CPU.

    python benchmarks/train_quick_vitb.py --out /tmp/hsam-vitb-quick --steps 300
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "HSAMSlicer"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="model folder to write")
    parser.add_argument("--config", default="vit_b_512")
    parser.add_argument("--ct", default=None, help="CT (default: shared example_ct.nii.gz)")
    parser.add_argument("--labels", default=None, help="TotalSegmentator labels of --ct")
    parser.add_argument("--slices", default="61:112:2", help="training slice range start:stop:step (canonical z)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    import numpy as np
    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    from hsam.labels import remap_labels
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, save_model
    from hsam.model.config import load_model_config
    from hsam.model.hsam import prior_from_logits
    from hsam.speed.bench import default_volume
    from hsam.engines.vit import FastEncoder
    from hsam.volume import to_canonical, window

    ct_path = Path(args.ct) if args.ct else default_volume()
    label_path = Path(args.labels) if args.labels else ct_path.parent / "example_seg_fast_force_split.nii.gz"
    torch.manual_seed(0)
    config = load_model_config(args.config)
    model = build_hsam(config).eval()
    card = ModelCard.for_config(config, "hsam-vitb-quick", demo=True, title="ViT-B/512 H-SAM, decoders trained "
                                "briefly on one CT (speed-benchmark fixture, not for use)",
                                training_data=f"{ct_path.name} slices {args.slices}", license="Apache-2.0")
    ct, _ = to_canonical(sitk.ReadImage(str(ct_path)), card.orientation)
    seg, _ = to_canonical(sitk.ReadImage(str(label_path)), card.orientation)
    seg = remap_labels(seg, "totalseg_total")
    start, stop, step = (int(v) for v in args.slices.split(":"))
    index = np.arange(start, min(stop, ct.shape[0]), step)
    size = model.img_size

    images = torch.from_numpy(window(ct[index], *card.window))[:, None]
    images = F.interpolate(images, (size, size), mode="bicubic", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    targets = torch.from_numpy(seg[index].astype(np.int64))[:, None].float()
    targets = F.interpolate(targets, (size, size), mode="nearest")[:, 0].long()

    started = time.perf_counter()
    cache = Path(args.out).with_name(Path(args.out).name + "-embeddings.pt")
    if cache.is_file():
        embeddings = torch.load(cache, weights_only=True)
    else:
        # the exact fast encoder (hsam.engines.vit): same embeddings to ~1e-6, 1.4x less work
        encoder = FastEncoder(model.image_encoder)
        with torch.inference_mode():
            embeddings = torch.cat([encoder(images[i : i + 1].contiguous()) for i in range(len(index))]).clone()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(embeddings, cache)
    print(f"{len(index)} embeddings in {time.perf_counter() - started:.0f} s", flush=True)

    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("image_encoder")]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    counts = torch.bincount(targets.flatten(), minlength=model.num_outputs).float()
    weights = (counts.sum() / counts.clamp_min(1)).pow(0.5)
    weights = weights / weights.mean()
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step_index in range(args.steps):
        pick = torch.randint(0, len(index), (args.batch,), generator=generator)
        embedding, target = embeddings[pick], targets[pick]
        dense, image_pe = model.prompt_encoder()
        stage1 = model.mask_decoder(embedding, image_pe, dense, want_class_maps=False)
        masks1 = F.interpolate(stage1.logits, (size, size), mode="bilinear", align_corners=False)
        prior = prior_from_logits(stage1.logits, tuple(embedding.shape[-2:]))
        logits2, _ = model.mask_decoder2(embedding, image_pe, dense, prior, stage1.up_embed, stage1.class_maps)
        loss = F.cross_entropy(masks1, target, weight=weights) + F.cross_entropy(logits2, target, weight=weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_index % 25 == 0 or step_index == args.steps - 1:
            print(f"step {step_index} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    model.eval()
    with torch.inference_mode():
        predicted = torch.cat([model.predict(images[i : i + 1].contiguous()).argmax(1) for i in range(0, len(index), 4)])
    sample = targets[:: 4]
    agree = (predicted == sample).float().mean().item()
    organ_recall = ((predicted == sample) & (sample > 0)).sum().item() / max(1, (sample > 0).sum().item())
    print(f"training-slice pixel accuracy {agree:.4f}, organ-pixel recall {organ_recall:.4f}, predicted classes "
          f"{torch.bincount(predicted.flatten(), minlength=model.num_outputs).tolist()}", flush=True)
    card.extra = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "encoder": "random init, frozen"}
    folder = save_model(model, card, args.out)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
