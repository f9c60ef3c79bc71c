"""The training loop: H-SAM's recipe (hsam-model.md §2) with validation, best-checkpoint selection, exact resume,
AMP on CUDA, DDP through ``torchrun``, logs, and the result saved and registered as a model.

Run folder (``output_dir``)::

    config.json             the full resolved config
    splits/train.txt(.json) the slices trained on (few-shot list, seed and per-organ counts)
    splits/val.txt          held-out validation volumes
    log.csv, curve.png      one row per epoch; the training curve
    checkpoints/last.pt     everything needed to continue bit-identically (--resume), written after the last
                            epoch and after any epoch that ends ``state_every_s`` seconds after the previous write
    checkpoints/best.pt     trainable tensors of the best validation epoch
    checkpoints/epoch_N.pt  trainable tensors every ``checkpoint_every`` epochs
    model/                  the result (model.safetensors + model.json), also installed under its name

Distributed: started by ``torchrun --nproc_per_node=N -m hsam train ...``, each process takes its share of every
global batch (``batch_size`` is the global batch) and the Dice sums are all-reduced, so N processes optimise exactly
what one process with the same global batch does.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist

from hsam import atomic
from hsam.errors import HSAMError
from hsam.training import logs
from hsam.training.augment import AugmentConfig
from hsam.training.config import with_defaults
from hsam.training.data import SliceStore, Volume, VolumeSlices, check_labels, load_slices, load_source_volumes
from hsam.engines.cpu import processor
from hsam.training.frozen import EncodedSamples, EncodedVolumes, encoder_autocast
from hsam.training.guard import ForgettingGuard
from hsam.training.loader import EpochBatchSampler, TrainingSlices, iterations_per_epoch
from hsam.training.losses import LossConfig, hsam_loss
from hsam.training.model_setup import build_training_model, encoder_is_frozen
from hsam.training.rehearsal import JoinedSlices, rehearsal_batches
from hsam.training.schedule import PaperSchedule
from hsam.training.splits import few_shot_split, hold_out_slices, split_cases, write_list
from hsam.training.state import (
    capture_rng,
    frozen_fingerprint,
    load_state,
    restore_rng,
    same_frozen_base,
    save_state,
    trainable_state,
)
from hsam.training.validate import validate

# Config keys that may change between a run and its resumption (everything else must match).
_RESUMABLE_CHANGES = {"num_workers", "device", "output_dir", "tensorboard", "state_every_s"}
# curve.png is redrawn at most this often (and once at the end): a plot costs ~0.7 s, a few-shot epoch ~5 s
CURVE_EVERY_S = 30.0


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device_kind: str) -> Distributed:
    """Join the process group ``torchrun`` describes (WORLD_SIZE > 1); gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    here = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        here = True
    return Distributed(rank, world, local, here)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HSAMError("device cuda was asked for but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise HSAMError("device mps was asked for but MPS is not available; use --device cpu")
    return device


@dataclass
class TrainResult:
    output_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    model: torch.nn.Module
    card: Any = None
    model_dir: Path | None = None
    installed: Path | None = None
    finished: bool = True
    info: dict[str, Any] = field(default_factory=dict)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _label_map(config: Mapping[str, Any]) -> dict[int, int] | None:
    from hsam.evaluation import resolve_label_map

    return resolve_label_map(config["data"]["label_map"])


def _prepare_data(config: Mapping[str, Any], out: Path | None) -> tuple[SliceStore, list[Volume], dict[str, Any]]:
    """Training slices (after holdout and few-shot selection) and validation volumes. Read before the network is
    built, so a wrong data path fails in seconds, not after loading a ViT."""
    data = config["data"]
    if data["train"] is None:
        raise HSAMError("the config has no training data: set data.train (e.g. --set data.train.root=...)")
    window, orientation, label_map = data["window"], data["orientation"], _label_map(config)
    store, volumes = load_slices(data["train"], window, orientation, label_map)
    info: dict[str, Any] = {}
    val_volumes: list[Volume] = []
    holdout = data["holdout"] or {}
    if (holdout.get("fraction") or holdout.get("count")) and not volumes:
        raise HSAMError("data.holdout needs a volume source (synapse_h5, nnunet, cases, pairs); for Synapse npz slices "
                        "give held-out volumes with data.val")
    if volumes and (holdout.get("fraction") or holdout.get("count")):
        train_names, val_names = split_cases([v.name for v in volumes], holdout.get("fraction") or 0.0,
                                             holdout.get("count"), holdout.get("seed", config["seed"]))
        val_volumes = [v for v in volumes if v.name in set(val_names)]
        volumes = [v for v in volumes if v.name in set(train_names)]
        store = VolumeSlices(volumes)
        info["held_out"] = val_names
    if data["val"] is not None:
        val_volumes += load_source_volumes(data["val"], window, orientation, label_map)
    if volumes and holdout.get("slices") and not val_volumes:  # one case: validate on some of its own slices
        volumes, val_volumes, info["held_out_slices"] = hold_out_slices(volumes, float(holdout["slices"]))
        store = VolumeSlices(volumes)
    few = data["few_shot"]
    meta: dict[str, Any] = {"source": "all slices", "count": len(store)}
    if few:
        unknown = set(few) - {"fraction", "count", "seed", "oversample_rare", "max_repeat"}
        if unknown:
            raise HSAMError(f"unknown data.few_shot setting(s) {sorted(unknown)}")
        split = few_shot_split(store, few.get("fraction"), few.get("count"), few.get("seed", config["seed"]),
                               few.get("oversample_rare", 0.0), few.get("max_repeat", 4))
        store, meta = store.subset(split.names), split.meta
    if out is not None:
        write_list(out / "splits" / "train.txt", store.ids, meta)
        write_list(out / "splits" / "val.txt", [v.name for v in val_volumes] or ["# no validation volumes"])
    info.update({"train_slices": len(store), "val_volumes": [v.name for v in val_volumes], "split": meta,
                 "volumes": volumes})
    return store, val_volumes, info


def _check_label_range(store: SliceStore, volumes: list[Volume], val_volumes: list[Volume], num_classes: int) -> None:
    check_labels(volumes + val_volumes, num_classes)
    if not volumes:  # slice source: check a spread of slices
        for i in range(0, len(store), max(1, len(store) // 16)):
            top = int(store.get(i)[1].max())
            if top > num_classes:
                raise HSAMError(f"slice {store.ids[i]} has label {top} > {num_classes}; set data.label_map")


def _probe(model: torch.nn.Module, dataset: TrainingSlices, noise: float, device: torch.device,
           frozen_encoder: bool) -> tuple[int, list[str]]:
    """One forward/backward on one slice: the stage-1 output size and the trainable parameters that never get a
    gradient (unused heads, the dead CMAttn branch). With a frozen encoder only the decoders run, on a blank
    embedding: which tensors get a gradient depends on the graph, not on the values. RNG states are restored."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if frozen_encoder:
            embedding = torch.zeros(1, model.prompt_encoder.embed_dim, model.grid, model.grid, device=device)
            stage1, stage2 = model.decode(embedding, noise)
        else:
            stage1, stage2 = model(dataset[(0, 0)]["image"][None].to(device), noise)
        (stage1["low_res_logits"].float().mean() + stage2["low_res_logits"].float().mean()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return int(stage1["low_res_logits"].shape[-1]), unused


def _autocast(device: torch.device, amp: bool | str,
              cpu_amp: bool | str = False) -> tuple[Any, torch.amp.GradScaler | None, str]:
    """(autocast factory, grad scaler or None, precision name). ``amp`` (CUDA): true (bf16 where the GPU supports it,
    else fp16 with a grad scaler), "bf16", "fp16", or false. ``cpu_amp`` (CPU): "auto" (bf16 where the processor has
    native bf16, else fp32) or false. MPS: fp32."""
    if amp not in (True, False, "bf16", "fp16"):
        raise HSAMError(f"amp must be true, false, \"bf16\" or \"fp16\", got {amp!r}")
    if cpu_amp not in (False, "auto"):
        raise HSAMError(f"cpu_amp must be false or \"auto\", got {cpu_amp!r}")
    if device.type == "cpu" and cpu_amp == "auto" and processor().native_bf16:
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None, "bf16"
    if not amp or device.type != "cuda":
        return contextlib.nullcontext, None, "fp32"
    if amp == "bf16" or (amp is True and torch.cuda.is_bf16_supported()):
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None, "bf16"
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda"), "fp16"


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES}


def _default_output(config: Mapping[str, Any]) -> Path:
    return Path(config["output_dir"] or Path("runs") / config["name"])


def _make_card(config: Mapping[str, Any], model: torch.nn.Module, source_card: Any, extra: dict[str, Any]) -> Any:
    from hsam.labels import CLASS_NAMES
    from hsam.model.checkpoint import ModelCard

    card_cfg = config["card"]
    classes = list(source_card.classes) if source_card is not None else list(CLASS_NAMES)
    if len(classes) != model.config.num_outputs:
        classes = ["background"] + [f"class_{i}" for i in range(1, model.config.num_outputs)]
    training_data = card_cfg["training_data"] or _describe_data(config)
    if source_card is not None and source_card.training_data:
        training_data = f"{training_data}; fine-tuned from {source_card.name} ({source_card.training_data})"
    return ModelCard.for_config(
        model.config,
        config["name"],
        title=config["title"] or config["name"],
        classes=classes,
        window=[float(w) for w in config["data"]["window"]],
        orientation=config["data"]["orientation"],
        training_data=training_data,
        license=card_cfg["license"] or (source_card.license if source_card is not None else ""),
        demo=bool(card_cfg["demo"]),
        extra=extra,
    )


def _describe_data(config: Mapping[str, Any]) -> str:
    train = config["data"]["train"] or {}
    where = train.get("root") or ", ".join(Path(p["image"]).name for p in train.get("pairs", []))
    few = config["data"]["few_shot"]
    part = ""
    if few:
        part = f", few-shot {few.get('fraction') or few.get('count')} (seed {few.get('seed', config['seed'])})"
    return f"{train.get('format', '?')}: {where}{part}"


def train(config: Mapping[str, Any], *, resume: bool = False, stop_after_epoch: int | None = None,
          progress: bool = True, register: bool = True, on_step: Callable[[int, int], None] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train as ``config`` (a dict from :func:`hsam.training.config.load_training_config`) says.

    ``resume``: continue the run in ``output_dir`` from ``checkpoints/last.pt``. ``stop_after_epoch``: stop (as if
    interrupted) once that many epochs are done; the run can be resumed later. ``register``: install the resulting
    model under ``config["name"]`` so ``hsam models list`` and Slicer show it. ``on_step(k, n)``: k of the run's n
    optimizer steps are done (main process); ``on_epoch(row)``: an epoch ended, ``row`` as in ``log.csv``.
    """
    config = copy.deepcopy(dict(config))
    device_name = config["device"]
    kind = "cuda" if (device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())) else "cpu"
    ddp = init_distributed(kind)
    try:
        return _train(config, ddp, resume, stop_after_epoch, progress, register, on_step, on_epoch)
    finally:
        from hsam.training.losses import use_reduce_group

        use_reduce_group(None)
        if ddp.initialized_here:
            dist.destroy_process_group()


@dataclass
class _Run:
    """Everything one training run works with; built step by step before the first epoch, then updated per epoch."""

    config: dict[str, Any]
    ddp: Distributed
    device: torch.device
    out: Path
    last_path: Path
    info: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    source_card: Any = None
    store: Any = None
    val_volumes: list[Volume] = field(default_factory=list)
    reference: list[Volume] = field(default_factory=list)
    dataset: Any = None
    mix: tuple[int, int, float] = (0, 0, 0.0)
    noise: float = 0.0
    frozen_encoder: bool = False
    encoded: EncodedSamples | None = None
    encoder_precision: Any = None
    encoder_name: str = ""
    optimizer: Any = None
    schedule: Any = None
    autocast: Any = None
    scaler: Any = None
    precision: str = ""
    loss_cfg: Any = None
    batch_size: int = 0
    epochs: int = 0
    per_epoch: int = 0
    fingerprint: Any = None
    start_weights: dict[str, torch.Tensor] | None = None
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    organs: list[int] = field(default_factory=list)
    val_scorer: Callable | None = None
    ref_scorer: Callable | None = None
    guard: Any = None


def _start(config: dict[str, Any], ddp: Distributed, resume: bool) -> _Run:
    """The device and the run folder (refuses to overwrite a run, or to resume a missing one)."""
    device = resolve_device(config["device"], ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    out = _default_output(config).resolve()
    last_path = out / "checkpoints" / "last.pt"
    if ddp.main:
        if last_path.exists() and not resume:
            raise HSAMError(f"{out} already holds a run; add --resume to continue it or choose another --output")
        if resume and not last_path.exists():
            raise HSAMError(f"nothing to resume: {last_path} does not exist")
        out.mkdir(parents=True, exist_ok=True)
    ddp.barrier()
    return _Run(config, ddp, device, out, last_path)


def _data_and_model(run: _Run) -> None:
    """The slices, the model (seeded: identical initial weights on every process), the training set with rehearsal,
    and the frozen encoder's cache."""
    config, ddp, device = run.config, run.ddp, run.device
    seed = int(config["seed"])
    run.store, run.val_volumes, run.info = _prepare_data(config, run.out if ddp.main else None)
    _seed_everything(seed)  # identical initial weights on every process
    model, run.source_card = build_training_model(config)
    model.to(device)
    _check_label_range(run.store, run.info.pop("volumes"), run.val_volumes, model.config.num_classes)
    if ddp.main:
        atomic.write_text(run.out / "config.json", json.dumps(config, indent=2) + "\n")
    augment = AugmentConfig.from_dict(config["augmentation"])
    run.noise = float(config["embedding_noise"])
    probe_set = TrainingSlices(run.store, model.img_size, max(1, model.img_size // 4), None, seed)
    run.frozen_encoder = encoder_is_frozen(model)
    low_res, unused = _probe(model, probe_set, run.noise, device, run.frozen_encoder)
    for name, p in model.named_parameters():
        if name in set(unused):
            p.requires_grad_(False)  # receives no gradient: leaving it out keeps AdamW's decay off it, as released
    run.info.update({"low_res": low_res, "never_trained": len(unused), "frozen_encoder": run.frozen_encoder})
    run.reference = _reference_volumes(config)
    rehearsal = _rehearsal_store(config, run.reference)
    run.dataset = TrainingSlices(JoinedSlices([run.store, rehearsal]) if rehearsal is not None else run.store,
                                 model.img_size, low_res, augment, seed)
    run.mix = (len(run.store), len(rehearsal) if rehearsal is not None else 0, float(config["rehearsal"]["ratio"]))
    cache_cfg = config["encoder_cache"]
    # DDP wraps the whole network, so the decoder-only step runs in single-process runs only
    run.encoder_precision, run.encoder_name = encoder_autocast(device, cache_cfg["precision"])
    if cache_cfg["enabled"] and run.frozen_encoder and ddp.world_size == 1:
        run.encoded = EncodedSamples(model, run.dataset, int(cache_cfg["copies"]), device, run.encoder_precision)
        run.info["encoder_cache"] = {"copies": int(cache_cfg["copies"]), "precision": run.encoder_name}
    run.model = model


def _optimisation(run: _Run) -> None:
    """AdamW over the trainable tensors, the paper's schedule, AMP and the loss; the starting weights for the guard."""
    config, model = run.config, run.model
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise HSAMError("nothing to train: every part of the model is frozen")
    optim_cfg = config["optim"]
    run.optimizer = torch.optim.AdamW(params, lr=optim_cfg["base_lr"], betas=tuple(optim_cfg["betas"]),
                                      weight_decay=optim_cfg["weight_decay"], eps=optim_cfg["eps"], foreach=True)
    run.batch_size, run.epochs = int(config["batch_size"]), int(config["epochs"])
    if run.batch_size < run.ddp.world_size:
        raise HSAMError(f"batch_size {run.batch_size} is smaller than the number of processes {run.ddp.world_size}")
    run.per_epoch = iterations_per_epoch(len(run.store), run.batch_size, run.ddp.world_size)
    run.schedule = PaperSchedule(run.optimizer, optim_cfg["base_lr"], optim_cfg["warmup_iters"],
                                 run.epochs * run.per_epoch, optim_cfg["poly_power"])
    run.autocast, run.scaler, run.precision = _autocast(run.device, config["amp"], config["cpu_amp"])
    run.loss_cfg = LossConfig.from_dict(config["loss"])
    run.fingerprint = frozen_fingerprint(model)
    # the guard may have to give back the starting weights: no epoch kept within its margin
    run.start_weights = {k: v.detach().clone() for k, v in trainable_state(model).items()} \
        if config["guard"]["margin"] is not None else None


def _resume_from(run: _Run) -> dict[str, Any]:
    """Restore the run in ``last_path`` exactly (weights, optimizer, schedule, scaler, RNG, history); returns its
    saved state. Refuses a different config, process count or frozen base."""
    state = load_state(run.last_path)
    saved_config = with_defaults(json.loads(state["config"]))
    if _comparable(saved_config) != _comparable(run.config):
        changed = sorted(k for k in set(saved_config) | set(run.config)
                         if k not in _RESUMABLE_CHANGES and saved_config.get(k) != run.config.get(k))
        raise HSAMError(f"the config differs from the run being resumed in {changed}; resume with the same config")
    if state["world_size"] != run.ddp.world_size:
        raise HSAMError(f"the run used {state['world_size']} processes; resume it with the same number")
    if not same_frozen_base(state["frozen_fingerprint"], run.fingerprint):
        raise HSAMError("the frozen base weights differ from those of the run being resumed (another SAM file?)")
    missing = set(trainable_state(run.model)) - set(state["model"])
    if missing:
        raise HSAMError(f"{run.last_path} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    run.model.load_state_dict(state["model"], strict=False)
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    restore_rng(state["rng"][run.ddp.rank])
    run.start_epoch, run.history, run.best = int(state["epoch"]), list(state["history"]), state.get("best")
    return state


def _scorers_and_guard(run: _Run, resume: bool, state: dict[str, Any] | None) -> None:
    """Validation and guard scorers (main process), the starting model's scores (the "before" of a fine-tune), and
    the forgetting guard with the history replayed."""
    config, ddp = run.config, run.ddp
    run.organs = list(range(1, run.model.config.num_outputs))
    val_batch = int(config["validation"]["batch_size"])
    if ddp.main:  # validation and the guard run on the main process only
        reuse = run.encoder_precision if run.encoded is not None else None
        run.val_scorer = _scorer(run.model, run.val_volumes, reuse, run.organs, val_batch, run.device, run.autocast,
                                 run.precision)
        # the reference cases ship with the model: their encoder outputs are cached for the next fine-tune
        run.ref_scorer = _scorer(run.model, run.reference, reuse, run.organs, val_batch, run.device, run.autocast,
                                 run.precision, cache_as=run.encoder_name)
    if not resume and ddp.main:
        # the starting model on the held-out and reference cases: the "before" of a fine-tune
        run.baseline = {
            "val": run.val_scorer(starting=True) if run.val_scorer and run.source_card is not None else None,
            "reference": run.ref_scorer(starting=True) if run.ref_scorer else None}
    elif resume:
        run.baseline = state.get("baseline") or {"val": None, "reference": None}
    else:
        run.baseline = {"val": None, "reference": None}
    run.info["baseline"] = run.baseline
    run.guard = ForgettingGuard(config["guard"]["margin"],
                                (run.baseline["reference"] or {}).get("dice") if ddp.main else None)
    run.guard.replay(run.history)


def _network(run: _Run) -> torch.nn.Module:
    """The module the steps run through: the model, or its DistributedDataParallel wrapper under torchrun."""
    if run.ddp.world_size == 1:
        return run.model
    from hsam.training.losses import use_reduce_group

    use_reduce_group(dist.new_group(backend="gloo" if run.device.type == "cpu" else None))
    return torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None, broadcast_buffers=False)


def _judge_epoch(run: _Run, epoch: int, row: dict[str, Any], validated: bool) -> None:
    """The guard's verdict and the validation of one epoch; a better allowed epoch becomes ``best.pt``."""
    allowed = True
    if run.guard.acting and run.ref_scorer is not None:
        row["reference_dice"] = run.ref_scorer()["dice"]
        allowed = run.guard.allows(epoch, row["reference_dice"])
    if validated and run.ddp.main:
        assert run.val_scorer is not None
        metrics = run.val_scorer()
        row["val_dice"] = metrics["dice"]
        row.update({f"val_dice_{k}": metrics[f"dice_{k}"] for k in run.organs})
        gain = run.best is None or (not math.isnan(metrics["dice"]) and metrics["dice"] > run.best["val_dice"])
        if allowed and gain:
            run.best = {"epoch": epoch, "val_dice": metrics["dice"]}
            save_state(run.out / "checkpoints" / "best.pt", {"model": trainable_state(run.model), "epoch": epoch,
                                                               "metrics": metrics})
    elif allowed and run.guard.acting and run.ddp.main and not run.val_volumes:  # no held-out data: last allowed
        run.best = {"epoch": epoch, "val_dice": None}
        save_state(run.out / "checkpoints" / "best.pt", {"model": trainable_state(run.model), "epoch": epoch})


def _save_epoch(run: _Run, epoch: int, last_epoch: bool, rng_states: list[dict[str, Any]], saved_at: float) -> float:
    """Main process: the epoch checkpoint, ``last.pt`` (at the end or every ``state_every_s``) and ``log.csv``;
    returns when ``last.pt`` was last written."""
    config, schedule = run.config, run.schedule
    if config["checkpoint_every"] and (epoch + 1) % config["checkpoint_every"] == 0:
        save_state(run.out / "checkpoints" / f"epoch_{epoch}.pt", {"model": trainable_state(run.model),
                                                                  "epoch": epoch})
    if last_epoch or time.monotonic() - saved_at >= float(config["state_every_s"]):
        save_state(run.last_path, {
            "epoch": epoch + 1, "step": schedule.step_count, "model": trainable_state(run.model),
            "optimizer": run.optimizer.state_dict(), "schedule": schedule.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None, "rng": rng_states,
            "history": run.history, "best": run.best, "config": json.dumps(config, sort_keys=True),
            "world_size": run.ddp.world_size, "frozen_fingerprint": run.fingerprint, "baseline": run.baseline,
        })
        saved_at = time.monotonic()
    logs.write_csv(run.out / "log.csv", run.history)
    return saved_at


def _epochs(run: _Run, net: torch.nn.Module, stop_after_epoch: int | None, progress: bool,
            on_step: Callable[[int, int], None] | None, on_epoch: Callable[[dict[str, Any]], None] | None) -> bool:
    """The epochs from ``start_epoch``: train, judge, save, log; stops early when validation stalls for
    ``patience`` checks. Returns False when stopped by ``stop_after_epoch`` (the run can be resumed)."""
    config, ddp, out = run.config, run.ddp, run.out
    patience = int(config["stopping"]["patience"])
    board = logs.TensorBoard(out / "tensorboard", bool(config["tensorboard"])) if ddp.main else None
    val_every = int(config["validation"]["every"])
    curve_drawn, curve_rows = time.monotonic(), len(run.history)
    state_saved = time.monotonic()
    total_steps = run.epochs * run.per_epoch
    step_report = (lambda: on_step(run.schedule.step_count, total_steps)) if on_step is not None and ddp.main else None
    finished = True
    try:
        for epoch in range(run.start_epoch, run.epochs):
            started = time.time()
            row = _run_epoch(net, run.model, run.dataset, config, epoch, ddp, run.device, run.optimizer, run.schedule,
                             run.scaler, run.autocast, run.loss_cfg, run.noise, run.frozen_encoder, progress,
                             run.organs, step_report, run.encoded, run.mix)
            row["seconds"] = round(time.time() - started, 3)
            validated = run.val_volumes and val_every > 0 and ((epoch + 1) % val_every == 0 or epoch + 1 == run.epochs)
            _judge_epoch(run, epoch, row, validated)
            run.history.append(row)
            if on_epoch is not None and ddp.main:
                on_epoch(row)
            interrupted = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < run.epochs
            # with an acting guard, epochs refused since the start count as epochs without a gain; without held-out
            # data the guard's verdict is the only check of an epoch
            anchor = run.best["epoch"] if run.best is not None else (-1 if run.guard.acting else None)
            checked = validated or (run.guard.acting and not run.val_volumes)
            stalled = bool(patience and anchor is not None and checked
                           and epoch - anchor >= patience * (val_every if validated else 1))
            last_epoch = epoch + 1 == run.epochs or interrupted or stalled
            rng_states = _gather_rng(ddp)
            if ddp.main:
                state_saved = _save_epoch(run, epoch, last_epoch, rng_states, state_saved)
                if time.monotonic() - curve_drawn >= CURVE_EVERY_S:
                    logs.plot_curve(out / "curve.png", run.history, config["title"] or config["name"])
                    curve_drawn, curve_rows = time.monotonic(), len(run.history)
                if board is not None:
                    board.log(row, run.schedule.step_count)
            ddp.barrier()
            if interrupted:
                finished = False
                break
            if stalled:
                run.info["stopped_early"] = {"epoch": epoch + 1, "best_epoch": anchor + 1}
                break
    finally:
        if board is not None:
            board.close()
    if ddp.main and len(run.history) > curve_rows:
        logs.plot_curve(out / "curve.png", run.history, config["title"] or config["name"])
    return finished


def _kept_weights(run: _Run) -> int | None:
    """Load the weights that become the model: the best validation epoch's, or the starting weights when the guard
    allowed no epoch. Returns the 1-based epoch kept (0: the starting weights), None: the last epoch."""
    if run.best is not None and run.ddp.main:  # the best validation epoch, not the last one, becomes the model
        run.model.load_state_dict(load_state(run.out / "checkpoints" / "best.pt")["model"], strict=False)
        return run.best["epoch"] + 1
    if run.guard.acting and run.guard.over and run.start_weights is not None and run.ddp.main:
        run.model.load_state_dict(run.start_weights, strict=False)
        return 0
    return None


def _save_model(run: _Run, result: TrainResult, kept: int | None, register: bool) -> None:
    """Main process: the guard and held-out figures, the model card, the saved model (installed with ``register``)."""
    config, info, best, history = run.config, run.info, run.best, run.history
    figures = None
    if run.ref_scorer is not None:
        figures = _guard_figures(run.reference, run.baseline["reference"], run.ref_scorer())
        figures.update(run.guard.record(kept), rehearsal_ratio=run.mix[2] if run.mix[1] else 0.0)
        info["forgetting_guard"] = figures
    if run.baseline["val"] is not None and kept is not None:
        after = run.baseline["val"]["dice"] if kept == 0 else best["val_dice"]
        info["held_out"] = held_out_figures(run.baseline["val"]["dice"], after)
    extra = {"training": {"epochs": run.epochs, "batch_size": run.batch_size, "best": best, "precision": run.precision,
                          "processes": run.ddp.world_size, "train_slices": info["train_slices"],
                          "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "final_train_loss": history[-1]["loss"] if history else None,
                          "epochs_run": len(history), "encoder_cache": info.get("encoder_cache"),
                          "held_out": info.get("held_out"), "held_out_slices": info.get("held_out_slices")}}
    if figures is not None:
        extra["forgetting_guard"] = figures
        if config["reference"].get("name"):  # fine-tunes of this model are guarded by the same cases
            extra["reference_case"] = config["reference"]["name"]
    card = _make_card(config, run.model, run.source_card, extra)
    run.model.eval()
    from hsam.model.checkpoint import save_model

    result.model_dir = save_model(run.model, card, run.out / "model")
    result.card = card
    if register:
        from hsam.weights.store import import_model

        result.installed = import_model(result.model_dir, config["name"])


def _train(config: dict[str, Any], ddp: Distributed, resume: bool, stop_after_epoch: int | None, progress: bool,
           register: bool, on_step: Callable[[int, int], None] | None,
           on_epoch: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    """One training run, step by step (the order of the steps keeps every random stream as it was)."""
    run = _start(config, ddp, resume)
    _data_and_model(run)
    _optimisation(run)
    # Each process gets its own dropout/noise stream; the data pipeline is seeded per sample and needs none.
    torch.manual_seed(int(config["seed"]) + 1000 * ddp.rank + 1)
    state = _resume_from(run) if resume else None
    _scorers_and_guard(run, resume, state)
    finished = _epochs(run, _network(run), stop_after_epoch, progress, on_step, on_epoch)
    result = TrainResult(run.out, run.history, run.best, run.model, finished=finished, info=run.info)
    if not finished:
        return result
    kept = _kept_weights(run)
    if ddp.main:
        _save_model(run, result, kept, register)
    ddp.barrier()
    return result


def _gather_rng(ddp: Distributed) -> list[dict[str, Any]]:
    mine = capture_rng()
    if ddp.world_size == 1:
        return [mine]
    gathered: list[Any] = [None] * ddp.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _scorer(model: torch.nn.Module, volumes: list[Volume], encoder_precision: Callable[[], Any] | None,
            organs: list[int], batch_size: int, device: torch.device, autocast: Any, precision: str,
            cache_as: str | None = None) -> Callable[..., dict[str, float]] | None:
    """A function giving the model's Dice on ``volumes`` now (None without volumes). With a frozen encoder
    (``encoder_precision``: the autocast of the run's encoder outputs) the volumes are encoded once here, or read
    from the user's cache when ``cache_as`` names the precision, and every later call runs the decoders only; there,
    ``starting=True`` (the starting model's figures) is also cached (:meth:`EncodedVolumes.starting_dice`)."""
    if not volumes:
        return None
    if encoder_precision is not None:
        encoded = EncodedVolumes(model, volumes, device, encoder_precision, cache_as)

        def score(starting: bool = False) -> dict[str, float]:
            if starting:
                return encoded.starting_dice(model, organs, batch_size, autocast, precision)
            return encoded.dice(model, organs, batch_size, autocast)

        return score
    return lambda starting=False: validate(model, volumes, organs, batch_size, device, autocast)


def _rehearsal_store(config: Mapping[str, Any], reference: list[Volume]) -> VolumeSlices | None:
    """The slices mixed into every batch (``rehearsal.ratio`` > 0): the reference cases' slices."""
    if not config["rehearsal"]["ratio"]:
        return None
    if not reference:
        raise HSAMError("rehearsal.ratio > 0 needs the base model's reference cases (reference: a volume source); "
                        "set --set rehearsal.ratio=0 for a model without them")
    return VolumeSlices(reference)


def _reference_volumes(config: Mapping[str, Any]) -> list[Volume]:
    """The forgetting guard's reference cases (``reference``: a volume source the base model was validated on)."""
    source = config["reference"]
    if not source:
        return []
    data = config["data"]
    from hsam.evaluation import resolve_label_map

    return load_source_volumes(source, data["window"], data["orientation"],
                               resolve_label_map(source.get("label_map")))


def held_out_figures(dice_before: float, dice_after: float) -> dict[str, Any]:
    """The held-out record of a fine-tune. ``worse_than_start``: no epoch beat the starting model there, so the
    starting model should stay in use (the CLI warns, the Slicer module keeps the base selected)."""
    return {"dice_before": dice_before, "dice_after": dice_after, "worse_than_start": dice_after < dice_before}


def _guard_figures(volumes: list[Volume], before: dict[str, float] | None, after: dict[str, float]) -> dict[str, Any]:
    """The forgetting guard's record: Dice of the starting and of the new model on the reference cases."""
    def rounded(metrics: dict[str, float] | None) -> dict[str, float | None] | None:
        if metrics is None:
            return None
        return {k: (None if math.isnan(v) else round(v, 4)) for k, v in metrics.items()}

    return {"reference": [v.name for v in volumes], "dice_before": rounded(before)["dice"] if before else None,
            "dice_after": rounded(after)["dice"], "organs_before": rounded(before), "organs_after": rounded(after)}


def _batches(dataset, sampler, config, epoch, device, encoded):
    """The epoch's batches: from the encoder-output store (no loader: nothing to start) or a DataLoader."""
    if encoded is not None:
        for keys in sampler:
            yield encoded.batch(epoch, [index for _, index in keys])
        return
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=int(config["num_workers"]),
                        pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(int(config["seed"]) + epoch), persistent_workers=False)
    yield from loader


def _run_epoch(net, model, dataset, config, epoch, ddp, device, optimizer, schedule, scaler, autocast, loss_cfg,
               noise, frozen_encoder, progress, organs, step_report, encoded=None, mix=None) -> dict[str, Any]:
    n_user, n_rehearsal, ratio = mix if mix is not None else (len(dataset), 0, 0.0)
    batches = rehearsal_batches(n_user, n_rehearsal, int(config["batch_size"]), ratio, epoch, int(config["seed"]),
                                ddp.world_size)
    sampler = EpochBatchSampler(batches, epoch, ddp.rank, ddp.world_size)
    model.train()
    if frozen_encoder:
        model.image_encoder.eval()  # nothing to train there: no dropout/BN updates, and no graph is recorded
    k = model.config.num_outputs
    sums = torch.zeros(9, dtype=torch.float64)  # n, loss, l1, l2, ce1, dice1, ce2, dice2, weight
    overlap = torch.zeros(3, k, dtype=torch.float64)  # hard Dice pieces of the stage-3 prediction per class
    bar = None
    if progress and ddp.main:
        from tqdm import tqdm

        bar = tqdm(total=len(sampler), desc=f"epoch {epoch + 1}/{config['epochs']}", leave=False, dynamic_ncols=True)
    for batch, global_n, indices in zip(_batches(dataset, sampler, config, epoch, device, encoded),
                                        sampler.global_sizes, sampler.batches):
        unknown = dataset.unknown_organs(indices).to(device)  # organs a partial case did not label: never background
        label = batch["label"].to(device, non_blocking=True)
        low = batch["low_res_label"].to(device, non_blocking=True)
        n = label.shape[0]
        with autocast():
            if encoded is not None:
                stage1, stage2 = model.decode(batch["embedding"], noise)
            else:
                stage1, stage2 = net(batch["image"].to(device, non_blocking=True), noise)
        parts = hsam_loss(stage1["low_res_logits"], stage2["low_res_logits"], low, label, epoch, loss_cfg,
                          ce_share=n * ddp.world_size / global_n, unknown=unknown)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(parts.total).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            parts.total.backward()
            optimizer.step()
        schedule.step()
        with torch.no_grad():
            share = n / global_n  # CE terms are scaled per process; Dice terms are already global
            ce1, ce2 = parts.ce1.item() / (n * ddp.world_size / global_n), parts.ce2.item() / (n * ddp.world_size / global_n)
            d1, d2, w = parts.dice1.item(), parts.dice2.item(), parts.weight
            l1 = loss_cfg.ce_weight * ce1 + loss_cfg.dice_weight * d1
            l2 = loss_cfg.ce_weight * ce2 + loss_cfg.dice_weight * d2
            total = (1 - w) * l1 + w * l2
            # per-process share of the global-batch averages, summed over processes below
            sums += torch.tensor([share, share * total, share * l1, share * l2, share * ce1, d1 / ddp.world_size,
                                  share * ce2, d2 / ddp.world_size, w / ddp.world_size], dtype=torch.float64)
            fused = (stage1["masks"].float() + stage2["masks"].float()).max(1).indices  # argmax, faster (validate.py)
            for c in range(1, k):
                p, t = fused == c, label == c
                overlap[0, c] += float((p & t).sum())
                overlap[1, c] += float(p.sum())
                overlap[2, c] += float(t.sum())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{parts.total.item():.4f}", lr=f"{schedule.current():.2e}")
        if step_report is not None:
            step_report()
    if bar is not None:
        bar.close()
    if ddp.world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(overlap)
    batches = max(1, len(sampler))
    sums = sums / batches  # mean over the epoch's batches
    present = overlap[2] + overlap[1] > 0
    present[0] = False
    dice = (2 * overlap[0][present] / (overlap[1][present] + overlap[2][present])).mean().item() if present.any() \
        else math.nan
    extra = {}
    if device.type == "cuda":
        extra["gpu_max_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return {
        "epoch": epoch, "step": schedule.step_count, "lr": schedule.current(),
        "loss": sums[1].item(), "loss_stage1": sums[2].item(), "loss_stage2": sums[3].item(),
        "ce1": sums[4].item(), "dice_loss1": sums[5].item(), "ce2": sums[6].item(), "dice_loss2": sums[7].item(),
        "stage_weight": sums[8].item(), "train_dice": dice, **extra,
    }
