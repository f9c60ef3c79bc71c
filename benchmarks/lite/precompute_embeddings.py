"""Compute LiteMedSAM TinyViT embeddings of the H-SAM-Lite training pool once, for every training run to reuse.

The training config's ``model.init.embedding_cache`` loads this file; inputs are matched by a digest of their bytes,
built exactly as ``hsam train`` builds them from the ``synapse_npz`` slices (clip to [0, 1], 3 channels), so a slice
that differs in any bit is encoded afresh, never served a stale embedding.

    python benchmarks/lite/precompute_embeddings.py --data runs/lite-data   # ~15 min for the 1,224-slice pool
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("runs/lite-data"))
    parser.add_argument("--out", type=Path, default=None, help="default: <data>/embeddings.safetensors")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="1 is the fastest per slice on a 2-core CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from hsam.model.tiny_vit import TinyViT, load_litemedsam_encoder

    names = [n.strip() for n in (args.data / "train.txt").read_text().splitlines() if n.strip()]
    encoder = load_litemedsam_encoder(TinyViT()).eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    encoder.enable_embedding_cache(len(names) + 16)
    started = time.time()
    with torch.inference_mode():
        for start in range(0, len(names), args.batch):
            chunk = []
            for name in names[start : start + args.batch]:
                with np.load(args.data / "train" / f"{name}.npz") as data:
                    image = np.clip(data["image"].astype(np.float32), 0.0, 1.0).astype(np.float32, copy=False)
                chunk.append(np.repeat(image[None], 3, axis=0))
            encoder(torch.from_numpy(np.stack(chunk)))
            done = min(start + args.batch, len(names))
            print(f"{done}/{len(names)} {time.time() - started:.0f} s", flush=True)
    encoder.save_embedding_cache(args.out or args.data / "embeddings.safetensors")
    print(f"saved {len(encoder._cache)} embeddings in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
