"""``hsam train`` (a config file) and ``hsam finetune`` (an installed model + exported Slicer cases)."""

from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

from hsam.cli import progress as progress_option

FEW_SHOT_SLICES = 64  # at most this many training slices: the few-shot config (benchmarks/finetune/RESULTS)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set epochs=50 --set data.train.root=/data/train_npz "
                        "(VALUE is JSON, else a string); repeatable")
    parser.add_argument("--output", default=None, help="run folder (default: runs/<name>)")
    parser.add_argument("--epochs", type=int, default=None, help="number of epochs (overrides the config)")
    parser.add_argument("--device", default=None, help="auto (default) | cpu | cuda | cuda:N | mps")
    parser.add_argument("--resume", action="store_true", help="continue the run in the output folder from its last "
                        "checkpoint (bit-identical to an uninterrupted run)")
    parser.add_argument("--no-register", action="store_true",
                        help="do not install the resulting model into the local model list")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    progress_option.add_option(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an H-SAM model from a config file",
        description="Train H-SAM as a JSON config says (the paper recipe by default; see hsam/configs/training/). "
        "Writes the run folder (config, split lists, log.csv, curve.png, checkpoints) and the resulting model, "
        "which is installed under the config's name. For several GPUs: torchrun --nproc_per_node=N -m hsam train ...",
    )
    parser.add_argument("--config", required=True,
                        help="a JSON config file or a shipped config name (synapse_10pct, finetune, tiny)")
    parser.add_argument("--name", default=None, help="id of the resulting model (overrides the config's name)")
    _common(parser)
    parser.set_defaults(run=run_train)

    finetune = subparsers.add_parser(
        "finetune",
        help="fine-tune an installed model on cases exported from Slicer",
        description="Fine-tune a model on case folders written by the HSAMSlicer module's 'Export for fine-tuning' "
        "(image.nii.gz + labels.nii.gz in H-SAM indices + provenance.json). With two or more cases, about a fifth "
        "(at least one) is held out to pick the best epoch. The new model is installed under --name.",
    )
    finetune.add_argument("--model", required=True, help="installed model id or model folder to start from")
    finetune.add_argument("--cases", required=True, help="folder of exported case folders (or one case folder)")
    finetune.add_argument("--name", default=None, help="id of the new model (default: <model>-ft)")
    finetune.add_argument("--config", default=None,
                          help="training config to start from (default: finetune_fewshot for case sets of at most "
                          f"{FEW_SHOT_SLICES} slices, else finetune)")
    finetune.add_argument("--val-cases", type=int, default=None,
                          help="cases held out for validation (default: a fifth of them, none with one case)")
    _common(finetune)
    finetune.set_defaults(run=run_finetune)


def _overrides(args: argparse.Namespace) -> list[str]:
    import json

    extra = list(args.overrides)
    if args.output:
        extra.append(f"output_dir={json.dumps(args.output)}")
    if args.epochs is not None:
        extra.append(f"epochs={args.epochs}")
    if args.device:
        extra.append(f"device={json.dumps(args.device)}")
    if getattr(args, "name", None):
        extra.append(f"name={json.dumps(args.name)}")
    return extra


def _report(result, reporter, fewshot: bool = False) -> int:
    last = result.history[-1] if result.history else {}
    print(f"run folder: {result.output_dir}")
    if not result.finished:
        print(f"stopped after epoch {last.get('epoch', -1) + 1}; continue with --resume")
        reporter.finished(run_folder=str(result.output_dir), complete=False)
        return 0
    if result.best and result.best.get("val_dice") is not None:
        print(f"best validation Dice {result.best['val_dice']:.4f} at epoch {result.best['epoch'] + 1}")
    if "loss" in last:
        print(f"final training loss {last['loss']:.4f}")
    if result.model_dir is not None:
        print(f"model saved: {result.model_dir}")
    if result.installed is not None:
        print(f"installed as '{result.installed.name}' (hsam models list; hsam segment --model {result.installed.name})")
    slices = result.info.get("held_out_slices")
    if slices:
        print("held out for early stopping and the held-out figure (not trained on): " + "; ".join(
            f"{case} slices {', '.join(str(z) for z in zs)}" for case, zs in slices.items()))
    guard = result.info.get("forgetting_guard")
    if guard is not None:
        _report_guard(guard)
    held = result.info.get("held_out")
    if held is not None:
        print(f"held-out Dice: {_fmt(held['dice_before'])} before, {_fmt(held['dice_after'])} after")
        if held["worse_than_start"]:
            print("warning: no epoch of this fine-tune beat the starting model on the held-out case(s); keep using "
                  "the starting model, or correct more slices (or lower --set optim.base_lr=...) and fine-tune again")
    reporter.finished(
        run_folder=str(result.output_dir), complete=True, best=result.best, forgetting_guard=guard, held_out=held,
        held_out_slices=slices,
        stopped_early=result.info.get("stopped_early"), fewshot=fewshot,
        model={"id": result.installed.name if result.installed is not None else None,
               "path": str(result.model_dir) if result.model_dir is not None else None},
    )
    return 0


