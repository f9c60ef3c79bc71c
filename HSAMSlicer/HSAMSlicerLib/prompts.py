"""The warm prompt process: one ``hsam serve`` child, requests sent without blocking, answers picked up by polling.

Qt-free (issue 26). The same process rules as every other job (:mod:`HSAMSlicerLib.process`): the child runs in its
own process group with a private folder under Slicer's temporary path (``job-*``, swept after a crash of Slicer like
the others), its answers go to a file that :meth:`PromptProcess.poll` reads from where it stopped (never blocks, no
thread: a thread in Slicer's process barely runs, ``product.md``), and closing it kills the whole group. A request is
one JSON line written to the child's stdin (a few hundred bytes: the pipe takes it at once, even while the child is
busy); the answers come back in order and each calls its request's callback on the caller's thread (the widget's
timer). The model, LiteMedSAM's decoder and the slice embeddings stay loaded between requests.

If the child dies, the next :meth:`PromptProcess.poll` starts a new one, reopens the volume, sends the unanswered
requests again and adds one line to ``notes``; when it dies again before answering anything, the process is not
restarted: ``failed`` says so and every waiting request gets the error.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hsam.errors import HSAMError
from HSAMSlicerLib.process import ChildCrashed, ChildProcess, LineReader, how_it_ended

ANSWERS_FILE = "answers.jsonl"
Answer = dict[str, Any]


class ServeChild(ChildProcess):
    """``python -m hsam serve [--model ID]``: answers go to ``answers.jsonl`` in the prompt folder."""

    stdout_name = ANSWERS_FILE


@dataclass
class _Request:
    payload: dict[str, Any]
    on_answer: Callable[[Answer], None] | None
    on_error: Callable[[BaseException], None] | None


class PromptProcess:
    """One warm ``hsam serve`` child. :meth:`send` queues a request; :meth:`poll` delivers answers to callbacks.

    ``root``: where its folder goes (``job-prompts-*``; the Logic passes Slicer's temporary path). Files the requests
    name (the volume, mask files) belong in :attr:`folder`; they go with it on :meth:`close`.
    """

    def __init__(self, model: str | None = None, root: Path | None = None, env: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix="job-prompts-", dir=root))
        # stdin carries the requests: the stop-on-EOF watcher of other jobs must not read it (EOF still ends serve)
        self._env = {**(env or {}), "HSAM_STOP_ON_STDIN_EOF": "0"}
        self._clock = clock
        self.notes: list[str] = []  # one line per restart (or the final stop), for the status line
        self.failed: str | None = None  # set when the child died twice in a row: no more restarts
        self._child: ServeChild | None = None
        self._answers: LineReader | None = None
        self._sent: deque[_Request] = deque()  # sent to the current child, not answered yet (answered in order)
        self._opened: dict[str, Any] | None = None  # the last "open": sent again to a restarted child
        self._answered_since_start = False

    @property
    def pending(self) -> int:
        """Requests not answered yet."""
        return len(self._sent)

    @property
    def pgid(self) -> int | None:
        """The current child's process group (its pid), or None before the first request."""
        return self._child.process.pid if self._child is not None and self._child.process is not None else None

    def send(self, payload: dict[str, Any], on_answer: Callable[[Answer], None] | None = None,
             on_error: Callable[[BaseException], None] | None = None) -> None:
        """Queue one request (starting the child on first use). Never waits for the answer. An ``{"error": ...}``
        answer goes to ``on_error`` as HSAMError. Raises HSAMError once the process has failed for good."""
        if self.failed:
            raise HSAMError(self.failed)
        if payload.get("cmd") == "open":
            self._opened = dict(payload)
        elif payload.get("cmd") == "embeddings" and self._opened is not None:  # a restarted child reopens with them
            self._opened["embeddings"] = payload.get("folder")
        if self._child is None:
            self._start()
        request = _Request(dict(payload), on_answer, on_error)
        self._sent.append(request)
        self._write(request.payload)

    def poll(self) -> None:
        """Deliver the answers that arrived (never blocks); restart a child that died (once in a row)."""
        if self._child is None:
            return
        for answer in self._answers.new_objects():
            if answer.get("cmd") == "ready" or "progress" in answer or not self._sent:
                continue  # the start-up line, a progress line (not an answer) or an answer nobody waits for
            self._answered_since_start = True
            self._deliver(self._sent.popleft(), answer)
        if self._child is not None and self._child.process.poll() is not None:
            self._after_crash(self._child.process.returncode)

    def wait(self, timeout_s: float = 600.0, interval_s: float = 0.02) -> None:
        """Poll until every request is answered (headless scripts and tests; the GUI polls from its timer)."""
        deadline = self._clock() + timeout_s
        while self._sent:
            if self._clock() > deadline:
                raise HSAMError(f"the prompt process gave no answer in {timeout_s:.0f} s")
            time.sleep(interval_s)
            self.poll()

    def close(self) -> None:
        """End the child and every process it started, and remove the folder. Waiting requests are dropped."""
        self._sent.clear()
        child, self._child = self._child, None
        if child is not None:
            child.kill()
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------------ internals
    def _start(self) -> None:
        arguments = ["serve"] + (["--model", self.model] if self.model else [])
        self._child = ServeChild(arguments, folder=self.folder, env=self._env, clock=self._clock)
        self._child.start()
        self._answers = LineReader(self.folder / ANSWERS_FILE)
        self._answered_since_start = False

    def _write(self, payload: dict[str, Any]) -> None:
        import json

        try:
            self._child.process.stdin.write((json.dumps(payload) + "\n").encode("utf-8"))
            self._child.process.stdin.flush()
        except OSError:
            pass  # the child has died: poll() sees it end and restarts it with this request

    @staticmethod
    def _deliver(request: _Request, answer: Answer) -> None:
        if "error" in answer:
            if request.on_error is not None:
                request.on_error(HSAMError(str(answer["error"])))
            return
        if request.on_answer is None:
            return
        try:
            request.on_answer(answer)
        except Exception as error:  # noqa: BLE001 (a failing callback must not stop the other answers)
            if request.on_error is None:
                raise
            request.on_error(error)

    def _after_crash(self, code: int) -> None:
        """The child ended without being asked: restart it once (reopen, resend), or give up after a second crash."""
        child, log = self._child, self._child.log_tail()
        child.kill()
        how = how_it_ended(code)
        waiting, self._sent = list(self._sent), deque()
        if self._answered_since_start or not self.notes:
            self.notes.append(f"the prompt process {how}; it was restarted (prompts given before on other slices "
                              "must be given again to propagate from them)")
            self._start()
            resend = ([_Request(self._opened, None, None)] if self._opened is not None
                      and not (waiting and waiting[0].payload.get("cmd") == "open") else [])
            for request in resend + waiting:
                self._sent.append(request)
                self._write(request.payload)
            return
        self._child = None
        self.failed = (f"the prompt process {how} again right after a restart, so it was not started again; "
                       f"prompts are off until the volume is chosen again (its log: {self.folder / 'log.txt'})")
        self.notes.append(self.failed)
        for request in waiting:
            if request.on_error is not None:
                request.on_error(ChildCrashed(self.failed, log))

