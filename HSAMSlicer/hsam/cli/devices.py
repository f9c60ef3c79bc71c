"""``hsam devices``: what PyTorch can compute on here (CUDA GPUs, Apple MPS, the CPU and its instruction sets)."""

from __future__ import annotations

import argparse

from hsam.cli import progress

FAMILY_NAMES = {"sam_vit": "ViT models (H-SAM)", "tiny_vit": "TinyViT models (H-SAM-Lite)"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``devices`` command (no torch import here)."""
    parser = subparsers.add_parser("devices", help="list the devices PyTorch can use here",
                                   description="Show the PyTorch version and the devices it can use (CUDA GPUs, Apple "
                                   "MPS, CPU), and which one --device auto picks.")
    progress.add_option(parser)
    parser.set_defaults(run=run)


def detect() -> dict[str, object]:
    """{'torch', 'cuda', 'cuda_devices', 'mps', 'cpu', 'cpu_threads', 'cpu_engines', 'cpu_engine_reasons',
    'gpu_engine_reason', 'auto'}; imports torch."""
    import torch

    from hsam.engines.cpu import processor
    from hsam.engines.modes import choose_engine
    from hsam.pipeline.device import select_device

    cuda = bool(torch.cuda.is_available())
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps is not None and mps.is_available())
    cpu_choices = {family: choose_engine("auto", torch.device("cpu"), family) for family in FAMILY_NAMES}
    gpu = "cuda" if cuda else "mps" if mps_ok else None
    return {
        "torch": torch.__version__,
        "cuda": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps": mps_ok,
        "cpu": processor().describe(),
        "cpu_threads": torch.get_num_threads(),
        # what --mode auto runs on this CPU for each encoder family (ViT-B H-SAM, TinyViT H-SAM-Lite)
        "cpu_engines": {family: choice.mode for family, choice in cpu_choices.items()},
        # why: the precision rule over the measured evidence (hsam.engines.modes.CPU_AUTO / GPU_AUTO)
        "cpu_engine_reasons": {family: choice.reason for family, choice in cpu_choices.items()},
        "gpu_engine_reason": choose_engine("auto", torch.device(gpu)).reason if gpu else None,
        "auto": str(select_device("auto")),
    }


def run(args: argparse.Namespace) -> int:
    found = detect()
    if args.reporter.json:
        args.reporter.finished(devices=found)
        return 0
    print(f"PyTorch {found['torch']}")
    for index, name in enumerate(found["cuda_devices"]):
        print(f"  cuda:{index}  {name}")
    if found["mps"]:
        print("  mps     Apple GPU")
    print(f"  cpu     {found['cpu']}, {found['cpu_threads']} threads")
    engines = ", ".join(f"{engine} for {FAMILY_NAMES[family]}" for family, engine in found["cpu_engines"].items())
    print(f"--mode auto on the CPU runs: {engines}")
    for family, reason in found["cpu_engine_reasons"].items():
        print(f"  why, {FAMILY_NAMES[family]}: {reason}")
    if found["gpu_engine_reason"]:
        print(f"--mode auto on the GPU: {found['gpu_engine_reason']}")
    print(f"--device auto uses: {found['auto']}")
    return 0
