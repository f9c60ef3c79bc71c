"""Issue 30's per-slice targets: ViT-B/512 and H-SAM-Lite per engine mode against eager fp32, refinement in and out.

One process, ``--rounds`` interleaved rounds: in every round each mode (eager fp32 first) runs the same real slices
twice, through the per-slice path of ``segment_volume`` without the refine stage
(``hsam.pipeline.predict.predict_slices``: window, resize, engine, resize back, softmax/argmax) and with it
(``hsam.prompting.refine.predict_refined``: the same engine pass plus the trunk mask and LiteMedSAM's prompt decoder
on every organ box). Slices go in batches of 2
(the CPU batch of ``segment_volume``); a slice's time is its batch's time / 2. Speed-up = median over rounds of
eager's time / the mode's in that round, per path. The slices: ``--slices`` evenly spaced slices of LIDC-IDRI-0001
on which the reference labels have an organ (512x512 at 0.70 mm, so the refine stage has boxes to decode). Models:
ViT-B/512 with random weights in the real format (same compute as the paper's model; it has no refine stage: that
needs an H-SAM-Lite embedding) and the bundled ``hsam-lite-demo``. ``auto`` is resolved and recorded per model.

Targets (issue 30, item 4; 2 cores, quiet):
- AVX-512 with BF16 or AMX: ViT-B/512 <= 0.5 s per slice, H-SAM-Lite <= 0.3 s per slice with refinement;
- AVX2 only: ViT-B/512 >= 2.0x eager fp32 in the same run, H-SAM-Lite <= 0.6 s per slice with refinement.
The AVX2 class is *emulated* on an AVX-512 machine by capping PyTorch (ATen) and oneDNN to AVX2 through the
environment (they must be set before the process starts); ONNX Runtime's MLAS kernels are not capped by them, so the
``ort*`` rows of an emulated run are not AVX2 figures. The record holds the CPU flags, the load average before and
after, ``contended``, and the emulation variables.

Quiet-window run (the lead's commands; about 10 and 12 min on 2 cores; bf16 is left out of the emulated run:
without AVX512_BF16/AMX it is emulated and only slow):

    python benchmarks/speed/per_slice.py --rounds 5 --json benchmarks/results/issue30_per_slice.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/speed/per_slice.py --rounds 5 \
        --modes eager,fast,ort,int8,ort-int8 --json benchmarks/results/issue30_per_slice_avx2_emulated.json

Tiny check (not a speed figure): ``--models lite --modes eager,ort --slices 2 --rounds 1 --json /tmp/ps.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402 (benchmarks/speed/common.py; puts HSAMSlicer on the path)

DATA = common.REPOSITORY.parent / "shared" / "data" / "real"
CT, LABELS = "lidc-idri-0001/ct.nii.gz", "lidc-idri-0001/labels_totalsegmentator.nii.gz"
BATCH = 2  # segment_volume's CPU batch
MODES = {"vitb": "eager,fast,ort,bf16,int8,ort-int8", "lite": "eager,ort,bf16,int8,ort-int8"}
TARGETS = {  # machine class -> model -> (what, bound)
    "avx512-bf16-amx": {"vitb": ("s_per_slice", 0.5), "lite": ("s_per_slice_refined", 0.3)},
    "avx2": {"vitb": ("speedup", 2.0), "lite": ("s_per_slice_refined", 0.6)},
}


def load_model(name: str, seed: int = 0):  # noqa: ANN201 (HSAM, ModelCard)
    """"vitb": ViT-B/512 with random weights (merged LoRA, as a loaded model); "lite": the bundled demo."""
    import torch

    if name == "lite":
        from hsam.weights.store import load_named_model

        return load_named_model("hsam-lite-demo", device="cpu")
    from hsam.labels import CLASS_NAMES
    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config

    torch.manual_seed(seed)
    config = load_model_config("vit_b_512")
    model = build_hsam(config).eval()
    model.merge_lora()
    return model, ModelCard.for_config(config, "vit_b_512-random", demo=True, classes=list(CLASS_NAMES))


def organ_slices(data: Path, orientation: str, count: int) -> tuple[np.ndarray, tuple[float, float]]:
    """``count`` evenly spaced canonical slices [count, H, W] (HU) of LIDC-IDRI-0001 that hold a reference organ,
    and the pixel size (row, column) in mm."""
    import SimpleITK as sitk

    from hsam.labels import remap_labels
    from hsam.volume import read_image, to_canonical

    canonical, how = to_canonical(read_image(data / CT), orientation)
    reference, _ = to_canonical(sitk.ReadImage(str(data / LABELS)), orientation)
    organs = remap_labels(reference, "totalseg_total").reshape(len(reference), -1).max(axis=1) > 0
    candidates = np.flatnonzero(organs)
    picks = candidates[np.linspace(0, len(candidates) - 1, num=count).round().astype(int)]
    sx, sy, _ = how.canonical_spacing
    return np.ascontiguousarray(canonical[picks]), (sy, sx)


def slice_paths(model, card, pixel_mm, decoder) -> dict[str, Callable]:  # noqa: ANN001
    """{"plain": f(predictor, batch), "refined": ...} calling segment_volume's per-slice functions."""
    import torch

    from hsam.pipeline.predict import predict_slices

    window = list(card.window)
    cpu = torch.device("cpu")
    paths = {"plain": lambda predictor, batch: predict_slices(model, batch, window, cpu, None, None, predictor)}
    if decoder is not None:
        from hsam.prompting.refine import predict_refined

        paths["refined"] = lambda predictor, batch: predict_refined(model, batch, window, cpu, None, None, predictor,
                                                                   decoder, pixel_mm)
    return paths


