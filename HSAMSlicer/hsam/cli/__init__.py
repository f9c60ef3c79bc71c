"""The ``hsam`` command line: ``hsam segment | prompt | serve | series | train | finetune | evaluate | bench | models |
devices | sample``.

Each command lives in its own module of this package with two functions: ``register(subparsers)`` adds its parser
(light: no torch import), and ``run(args) -> int`` does the work, reporting through ``args.reporter``
(:class:`hsam.cli.progress.Reporter`). Problems the user can fix raise :class:`hsam.errors.HSAMError`; ``main`` prints
them as one ``error:`` line (one ``{"error": ...}`` line with ``--progress json``) and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from typing import Sequence

from hsam import __version__
from hsam.errors import HSAMError

# each command module adds its name here
COMMAND_MODULES: tuple[str, ...] = (
    "evaluate", "segment", "prompt", "serve", "series", "models", "bench", "train", "devices", "sample",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsam",
        description="H-SAM multi-organ CT segmentation: segment, train, fine-tune, evaluate, benchmark, manage models.",
    )
    parser.add_argument("--version", action="version", version=f"hsam {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"hsam.cli.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Called without ``argv`` (the ``hsam`` program) it also installs the stop handlers."""
    from hsam.cli import progress, stop

    if argv is None:
        stop.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    style = getattr(args, "progress", "bar")
    # JSON mode: stdout carries the JSON lines only; whatever else anything prints goes to stderr
    reporter = progress.Reporter(style, stream=sys.stdout, quiet=bool(getattr(args, "quiet", False)))
    args.reporter = reporter
    redirect = contextlib.redirect_stdout(sys.stderr) if reporter.json else contextlib.nullcontext()
    try:
        with redirect:
            return int(args.run(args) or 0)
    except HSAMError as error:
        reporter.error(str(error))
        return 2
    except KeyboardInterrupt:
        reporter.error("interrupted; no output was written", cancelled=True)
        return stop.INTERRUPTED_STATUS
    except ModuleNotFoundError as error:
        if error.name not in ("torch", "onnxruntime", "onnx", "safetensors", "segment_anything"):
            raise
        reporter.error(f"the Python package {error.name} is not installed: pip install {error.name.replace('_', '-')}")
        return 2
    except Exception as error:
        if not reporter.json:
            raise
        traceback.print_exc(file=sys.stderr)
        reporter.error(f"unexpected error ({type(error).__name__}: {error}); this is a bug: please report it with "
                       "the log")
        return 1


if __name__ == "__main__":
    sys.exit(main())
