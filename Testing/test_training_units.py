"""Training building blocks against the recipe (hsam-model.md §2): config, schedule, losses, augmentation, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hsam.errors import HSAMError
from hsam.training.augment import AugmentConfig, augment, crop, elastic, make_sample, rotate
from hsam.training.config import DEFAULTS, load_training_config
from hsam.training.data import VolumeSlices, Volume
from hsam.training.loader import global_batches, iterations_per_epoch, local_batch
from hsam.training.losses import dice_loss, hsam_loss, stage_weight
from hsam.training.schedule import PaperSchedule, learning_rate
from hsam.training.splits import few_shot_split, split_cases, write_list


# ------------------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("flags", ["avx2 avx512f avx512_bf16 amx_bf16", "avx2"])
def test_cpu_mixed_precision_only_where_the_processor_has_bf16(monkeypatch, flags):
    """cpu_amp "auto" trains in bf16 only on CPUs with native bf16; the recipe configs keep fp32 on every CPU."""
    from hsam.engines import cpu as cpu_info
    from hsam.training import trainer

    machine = cpu_info.parse_cpuinfo(f"model name\t: test\nflags\t\t: {flags}\n")
    monkeypatch.setattr(trainer, "processor", lambda: machine)
    cpu = torch.device("cpu")
    _, scaler, precision = trainer._autocast(cpu, True, "auto")
    assert precision == ("bf16" if machine.native_bf16 else "fp32") and scaler is None
    assert trainer._autocast(cpu, True, load_training_config("lite_demo")["cpu_amp"])[2] == "fp32"
    assert load_training_config("finetune_fewshot")["cpu_amp"] == "auto"
    with pytest.raises(HSAMError, match="cpu_amp"):
        trainer._autocast(cpu, True, "fp16")


def test_default_config_is_the_paper_recipe():
    c = load_training_config("synapse_10pct")
    assert (c["optim"]["base_lr"], c["optim"]["weight_decay"], c["optim"]["warmup_iters"]) == (0.0025, 0.1, 250)
    assert (c["loss"]["ce_weight"], c["loss"]["dice_weight"]) == (0.1, 0.9)
    assert (c["epochs"], c["batch_size"], c["embedding_noise"], c["seed"]) == (300, 16, 0.2, 2345)
    assert c["data"]["few_shot"] == {"fraction": 0.1, "seed": 2345}
    assert DEFAULTS["augmentation"]["p_rotate"] == 0.45


def test_config_rejects_typos_and_applies_overrides(tmp_path):
    with pytest.raises(HSAMError, match="unknown training config key 'optim.lr'"):
        load_training_config("tiny", ["optim.lr=0.1"])
    with pytest.raises(HSAMError, match="no training config"):
        load_training_config("nope")
    (tmp_path / "data").mkdir()
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"data": {"train": {"format": "cases", "root": "data"}}, "epochs": 5}))
    c = load_training_config(user, ["epochs=7", "data.train.root=/abs/cases", 'title="x y"'])
    assert c["epochs"] == 7 and c["title"] == "x y"
    assert c["data"]["train"] == {"format": "cases", "root": "/abs/cases"}
    c = load_training_config(user)
    assert c["data"]["train"]["root"] == str(tmp_path / "data")  # relative to the config file's folder
    assert c["model"]["config"] == "vit_b_512"  # nothing extended: the paper recipe
    child = tmp_path / "child.json"
    child.write_text(json.dumps({"extends": "mine.json", "batch_size": 2}))
    c = load_training_config(child)
    assert (c["epochs"], c["batch_size"], c["data"]["train"]["root"]) == (5, 2, str(tmp_path / "data"))
    tiny = load_training_config({"extends": "tiny", "epochs": 3})
    assert tiny["model"]["config"]["backbone"] == "vit_tiny" and tiny["epochs"] == 3


@pytest.mark.parametrize("override, message", [
    ("epochs=0", "epochs must be a positive integer"),
    ("batch_size=2.5", "batch_size must be a positive integer"),
    ("validation.every=-1", "validation.every must be an integer >= 0"),
    ("checkpoint_every=\"10\"", "checkpoint_every must be an integer >= 0"),
    ("checkpoint_every=-5", "checkpoint_every must be an integer >= 0"),
    ("state_every_s=\"a minute\"", "state_every_s must be a number of seconds >= 0"),
    ("state_every_s=-1", "state_every_s must be a number of seconds >= 0"),
    ("state_every_s=true", "state_every_s must be a number of seconds >= 0"),
])
def test_config_values_of_the_wrong_kind_are_named(override, message):
    with pytest.raises(HSAMError, match=message):
        load_training_config("tiny", [override])
    key = override.split("=")[0]
    assert load_training_config("tiny", [f"{key}={'0' if 'every' in key else '1'}"])  # the edge value is accepted


# ---------------------------------------------------------------------------------------------------------- schedule
def test_learning_rate_schedule_matches_the_released_loop():
    base, warm, max_it = 0.0025, 250, 4200

    def released(total_steps):  # what the released loop sets: start at base/W, then update after each step it
        lrs, lr = [], base / warm
        for it in range(total_steps):
            lrs.append(lr)
            lr = base * (it + 1) / warm if it < warm else base * (1.0 - (it - warm) / max_it) ** 0.9
        return lrs

    ours = [learning_rate(s, base, warm, max_it) for s in range(max_it)]
    assert ours == pytest.approx(released(max_it), rel=1e-12)
    assert ours[0] == base / 250 and ours[250] == base and ours[251] == base
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = PaperSchedule(optimizer, base, warm, max_it)
    for _ in range(300):
        schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(ours[300])
    again = PaperSchedule(optimizer, base, warm, max_it)
    again.load_state_dict(schedule.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(ours[300])


# ------------------------------------------------------------------------------------------------------------ losses
def test_stage_weight_values_from_the_design():
    assert stage_weight(0) == pytest.approx(0.6)
    assert stage_weight(100) == pytest.approx(0.83, abs=0.005)
    assert stage_weight(299) == pytest.approx(0.975, abs=0.002)


def test_dice_loss_is_batch_pooled_squared_denominator_over_all_classes():
    target = torch.tensor([[[0, 1], [2, 2]]])
    perfect = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 100
    assert dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    p = logits.softmax(1)
    t = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    expected = np.mean([1 - (2 * (p[:, c] * t[:, c]).sum() + 1e-5) / ((p[:, c] ** 2).sum() + (t[:, c] ** 2).sum() + 1e-5)
                        for c in range(3)])
    assert dice_loss(logits, target).item() == pytest.approx(float(expected), rel=1e-6)


def test_hsam_loss_mixes_stages_with_the_epoch_weight():
    s1, s2 = torch.randn(2, 9, 4, 4), torch.randn(2, 9, 16, 16)
    low, full = torch.randint(0, 9, (2, 4, 4)), torch.randint(0, 9, (2, 16, 16))
    parts = hsam_loss(s1, s2, low, full, epoch=100)
    l1 = 0.1 * torch.nn.functional.cross_entropy(s1, low) + 0.9 * dice_loss(s1, low)
    l2 = 0.1 * torch.nn.functional.cross_entropy(s2, full) + 0.9 * dice_loss(s2, full)
    w = 0.6 ** (0.99**100)
    assert parts.total.item() == pytest.approx(((1 - w) * l1 + w * l2).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------------ augmentation
def _slice():
    rng = np.random.default_rng(1)
    image = rng.random((60, 70)).astype(np.float32)
    label = np.zeros((60, 70), np.uint8)
    label[10:30, 10:40] = 5
    label[35:50, 20:60] = 7
    label[12:20, 45:60] = 2
    return image, label


def test_labels_are_never_interpolated_and_the_image_never_nearest():
    image, label = _slice()
    rng = np.random.default_rng(0)
    for branch in (lambda: rotate(image, label, rng, 20), lambda: elastic(image, label, rng, 140, 5.6, 5.6),
                   lambda: crop(image, label, rng, (0.2, 0.8))):
        for _ in range(3):
            img, lab = branch()
            assert set(np.unique(lab)) <= {0, 2, 5, 7}  # linear interpolation of 5 and 7 would invent a 6
    img, _ = rotate(image, label, np.random.default_rng(3), 20)
    # bilinear: most rotated pixels are new values (nearest would only copy existing ones)
    assert np.mean(~np.isin(img, image)) > 0.5
    out_img, out_lab, low = make_sample(image, label, 64, 16, np.random.default_rng(5), AugmentConfig())
    assert out_img.shape == (3, 64, 64) and out_lab.shape == (64, 64) and low.shape == (16, 16)
    assert out_img.min() >= 0 and out_img.max() <= 1 and set(np.unique(out_lab)) <= {0, 2, 5, 7}


def test_augmentation_is_a_function_of_the_seed_and_uses_released_branch_probabilities():
    image, label = _slice()
    a = make_sample(image, label, 64, 16, np.random.default_rng([1, 2, 3]), AugmentConfig())
    b = make_sample(image, label, 64, 16, np.random.default_rng([1, 2, 3]), AugmentConfig())
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # Branch frequencies from the outputs: crop shrinks the slice, "none" returns it unchanged.
    config, n = AugmentConfig(), 600
    shapes_changed = unchanged = 0
    for seed in range(n):
        img, _ = augment(image, label, np.random.default_rng(seed), config)
        shapes_changed += img.shape != image.shape
        unchanged += img is image
    assert shapes_changed / n == pytest.approx(config.p_crop, abs=0.06)
    assert unchanged / n == pytest.approx(1 - config.p_rotate - config.p_crop - config.p_elastic, abs=0.02)
    same, _ = augment(image, label, np.random.default_rng(0), AugmentConfig.off())
    assert same is image


# ------------------------------------------------------------------------------------------------------------ splits
def _store(n_volumes=3, depth=20):
    volumes = []
    for v in range(n_volumes):
        label = np.zeros((depth, 8, 8), np.uint8)
        label[:, :4] = 5  # liver everywhere
        label[: depth // 10, 5:, 5:] = 4  # gallbladder in a tenth of the slices
        volumes.append(Volume(f"case{v}", np.zeros((depth, 8, 8), np.float32), label))
    return VolumeSlices(volumes)


def test_few_shot_split_is_seeded_and_writes_its_recipe(tmp_path):
    store = _store()
    a = few_shot_split(store, fraction=0.1, seed=2345)
    b = few_shot_split(store, fraction=0.1, seed=2345)
    c = few_shot_split(store, fraction=0.1, seed=7)
    assert a.names == b.names and a.names != c.names and len(a.names) == 6
    path = write_list(tmp_path / "train.txt", a.names, a.meta)
    assert path.read_text().split() == a.names
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta["seed"] == 2345 and meta["count"] == 6 and meta["of_total"] == 60


def test_oversampling_repeats_slices_with_rare_organs():
    store = _store(n_volumes=5)
    plain = few_shot_split(store, count=40, seed=1)
    over = few_shot_split(store, count=40, seed=1, oversample_rare=0.3)
    rare = lambda names: sum(4 in store.organs(store.ids.index(n)) for n in names)  # noqa: E731
    assert rare(plain.names) >= 1
    assert rare(over.names) / len(over.names) > rare(plain.names) / len(plain.names)
    assert set(over.names) == set(plain.names)  # the same slices, some repeated


def test_case_holdout_is_seeded_and_keeps_a_training_case():
    names = [f"c{i}" for i in range(10)]
    train, val = split_cases(names, count=2, seed=3)
    assert len(val) == 2 and sorted(train + val) == sorted(names)
    assert split_cases(names, count=2, seed=3) == (train, val)
    assert split_cases(["only"], fraction=0.5) == (["only"], [])


# ------------------------------------------------------------------------------------------------------------ loader
def test_global_batches_cover_the_epoch_and_split_evenly_over_processes():
    batches = global_batches(30, 8, epoch=2, seed=5)
    assert sorted(np.concatenate(batches).tolist()) == list(range(30)) and [len(b) for b in batches] == [8, 8, 8, 6]
    assert all(np.array_equal(x, y) for x, y in zip(batches, global_batches(30, 8, epoch=2, seed=5)))
    assert not all(np.array_equal(x, y) for x, y in zip(batches, global_batches(30, 8, epoch=3, seed=5)))
    parts = [local_batch(batches[0], r, 3) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), batches[0]) and [len(p) for p in parts] == [3, 3, 2]
    assert iterations_per_epoch(30, 8) == 4 and iterations_per_epoch(29, 4, world_size=2) == 7


def test_batches_do_not_depend_on_loader_workers():
    from torch.utils.data import DataLoader

    from hsam.training.loader import EpochBatchSampler, TrainingSlices, global_batches

    rng = np.random.default_rng(0)
    volumes = [Volume("v", rng.random((12, 40, 40)).astype(np.float32), rng.integers(0, 9, (12, 40, 40)).astype(np.uint8))]
    dataset = TrainingSlices(VolumeSlices(volumes), 32, 8, AugmentConfig(), seed=3)

    def batches(workers):
        loader = DataLoader(dataset, batch_sampler=EpochBatchSampler(global_batches(len(dataset), 4, 1, 3), 1), num_workers=workers)
        return [b["image"] for b in loader]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2)))


def test_bad_data_fails_before_the_network_is_built(tmp_path):
    import time

    from hsam.training.trainer import train

    config = load_training_config("synapse_10pct", [f"output_dir={json.dumps(str(tmp_path / 'run'))}",
                                                    f"data.train.root={json.dumps(str(tmp_path))}",
                                                    f"data.train.list={json.dumps(str(tmp_path / 'missing.txt'))}"])
    started = time.time()
    with pytest.raises(HSAMError, match="missing.txt does not exist"):
        train(config, progress=False, register=False)
    assert time.time() - started < 5  # no ViT-B was built
    with pytest.raises(HSAMError, match="data.holdout needs a volume source"):
        (tmp_path / "l.txt").write_text("a_slice000\n")
        import numpy as _np

        _np.savez(tmp_path / "a_slice000.npz", image=_np.zeros((8, 8), _np.float32), label=_np.zeros((8, 8)))
        train(load_training_config("synapse_10pct", [f"output_dir={json.dumps(str(tmp_path / 'run2'))}",
                                                     f"data.train.root={json.dumps(str(tmp_path))}",
                                                     f"data.train.list={json.dumps(str(tmp_path / 'l.txt'))}",
                                                     "data.holdout.count=1"]), progress=False, register=False)