def time_rounds(predictors: dict[str, Callable], paths: dict[str, Callable], slices: np.ndarray, rounds: int,
                say: Callable[[str], None]) -> dict[str, dict[str, list[float]]]:
    """Seconds per slice, per mode and path, one value per round (interleaved; one untimed warm-up pass first)."""
    import torch

    batches = [slices[i : i + BATCH] for i in range(0, len(slices), BATCH)]
    times = {mode: {path: [] for path in paths} for mode in predictors}
    with torch.inference_mode():
        for mode, predictor in predictors.items():  # warm-up: first calls allocate and tune
            for run in paths.values():
                run(predictor, batches[0])
        for index in range(rounds):
            for mode, predictor in predictors.items():
                for path, run in paths.items():
                    started = time.perf_counter()
                    for batch in batches:
                        run(predictor, batch)
                    times[mode][path].append((time.perf_counter() - started) / len(slices))
            say(f"  round {index + 1}/{rounds}: " + ", ".join(
                f"{m} {'/'.join(f'{v[-1]:.2f}' for v in times[m].values())} s" for m in times))
    return times


def summarise(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """Per mode: s/slice (median, spread) per path, speed-up against eager per path, refinement's added share."""
    rows = {}
    for mode, per_path in times.items():
        row: dict[str, Any] = {}
        for path, values in per_path.items():
            key = "s_per_slice" if path == "plain" else "s_per_slice_refined"
            row[key] = common.spread(values)
            ratios = [e / v for e, v in zip(times["eager"][path], values)]
            row["speedup" if path == "plain" else "speedup_refined"] = round(statistics.median(ratios), 3)
        if "refined" in per_path:
            added = [r / p - 1 for r, p in zip(per_path["refined"], per_path["plain"])]
            row["refine_adds"] = round(statistics.median(added), 3)
        rows[mode] = row
    return rows


def verdict(machine_class: str, name: str, row: dict[str, Any]) -> dict[str, Any] | None:
    """The issue's target for this model on this class, and whether ``row`` (auto's mode) meets it."""
    target = TARGETS.get(machine_class.split(" ")[0], {}).get(name)
    if target is None or row is None:
        return None
    what, bound = target
    value = row.get(what)
    value = value["median"] if isinstance(value, dict) else value
    if value is None:
        return {"what": what, "bound": bound, "value": None, "met": None}
    return {"what": what, "bound": bound, "value": value, "met": value >= bound if what == "speedup" else value <= bound}


def measure(name: str, modes: list[str], args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, Any]:
    """One model: prepare every mode, time interleaved rounds, summarise and check the target for auto's mode."""
    import torch

    from hsam.engines.modes import choose_engine, encoder_family, prepare
    from hsam.errors import HSAMError
    from hsam.prompting.refine import refine_decoder_for

    model, card = load_model(name)
    family = encoder_family(model)
    auto = choose_engine("auto", torch.device("cpu"), family)
    decoder = refine_decoder_for(model)[0] if not args.no_refine else None
    slices, pixel_mm = organ_slices(args.data, card.orientation or "LPS", args.slices)
    predictors, skipped = {}, {}
    for mode in dict.fromkeys(["eager", *modes]):
        try:
            predictors[mode] = prepare(model, mode, torch.device("cpu"), say=say)
        except (HSAMError, ValueError) as error:  # a mode this model or machine cannot run, or unknown here
            skipped[mode] = str(error)
    say(f"{name}: modes {', '.join(predictors)}; auto = {auto.mode}; refine {'on' if decoder else 'off'}")
    rows = summarise(time_rounds(predictors, slice_paths(model, card, pixel_mm, decoder), slices, args.rounds, say))
    machine_class = common.machine_class(common.cpu_flags())
    return {"model": name, "family": family, "auto": auto.mode, "auto_reason": auto.reason,
            "refine_stage": decoder is not None, "skipped": skipped, "modes": rows,
            "target_for_auto": verdict(machine_class, name, rows.get(auto.mode))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vitb,lite", help="comma-separated: vitb (random ViT-B/512), lite (demo)")
    parser.add_argument("--modes", help=f"comma-separated modes for every model (default: {MODES})")
    parser.add_argument("--slices", type=int, default=4, help="slices per round (even: batches of 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-refine", action="store_true", help="time only the path without the refine stage")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared real data folder")
    parser.add_argument("--json", type=Path, required=True, help="write the record here")
    args = parser.parse_args()
    names = args.models.split(",")
    if not set(names) <= set(MODES) or args.rounds < 1 or args.slices < 1:
        parser.error(f"--models from {','.join(MODES)}; --rounds and --slices at least 1")
    if not (args.data / CT).is_file():
        parser.error(f"{args.data / CT} is missing: give the shared real data folder with --data")
    import torch

    torch.set_num_threads(args.threads)
    load_before = common.load_average()
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    results = [measure(name, (args.modes or MODES[name]).split(","), args, say) for name in names]
    load_after = common.load_average()
    record = {"command": " ".join(f"{k}={v}" for k, v in common.machine_record()["emulation"].items())
                         + " python benchmarks/speed/per_slice.py " + " ".join(sys.argv[1:]),
              "machine": common.machine_record(), "load_average_before": load_before,
              "load_average_after": load_after, "contended": common.contended(load_before, load_after),
              "slices": args.slices, "batch": BATCH, "rounds": args.rounds, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    for result in results:
        print(json.dumps({k: result[k] for k in ("model", "auto", "target_for_auto")}))
    print(f"wrote {args.json}; contended: {record['contended']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
