"""``hsam prompt CT -o labels.nii.gz --prompts prompts.json``: organ masks from boxes and +/- points.

The prompts (a JSON file, :mod:`hsam.prompting.prompt_file`) name organs and boxes or points on axial slices; the
LiteMedSAM prompt decoder turns each into a mask (:mod:`hsam.prompting`). Outputs are those of ``hsam segment``, on
the input's grid; organs without a prompt are background.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hsam.cli import progress as progress_option


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prompt`` command (no torch import here)."""
    parser = subparsers.add_parser(
        "prompt",
        help="segment organs from box / point prompts (LiteMedSAM prompt decoder)",
        description="Segment the organs named in a JSON prompt file (boxes and +/- points on axial slices; "
        "see docs/prompting.md). The output has exactly the input's grid; unprompted organs are background.",
    )
    parser.add_argument("input", help="CT volume file or DICOM folder")
    parser.add_argument("-o", "--output", required=True,
                        help="labels file: .seg.nrrd, .nii.gz, .nii, .nrrd, .mha, or .dcm (DICOM SEG; DICOM input)")
    parser.add_argument("--prompts", required=True, metavar="JSON", help="the prompt file (docs/prompting.md)")
    parser.add_argument("--model", default=None,
                        help="installed model id or folder whose image encoder to use when it is H-SAM-Lite "
                        "(default: the most accurate installed model; other models use LiteMedSAM's encoder)")
    parser.add_argument("--series", metavar="UID", default=None, help="DICOM folder only: this Series Instance UID")
    parser.add_argument("--confidence", metavar="PATH", default=None,
                        help="also write the confidence map (uint8, 255 x sigmoid of the mask logit; 255 elsewhere)")
    parser.add_argument("--stats", metavar="CSV", default=None, help="also write per-organ volumes (ml) as CSV")
    parser.add_argument("--overlay", metavar="PNG", default=None, help="also write a PNG of labels on a few slices")
    parser.add_argument("--embeddings", metavar="DIR", default=None,
                        help="slice embeddings an automatic run kept (hsam segment --keep-embeddings DIR): used "
                        "instead of running the encoder where they match this CT and model")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    progress_option.add_option(parser)
    parser.set_defaults(run=run)


def _read(args: argparse.Namespace, dicom_seg: bool):  # noqa: ANN202 (sitk.Image, DicomSeries | None)
    import warnings

    from hsam.volume import read_image
    from hsam.volume.io import read_dicom_volume

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        image, source = read_dicom_volume(args.input, args.series) if dicom_seg else (
            read_image(args.input, series=args.series), None)
    for warning in caught:
        args.reporter.warning(str(warning.message))
    return image, source


def run(args: argparse.Namespace) -> int:
    """Read the CT and the prompts, decode them, write the outputs."""
    import SimpleITK as sitk

    from hsam.cli.segment import _algorithm, _check_outputs
    from hsam.pipeline.result import SegmentationResult, organ_volumes_ml
    from hsam.pipeline.write import DicomTarget, write_outputs
    from hsam.labels import CLASS_NAMES
    from hsam.prompting.build import attach_kept, confidence_of, run_plan, session_on
    from hsam.prompting.prompt_file import read_prompt_file
    from hsam.volume import check_volume, from_canonical, to_canonical
    from hsam.weights.store import load_named_model, resolve_model

    started = time.perf_counter()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    outputs = _check_outputs(args)
    reporter = args.reporter
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    image, source = _read(args, outputs.labels.name.lower().endswith(".dcm"))
    image = check_volume(image, Path(args.input).name)
    model_id, folder = resolve_model(args.model)
    model, card = load_named_model(str(folder), device="cpu")
    canonical, how = to_canonical(image, (card.orientation or "LPS").upper())
    plan = read_prompt_file(args.prompts, how)  # every mistake in the file is reported before the slow work
    reporter.status(f"Loading the prompt decoder; encoder of {model_id}", "load")
    session = session_on(canonical, how, model, card)
    if args.embeddings:
        why_not = attach_kept(session, args.embeddings)
        if why_not:
            reporter.warning(f"--embeddings not used: {why_not}")
    try:
        run_plan(session, plan, progress=lambda done, total: reporter.progress(done, total, "prompt"))
    finally:
        reporter.close_bar()
    canonical_labels = session.labels()
    labels = from_canonical(canonical_labels, how)
    result = SegmentationResult(
        labels=labels, confidence=from_canonical(confidence_of(session, canonical_labels), how),
        volumes_ml=organ_volumes_ml(labels, CLASS_NAMES), device="cpu", seconds=time.perf_counter() - started,
    )
    dicom = DicomTarget(source, _algorithm(model_id, card)) if source is not None else None
    written = write_outputs(result, image, list(CLASS_NAMES), outputs, dicom,
                            title=f"{Path(args.input).name} - prompts")
    if not args.quiet:
        say(f"done in {result.seconds:.1f} s: {len(plan.prompts)} prompted slices, "
            f"{len(session.masks) - len(plan.prompts)} propagated; {session.embeddings.computed} slices encoded")
        for name, ml in result.volumes_ml.items():
            if ml:
                say(f"  {name:<14} {ml:9.1f} ml")
        for path in written.values():
            say(f"wrote {path}")
    reporter.finished(written={kind: str(path) for kind, path in written.items()},
                      result={"seconds": round(result.seconds, 3), "volumes_ml": result.volumes_ml,
                              "prompted_slices": len(plan.prompts), "masks": len(session.masks),
                              "encoded_slices": session.embeddings.computed},
                      model={"id": model_id, "sha256": card.sha256 or ""})
    return 0