def _report_guard(guard: dict[str, Any]) -> None:
    """The forgetting guard's lines: the reference Dice before/after, and what the margin refused."""
    margin = guard.get("margin")
    rule = f" (allowed drop {margin:.3f})" if margin is not None else " (report only: no margin set)"
    print(f"forgetting guard: Dice on the reference case(s) {', '.join(guard['reference'])}: "
          f"{_fmt(guard['dice_before'])} before, {_fmt(guard['dice_after'])} after{rule}")
    if guard.get("epochs_over_margin"):
        print(f"forgetting guard: epoch(s) {', '.join(map(str, guard['epochs_over_margin']))} lost more than "
              f"{margin:.3f} on the reference case(s) and were not kept")
    if guard.get("within_margin") is False:
        print("warning: every epoch of this fine-tune lost more than the allowed margin on the reference case(s); "
              "the new model keeps the starting weights: keep using the starting model, or lower the learning rate "
              "(--set optim.base_lr=...) or rehearse more (--set rehearsal.ratio=...) and fine-tune again")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _number(value: Any) -> float | None:
    """JSON has no NaN: an organ absent from the validation cases is reported as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _train(config, args: argparse.Namespace, class_names: Sequence[str]):
    """Run :func:`hsam.training.trainer.train` with progress through ``args.reporter``."""
    from hsam.training.trainer import train

    reporter = args.reporter
    epochs = int(config["epochs"])

    def on_epoch(row: dict[str, Any]) -> None:
        organs = {name: _number(row.get(f"val_dice_{index}")) for index, name in enumerate(class_names)
                  if index and f"val_dice_{index}" in row}
        reporter.epoch(epoch=int(row["epoch"]) + 1, epochs=epochs, loss=_number(row.get("loss")),
                       train_dice=_number(row.get("train_dice")), val_dice=_number(row.get("val_dice")),
                       val_dice_organs=organs, reference_dice=_number(row.get("reference_dice")),
                       seconds=row.get("seconds"))

    if reporter.json:
        reporter.status(f"Training {config['name']} for {epochs} epochs", "train")
    return train(config, resume=args.resume, progress=not (args.quiet or reporter.json), register=not args.no_register,
                 on_step=(lambda done, total: reporter.progress(done, total, "train", unit="step")) if reporter.json
                 else None,
                 on_epoch=on_epoch)


def run_train(args: argparse.Namespace) -> int:
    from hsam.labels import CLASS_NAMES
    from hsam.training.config import load_training_config

    config = load_training_config(args.config, _overrides(args))
    return _report(_train(config, args, CLASS_NAMES), args.reporter)


def run_finetune(args: argparse.Namespace) -> int:
    from hsam.errors import HSAMError
    from hsam.model.checkpoint import read_card
    from hsam.training.config import load_training_config
    from hsam.training.data import case_folders
    from hsam.training.reference import reference_cases
    from hsam.weights.store import resolve_model

    model_id, folder = resolve_model(args.model)
    card = read_card(folder)
    cases = case_folders(args.cases)
    config_name = args.config
    if config_name is None:
        slices = _count_slices(cases)
        config_name = "finetune_fewshot" if slices <= FEW_SHOT_SLICES else "finetune"
        if config_name == "finetune_fewshot":
            args.reporter.status(f"{slices} slices: few-shot settings (finetune_fewshot: short warm-up, encoder "
                                 "outputs reused, held-out Dice every epoch, stop after 3 epochs without gain, "
                                 "reference slices rehearsed, no epoch kept that loses more than the guard margin "
                                 "there)", "train")
    n_val = args.val_cases if args.val_cases is not None else (max(1, round(len(cases) / 5)) if len(cases) > 1 else 0)
    if n_val >= len(cases):
        raise HSAMError(f"--val-cases {n_val} leaves no case to train on ({len(cases)} found in {args.cases})")
    extra = {
        "name": f"{model_id}-ft",
        "title": f"{card.title or model_id}, fine-tuned on {len(cases)} case(s)",
        "model": {"init": {"model": str(folder)}},
        "data": {"train": {"format": "cases", "root": str(args.cases)}, "label_map": None,
                 "window": list(card.window), "orientation": card.orientation,
                 "holdout": {"fraction": 0.0, "count": n_val, "seed": 2345}},
    }
    reference = reference_cases(card)
    if reference is not None:
        extra["reference"] = reference
    else:  # nothing to rehearse or to guard with: the few-shot rehearsal would be an error
        extra["rehearsal"] = {"ratio": 0.0}
        args.reporter.status(f"{model_id} names no reference cases: no rehearsal and no forgetting guard", "train")
    config = load_training_config(config_name, _overrides(args), extra=extra)
    return _report(_train(config, args, list(card.classes)), args.reporter,
                   fewshot=config_name == "finetune_fewshot" and args.config is None)


def _count_slices(cases) -> int:
    """Axial slices in the case folders, from the image headers (no voxel data read)."""
    import SimpleITK as sitk

    from hsam.training.data import _find

    total = 0
    for folder in cases:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(_find(folder, "image")))
        reader.ReadImageInformation()
        total += int(reader.GetSize()[2]) if len(reader.GetSize()) > 2 else 1
    return total
