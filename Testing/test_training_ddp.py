"""DDP through torchrun on CPU (gloo): 2 processes train to the same weights as 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hsam.training.config import load_training_config
from hsam.training.state import load_state
from hsam.training.trainer import train



def test_two_gloo_processes_match_one_process(tmp_path, real_data):
    folder = real_data / "totalsegmentator"
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps({
        "extends": "tiny", "name": "ddp-check", "epochs": 2, "batch_size": 4,
        # Per-sample seeded augmentation is the same for any process layout; dropout masks and the embedding noise
        # (scaled by the local batch's range) are per process, so they are switched off for an exact comparison.
        "augmentation": {"p_rotate": 0.45, "p_crop": 0.4125, "p_elastic": 0.116875},
        "model": {"dropout": False}, "embedding_noise": 0.0, "validation": {"every": 0},
        # Adam divides by sqrt(v) + eps: with eps 1e-8 a weight whose gradient is at rounding level (LoRA A before B
        # moves, unused classes) moves by +-lr on the sign of that rounding noise, which hides real agreement. A larger
        # eps makes such updates vanish, so the comparison measures the gradients' agreement.
        "optim": {"eps": 1e-3},
        "data": {"train": {"format": "pairs", "pairs": [{"image": str(folder / "example_ct_sm.nii.gz"),
                                                          "label": str(folder / "example_seg.nii.gz")}]},
                 "label_map": "totalseg_total", "few_shot": {"count": 10, "seed": 1}},  # 3 steps/epoch, last of 2
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "hsam", "train",
         "--config", str(config), "--output", str(tmp_path / "ddp"), "--quiet", "--no-register", "--device", "cpu"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    train(load_training_config(str(config), [f"output_dir={json.dumps(str(tmp_path / 'single'))}"]), progress=False,
          register=False)

    two = load_state(tmp_path / "ddp" / "checkpoints" / "last.pt")
    one = load_state(tmp_path / "single" / "checkpoints" / "last.pt")
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["step"] == one["step"] == 6
    worst = max((two["model"][k] - one["model"][k]).abs().max().item() for k in one["model"])
    torch.manual_seed(2345)  # the run's seed: the same initial weights
    from hsam.training.model_setup import build_training_model

    initial = build_training_model(load_training_config(str(config)))[0].state_dict()
    moved = max((one["model"][k] - initial[k]).abs().max().item() for k in one["model"])
    print(f"largest weight change in training {moved:.2e}; largest difference 2 vs 1 process {worst:.2e}")
    assert moved > 1e-3 and worst < 1e-5
    for a, b in zip(two["history"], one["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["train_dice"] == pytest.approx(b["train_dice"], abs=1e-3)
