"""Run a long job (model loading + per-slice inference) in a Python thread; the GUI polls it from a QTimer.

No Qt here: the thread never touches MRML or widgets. It only calls ``job(progress, cancel, status)``, where
``progress(k, n)`` records "slice k of n", ``cancel()`` tells the job whether the user asked to stop and
``status(text)`` posts a one-line message (download, model loading). PyTorch releases the GIL inside
its kernels, so Slicer's event loop keeps running while the worker computes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

Job = Callable[[Callable[[int, int], None], Callable[[], bool], Callable[[str], None]], Any]


@dataclass(frozen=True)
class TaskState:
    """A snapshot of a :class:`BackgroundTask`, safe to read on the main thread."""

    done: bool
    current: int  # slices finished
    total: int  # slices in all (0 while unknown, e.g. during model loading)
    elapsed_s: float
    eta_s: float | None  # None until two progress reports allow an estimate
    cancel_requested: bool
    message: str = ""
    result: Any = None
    error: BaseException | None = None


class BackgroundTask:
    """``job(progress, cancel, status)`` in a daemon thread, with thread-safe progress, ETA and a cancel flag."""

    def __init__(self, job: Job, name: str = "HSAMSlicer worker", clock: Callable[[], float] = time.monotonic):
        self._job = job
        self._clock = clock
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started_at: float | None = None
        self._first: tuple[int, float] | None = None  # first progress report: the rate excludes model loading
        self._last: tuple[int, float] | None = None
        self._total = 0
        self._message = ""
        self._result: Any = None
        self._error: BaseException | None = None

    def start(self) -> "BackgroundTask":
        self._started_at = self._clock()
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the job to stop at its next check (between slice batches)."""
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job ends (tests and headless use); True when it did."""
        return self._finished.wait(timeout)

    def poll(self) -> TaskState:
        with self._lock:
            now = self._clock()
            elapsed = 0.0 if self._started_at is None else now - self._started_at
            current = self._last[0] if self._last else 0
            eta = None
            if self._first and self._last and self._last[0] > self._first[0] and self._total:
                rate = (self._last[0] - self._first[0]) / max(self._last[1] - self._first[1], 1e-9)
                eta = max(self._total - self._last[0], 0) / rate
            return TaskState(
                done=self._finished.is_set(),
                current=current,
                total=self._total,
                elapsed_s=elapsed,
                eta_s=eta,
                cancel_requested=self._cancel.is_set(),
                message=self._message,
                result=self._result,
                error=self._error,
            )

    def _progress(self, current: int, total: int) -> None:
        with self._lock:
            stamp = (int(current), self._clock())
            if self._first is None:
                self._first = stamp
            self._last = stamp
            self._total = int(total)

    def _status(self, text: str) -> None:
        with self._lock:
            self._message = str(text)

    def _run(self) -> None:
        try:
            result = self._job(self._progress, self._cancel.is_set, self._status)
            with self._lock:
                self._result = result
        except BaseException as error:  # handed to the main thread, which decides how to report it
            with self._lock:
                self._error = error
        finally:
            self._finished.set()


def format_eta(seconds: float | None) -> str:
    """'1:05' style remaining time, or '' while unknown."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"
