"""The machine-readable progress contract (``--progress json``) and prompt, clean stopping of the ``hsam`` program.

Every command runs as a real child process (``python -m hsam``), as the Slicer module and scripts run it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from hsam.labels import CLASS_NAMES, remap_labels
import slicer_headless  # noqa: F401,E402  (puts HSAMSlicer/ on sys.path; imports nothing of slicer)
from HSAMSlicerLib.testing import save_tiny_model  # noqa: E402

STOP_LIMIT_S = 5.0  # hsam segment on SIGTERM/SIGINT: stopped within 5 s


def hsam(*arguments: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hsam", *arguments], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)  # fmt: skip


def run_json(*arguments: str, timeout: float = 300) -> tuple[int, list[dict], str]:
    """Run ``hsam ARGUMENTS --progress json``; every stdout line must be a JSON object."""
    process = hsam(*arguments, "--progress", "json")
    out, err = process.communicate(timeout=timeout)
    events = [json.loads(line) for line in out.splitlines()]  # raises if anything else reached stdout
    assert all(isinstance(e, dict) for e in events)
    return process.returncode, events, err


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def long_ct(tmp_path_factory, real_data) -> Path:
    """The sample CT repeated to 720 slices: long enough to be interrupted part-way even on a fast, idle machine
    (at 240 slices a tiny model sometimes finished before the signal arrived)."""
    sample = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    image = sitk.GetImageFromArray(np.tile(sitk.GetArrayFromImage(sample), (24, 1, 1)))
    image.SetSpacing(sample.GetSpacing())
    image.SetOrigin(sample.GetOrigin())
    image.SetDirection(sample.GetDirection())
    path = tmp_path_factory.mktemp("ct") / "long.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def test_segment_reports_each_step_and_names_what_it_wrote(tmp_path, tiny_model, real_data):
    ct = real_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    code, events, _ = run_json("segment", str(ct), "-o", str(tmp_path / "labels.nrrd"), "--confidence",
                               str(tmp_path / "confidence.nrrd"), "--model", str(tiny_model), "--mode", "eager")
    assert code == 0
    assert events[0] == {"status": "Loading model hsam-tiny-test", "stage": "load"}
    progress = [(e["done"], e["total"]) for e in events if "done" in e]
    assert progress[0] == (0, 30) and progress[-1] == (30, 30)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    warnings = [e["warning"] for e in events if "warning" in e]
    assert any("demo model" in w for w in warnings)
    last = events[-1]
    assert last["finished"] is True and set(last) == {"finished", "written", "result", "model"}
    assert last["written"] == {"labels": str(tmp_path / "labels.nrrd"), "confidence": str(tmp_path / "confidence.nrrd")}
    assert sitk.ReadImage(last["written"]["labels"]).GetSize() == sitk.ReadImage(str(ct)).GetSize()
    assert last["model"]["id"] == "hsam-tiny-test" and last["model"]["classes"] == list(CLASS_NAMES)
    assert len(last["model"]["sha256"]) == 64
    assert last["result"]["device"] == "cpu" and last["result"]["mode"] == "eager"
    assert set(last["result"]["volumes_ml"]) == set(CLASS_NAMES[1:])


def test_an_error_is_one_json_line_and_exit_status_2(tmp_path, tiny_model):
    code, events, err = run_json("segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "out.nii.gz"),
                                 "--model", str(tiny_model))  # fmt: skip
    assert code == 2
    assert len(events) == 1 and set(events[0]) == {"error"} and "\n" not in events[0]["error"]
    assert "missing.nii.gz" in events[0]["error"]
    assert f"error: {events[0]['error']}" in err
    assert not (tmp_path / "out.nii.gz").exists()

    code, events, _ = run_json("models", "download", "no-such-model")
    assert code == 2 and len(events) == 1 and "no-such-model" in events[0]["error"]


def test_models_import_reports_the_installed_id(tiny_model):
    code, events, _ = run_json("models", "import", str(tiny_model))
    assert code == 0
    assert events[0]["stage"] == "install"
    assert events[-1]["finished"] is True and events[-1]["id"] == "hsam-tiny-test"
    assert (Path(events[-1]["path"]) / "model.json").is_file()


def test_devices_reports_what_torch_sees():
    code, events, _ = run_json("devices")
    assert code == 0 and events[-1]["finished"] is True
    devices = events[-1]["devices"]
    assert devices["auto"] == ("cuda" if devices["cuda"] else "mps" if devices["mps"] else "cpu")
    assert devices["torch"] and devices["cpu_threads"] >= 1
    # why auto runs what it runs: the precision rule's evidence, per model family
    assert all(reason.startswith(devices["cpu"]) for reason in devices["cpu_engine_reasons"].values())


def _write_case(folder: Path, image: sitk.Image, labels: sitk.Image) -> None:
    folder.mkdir(parents=True)
    sitk.WriteImage(image, str(folder / "image.nii.gz"))
    sitk.WriteImage(labels, str(folder / "labels.nii.gz"))
    (folder / "provenance.json").write_text(json.dumps({"source": "test: TotalSegmentator reference labels"}))


def test_finetune_reports_steps_epochs_and_per_organ_validation_dice(tmp_path, tiny_model, real_data):
    folder = real_data / "totalsegmentator"
    image = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))
    reference = sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    labels = sitk.GetImageFromArray(remap_labels(sitk.GetArrayFromImage(reference), "totalseg_total"))
    labels.CopyInformation(reference)
    for name, (start, stop) in {"upper": (16, 22), "lower": (8, 14)}.items():  # one case trains, one validates
        _write_case(tmp_path / "cases" / name, image[:, :, start:stop], labels[:, :, start:stop])

    code, events, err = run_json("finetune", "--model", str(tiny_model), "--cases", str(tmp_path / "cases"),
                                 "--epochs", "2", "--name", "tiny-ft", "--output", str(tmp_path / "run"),
                                 "--device", "cpu")  # fmt: skip
    assert code == 0, err[-2000:]
    steps = [(e["done"], e["total"]) for e in events if e.get("stage") == "train" and "done" in e]
    assert steps and steps[-1][0] == steps[-1][1] and [d for d, _ in steps] == sorted(d for d, _ in steps)
    epochs = [e for e in events if "epoch" in e]
    assert [(e["epoch"], e["epochs"]) for e in epochs] == [(1, 2), (2, 2)]
    assert all(isinstance(e["loss"], float) for e in epochs)
    assert set(epochs[-1]["val_dice_organs"]) == set(CLASS_NAMES[1:])
    assert epochs[-1]["val_dice"] is None or 0.0 <= epochs[-1]["val_dice"] <= 1.0
    last = events[-1]
    assert last["finished"] is True and last["complete"] is True and last["model"]["id"] == "tiny-ft"


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stopped_segment_leaves_the_previous_output_intact(tmp_path, tiny_model, long_ct, stop):
    output = tmp_path / "labels.nii.gz"
    output.write_bytes(b"the previous run's labels")
    before = sorted(p.name for p in tmp_path.iterdir())
    # A shell starts background jobs with SIGINT ignored, and a child inherits that (Python then keeps ignoring it):
    # the child gets the default disposition, so the test sees how hsam handles a SIGINT that reaches it.
    process = hsam("segment", str(long_ct), "-o", str(output), "--model", str(tiny_model), "--mode", "eager",
                   "--batch-size", "1", "--progress", "json",
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    for line in process.stdout:  # wait until it is segmenting
        event = json.loads(line)
        if event.get("stage") == "segment" and event.get("done", 0) >= 2:
            break
    sent = time.perf_counter()
    process.send_signal(stop)
    out, err = process.communicate(timeout=30)
    waited = time.perf_counter() - sent
    assert waited < STOP_LIMIT_S, f"stopped after {waited:.1f} s"
    assert process.returncode == 130, err[-2000:]
    last = json.loads(out.splitlines()[-1])
    assert last["cancelled"] is True and "no output was written" in last["error"]
    assert output.read_bytes() == b"the previous run's labels"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "no staged or partial file is left behind"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to see whether the child lives")
def test_a_child_ends_when_its_parent_dies(tmp_path, tiny_model, long_ct):
    """The Slicer module's children watch their stdin: a killed Slicer never leaves a child running."""
    script = f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / "HSAMSlicer")!r})
from HSAMSlicerLib.process import ChildJob
job = ChildJob(["segment", {str(long_ct)!r}, "-o", {str(tmp_path / "out.nrrd")!r}, "--model", {str(tiny_model)!r},
                "--mode", "eager", "--batch-size", "1"]).start()
while job.poll().current < 1:
    time.sleep(0.05)
print(job.process.pid, flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no cleanup code of the parent runs
    parent.wait()
    deadline = time.monotonic() + STOP_LIMIT_S
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the child outlived its parent"
    assert not (tmp_path / "out.nrrd").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended (only its parent may reap it)
    except FileNotFoundError:
        return False
