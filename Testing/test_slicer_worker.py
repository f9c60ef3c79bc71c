"""The background worker the widget polls: progress, ETA, status, cancel and errors cross the thread boundary, and
the real inference runs in the worker while MRML is only touched on the main thread.
"""

from __future__ import annotations

import threading
import time

import pytest

import slicer_headless  # noqa: F401  (puts HSAMSlicer/ on sys.path)
from hsam.errors import HSAMError
from HSAMSlicerLib.worker import BackgroundTask, format_eta


def wait_done(task: BackgroundTask, timeout: float = 60.0):
    assert task.wait(timeout), "the worker did not finish"
    return task.poll()


def test_progress_eta_and_status_are_reported():
    now = [0.0]

    def job(progress, cancel, status):
        status("Loading model...")
        now[0] = 5.0  # model loading took 5 s: it must not count in the slice rate
        progress(0, 10)
        now[0] = 7.0
        progress(4, 10)  # 4 slices in 2 s -> 2 slices/s -> 6 left take 3 s
        return "labels"

    task = BackgroundTask(job, clock=lambda: now[0]).start()
    state = wait_done(task)
    assert state.done and state.error is None and state.result == "labels"
    assert (state.current, state.total) == (4, 10)
    assert state.eta_s == pytest.approx(3.0)
    assert state.message == "Loading model..."
    assert state.elapsed_s == pytest.approx(7.0)


def test_no_eta_before_two_reports():
    release = threading.Event()

    def job(progress, cancel, status):
        progress(0, 30)
        release.wait(10)

    task = BackgroundTask(job).start()
    while task.poll().total == 0:
        time.sleep(0.01)
    state = task.poll()
    assert not state.done and state.eta_s is None and (state.current, state.total) == (0, 30)
    release.set()
    assert wait_done(task).error is None


def test_cancel_reaches_the_job_and_errors_come_back():
    started = threading.Event()

    class Stopped(Exception):
        pass

    def job(progress, cancel, status):
        started.set()
        while not cancel():
            time.sleep(0.005)
        raise Stopped("cancelled")

    task = BackgroundTask(job).start()
    assert started.wait(10)
    assert not task.poll().done
    task.cancel()
    state = wait_done(task, 10)
    assert state.cancel_requested and isinstance(state.error, Stopped)

    def failing(progress, cancel, status):
        raise HSAMError("the image is 2-D: load a 3-D CT")

    state = wait_done(BackgroundTask(failing).start(), 10)
    assert isinstance(state.error, HSAMError) and "2-D" in str(state.error)


def test_format_eta():
    assert format_eta(None) == ""
    assert format_eta(4.4) == "0:04"
    assert format_eta(65) == "1:05"
    assert format_eta(3725) == "1:02:05"


def test_inference_in_the_worker_result_applied_on_the_main_thread(real_data, tmp_path):
    """What the widget does: read MRML, compute in the worker while polling, apply on the main thread."""
    pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    from HSAMSlicerLib.logic import HSAMSlicerLogic, RunOptions
    from HSAMSlicerLib.testing import save_tiny_model

    app = slicer_headless.start()
    volume = app.load_volume(real_data / "totalsegmentator" / "example_ct_sm.nii.gz")
    logic = HSAMSlicerLogic(app.scene)
    options = RunOptions(model=str(save_tiny_model(tmp_path / "tiny")), device="cpu", show_3d=False)
    image = logic.volume_to_image(volume)
    main = threading.get_ident()
    threads = set()

    def job(progress, cancel, status):
        threads.add(threading.get_ident())
        return logic.compute(image, options, progress=progress, cancel=cancel, status=status)

    task = BackgroundTask(job).start()
    polls = 0
    while not task.poll().done:  # the QTimer's role: the main thread stays free while the worker computes
        polls += 1
        time.sleep(0.02)
    state = task.poll()
    assert state.error is None, state.error
    assert threads and main not in threads
    assert (state.current, state.total) == (30, 30)
    assert state.message.startswith("Loading model")
    result, card = state.result
    segmentation = logic.apply_result(volume, result, card, options)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 8
    assert polls > 0
