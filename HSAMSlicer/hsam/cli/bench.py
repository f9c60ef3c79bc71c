"""``hsam bench``: time every speed mode against eager fp32 of the same model in one process (hsam.speed.bench).

Per-slice latency (interleaved rounds, ratio = median of per-round eager/mode), whole-volume time, peak memory,
and agreement with eager's labels (identical voxels, Dice per organ) plus the encoder's relative error.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bench`` command (no torch import here)."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark the speed modes against eager fp32 (latency, volume time, memory, agreement)",
        description="Benchmark speed modes (fast, int8, ort, ort-int8, compile) against the plain eager fp32 model in "
        "one process. Agreement with eager labels needs trained weights (--model); random weights give near-tied "
        "logits.",
    )
    parser.add_argument("--model", default=None, help="installed model id or model folder (default: random weights)")
    parser.add_argument("--config", default="vit_b_512", help="model config for random weights (default vit_b_512)")
    parser.add_argument("--volume", default=None, help="CT volume (default: the shared real CT if found, else a phantom)")
    parser.add_argument("--volume-slices", type=int, default=None, help="use only this many central slices")
    parser.add_argument("--modes", default=None, help="comma-separated modes (default: all for the device)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", help="autocast precision for GPU modes (auto, fp32, fp16, bf16)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size of the whole-volume runs")
    parser.add_argument("--slices", type=int, default=3, help="slices per latency round (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved latency rounds (default 3)")
    parser.add_argument("--volume-rounds", type=int, default=1, help="whole-volume runs per mode (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch/ONNX Runtime threads (default: torch's)")
    parser.add_argument("--no-volume", action="store_true", help="per-slice latency and errors only")
    parser.add_argument("--json", default=None, help="write the full record as JSON here")
    parser.add_argument("--markdown", default=None, help="write the table as markdown here")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hsam.speed.bench import BenchOptions, markdown, run_bench, write_json

    options = BenchOptions(
        model=args.model, config=args.config, volume=args.volume, volume_slices=args.volume_slices,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()] if args.modes else (),
        device=args.device, precision=args.precision, batch_size=args.batch_size, slices=args.slices,
        rounds=args.rounds, volume_rounds=args.volume_rounds, threads=args.threads, skip_volume=args.no_volume,
    )
    record = run_bench(options, say=lambda text: print(text, file=sys.stderr, flush=True))
    table = markdown(record)
    print(table)
    if args.json:
        write_json(record, args.json)
    if args.markdown:
        from pathlib import Path

        Path(args.markdown).write_text(table)
    return 0
