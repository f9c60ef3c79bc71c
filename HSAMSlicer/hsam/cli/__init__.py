"""The ``hsam`` command line: ``hsam segment | series | train | finetune | evaluate | bench | models``.

Each command lives in its own module of this package with two functions: ``register(subparsers)`` adds its parser
(light: no torch import), and ``run(args) -> int`` does the work. Problems the user can fix raise
:class:`hsam.errors.HSAMError`; ``main`` prints them as one ``error:`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from hsam import __version__
from hsam.errors import HSAMError

COMMAND_MODULES: tuple[str, ...] = ("evaluate", "segment", "series", "models", "bench", "train")  # each command module adds its name here


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
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except HSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
