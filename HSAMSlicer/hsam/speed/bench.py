"""Speed benchmark: every speed mode against plain eager fp32 of the same model, in one process.

Per-slice latency: a few real slices, windowed and resized as ``segment_volume`` does, run through each mode's
predictor, interleaved (eager, mode 1, mode 2, ..., eager, ...) so machine noise hits all alike; the ratio is the
median of the per-round ratios eager/mode. Whole volume: ``segment_volume`` per mode (also interleaved when
repeated), with peak memory and agreement of the labels with eager's: fraction of identical voxels and Dice per organ.
Accuracy of the network itself: relative L2 error of the encoder embedding and of the fused logits against eager fp32.

Used by ``hsam bench`` and ``benchmarks/bench.py``. Random weights give near-tied logits, so agreement is only
meaningful with trained weights (``--model``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

GIB = 1024**3
AGREEMENT_BAR = {"identical": 0.995, "dice": 0.99}
# A run that starts with the 1-minute load average above this (per 2 cores) shared the machine: not a speed result.
CONTENDED_LOAD_PER_2_CORES = 1.5


@dataclass
class BenchOptions:
    model: str | None = None  # installed model id or folder; None: random weights of ``config``
    config: str = "vit_b_512"
    volume: str | None = None  # CT file; None: the shared real CT if present, else a phantom
    volume_slices: int | None = None  # crop the volume to this many central slices (None: all)
    modes: Sequence[str] = ()
    device: str = "cpu"
    precision: str = "auto"
    batch_size: int | None = None
    slices: int = 3  # slices timed per round for the per-slice latency
    rounds: int = 3
    volume_rounds: int = 1
    threads: int | None = None
    skip_volume: bool = False
    seed: int = 0


@dataclass
class ModeResult:
    mode: str
    prepare_s: float = 0.0
    slice_wall_s: list[float] = field(default_factory=list)
    slice_cpu_s: list[float] = field(default_factory=list)
    volume_s: list[float] = field(default_factory=list)
    peak_rss_gib: float | None = None
    peak_gpu_gib: float | None = None
    encoder_rel_error: float | None = None
    logits_rel_error: float | None = None
    identical: float | None = None
    dice: dict[str, float] = field(default_factory=dict)


def default_modes(device: str) -> list[str]:
    from hsam.engines import ort

    if device.startswith("cuda"):
        return ["fast", "compile"]
    modes = ["fast", "int8"]
    if ort.available():
        modes += ["ort", "ort-int8"]
    return modes


def _status(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def default_volume() -> Path | None:
    """The shared real CT (``HSAM_REAL_DATA`` or ../shared/data/real next to the repository), if present."""
    roots = [os.environ.get("HSAM_REAL_DATA"), Path(__file__).resolve().parents[3].parent / "shared" / "data" / "real"]
    for root in roots:
        if root and (Path(root) / "totalsegmentator" / "example_ct.nii.gz").is_file():
            return Path(root) / "totalsegmentator" / "example_ct.nii.gz"
    return None


def _phantom(shape_zyx: tuple[int, int, int]):  # noqa: ANN202 (sitk.Image)
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    z, y, x = shape_zyx
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.38 * y)) ** 2 + ((xx - x / 2) / (0.45 * x)) ** 2 <= 1
    organ = ((yy - 0.45 * y) / (0.15 * y)) ** 2 + ((xx - 0.33 * x) / (0.16 * x)) ** 2 <= 1
    volume = np.full(shape_zyx, -1000, dtype=np.int16)
    volume[:, body] = 40
    volume[:, organ] = 60
    volume += rng.integers(-20, 21, size=shape_zyx, dtype=np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.8, 0.8, 2.0))
    return image


def load_subject(options: BenchOptions):  # noqa: ANN201 (model, card, image, description)
    import SimpleITK as sitk
    import torch

    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config
    from hsam.volume import read_image

    if options.model:
        from hsam.weights.store import load_named_model

        model, card = load_named_model(options.model, device="cpu")
        name = f"{card.name} (trained weights)"
    else:
        torch.manual_seed(options.seed)
        config = load_model_config(options.config)
        model = build_hsam(config).eval()
        model.merge_lora()
        card = ModelCard.for_config(config, f"{options.config}-random", demo=True)
        name = f"{options.config} (random weights, seed {options.seed})"
    path = Path(options.volume) if options.volume else default_volume()
    image = read_image(str(path)) if path else _phantom((24, 512, 512))
    if options.volume_slices and options.volume_slices < image.GetSize()[2]:
        depth = image.GetSize()[2]
        start = (depth - options.volume_slices) // 2
        image = image[:, :, start : start + options.volume_slices]
    image = sitk.Cast(image, sitk.sitkInt16) if image.GetPixelID() not in (sitk.sitkInt16, sitk.sitkFloat32) else image
    return model.eval(), card, image, name, str(path) if path else "phantom"


def _model_inputs(model: Any, card: Any, image: Any, count: int) -> list[Any]:
    """``count`` evenly spaced slices of ``image`` as model inputs [1,3,S,S] (windowed, resized like segment_volume)."""
    import torch
    import torch.nn.functional as F

    from hsam.volume import to_canonical, window

    canonical, _ = to_canonical(image, getattr(card, "orientation", None) or "LPS")
    lo, hi = list(getattr(card, "window", None) or (-125, 275))
    picks = np.linspace(canonical.shape[0] * 0.2, canonical.shape[0] * 0.8, num=count).round().astype(int)
    inputs = []
    for index in picks:
        tensor = torch.from_numpy(window(canonical[index : index + 1], float(lo), float(hi)))[:, None]
        size = model.img_size
        if tensor.shape[-2:] != (size, size):
            tensor = F.interpolate(tensor, (size, size), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
        inputs.append(tensor.expand(-1, 3, -1, -1).contiguous())
    return inputs


def _relative(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _encoder_output(mode: str, predictor: Callable, model: Any, images: Any) -> Any:
    """The mode's encoder embedding for ``images`` (None when the engine does not expose it)."""
    if hasattr(predictor, "run"):  # ONNX Runtime engine: the graph's second output
        return predictor.run(images, ("logits", "embedding"))[1]
    owner = getattr(predictor, "__self__", None)
    if owner is not None and hasattr(owner, "image_encoder"):
        return owner.image_encoder(images)
    return None


