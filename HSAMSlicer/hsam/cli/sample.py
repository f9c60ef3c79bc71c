"""``hsam sample NAME -o FILE``: write a sample shipped with hsam, e.g. the abdominal CT for a first run."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sample`` command (no torch import here)."""
    from hsam.sample_data.samples import SAMPLES

    parser = subparsers.add_parser(
        "sample",
        help="write a sample CT shipped with hsam (for a first run)",
        description="Write a sample volume shipped inside the hsam package, SHA-256 checked. Samples: "
        + "; ".join(f"{s.name}: {s.description}" for s in SAMPLES.values()),
    )
    parser.add_argument("name", choices=sorted(SAMPLES), help="which sample")
    parser.add_argument("-o", "--output", required=True, help="file to write (.nii.gz)")
    parser.add_argument("--force", action="store_true", help="replace the output file if it exists")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hsam.sample_data.samples import write_sample

    path = write_sample(args.name, args.output, overwrite=args.force)
    print(f"wrote {path}")
    return 0
