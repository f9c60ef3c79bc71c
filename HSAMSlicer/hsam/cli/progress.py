"""How a command tells what it is doing: for people, a progress bar and lines on stderr; for programs
(``--progress json``), one JSON object per line on stdout.

The JSON lines, in the order a command prints them (every line is one object, flushed at once):

- ``{"status": "Loading model ...", "stage": "load"}``: what the command is doing now. Stages: ``download``,
  ``load``, ``engine`` (the engine chosen and why; building the ONNX Runtime engine), ``slab`` (which slices the
  slab search encodes, :mod:`hsam.pipeline.slab`), ``segment``, ``train``, ``install``.
- ``{"done": k, "total": n, "stage": "segment"}``: k of n units done (slices, bytes, training steps), after every step.
- ``{"epoch": k, "epochs": n, "loss": ..., "val_dice": ..., "val_dice_organs": {...}}``: after a training epoch.
- ``{"warning": "..."}``: something the user should know about the result.
- last, on success: ``{"finished": true, ...}`` with what the command wrote (e.g. ``"written": {...}``).
- last, on failure: ``{"error": "one line saying what is wrong and what to do"}``; exit status 2 (1 for a bug,
  130 when interrupted, with ``"cancelled": true``).

In JSON mode everything else the command prints goes to stderr, so stdout holds nothing but these lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import IO, Any

STYLES = ("bar", "json", "none")


def add_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--progress bar|json|none`` to a command's parser."""
    parser.add_argument("--progress", choices=STYLES, default="bar",
                        help="bar (default): a progress bar on stderr; json: one JSON object per line on stdout "
                        "(status, done/total, warnings, then finished or error), for programs such as the Slicer "
                        "module; none: no progress output")


class Reporter:
    """Sends a command's progress to a person (tqdm bar, stderr lines) or to a program (JSON lines)."""

    def __init__(self, style: str = "bar", stream: IO[str] | None = None, quiet: bool = False) -> None:
        self.style = style if style in STYLES else "bar"
        self.quiet = quiet or self.style == "none"
        self._stream = stream if stream is not None else sys.stdout
        self._bar: Any = None
        self._bar_key: tuple[str, str] | None = None

    @property
    def json(self) -> bool:
        return self.style == "json"

    def emit(self, **fields: Any) -> None:
        """Write one JSON line (JSON mode only)."""
        if self.json:
            self._stream.write(json.dumps(fields, default=str) + "\n")
            self._stream.flush()

    def status(self, text: str, stage: str) -> None:
        """What the command is doing now (for programs: people see the progress bar and the command's own lines, and
        a mistake in their options must still give one error line only)."""
        self.emit(status=text, stage=stage)

    def progress(self, done: int, total: int | None, stage: str, unit: str = "slice", label: str = "") -> None:
        """``done`` of ``total`` units finished in ``stage``; ``label`` names the bar (default: the stage)."""
        if self.json:
            self.emit(done=int(done), total=None if total is None else int(total), stage=stage)
            return
        if self.quiet:
            return
        if self._bar is None or self._bar_key != (stage, unit):
            from tqdm import tqdm

            self.close_bar()
            byte_units = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
            self._bar = tqdm(total=total, unit=unit, desc=label or stage, file=sys.stderr, dynamic_ncols=True,
                             **byte_units)
            self._bar_key = (stage, unit)
        self._bar.total = total
        self._bar.update(int(done) - self._bar.n)

    def epoch(self, **fields: Any) -> None:
        """A training epoch finished (JSON mode; the bar style prints the training log itself)."""
        self.emit(**fields)

    def warning(self, text: str) -> None:
        """Always shown to people (even with --quiet), and sent as ``{"warning": ...}`` to programs."""
        self.close_bar()
        self.emit(warning=text)
        print(f"warning: {text}", file=sys.stderr)

    def finished(self, **fields: Any) -> None:
        """The command succeeded; ``fields`` say what it wrote."""
        self.close_bar()
        self.emit(finished=True, **fields)

    def error(self, message: str, **fields: Any) -> None:
        """The command failed: one line, for people on stderr and for programs as ``{"error": ...}``."""
        self.close_bar()
        self.emit(error=message, **fields)
        print(f"error: {message}", file=sys.stderr)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_key = None


def download_progress(reporter: Reporter, what: str, every_s: float = 0.25):
    """A ``progress(done_bytes, total_bytes)`` callback for :func:`hsam.weights.fetch.fetch` that reports through
    ``reporter``: a status line first, then byte counts (at most one line per ``every_s`` in JSON mode)."""
    last = [-1.0]

    def report(done: int, total: int | None) -> None:
        now = time.monotonic()
        if last[0] < 0:
            reporter.status(f"Downloading {what}", "download")
        elif reporter.json and now - last[0] < every_s and done != total:
            return
        last[0] = now
        reporter.progress(done, total, "download", unit="B", label=what)

    return report
