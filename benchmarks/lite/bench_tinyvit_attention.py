"""The TinyViT encoder with its attention bias as a 3-D mask (torch's unfused math path) against a 4-D one (the CPU
flash kernel), interleaved in one process on slices of the bundled sample CT.

Every ``WindowAttention`` of the demo model's encoder is switched between the two forwards before each slice, so both
see the same machine. Times one encoder forward per slice (batch 1, as ``hsam finetune`` encodes) in fp32 and under
bf16 autocast, reports the median and range over rounds, and the largest difference between the two outputs.

    python benchmarks/lite/bench_tinyvit_attention.py --rounds 5 --json benchmarks/lite/results/tinyvit_attention.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from hsam.engines.cpu import processor
from hsam.model.tiny_vit import WindowAttention
from hsam.sample_data.samples import write_sample
from hsam.training.augment import resize_image
from hsam.volume.intensity import window as intensity_window
from hsam.weights.store import load_named_model


def _attention_3d_mask(self: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The forward before the change: the bias as a [heads, L, L] mask."""
    n, length, dim = x.shape
    qkv = self.qkv(self.norm(x)).view(n, length, self.num_heads, 3, self.head_dim)
    q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)
    bias = self.attention_biases[:, self.bias_index].to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return self.proj(out.transpose(1, 2).reshape(n, length, dim))


def _slices(count: int, size: int, window: tuple[float, float]) -> torch.Tensor:
    """``count`` evenly spaced slices of the sample CT, windowed to [0, 1] and resized to the model input."""
    with tempfile.TemporaryDirectory() as folder:
        image = sitk.GetArrayFromImage(sitk.ReadImage(str(write_sample("abdomen-ct", Path(folder) / "ct.nii.gz"))))
    scaled = intensity_window(image[np.linspace(0, len(image) - 1, count).round().astype(int)], *window)
    return torch.from_numpy(np.stack([resize_image(s, size) for s in scaled]))[:, None].expand(-1, 3, -1, -1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    model, card = load_named_model("hsam-lite-demo", device="cpu")
    encoder = model.image_encoder.eval()
    images = _slices(args.slices, model.img_size, tuple(card.window))
    attentions = [m for m in encoder.modules() if isinstance(m, WindowAttention)]
    forwards = {"3-D mask": _attention_3d_mask, "4-D mask": WindowAttention.forward}
    precisions = {"fp32": contextlib.nullcontext,
                  "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}

    def use(name: str) -> None:
        for module in attentions:
            module.forward = forwards[name].__get__(module)

    times: dict[str, dict[str, list[float]]] = {p: {f: [] for f in forwards} for p in precisions}
    max_diff: dict[str, float] = {}
    with torch.inference_mode():
        for precision, autocast in precisions.items():
            outputs = {}
            for name in forwards:  # warm-up, and the outputs to compare
                use(name)
                with autocast():
                    outputs[name] = torch.cat([encoder(image[None]).float() for image in images])
            max_diff[precision] = float((outputs["3-D mask"] - outputs["4-D mask"]).abs().max())
            for _ in range(args.rounds):
                for image in images:
                    for name in forwards:
                        use(name)
                        started = time.perf_counter()
                        with autocast():
                            encoder(image[None])
                        times[precision][name].append(time.perf_counter() - started)

    result = {"cpu": processor().describe(), "cpu_flags": sorted(processor().flags), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "rounds": args.rounds, "slices": args.slices,
              "load_before": load_before, "load_after": Path("/proc/loadavg").read_text().split()[:3],
              "per_slice_s": {p: {name: {"median": round(statistics.median(t), 4), "min": round(min(t), 4),
                                         "max": round(max(t), 4)} for name, t in by_name.items()}
                              for p, by_name in times.items()},
              "max_abs_output_difference": max_diff}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
