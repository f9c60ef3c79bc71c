"""``hsam series DIR``: list the DICOM series of a study folder and say which one ``hsam segment DIR`` would pick."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``series`` command (pydicom is imported only when it runs)."""
    parser = subparsers.add_parser(
        "series",
        help="list the DICOM series in a folder and the one `hsam segment` would pick",
        description="List every DICOM series under a folder (searched recursively): Series Instance UID, number, "
        "description, modality, slices, pixel and slice spacing, and why a series is not picked. `hsam segment DIR` "
        "picks the axial CT series with the most slices (ties: the smallest slice spacing); --series UID picks another.",
    )
    parser.add_argument("folder", help="a DICOM folder: one series, or a whole study (any sub-folder layout)")
    parser.set_defaults(run=run)


def rows(series: list, picked) -> list[list[str]]:  # noqa: ANN001 (DicomSeries; imports kept light)
    """The table's cells: one row per series; the last column is "picked" or the reason it is not."""
    table = []
    for entry in series:
        spacing = "" if entry.pixel_spacing is None else f"{entry.pixel_spacing[1]:.3g} x {entry.pixel_spacing[0]:.3g}"
        table.append([
            entry.uid, "" if entry.number is None else str(entry.number), entry.description or "-", entry.modality or "?",
            str(entry.slices), spacing or "-", f"{entry.slice_spacing:.3g}" if entry.slice_spacing else "-",
            "picked" if entry is picked else (entry.unsuitable() or "fewer slices or coarser spacing"),
        ])  # fmt: skip
    return table


def run(args: argparse.Namespace) -> int:
    from hsam.errors import HSAMError
    from hsam.volume.dicom_series import pick_series, scan_series

    found = scan_series(args.folder)
    try:
        picked = pick_series(found, folder=args.folder)
    except HSAMError as error:  # still list them: the table shows why none can be segmented
        picked, reason = None, str(error)
    else:
        reason = ""
    header = ["series UID", "number", "description", "modality", "slices", "pixel mm", "slice mm", "status"]
    table = [header] + rows(found, picked)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for entry in found:  # how files without a Series Instance UID were grouped, copies left out
        if entry.note:
            print(f"warning: {entry.uid}: {entry.note}", file=sys.stderr)
    if picked is None:
        print(f"no series can be segmented: {reason}")
        return 1
    print(f"hsam segment {args.folder} picks series {picked.uid}; --series UID picks another")
    return 0
