"""Cancel ends the whole process tree, launcher or not (POSIX).

In Slicer the module's child is ``PythonSlicer``, CTK's AppLauncher, which starts the real interpreter as *its* child.
These tests put a stand-in ``PythonSlicer`` on PATH that does the same (runs the real interpreter as a child, dies at
once on SIGTERM, and reports a child's signal death as 128 + signal like a shell), then run real ``hsam`` jobs under
it. "Ended" means the process group is gone: ``os.killpg(pgid, 0)`` raises.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.name == "nt" or not Path("/proc/self/stat").is_file(),
                                reason="process groups and /proc (Linux)")

import slicer_headless  # noqa: E402,F401  (puts HSAMSlicer/ on sys.path)
from local_http import served_base_weights  # noqa: E402

from HSAMSlicerLib.process import ChildCrashed, ChildJob, JobCancelled, group_alive, python_executable  # noqa: E402

LAUNCHER = """#!{python}
# Stand-in for CTK's AppLauncher (PythonSlicer): the real interpreter runs as a child, not in this process.
import subprocess, sys
code = subprocess.call([{python!r}, *sys.argv[1:]])
sys.exit(128 - code if code < 0 else code)
"""


@pytest.fixture
def launcher(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    path = folder / "PythonSlicer"
    path.write_text(LAUNCHER.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    assert python_executable() == str(path)
    return path


@pytest.fixture
def slow_download(tmp_path, monkeypatch):
    """A model download from a local server slow enough (about 5 s) that a test can act while it runs."""
    with served_base_weights(tmp_path, monkeypatch, "test-base", seed=0, delay=0.1):
        yield ["models", "download", "test-base"]


def members(pgid: int) -> dict[int, str]:
    """{pid: state} of the processes in group ``pgid`` (zombies included)."""
    found = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            found[int(path.parent.name)] = fields[0]
    return found


def downloading(job: ChildJob, timeout_s: float = 120.0):
    """Poll until the interpreter under the launcher reports download progress."""
    deadline = time.monotonic() + timeout_s
    state = job.poll()
    while not (state.stage == "download" and state.current > 0):
        assert not state.done and time.monotonic() < deadline, f"no download progress: {state}"
        time.sleep(0.05)
        state = job.poll()
    return state


def assert_group_ended(pgid: int, timeout_s: float = 5.0) -> None:
    """Nothing of the group runs now, and the group is gone (os.killpg raises) once init has reaped it."""
    assert not [pid for pid, state in members(pgid).items() if state not in "ZX"], "a process of the job still runs"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process group {pgid} still exists: {members(pgid)}"
        time.sleep(0.02)


def test_cancel_under_a_launcher_ends_the_interpreter_before_the_folder_goes(launcher, slow_download):
    job = ChildJob(slow_download).start()
    pgid = job.process.pid
    downloading(job)
    assert len(members(pgid)) == 2, "the launcher and the interpreter it started"
    job.cancel()
    state = job.poll()
    deadline = time.monotonic() + 10
    while not state.done:
        assert time.monotonic() < deadline
        assert job.folder.is_dir(), "the folder must stay while a process of the job runs"
        time.sleep(0.02)
        state = job.poll()
    assert isinstance(state.error, JobCancelled), state.error
    assert_group_ended(pgid)
    job.cleanup()
    assert not job.folder.exists()


def test_cleanup_of_a_running_job_ends_the_whole_group_first(launcher, slow_download):
    """Closing the scene or the module: cleanup() returns only when no process of the job runs."""
    job = ChildJob(slow_download).start()
    pgid = job.process.pid
    downloading(job)
    job.cleanup()
    assert_group_ended(pgid)
    assert not job.folder.exists()


def test_an_interpreter_killed_under_the_launcher_is_a_crash_with_its_signal(launcher, slow_download):
    job = ChildJob(slow_download).start()
    pgid = job.process.pid
    downloading(job)
    (interpreter,) = [pid for pid in members(pgid) if pid != job.process.pid]
    os.kill(interpreter, signal.SIGKILL)  # what the out-of-memory killer does
    state = job.wait(timeout=30)
    assert isinstance(state.error, ChildCrashed), state.error
    assert "signal SIGKILL (exit code 137)" in str(state.error) and "\n" not in str(state.error)
    assert_group_ended(pgid)
    job.cleanup()


def test_a_direct_child_killed_by_a_signal_is_named(slow_download):
    job = ChildJob(slow_download).start()
    downloading(job)
    os.kill(job.process.pid, signal.SIGSEGV)
    state = job.wait(timeout=30)
    assert isinstance(state.error, ChildCrashed) and "signal SIGSEGV" in str(state.error), state.error
    job.cleanup()
    assert not group_alive(job.process.pid)
