"""Latency of prompted correction (issue 26 item 5) and the refine stage's cost per slice (issue 30 item 3).

Run on a QUIET machine (nothing else running; the numbers are a speed claim only then), from the repository root:

    python benchmarks/prompting/bench_latency.py --data ../shared/data/real --rounds 5 --threads 2 \
        --json benchmarks/prompting/results/latency.json

(A smoke test of the script itself, no speed claim: --rounds 1 --slices 1 --propagate-each-side 1.)

Each round, in this order (so a slower machine state hits every measure alike):
  1. warm process start: ``python -m hsam serve`` spawned until its "ready" line (model and decoder loaded);
  2. ``open`` of lidc-idri-0001 (512 x 512 x 133);
  3. first mask after a liver box on a slice whose embedding is NOT cached (encoder + decoder), then a spleen box
     on the same slice, whose embedding now IS cached (decoder only); both as the client sees them (round trip);
  4. propagation of the liver through at most 20 slices (``"from"``/``"to"`` 10 slices each side, ``"progress":
     true``: one progress line per slice is read as it comes); seconds, slices filled, seconds per slice;
  4b. 2-4 again in a fresh process opened with the embeddings the automatic run kept (``hsam segment
     --keep-embeddings``, run once before the rounds, default options: what the Slicer module does): open (with the
     fingerprint checks), the liver box, the propagation;
  5. ``hsam segment``'s per-slice time on a ``--slices``-slice part of the same CT (``segment_volume``, orientation
     self-check off: issue 30 counts it apart): eager fp32 (the baseline), the CPU default mode without refine, and
     the default mode with refine; the refine stage's added share = with / without - 1 (issue 30's budget: 25 %);
  6. one eager fp32 prompt-decoder call in this process (a machine-speed reference for the serve measures).
Reported per measure: every round's value, the median, the min and max. The JSON also holds the CPU (name, flags),
torch's thread count and version, the load average before and after, and this command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import load_case  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[2]


def voxel_box(mask: np.ndarray) -> list[int]:
    """[i0, j0, i1, j1] inclusive corners of a [y, x] mask of the file's array."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


class Child:
    """A ``hsam serve`` child: one request per line, answers (and progress lines) read as they come."""

    def __init__(self, threads: int) -> None:
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "hsam", "serve"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=REPOSITORY, env=environment)
        ready = self._line()
        if ready.get("cmd") != "ready":
            raise RuntimeError(f"hsam serve did not start: {ready}")
        self.start_seconds = time.perf_counter() - started

    def _line(self) -> dict[str, Any]:
        stream: IO[str] = self.process.stdout  # type: ignore[assignment]
        line = stream.readline()
        if not line:
            raise RuntimeError(f"hsam serve ended (exit status {self.process.wait()})")
        return json.loads(line)

    def ask(self, request: dict[str, Any]) -> tuple[dict[str, Any], float, list[float]]:
        """(answer, round-trip seconds, seconds at which each progress line came)."""
        started = time.perf_counter()
        self.process.stdin.write(json.dumps(request) + "\n")  # type: ignore[union-attr]
        self.process.stdin.flush()  # type: ignore[union-attr]
        progress: list[float] = []
        while True:
            answer = self._line()
            if "progress" not in answer:
                break
            progress.append(time.perf_counter() - started)
        if "error" in answer:
            raise RuntimeError(f"{request['cmd']}: {answer['error']}")
        return answer, time.perf_counter() - started, progress

    def close(self) -> None:
        try:
            self.ask({"cmd": "quit"})
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def serve_round(ct: Path, reference: np.ndarray, threads: int, reach: int, kept: Path | None = None
                ) -> dict[str, float]:
    """Measures 1-4 of one round (a fresh serve process); with ``kept``, measure 4b: the process opened with the
    automatic run's kept embeddings (keys ``kept_*``, the first box's time as ``kept_first_mask_s``)."""
    z = int(np.median(np.flatnonzero(((reference == 5).any(axis=(1, 2))) & ((reference == 1).any(axis=(1, 2))))))
    child = Child(threads)
    try:
        given, opened, _ = child.ask({"cmd": "open", "volume": str(ct), **({"embeddings": str(kept)} if kept else {})})
        if kept is not None and not given.get("kept_slices"):
            raise RuntimeError(f"the kept embeddings were not used: {given.get('kept_note')}")
        liver, uncached, _ = child.ask({"cmd": "prompt", "organ": "liver", "slice": z,
                                        "box": voxel_box(reference[z] == 5)})
        _, cached, _ = child.ask({"cmd": "prompt", "organ": "spleen", "slice": z,
                                  "box": voxel_box(reference[z] == 1)})
        answer, propagated, progress = child.ask({"cmd": "propagate", "organ": "liver", "slice": liver["slice"],
                                                  "from": z - reach, "to": z + reach, "progress": True})
    finally:
        child.close()
    filled = len(answer["slices"])
    if len(progress) != filled:
        raise RuntimeError(f"{len(progress)} progress lines for {filled} propagated slices")
    record = {"process_start_s": child.start_seconds, "open_s": opened, "first_mask_uncached_s": uncached,
              "first_mask_cached_s": cached, "propagation_s": propagated, "propagation_slices": filled,
              "propagation_s_per_slice": propagated / max(1, filled),
              "first_progress_line_s": progress[0] if progress else float("nan")}
    if kept is None:
        return record
    names = {"first_mask_uncached_s": "first_mask_s", "first_mask_cached_s": "second_mask_same_slice_s"}
    return {f"kept_{names.get(k, k)}": v for k, v in record.items() if k != "process_start_s"}


