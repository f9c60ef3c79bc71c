"""Run one ``hsam`` command in a child process and follow it from Slicer's main thread without ever blocking it.

Why a process and not a thread: Slicer's main thread holds Python's GIL while Qt idles, so a Python thread inside
Slicer runs only while the main thread runs Python (measured 20-50x slower; ``product.md``, "Process model"). The
child is Slicer's own Python (``PythonSlicer``) running ``python -m hsam COMMAND ... --progress json``:

- its stdout (one JSON object per line, :mod:`hsam.cli.progress`) goes to a file in the job's private folder, which
  :meth:`ChildJob.poll` reads from where it stopped: a file read never blocks, on every platform, and needs no thread;
- its stderr goes to ``log.txt`` beside it (shown with an error);
- its stdin is a pipe that the parent never writes to: closing it asks the child to stop, and the operating system
  closes it when Slicer exits or crashes, so a child never outlives Slicer (``hsam.cli.stop``);
- it runs in its own process group (a new session on POSIX), so Cancel ends it and every process it started. Under
  Slicer the direct child is ``PythonSlicer``, CTK's AppLauncher, which starts the real interpreter as *its* child:
  the launcher may end at once on SIGTERM while the interpreter still cleans up. So a job is over only when its whole
  group is gone (:func:`group_alive`), and its folder is removed only then.

No Qt and no MRML here: the widget calls :meth:`ChildJob.poll` from a QTimer, the Logic applies results.

:class:`ChildProcess` holds these rules (start in a new group, kill the group, remove the folder) and
:class:`LineReader` the non-blocking read of a child's output file; :class:`ChildJob` adds progress, and the warm
prompt process (:mod:`HSAMSlicerLib.prompts`) adds requests written to the child's stdin.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from hsam.errors import HSAMError

PROGRESS_FILE = "progress.jsonl"
LOG_FILE = "log.txt"
GROUP_FILE = "group.txt"  # the child's process group: the sweep leaves a folder alone while that group runs
STALE_AFTER_S = 3600.0  # a job folder nothing wrote to for this long, whose processes are gone, is swept
STOP_GRACE_S = 1.0  # after a cancel, the child gets this long to clean up before it is killed
LOG_TAIL_LINES = 30


class ChildCrashed(HSAMError):
    """The child ended without saying why (killed, out of memory, segfault): ``details`` holds its log's last lines."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


class JobCancelled(Exception):
    """The user cancelled the job; nothing was applied."""


