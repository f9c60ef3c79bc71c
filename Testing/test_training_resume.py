"""Stopping a run and resuming it (`hsam train --resume`) gives bit-identical results to an uninterrupted run, with
augmentation, embedding noise, dropout and validation all active."""

from __future__ import annotations

import json

import pytest
import torch

from hsam.cli import main
from hsam.errors import HSAMError
from hsam.training.config import load_training_config
from hsam.training.state import load_state
from hsam.training.trainer import train



def _config_file(tmp_path, real_data) -> str:
    folder = real_data / "totalsegmentator"
    pairs = {"format": "pairs", "pairs": [{"image": str(folder / "example_ct_sm.nii.gz"),
                                           "label": str(folder / "example_seg.nii.gz")}]}
    path = tmp_path / "resume.json"
    path.write_text(json.dumps({
        "extends": "tiny", "name": "resume-check", "epochs": 3,
        "augmentation": {"p_rotate": 0.45, "p_crop": 0.4125, "p_elastic": 0.116875},  # the released recipe
        "data": {"train": pairs, "val": pairs, "label_map": "totalseg_total", "few_shot": {"count": 10, "seed": 4}},
        "validation": {"every": 1}, "checkpoint_every": 2,
    }))
    return str(path)


def _without_time(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_stop_and_resume_equals_uninterrupted(tmp_path, real_data):
    path = _config_file(tmp_path, real_data)
    train(load_training_config(path, [f"output_dir={json.dumps(str(tmp_path / 'whole'))}"]), progress=False,
          register=False)
    config = load_training_config(path, [f"output_dir={json.dumps(str(tmp_path / 'parts'))}"])
    first = train(config, stop_after_epoch=1, progress=False, register=False)
    assert not first.finished and len(first.history) == 1 and first.model_dir is None
    with pytest.raises(HSAMError, match="already holds a run"):
        train(config, progress=False, register=False)
    # the second part through the CLI, as a user would resume
    assert main(["train", "--config", path, "--output", str(tmp_path / "parts"), "--resume", "--quiet",
                 "--no-register"]) == 0

    a = load_state(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_state(tmp_path / "parts" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 9 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _without_time(a["history"]) == _without_time(b["history"])
    assert a["best"] == b["best"]
    for key in ("model.safetensors",):
        assert (tmp_path / "whole" / "model" / key).read_bytes() == (tmp_path / "parts" / "model" / key).read_bytes()
    assert (tmp_path / "parts" / "checkpoints" / "epoch_1.pt").is_file()


@pytest.mark.parametrize("every_s", [0, 3600])
def test_resume_state_is_written_after_the_last_epoch_and_every_state_every_s(tmp_path, real_data, every_s):
    """last.pt after each epoch with state_every_s 0; with an hour, only after the last epoch (a short run does not
    write it ten times), and the finished state is the same either way."""
    path = _config_file(tmp_path, real_data)
    out = tmp_path / f"every{every_s}"
    last = out / "checkpoints" / "last.pt"
    seen = []  # the epochs last.pt holds when each epoch ends (before that epoch's own write)
    config = load_training_config(path, [f"output_dir={json.dumps(str(out))}", f"state_every_s={every_s}"])
    train(config, progress=False, register=False,
          on_epoch=lambda row: seen.append(load_state(last)["epoch"] if last.exists() else None))
    assert seen == ([None, 1, 2] if every_s == 0 else [None, None, None])
    assert load_state(last)["epoch"] == 3 and load_state(last)["step"] == 9


def test_resume_refuses_a_changed_config(tmp_path, real_data):
    path = _config_file(tmp_path, real_data)
    out = json.dumps(str(tmp_path / "run"))
    train(load_training_config(path, [f"output_dir={out}", "epochs=2"]), stop_after_epoch=1, progress=False,
          register=False)
    with pytest.raises(HSAMError, match=r"differs from the run being resumed in \['optim'\]"):
        train(load_training_config(path, [f"output_dir={out}", "epochs=2", "optim.base_lr=0.01"]), resume=True,
              progress=False, register=False)
    with pytest.raises(HSAMError, match="nothing to resume"):
        train(load_training_config(path, [f"output_dir={json.dumps(str(tmp_path / 'none'))}"]), resume=True,
              progress=False, register=False)


def test_resume_a_run_saved_before_newer_keys_and_heads(tmp_path, real_data):
    """A run saved by an older version resumes: its config lacks keys added since (they take the defaults that keep
    the old behaviour), and its frozen fingerprint lists a head the model no longer builds. Other base weights are
    still refused."""
    path = _config_file(tmp_path, real_data)
    out = json.dumps(str(tmp_path / "run"))
    config = load_training_config(path, [f"output_dir={out}", "epochs=2"])
    train(config, stop_after_epoch=1, progress=False, register=False)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    state = load_state(last)
    name = next(iter(state["frozen_fingerprint"]))
    state["frozen_fingerprint"][name] += 1e-3
    torch.save(state, last)
    with pytest.raises(HSAMError, match="frozen base weights differ"):
        train(config, resume=True, progress=False, register=False)

    state["frozen_fingerprint"][name] -= 1e-3
    state["frozen_fingerprint"]["mask_decoder.head_dropped_since.weight"] = 1.5
    saved = json.loads(state["config"])
    del saved["cpu_amp"], saved["encoder_cache"]
    state["config"] = json.dumps(saved)
    torch.save(state, last)
    resumed = train(config, resume=True, progress=False, register=False)
    assert resumed.finished and len(resumed.history) == 2


def test_same_frozen_base_ignores_summation_order_only():
    from hsam.training.state import same_frozen_base

    saved = {"a": 5.662278802409758, "b": -2.0, "old_head": 1.0}
    assert same_frozen_base(saved, {"a": 5.6622788024097614, "b": -2.0})
    assert not same_frozen_base(saved, {"a": 5.6623, "b": -2.0})
    assert not same_frozen_base(saved, {"a": 5.662278802409758, "b": -2.0, "new": 0.0})