def keep_embeddings(ct: Path, folder: Path, threads: int) -> float:
    """Run ``hsam segment CT --keep-embeddings FOLDER`` once (default options); returns its seconds."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hsam", "segment", str(ct), "-o", str(folder / "labels.nii.gz"), "-q",
                    "--keep-embeddings", str(folder / "embeddings")], check=True, cwd=REPOSITORY, env=environment)
    return time.perf_counter() - started


def segment_round(image, model, card, modes: list[tuple[str, str, bool]]) -> dict[str, float]:  # noqa: ANN001
    """Measure 5: seconds per slice of segment_volume for each (name, mode, refine)."""
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume

    out: dict[str, float] = {}
    depth = image.GetSize()[2]
    for name, mode, refine in modes:
        started = time.perf_counter()
        options = SegmentOptions(device="cpu", mode=mode, refine=refine, check_orientation=False)
        segment_volume(image, model, card, options)
        out[f"segment_{name}_s_per_slice"] = (time.perf_counter() - started) / depth
    out["refine_added_share"] = out["segment_default_refine_s_per_slice"] / out["segment_default_s_per_slice"] - 1
    return out


def decoder_round(decoder, embedding: torch.Tensor) -> dict[str, float]:  # noqa: ANN001
    """Measure 6: one eager fp32 box decode in this process."""
    started = time.perf_counter()
    decoder(embedding, torch.tensor([[60.0, 60.0, 160.0, 160.0]]))
    return {"decoder_fp32_one_box_s": time.perf_counter() - started}


def machine() -> dict[str, Any]:
    from hsam.engines.cpu import processor

    cpu = processor()
    return {"cpu": cpu.name, "flags": sorted(cpu.flags), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def summary(rounds: list[dict[str, float]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        out[key] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
                    "max": round(max(values), 4), "rounds": [round(v, 4) for v in values]}
    return out


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """The JSON record at ``path`` (folders made); nothing when no path was asked for."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=20, help="slices of lidc-idri-0001 for the segment measure")
    parser.add_argument("--first-slice", type=int, default=20)
    parser.add_argument("--propagate-each-side", type=int, default=10, help="propagation limit each side (20 slices)")
    parser.add_argument("--mode", default="auto", help="hsam segment's CPU default mode to compare with eager fp32")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from hsam.prompting.decoder import load_prompt_decoder
    from hsam.weights.store import load_named_model

    load_before = os.getloadavg()
    case = load_case(args.data, "lidc-idri-0001")
    ct = args.data / "lidc-idri-0001" / "ct.nii.gz"
    import SimpleITK as sitk

    from hsam.labels import remap_labels

    labels_file = args.data / "lidc-idri-0001" / "labels_totalsegmentator.nii.gz"
    reference = remap_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(labels_file))), "totalseg_total")
    part = case.image[:, :, args.first_slice:args.first_slice + args.slices]
    model, card = load_named_model("hsam-lite-demo")
    decoder = load_prompt_decoder()
    embedding = torch.zeros(256, 64, 64)
    modes = [("eager_fp32", "eager", False), ("default", args.mode, False), ("default_refine", args.mode, True)]
    segment_round(part[:, :, :1], model, card, modes)  # warm-up: graphs exported/prepared, weights paged in
    automatic = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    print(f"automatic run keeping its embeddings: {keep_embeddings(ct, automatic, args.threads):.1f} s", flush=True)
    rounds = []
    for number in range(args.rounds):
        record = {**serve_round(ct, reference, args.threads, args.propagate_each_side),
                  **serve_round(ct, reference, args.threads, args.propagate_each_side, automatic / "embeddings"),
                  **segment_round(part, model, card, modes), **decoder_round(decoder, embedding)}
        rounds.append(record)
        print(f"round {number + 1}: " + json.dumps({k: round(v, 3) for k, v in record.items()}), flush=True)
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "settings": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "machine": machine(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(), "summary": summary(rounds)}
    print(json.dumps(report["summary"], indent=1))
    write_report(args.json, report)
    shutil.rmtree(automatic, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
