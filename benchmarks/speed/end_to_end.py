"""Issue 30's end-to-end target: a 512x512x300 CT through the Slicer module's child process, click to labels.

What the module does on "Apply" (``HSAMSlicerLib.logic.HSAMSlicerLogic.start_segmentation``), done here without
Slicer: the volume's voxels are written as a raw NRRD into a job folder (:func:`HSAMSlicerLib.nrrd_input.
write_volume_nrrd`, the Logic's writer), a :class:`HSAMSlicerLib.process.ChildJob` runs the Logic's command line
(``segment input.nrrd -o labels.nrrd --model M --device cpu --organs <all eight>``: no ``--mode``, so the CPU default
``auto``) and is polled as the widget's timer polls it; when it is done the labels file is read back (as
``finish_segmentation`` reads it). Times from the click: the first progress event with a finished slice ("first
slice"), the child's end, and the labels read back ("total"). One untimed warm-up run on the volume's first 2 slices
fills a private engine cache first (``HSAM_HOME`` in a temporary folder): a user's first run exports the ONNX graph
once (its time is recorded as ``warmup_s``), later runs find it. Then ``--rounds`` timed runs: median and spread.

Targets (issue 30, item 4): H-SAM-Lite on the AVX-512 BF16/AMX class, 2 cores, quiet: total <= 90 s, first slice
<= 10 s. The volume: ``benchmarks/speed/make_cap_volume.py`` (a composite test volume, not a patient). The record
has the CPU flags, the load average before and after, and ``contended`` (the load says it was not a quiet machine).

Quiet-window run (the lead's commands; about 20 s for the volume, then 10-15 min: a warm-up with the ONNX export
and 3 runs of 3-4 min at the quiet 0.76 s per encoded Lite slice):

    python benchmarks/speed/make_cap_volume.py /tmp/hsam-cap
    python benchmarks/speed/end_to_end.py --volume /tmp/hsam-cap/cap_512x512x300.nrrd --rounds 3 \
        --json benchmarks/results/issue30_end_to_end_lite.json

Tiny check (not a speed figure): ``make_cap_volume.py /tmp/cap --slices 20`` then ``--volume
/tmp/cap/cap_512x512x20.nrrd --rounds 1 --json /tmp/e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402 (benchmarks/speed/common.py; puts HSAMSlicer on the path)

TARGET_TOTAL_S = 90.0
TARGET_FIRST_SLICE_S = 10.0
POLL_S = 0.05  # the widget's timer polls more slowly (250 ms); 50 ms keeps the measured times close


def logic_arguments(source: Path, out: Path, model: str, device: str) -> list[str]:
    """The command line ``start_segmentation`` builds with default RunOptions (all organs, no confidence)."""
    from HSAMSlicerLib.logic import organs_selected

    organs = [organ.name for organ in organs_selected(None)]
    return ["segment", str(source), "-o", str(out), "--model", model, "--device", device, "--organs", ",".join(organs)]


def one_run(array, ijk_to_ras, model: str, device: str, jobs: Path, env: dict[str, str]) -> dict:  # noqa: ANN001
    """One click-to-labels run; seconds from the click to each milestone, and the child's result."""
    import SimpleITK as sitk

    from HSAMSlicerLib.nrrd_input import write_volume_nrrd
    from HSAMSlicerLib.process import ChildJob

    clicked = time.perf_counter()
    job = ChildJob([], env=env, root=jobs)
    try:
        source = write_volume_nrrd(array, ijk_to_ras, job.folder / "input.nrrd")
        marks = {"input_written_s": time.perf_counter() - clicked}
        job.arguments = logic_arguments(source, job.folder / "labels.nrrd", model, device)
        job.start()
        state = job.poll()
        while not state.done:
            time.sleep(POLL_S)
            state = job.poll()
            if state.stage == "segment" and state.current > 0:
                marks.setdefault("first_slice_s", time.perf_counter() - clicked)
        marks["child_done_s"] = time.perf_counter() - clicked
        if state.error is not None:
            raise SystemExit(f"error: the segmentation failed: {state.error}\n{job.log_tail()}")
        labels = sitk.ReadImage(str(job.folder / "labels.nrrd"))
        marks["total_s"] = time.perf_counter() - clicked
        if labels.GetSize() != tuple(reversed(array.shape)):
            raise SystemExit(f"error: labels of size {labels.GetSize()} for a volume of {array.shape[::-1]}")
        result = (state.result or {}).get("result", {})
        return {**{k: round(v, 2) for k, v in marks.items()},
                **{k: result.get(k) for k in ("mode", "mode_reason", "seconds", "slab")}}
    finally:
        job.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--volume", type=Path, required=True, help="the CT (make_cap_volume.py's output)")
    parser.add_argument("--model", default="hsam-lite-demo")
    parser.add_argument("--device", default="cpu", help="the Logic passes its device option (default auto; cpu here)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True, help="write the record here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not args.volume.is_file():
        parser.error(f"{args.volume} does not exist: build it with benchmarks/speed/make_cap_volume.py")
    import SimpleITK as sitk

    from HSAMSlicerLib.geometry import ijk_to_ras_from_image

    image = sitk.Cast(sitk.ReadImage(str(args.volume)), sitk.sitkInt16)
    array, ijk_to_ras = sitk.GetArrayFromImage(image), ijk_to_ras_from_image(image)
    load_before = common.load_average()
    with tempfile.TemporaryDirectory(prefix="hsam-e2e-") as temporary:
        folder = Path(temporary)
        env = {"HSAM_HOME": str(folder / "home")}  # a cold engine cache of its own, filled by the warm-up run
        started = time.perf_counter()
        one_run(array[:2], ijk_to_ras, args.model, args.device, folder / "jobs", env)
        warmup_s = time.perf_counter() - started
        runs = []
        for index in range(args.rounds):
            runs.append(one_run(array, ijk_to_ras, args.model, args.device, folder / "jobs", env))
            print(json.dumps({"round": index + 1, **runs[-1]}), flush=True)
    load_after = common.load_average()
    total = common.spread([r["total_s"] for r in runs])
    first = common.spread([r["first_slice_s"] for r in runs if "first_slice_s" in r] or [float("nan")])
    record = {
        "command": "python benchmarks/speed/end_to_end.py " + " ".join(sys.argv[1:]),
        "volume": str(args.volume), "size_xyz": list(image.GetSize()), "model": args.model, "device": args.device,
        "machine": common.machine_record(), "load_average_before": load_before, "load_average_after": load_after,
        "contended": common.contended(load_before, load_after), "warmup_s": round(warmup_s, 2),
        "total_s": total, "first_slice_s": first, "runs": runs,
        "targets": {"total_s": TARGET_TOTAL_S, "first_slice_s": TARGET_FIRST_SLICE_S,
                    "apply_to": "avx512-bf16-amx", "total_met": total["median"] <= TARGET_TOTAL_S,
                    "first_slice_met": first["median"] <= TARGET_FIRST_SLICE_S},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.json}: total {total['median']} s (median of {args.rounds}), first slice {first['median']} s; "
          f"contended: {record['contended']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