@dataclass(frozen=True)
class JobState:
    """A snapshot of a :class:`ChildJob`, read on the main thread."""

    done: bool
    current: int  # units finished (slices, training steps, bytes)
    total: int  # units in all; 0 while unknown
    stage: str  # what the child does now: download, load, engine, segment, train, install
    message: str  # the child's latest status line
    elapsed_s: float
    eta_s: float | None  # None until two progress reports allow an estimate
    cancel_requested: bool
    warnings: tuple[str, ...] = ()
    epochs: tuple[dict[str, Any], ...] = ()  # training: one entry per finished epoch
    result: dict[str, Any] | None = None  # the child's last line, {"finished": true, ...}, once it succeeded
    error: BaseException | None = None  # HSAMError (the child's message), ChildCrashed, or JobCancelled


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` launcher where it exists (it sets up Slicer's libraries), else this Python."""
    launcher = shutil.which("PythonSlicer")
    return launcher or sys.executable


def package_root() -> Path:
    """The folder that holds the ``hsam`` package (next to HSAMSlicerLib in a checkout and an installed extension)."""
    import hsam

    return Path(hsam.__file__).resolve().parent.parent


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` still runs (POSIX). Zombies do not run: in a container
    whose init reaps orphans late, an ended interpreter can stay a zombie for a second or two."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path("/proc")
    if not (proc / "self" / "stat").is_file():
        return True  # no /proc (macOS): init reaps at once there
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp, ...
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _child_environment(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    root = str(package_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["HSAM_STOP_ON_STDIN_EOF"] = "1"
    env.update(extra or {})
    return env


def sweep_stale_folders(root: Path, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove job folders under ``root`` left by a crash (of Slicer or the machine): nothing in them changed for
    ``stale_after_s`` and their process group no longer runs. Returns the folders removed."""
    removed = []
    now = time.time()
    for folder in sorted(Path(root).glob("job-*")) if Path(root).is_dir() else []:
        try:
            newest = max([folder.stat().st_mtime] + [p.stat().st_mtime for p in folder.iterdir()])
            group = int((folder / GROUP_FILE).read_text()) if (folder / GROUP_FILE).is_file() else None
        except (OSError, ValueError):
            continue  # being removed, or a half-written group file: next time
        if now - newest < stale_after_s or (group is not None and os.name != "nt" and group_alive(group)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


class LineReader:
    """Complete lines a child appended to a file since the last call: a file read never blocks and needs no thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._pending = b""

    def new_objects(self) -> list[dict[str, Any]]:
        """The JSON objects of the lines completed since the last call (other lines are skipped: not ours)."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except OSError:
            return []
        self._offset += len(data)
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()  # an unfinished last line waits for the next read
        found = []
        for line in lines:
            try:
                event = json.loads(line) if line.strip() else None
            except ValueError:
                continue  # not ours (a library printing to stdout before the redirection): it is in no contract
            if isinstance(event, dict):
                found.append(event)
        return found


class ChildProcess:
    """``python -m hsam ARGUMENTS`` in its own process group, stdout to ``folder/stdout_name``, stderr to the log.

    The process-group rules every child of the module follows (module docstring): started with :meth:`start`, ended
    with its whole group by :meth:`kill`, its private folder removed by :meth:`cleanup`. ``folder`` is created as
    ``root/job-*`` when None (``root`` None: the system's temporary folder), so the start-up sweep finds it.
    """

    stdout_name = PROGRESS_FILE

    def __init__(self, arguments: Sequence[str], folder: Path | None = None, env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, root: Path | None = None) -> None:
        self.arguments = [str(a) for a in arguments]
        if folder is None:
            if root is not None:
                Path(root).mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="job-" if root is not None else "hsam-job-", dir=root))
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._env = env
        self._clock = clock
        self.process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._gone = False  # the whole group was seen gone: its ID may be reused, so it is never signalled again
        self._windows_job = None  # Windows: the job object holding the child's whole tree (HSAMSlicerLib.winjob)

    @property
    def command(self) -> list[str]:
        return [python_executable(), "-m", "hsam", *self.arguments]

    def start(self) -> "ChildProcess":
        """Start the child. Raises HSAMError when it cannot be started (the folder is removed then)."""
        popen: dict[str, Any] = {}
        if os.name == "nt":
            from HSAMSlicerLib import winjob

            popen["creationflags"] = (subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
                                      | winjob.CREATE_SUSPENDED)  # resumed once it is in its job object
        else:
            popen["start_new_session"] = True
        try:
            with open(self.folder / self.stdout_name, "wb") as stdout, open(self.folder / LOG_FILE, "wb") as stderr:
                self.process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                                                cwd=self.folder, env=_child_environment(self._env), **popen)
        except OSError as error:
            self.cleanup()
            raise HSAMError(f"could not start the H-SAM process ({error.strerror or error}); check that Slicer's "
                            "Python can run") from None
        if os.name == "nt":
            from HSAMSlicerLib import winjob

            self._windows_job = winjob.create(self.process)  # None: taskkill /T is the fallback
        self._started_at = self._clock()
        (self.folder / GROUP_FILE).write_text(str(self.process.pid))
        return self

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the child wrote to stderr (its log)."""
        try:
            text = (self.folder / LOG_FILE).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self, timeout_s: float = 5.0) -> bool:
        """End the child and every process it started, now, also when the direct child (a launcher) has already
        ended. Returns whether all of them are gone within ``timeout_s``."""
        if self.process is None:
            return True
        self._close_stdin()
        self._kill_group()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False
        deadline = time.monotonic() + timeout_s
        while self._tree_alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _kill_group(self) -> None:
        """SIGKILL to the child's process group (POSIX); on Windows, end the process tree."""
        if self._gone:
            return
        if os.name == "nt" and self._windows_job is not None:
            self._windows_job.terminate()
            return
        if os.name == "nt":
            if self.process.poll() is None:  # taskkill /T follows parent links: only while the child exists
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True,
                               check=False)  # fmt: skip
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _tree_alive(self) -> bool:
        """Whether the child or any process it started still runs (Windows: the direct child only)."""
        if self.process is None or self._gone:
            return False
        if os.name == "nt":
            active = self._windows_job.active() if self._windows_job is not None else -1
            alive = active > 0 or (active < 0 and self.process.poll() is None)
        else:
            alive = self.process.poll() is None or group_alive(self.process.pid)
        self._gone = not alive
        return alive

    def _close_stdin(self) -> None:
        if self.process is not None and self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except OSError:
                pass

    def cleanup(self) -> None:
        """Kill the child and every process it started if any still runs, then remove the private folder. A process
        that survives SIGKILL (stuck in the kernel) keeps its folder: the module's start-up sweep removes it later."""
        if self.kill():
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._windows_job is not None and self._gone:
            self._windows_job.close()


class ChildJob(ChildProcess):
    """``python -m hsam ARGUMENTS --progress json`` in a child process with a private working folder, followed by
    :meth:`poll`. The folder is removed by :meth:`cleanup`; the command's outputs should be written there.
    """

    def __init__(self, arguments: Sequence[str], folder: Path | None = None, env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, root: Path | None = None) -> None:
        super().__init__(arguments, folder, env, clock, root)
        self._lines = LineReader(self.folder / PROGRESS_FILE)
        self._current = 0
        self._total = 0
        self._stage = ""
        self._message = ""
        self._first: tuple[int, float] | None = None  # first progress report: the rate excludes start-up
        self._last: tuple[int, float] | None = None
        self._warnings: list[str] = []
        self._epochs: list[dict[str, Any]] = []
        self._final: dict[str, Any] | None = None
        self._cancel_at: float | None = None
        self._exited: tuple[int, float] | None = None  # the direct child's exit code and when it was seen
        self._error: BaseException | None = None
        self._done = False

    @property
    def command(self) -> list[str]:
        return [*super().command, "--progress", "json"]

    # ------------------------------------------------------------------ following the child
    def poll(self) -> JobState:
        """Read what the child reported since the last call (never blocks) and return the job's state. The job is
        done once the direct child has ended *and* every process it started is gone; processes left behind (the
        interpreter under a launcher) get :data:`STOP_GRACE_S` and are then killed."""
        if self.process is not None and not self._done:
            self._read_lines()
            code = self.process.poll()
            now = self._clock()
            if code is None and self._cancel_at is not None and now >= self._cancel_at:
                self._kill_group()
                code = self.process.poll()
            if code is not None and self._exited is None:
                self._exited = (code, now)
            if self._exited is not None:
                if self._tree_alive() and now >= self._exited[1] + STOP_GRACE_S:
                    self._kill_group()
                if not self._tree_alive():
                    self._read_lines()
                    self._finish(self._exited[0])
        return self._state()

    def _read_lines(self) -> None:
        for event in self._lines.new_objects():
            self._handle(event)

    def _handle(self, event: dict[str, Any]) -> None:
        if "error" in event:
            self._error = JobCancelled(event["error"]) if event.get("cancelled") else HSAMError(str(event["error"]))
        elif event.get("finished"):
            self._final = event
        elif "warning" in event:
            self._warnings.append(str(event["warning"]))
        elif "epoch" in event:
            self._epochs.append(event)
        elif "status" in event:
            self._message = str(event["status"])
            self._stage = str(event.get("stage", self._stage))
        if "done" in event and "total" in event:
            stage = str(event.get("stage", self._stage))
            if stage != self._stage or int(event["done"]) < self._current:
                self._first = None  # a new stage (download -> segment) or a new file: its own rate
            self._stage = stage
            now = self._clock()
            stamp = (int(event["done"]), now)
            self._current, self._total = stamp[0], int(event["total"] or 0)
            if self._first is None:
                self._first = stamp
            self._last = stamp

    def _finish(self, code: int) -> None:
        self._done = True
        if self._cancel_at is not None:
            self._error = JobCancelled("cancelled")
        elif code == 0 and self._final is not None:
            self._error = None
        elif self._error is None:
            message = (f"the H-SAM process {how_it_ended(code)} without finishing (out of memory, a GPU driver error "
                       "or a crash?); the scene was not changed. The log's last lines are in the details")
            self._error = ChildCrashed(message, self.log_tail())

    def _state(self) -> JobState:
        now = self._clock()
        eta = None
        if self._first and self._last and self._last[0] > self._first[0] and self._total:
            rate = (self._last[0] - self._first[0]) / max(self._last[1] - self._first[1], 1e-9)
            eta = max(self._total - self._last[0], 0) / rate
        return JobState(
            done=self._done, current=self._current, total=self._total, stage=self._stage, message=self._message,
            elapsed_s=now - self._started_at if self._started_at else 0.0, eta_s=eta,
            cancel_requested=self._cancel_at is not None, warnings=tuple(self._warnings),
            epochs=tuple(self._epochs), result=self._final if self._done and self._error is None else None,
            error=self._error if self._done else None,
        )

    def wait(self, timeout: float | None = None, interval: float = 0.05, cleanup: bool = False) -> JobState:
        """Poll until the job ends (headless use and tests); the same as the GUI's timer, without the GUI. With
        ``cleanup`` the folder is removed afterwards (for jobs whose result is all in the returned state)."""
        deadline = None if timeout is None else self._clock() + timeout
        state = self.poll()
        while not state.done and (deadline is None or self._clock() < deadline):
            time.sleep(interval)
            state = self.poll()
        if cleanup:
            self.cleanup()
        return state

    # ------------------------------------------------------------------ stopping
    def cancel(self) -> None:
        """Ask the child to stop (it removes its partial outputs); :meth:`poll` kills it if it has not ended within
        :data:`STOP_GRACE_S`. Never blocks."""
        if self.process is None or self._done or self._cancel_at is not None:
            return
        self._cancel_at = self._clock() + STOP_GRACE_S
        self._close_stdin()
        if os.name != "nt":
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass


def how_it_ended(code: int) -> str:
    """'was ended by signal SIGKILL' or 'stopped with exit code 3'. A negative code is a signal (the direct child);
    129-159 is 128 + a signal, how a launcher or shell reports a child that a signal ended (the interpreter under
    ``PythonSlicer``, killed for memory)."""
    signal_number = -code if code < 0 else code - 128 if 128 < code < 160 else None
    if signal_number is None:
        return f"stopped with exit code {code}"
    try:
        name = signal.Signals(signal_number).name
    except ValueError:
        name = str(signal_number)
    return f"was ended by signal {name}" + (f" (exit code {code})" if code > 0 else "")


def format_eta(seconds: float | None) -> str:
    """'1:05' style remaining time, or '' while unknown."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
