"""GPU throughput of H-SAM ViT-B at 512 (random weights are fine for speed): slices per second per variant.

Variants: eager / fast (exact encoder rewrites of hsam.engines.vit) x fp32 / fp16 / bf16 (autocast) / bf16 weights,
batch sizes 1..64, CUDA graphs and torch.compile on the best variant, then ``segment_volume`` end to end on a
phantom volume. Stays within ``--budget`` seconds (skips what does not fit) and writes one JSON record.
Run through benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "HSAMSlicer"))

STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def log(text: str) -> None:
    print(f"[{elapsed():6.1f}s] {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_results.json")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for this script (default 270)")
    parser.add_argument("--model", default=os.environ.get("HSAM_BENCH_MODEL"), help="trained model folder (optional)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"results": [], "errors": []}

    def save() -> None:
        record["seconds"] = round(elapsed(), 1)
        (out / "gpu_results.json").write_text(json.dumps(record, indent=1) + "\n")

    import torch

    record["torch"] = torch.__version__
    record["cuda"] = torch.version.cuda
    if not torch.cuda.is_available():
        record["errors"].append("no CUDA device")
        save()
        log("no CUDA device")
        return 1
    record["gpu"] = torch.cuda.get_device_name()
    record["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    log(f"{record['gpu']} torch {torch.__version__} cuda {torch.version.cuda}")

    from hsam.model.build import build_hsam
    from hsam.model.config import load_model_config
    from hsam.engines.vit import FastEncoder, with_encoder

    device = torch.device("cuda")
    if args.model:
        from hsam.model.checkpoint import load_model

        model, _ = load_model(args.model, device="cpu")
        record["model"] = str(args.model)
    else:
        torch.manual_seed(0)
        model = build_hsam(load_model_config("vit_b_512")).eval()
        model.merge_lora()
        record["model"] = "vit_b_512 random weights (seed 0)"
    model = model.to(device).eval()
    fast = with_encoder(model, FastEncoder(model.image_encoder))
    size = model.img_size
    torch.manual_seed(0)
    pool = torch.rand(64, 3, size, size, device=device)

    dtypes = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}

    def runner(net, precision: str):  # noqa: ANN001, ANN202
        dtype = dtypes[precision]

        def run(images):  # noqa: ANN001, ANN202
            with torch.inference_mode():
                if dtype is None:
                    return net.predict(images)
                with torch.autocast("cuda", dtype=dtype):
                    return net.predict(images)

        return run

    def timed(run, batch: int, min_seconds: float = 1.0, max_iters: int = 30) -> dict:  # noqa: ANN001
        images = pool[:batch]
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            run(images)
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        iters, total = 0, 0.0
        while iters < max_iters and total < min_seconds * 1000:
            start.record()
            run(images)
            stop.record()
            stop.synchronize()
            total += start.elapsed_time(stop)
            iters += 1
        seconds = total / 1000 / iters
        return {"batch": batch, "ms_per_batch": round(seconds * 1000, 2), "slices_per_s": round(batch / seconds, 1),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}

    # accuracy of the reduced precisions against fp32 on the same inputs (random weights: logits error only)
    with torch.inference_mode():
        reference = model.predict(pool[:4]).float()
    accuracy = {}
    for name, net in (("eager", model), ("fast", fast)):
        for precision in ("fp32", "fp16", "bf16"):
            try:
                logits = runner(net, precision)(pool[:4]).float()
                accuracy[f"{name}-{precision}"] = {
                    "logits_rel_error": float((logits - reference).norm() / reference.norm()),
                    "label_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
                }
            except Exception as error:  # noqa: BLE001 (keep measuring the others)
                record["errors"].append(f"accuracy {name}-{precision}: {error!r}")
    record["accuracy_vs_fp32"] = accuracy
    save()

    def measure(variant: str, run, batches, limit: float = 0.55) -> None:  # noqa: ANN001
        for batch in batches:
            if elapsed() > args.budget * limit:
                record["errors"].append(f"skipped {variant} batch {batch}: time budget")
                return
            try:
                row = {"variant": variant, **timed(run, batch)}
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                record["errors"].append(f"{variant} batch {batch}: out of memory")
                return
            except Exception as error:  # noqa: BLE001
                record["errors"].append(f"{variant} batch {batch}: {error!r}")
                traceback.print_exc()
                return
            record["results"].append(row)
            log(f"{variant:<22} batch {batch:>2}: {row['slices_per_s']:8.1f} slices/s ({row['peak_gib']} GiB)")
            save()

    measure("eager-fp32", runner(model, "fp32"), [8])
    measure("eager-bf16", runner(model, "bf16"), [8, 32])
    measure("eager-fp16", runner(model, "fp16"), [8, 32])
    measure("fast-fp32", runner(fast, "fp32"), [8])
    measure("fast-fp16", runner(fast, "fp16"), [8, 32])
    measure("fast-bf16", runner(fast, "bf16"), [1, 2, 4, 8, 16, 32, 64])

    # the half-precision network itself (no autocast casts): bf16 weights
    try:
        half = with_encoder(model, FastEncoder(model.image_encoder))
        import copy

        half = copy.deepcopy(half).to(torch.bfloat16)

        def run_half(images):  # noqa: ANN001, ANN202
            with torch.inference_mode():
                return half.predict(images.to(torch.bfloat16))

        with torch.inference_mode():
            logits = run_half(pool[:4]).float()
        accuracy["fast-bf16-weights"] = {
            "logits_rel_error": float((logits - reference).norm() / reference.norm()),
            "label_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
        }
        measure("fast-bf16-weights", run_half, [8, 32, 64])
        torch.cuda.empty_cache()
    except Exception as error:  # noqa: BLE001
        record["errors"].append(f"bf16 weights: {error!r}")

    best = max((r for r in record["results"] if r["variant"] == "fast-bf16"), key=lambda r: r["slices_per_s"],
               default={"batch": 32})
    best_batch = best["batch"]

    # CUDA graphs: replay a captured forward at a fixed batch (removes launch overhead)
    for batch in sorted({8, best_batch}):
        if elapsed() > args.budget * 0.65:
            record["errors"].append("skipped CUDA graphs: time budget")
            break
        try:
            static_in = pool[:batch].clone()
            run = runner(fast, "bf16")
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    run(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run(static_in)

            def replay(images, graph=graph, static_in=static_in, static_out=static_out):  # noqa: ANN001, ANN202
                static_in.copy_(images)
                graph.replay()
                return static_out

            diff = float((replay(pool[:batch]).float() - run(pool[:batch]).float()).abs().max())
            measure("fast-bf16-cudagraph", replay, [batch], limit=0.7)
            record.setdefault("cudagraph_max_abs_diff", {})[str(batch)] = diff
            del graph
        except Exception as error:  # noqa: BLE001
            record["errors"].append(f"cudagraph batch {batch}: {error!r}")
            traceback.print_exc()

    # end to end: segment_volume on a 512 x 512 x 160 phantom (windowing, resizing, transfers, argmax included)
    if elapsed() < args.budget * 0.75:
        try:
            import numpy as np
            import SimpleITK as sitk

            from hsam.pipeline.options import SegmentOptions
            from hsam.pipeline.run import segment_volume
            from hsam.model.checkpoint import ModelCard

            card = ModelCard.for_config(model.config, "bench", demo=True)
            volume = np.full((160, 512, 512), -1000, dtype=np.int16)
            yy, xx = np.ogrid[:512, :512]
            volume[:, ((yy - 256) / 190.0) ** 2 + ((xx - 256) / 230.0) ** 2 <= 1] = 40
            image = sitk.GetImageFromArray(volume)
            for mode in ("fast", "eager"):
                for batch in sorted({16, best_batch}):
                    if elapsed() > args.budget * 0.8:
                        break
                    result = segment_volume(image, model, card,
                                            SegmentOptions(device="cuda", precision="bf16", batch_size=batch,
                                                           mode=mode))
                    row = {"variant": f"segment_volume-{mode}-bf16", "batch": batch,
                           "slices_per_s": round(160 / result.seconds, 1), "seconds": round(result.seconds, 2)}
                    record["results"].append(row)
                    log(f"segment_volume {mode} bf16 batch {batch}: {row['slices_per_s']} slices/s")
                    save()
        except Exception as error:  # noqa: BLE001
            record["errors"].append(f"segment_volume: {error!r}")
            traceback.print_exc()

    # torch.compile (default mode) on the best batch, if time allows (compiling takes a minute or more)
    if elapsed() < args.budget * 0.8:
        try:
            compiled = torch.compile(fast.predict, dynamic=False)

            def run_compiled(images):  # noqa: ANN001, ANN202
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return compiled(images)

            started = time.perf_counter()
            run_compiled(pool[:best_batch])
            torch.cuda.synchronize()
            record["compile_seconds"] = round(time.perf_counter() - started, 1)
            log(f"compiled in {record['compile_seconds']} s")
            measure("fast-bf16-compile", run_compiled, [best_batch], limit=0.9)
        except Exception as error:  # noqa: BLE001
            record["errors"].append(f"torch.compile: {error!r}")
            traceback.print_exc()
    else:
        record["errors"].append("skipped torch.compile: time budget")

    best_row = max(record["results"], key=lambda r: r.get("slices_per_s", 0), default=None)
    record["best"] = best_row
    save()
    log(f"best: {best_row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