def dice_per_organ(labels: np.ndarray, reference: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Dice of each organ (label 1..) of ``labels`` against ``reference``; organs absent from both are left out."""
    out = {}
    for index, name in enumerate(names):
        if index == 0:
            continue
        a, b = labels == index, reference == index
        total = int(a.sum()) + int(b.sum())
        if total:
            out[name] = 2.0 * int(np.logical_and(a, b).sum()) / total
    return out


def _prepare_modes(model: Any, device: Any, all_modes: list[str], say: Callable[[str], None]
                   ) -> tuple[dict[str, ModeResult], dict[str, Callable]]:
    """Build each mode's predictor (timed); a mode the model cannot run (e.g. int8 on a Lite model) is left out of
    ``all_modes``. Returns the per-mode results so far and the predictors."""
    from hsam.engines.modes import prepare
    from hsam.errors import HSAMError

    results = {mode: ModeResult(mode) for mode in all_modes}
    predictors: dict[str, Callable] = {}
    for mode in list(all_modes):
        started = time.perf_counter()
        try:
            predictors[mode] = prepare(model, mode, device, say=say)
        except HSAMError as error:  # e.g. int8 needs a SAM ViT: a Lite model skips it
            if mode == "eager":
                raise
            say(f"  skipped {mode}: {error}")
            all_modes.remove(mode)
            del results[mode]
            continue
        results[mode].prepare_s = time.perf_counter() - started
        say(f"  prepared {mode} in {results[mode].prepare_s:.1f} s")
    return results, predictors


def _accuracy(call: Callable[[str, Any], Any], model: Any, inputs: list, modes: Sequence[str],
              predictors: dict[str, Callable], results: dict[str, ModeResult]) -> None:
    """Relative error of each mode's logits (and encoder output, where the engine exposes it) against eager; also
    the warm-up: the first call of every engine is not timed."""
    import torch

    with torch.inference_mode():
        reference_logits = [call("eager", x) for x in inputs]
        reference_embedding = [model.image_encoder(x).float() for x in inputs]
        for mode in modes:
            logits = [call(mode, x) for x in inputs]
            results[mode].logits_rel_error = statistics.mean(_relative(a, b) for a, b in zip(logits, reference_logits))
            embeddings = [_encoder_output(mode, predictors[mode], model, x) for x in inputs]
            if all(e is not None for e in embeddings):
                results[mode].encoder_rel_error = statistics.mean(
                    _relative(e, r) for e, r in zip(embeddings, reference_embedding)
                )


def _slice_latency(call: Callable[[str, Any], Any], device: Any, inputs: list, all_modes: Sequence[str],
                   rounds: int, results: dict[str, ModeResult], say: Callable[[str], None]) -> None:
    """Per-slice wall and CPU time of every mode, interleaved round by round."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for round_index in range(rounds):
        for mode in all_modes:
            for x in inputs:
                sync()
                wall, cpu = time.perf_counter(), time.process_time()
                call(mode, x)
                sync()
                results[mode].slice_wall_s.append(time.perf_counter() - wall)
                results[mode].slice_cpu_s.append(time.process_time() - cpu)
        say(f"  round {round_index + 1}/{rounds}: "
            + ", ".join(f"{m} {statistics.median(results[m].slice_wall_s[-len(inputs):]):.2f} s" for m in all_modes))


def _whole_volume(options: BenchOptions, model: Any, card: Any, image: Any, device: Any, all_modes: Sequence[str],
                  results: dict[str, ModeResult], say: Callable[[str], None]) -> None:
    """The whole volume through ``segment_volume`` per mode: time, peak memory, agreement with eager."""
    import SimpleITK as sitk
    import torch

    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume

    reference = None
    names = list(card.classes)
    for round_index in range(options.volume_rounds):
        for mode in all_modes:
            rss_before = _status("VmRSS")
            reset = _reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            result = segment_volume(image, model, card, SegmentOptions(
                device=options.device, batch_size=options.batch_size, precision=options.precision, mode=mode))
            results[mode].volume_s.append(time.perf_counter() - started)
            peak = _status("VmHWM") if reset else None
            if peak and rss_before:
                results[mode].peak_rss_gib = max(results[mode].peak_rss_gib or 0.0, peak / GIB)
            if device.type == "cuda":
                results[mode].peak_gpu_gib = torch.cuda.max_memory_allocated() / GIB
            labels = sitk.GetArrayFromImage(result.labels)
            if mode == "eager" and reference is None:
                reference = labels
            if reference is not None and round_index == 0:
                results[mode].identical = float((labels == reference).mean())
                results[mode].dice = dice_per_organ(labels, reference, names)
            say(f"  volume {mode}: {results[mode].volume_s[-1]:.1f} s")


def run_bench(options: BenchOptions, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-able record (see module docstring)."""
    import torch

    from hsam.engines.modes import choose_engine, encoder_family
    from hsam.pipeline.device import select_device, select_precision

    if options.threads:
        torch.set_num_threads(int(options.threads))
    load_before = os.getloadavg()[0]
    model, card, image, model_name, volume_name = load_subject(options)
    device = select_device(options.device)
    precision, dtype = select_precision(options.precision, device)
    family = encoder_family(model)
    modes = [choose_engine(m, device, family).mode for m in (options.modes or default_modes(options.device))]
    all_modes = ["eager", *[m for m in dict.fromkeys(modes) if m != "eager"]]
    model.to(device)
    say(f"model {model_name}; volume {volume_name} {image.GetSize()}; device {device} ({precision}); "
        f"{torch.get_num_threads()} threads; modes {', '.join(all_modes)}")
    results, predictors = _prepare_modes(model, device, all_modes, say)
    inputs = [x.to(device) for x in _model_inputs(model, card, image, options.slices)]

    def call(mode: str, images: Any) -> Any:
        with torch.inference_mode():
            if dtype is not None and mode not in ("int8", "ort", "ort-int8"):
                with torch.autocast(device_type=device.type, dtype=dtype):
                    return predictors[mode](images).float()
            return predictors[mode](images).float()

    _accuracy(call, model, inputs, all_modes[1:], predictors, results)
    _slice_latency(call, device, inputs, all_modes, options.rounds, results, say)
    if not options.skip_volume:
        _whole_volume(options, model, card, image, device, all_modes, results, say)
    record = _record(options, results, model_name, volume_name, image, device, precision, inputs)
    limit = CONTENDED_LOAD_PER_2_CORES * (os.cpu_count() or 2) / 2
    record["load_average"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    record["contended"] = load_before > limit
    if record["contended"]:
        say(f"CONTENDED: the load average was {load_before:.2f} at the start (> {limit:.1f}); "
            "these timings are not a speed result")
    return record


def _record(options: BenchOptions, results: dict[str, ModeResult], model_name: str, volume_name: str, image: Any,
            device: Any, precision: str, inputs: list) -> dict[str, Any]:
    import torch

    from hsam.engines.cpu import processor

    base = results["eager"]
    rounds = options.rounds
    per_round = len(inputs)

    def paired_ratio(values: list[float], reference: list[float]) -> float | None:
        if not values:
            return None
        ratios = [
            statistics.median(reference[r * per_round : (r + 1) * per_round])
            / statistics.median(values[r * per_round : (r + 1) * per_round])
            for r in range(rounds)
        ]
        return statistics.median(ratios)

    rows = []
    for mode, res in results.items():
        min_dice = min(res.dice.values()) if res.dice else None
        meets = None
        if res.identical is not None:
            meets = res.identical >= AGREEMENT_BAR["identical"] and (min_dice is None or min_dice >= AGREEMENT_BAR["dice"])
        rows.append({
            "mode": mode,
            "prepare_s": round(res.prepare_s, 2),
            "slice_s": round(statistics.median(res.slice_wall_s), 3) if res.slice_wall_s else None,
            "slice_cpu_s": round(statistics.median(res.slice_cpu_s), 3) if res.slice_cpu_s else None,
            "speedup": round(paired_ratio(res.slice_wall_s, base.slice_wall_s) or 0, 3),
            "speedup_cpu_time": round(paired_ratio(res.slice_cpu_s, base.slice_cpu_s) or 0, 3),
            "volume_s": round(statistics.median(res.volume_s), 2) if res.volume_s else None,
            "volume_speedup": round(statistics.median(base.volume_s) / statistics.median(res.volume_s), 3)
            if res.volume_s and base.volume_s else None,
            "peak_rss_gib": round(res.peak_rss_gib, 3) if res.peak_rss_gib else None,
            "peak_gpu_gib": round(res.peak_gpu_gib, 3) if res.peak_gpu_gib else None,
            "encoder_rel_error": res.encoder_rel_error,
            "logits_rel_error": res.logits_rel_error,
            "identical_voxels": res.identical,
            "dice_vs_eager": {k: round(v, 5) for k, v in res.dice.items()},
            "min_dice_vs_eager": round(min_dice, 5) if min_dice is not None else None,
            "meets_bar": meets,
        })
    return {
        "model": model_name,
        "volume": volume_name,
        "volume_size_xyz": list(image.GetSize()),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs; {processor().describe()}",
        "cpu_flags": sorted(processor().flags),
        "slices_per_round": per_round,
        "rounds": rounds,
        "bar": AGREEMENT_BAR,
        "modes": rows,
    }


def markdown(record: dict[str, Any]) -> str:
    """The record as a markdown table (for benchmarks/RESULTS.md)."""
    load = record.get("load_average") or {}
    lines = [
        f"model {record['model']}; volume {record['volume']} {record['volume_size_xyz']}; {record['device']} "
        f"({record['precision']}, {record['threads']} threads, torch {record['torch']}); {record['machine']}; "
        f"load average {load.get('before', '?')} before, {load.get('after', '?')} after"
        + (" (CONTENDED: not a speed result)" if record.get("contended") else ""),
        "",
        "| mode | s/slice | speed-up (wall) | speed-up (CPU time) | volume s | volume speed-up | peak RSS GiB | "
        "encoder rel err | logits rel err | identical voxels | min Dice vs eager | bar |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: Any, digits: int = 3) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.{digits}g}" if abs(value) < 1e-2 and value else f"{value:.{digits}f}"
        return str(value)

    for row in record["modes"]:
        lines.append(
            f"| {row['mode']} | {fmt(row['slice_s'])} | {fmt(row['speedup'], 2)}x | {fmt(row['speedup_cpu_time'], 2)}x | "
            f"{fmt(row['volume_s'], 1)} | {fmt(row['volume_speedup'], 2)} | {fmt(row['peak_rss_gib'], 2)} | "
            f"{fmt(row['encoder_rel_error'])} | {fmt(row['logits_rel_error'])} | {fmt(row['identical_voxels'], 5)} | "
            f"{fmt(row['min_dice_vs_eager'], 4)} | {'-' if row['meets_bar'] is None else ('yes' if row['meets_bar'] else 'NO')} |"
        )
    return "\n".join(lines) + "\n"


def write_json(record: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(json.dumps(record, indent=1) + "\n")
