"""One few-shot training step of the H-SAM-Lite decoders, two variants of a layer switched between steps, interleaved.

The step is what ``hsam finetune`` runs per batch with a frozen encoder: both decoder stages on a batch of encoder
outputs under the run's precision, the H-SAM loss, backward, AdamW. Between steps the compared layer is switched in
every module of the model (same parameters), so both variants see the same machine:

- ``--compare norm``: SAM's elementwise ``LayerNorm2d`` against :class:`hsam.model.common.LayerNorm2d`'s fused one;
  also times the label step of validation (``argmax(1)`` against ``max(1).indices`` on [8,9,512,512] logits) and
  inference with each norm: eager fp32 ``predict`` of 3 slices and, with ``--ort``, ONNX Runtime per slice on a graph
  exported with each.
- ``--compare gelu``: ``nn.GELU`` against :class:`hsam.model.common.GELU` (the gradient handed to the kernel in the
  input's layout); inference does not change (no autograd there), so only the step is timed.

Prints medians and spreads, CPU flags and load average. Usage:

    python benchmarks/finetune/bench_decoder_step.py --rounds 5 --ort --json benchmarks/finetune/results/decoder_step.json
    python benchmarks/finetune/bench_decoder_step.py --compare gelu --rounds 8 \
        --json benchmarks/finetune/results/decoder_step_gelu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hsam.engines.cpu import processor
from hsam.model.common import GELU, LayerNorm2d
from hsam.model.sam_compat import modeling
from hsam.training.losses import LossConfig, hsam_loss
from hsam.training.model_setup import load_source_model


def _load() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="hsam-lite-demo")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if processor().native_bf16 else "fp32")
    parser.add_argument("--compare", choices=["norm", "gelu"], default="norm")
    parser.add_argument("--ort", action="store_true", help="also time ONNX Runtime on graphs exported with each norm")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    load_before = _load()

    torch.manual_seed(0)
    model, _ = load_source_model(args.model)
    model.train()
    model.image_encoder.eval()
    for p in model.image_encoder.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0, foreach=True)
    embedding = torch.randn(args.batch, 256, model.grid, model.grid) * 0.3
    with torch.no_grad():
        low = model.decode(embedding[:1])[0]["low_res_logits"].shape[-1]
    label = torch.randint(0, model.num_outputs, (args.batch, model.img_size, model.img_size))
    low_label = torch.randint(0, model.num_outputs, (args.batch, low, low))
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step() -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            stage1, stage2 = model.decode(embedding, 0.2)
        loss = hsam_loss(stage1["low_res_logits"], stage2["low_res_logits"], low_label, label, 0, LossConfig()).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    if args.compare == "norm":
        forwards = {"sam": modeling().common.LayerNorm2d.forward, "fused": LayerNorm2d.forward}
        switched = [m for m in model.modules() if isinstance(m, LayerNorm2d)]
    else:
        forwards = {"nn.GELU": torch.nn.GELU.forward, "hsam GELU": GELU.forward}
        switched = [m for m in model.modules() if isinstance(m, GELU)]

    def use(name: str) -> None:
        for module in switched:
            module.forward = forwards[name].__get__(module)

    for name in forwards:  # warm-up
        use(name)
        step()
    steps: dict[str, list[float]] = {name: [] for name in forwards}
    for _ in range(args.rounds):
        for name in forwards:
            use(name)
            steps[name].append(step())

    result = {"cpu": processor().describe(), "cpu_flags": sorted(processor().flags), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "precision": args.precision, "batch": args.batch,
              "rounds": args.rounds, "load_before": load_before, "compare": args.compare,
              "step": {name: _summary(times) for name, times in steps.items()}, "raw": {"step": steps}}
    if args.compare == "gelu":
        return _finish(dict(result, load_after=_load()), args.json)

    logits = torch.randn(8, model.num_outputs, 512, 512)
    assert torch.equal(logits.argmax(1), logits.max(1).indices)
    labels: dict[str, list[float]] = {"argmax": [], "max_indices": []}
    for _ in range(args.rounds):
        for name, run in (("argmax", lambda: logits.argmax(1)), ("max_indices", lambda: logits.max(1).indices)):
            started = time.perf_counter()
            run()
            labels[name].append(time.perf_counter() - started)

    model.eval()
    images = torch.rand(3, 3, model.img_size, model.img_size)
    predicts: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name in forwards:
                use(name)
                started = time.perf_counter()
                model.predict(images)
                predicts[name].append(time.perf_counter() - started)
    ort_slices: dict[str, list[float]] = {}
    if args.ort:
        import tempfile

        from hsam.engines.ort import OrtPredictor, export_fp32

        with tempfile.TemporaryDirectory() as folder:
            sessions = {}
            for name in forwards:
                use(name)
                sessions[name] = OrtPredictor(export_fp32(model, Path(folder) / f"{name}.onnx"), threads=2)
            ort_slices = {name: [] for name in forwards}
            for _ in range(args.rounds):
                for name, session in sessions.items():
                    started = time.perf_counter()
                    session(images)
                    ort_slices[name].append((time.perf_counter() - started) / len(images))

    result.update(load_after=_load(),
                  labels_8x9x512x512={name: _summary(times) for name, times in labels.items()},
                  eager_predict_3_slices_fp32={name: _summary(times) for name, times in predicts.items()},
                  ort_per_slice={name: _summary(times) for name, times in ort_slices.items()},
                  raw={"step": steps, "labels": labels, "predict": predicts, "ort": ort_slices})
    return _finish(result, args.json)


def _summary(times: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
            "max_s": round(max(times), 4)}


def _finish(result: dict, path: Path | None) -> int:
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=1))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
