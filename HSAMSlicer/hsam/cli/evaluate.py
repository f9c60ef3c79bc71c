"""``hsam evaluate``: Dice and HD95 per organ per volume, as a CSV report plus a markdown summary."""

from __future__ import annotations

import argparse
import sys
import warnings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted label volumes against references (Dice, HD95)",
        description="Score predicted label volumes against reference labels: Dice and HD95 per organ per volume. "
        "--pred and --ref are two files or two folders whose files are matched by case name (suffixes such as "
        "_pred/_gt are ignored). A DICOM SEG (.dcm) is read with its segments matched to organs by SNOMED CT code, "
        "then by name, on the grid of the volume it is compared with. Writes the CSV report and a markdown summary "
        "next to it (.md), and prints the summary.",
    )
    parser.add_argument("--pred", required=True,
                        help="predicted label volume (NIfTI, NRRD, MHA, .seg.nrrd, DICOM SEG .dcm), or a folder of them")
    parser.add_argument("--ref", required=True,
                        help="reference label volume (NIfTI, NRRD, MHA, .seg.nrrd, DICOM SEG .dcm), or a folder of them")
    parser.add_argument("--label-map", default=None,
                        help="convert the reference labels to H-SAM indices: btcv, totalseg_total, totalseg_total_mr, "
                        "or a JSON file {\"source\": target}")
    parser.add_argument("--pred-label-map", default=None, help="the same for the predicted labels (default: none)")
    parser.add_argument("--protocol", choices=("mm", "reference"), default="mm",
                        help="mm (default): HD95 in millimetres, organs absent from both not counted; reference: the "
                        "released H-SAM test.py rules (HD95 in voxels, empty prediction = 0, false positive = 1)")
    parser.add_argument("--organs", default=None, help="comma-separated organ indices to score (default 1-8)")
    parser.add_argument("-o", "--output", required=True, help="the CSV report to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from hsam.errors import HSAMError
    from hsam.evaluation import evaluate_files, markdown_summary, write_csv, write_summary

    organs = tuple(range(1, 9))
    if args.organs:
        try:
            organs = tuple(int(x) for x in args.organs.split(",") if x.strip())
        except ValueError:
            raise HSAMError(f"--organs must be comma-separated integers, got {args.organs!r}") from None
    with warnings.catch_warnings(record=True) as caught:  # e.g. "the predicted labels ... resampled onto the ..."
        warnings.simplefilter("always", UserWarning)
        rows = evaluate_files(args.pred, args.ref, args.label_map, args.pred_label_map, args.protocol, organs)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    report = write_csv(rows, args.output, args.protocol)
    summary_path = write_summary(rows, report.with_suffix(".md"), args.protocol)
    print(markdown_summary(rows, args.protocol), end="")
    print(f"wrote {report} and {summary_path}")
    return 0
