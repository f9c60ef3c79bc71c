"""GPU check of hsam.training: AMP (bf16, fp16 + grad scaler), resume on CUDA, ViT-B/512 step time and memory.

    python benchmarks/gpu_training_check.py --data DIR --out OUT [--device cuda]

DIR holds the TotalSegmentator example CT (example_ct_sm + example_seg, H-SAM labels, LPS, windowed) in the
TransUNet layout: train_npz/case0001_sliceNNN.npz, train.txt and case0001.npy.h5 (so no SimpleITK is needed on the
GPU machine); make it here with ``--make-data ../shared/data/real/totalsegmentator --data DIR`` (needs SimpleITK),
put DIR in an ignored folder of the repo and carry it to the device. Writes OUT/results.json.
ViT-B runs start from random weights (no SAM download on the device machine): they time the recipe, not accuracy.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hsam.evaluation import dice_per_organ
from hsam.training.config import load_training_config
from hsam.training.data import load_h5_volume
from hsam.training.state import load_state
from hsam.training.trainer import train
from hsam.training.validate import predict_volume


def run(config: dict, **kwargs):
    started = time.time()
    result = train(config, progress=False, register=False, **kwargs)
    return result, time.time() - started


def make_data(source: Path, target: Path) -> None:
    """The TotalSegmentator example CT as TransUNet-style npz slices + one h5 volume (H-SAM labels, LPS, windowed)."""
    import h5py

    from hsam.labels import LABEL_MAPS
    from hsam.training.data import load_source_volumes

    pairs = {"format": "pairs", "pairs": [{"image": str(source / "example_ct_sm.nii.gz"),
                                           "label": str(source / "example_seg.nii.gz")}]}
    (volume,) = load_source_volumes(pairs, [-125, 275], "LPS", LABEL_MAPS["totalseg_total"])
    (target / "train_npz").mkdir(parents=True, exist_ok=True)
    names = [f"case0001_slice{z:03d}" for z in range(volume.image.shape[0])]
    for z, name in enumerate(names):
        np.savez(target / "train_npz" / f"{name}.npz", image=volume.image[z], label=volume.label[z].astype(np.float32))
    (target / "train.txt").write_text("\n".join(names) + "\n")
    with h5py.File(target / "case0001.npy.h5", "w") as handle:
        handle["image"], handle["label"] = volume.image, volume.label.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--make-data", default=None, help="write --data from this TotalSegmentator folder and exit")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-vitb", action="store_true")
    args = parser.parse_args()
    if args.make_data:
        make_data(Path(args.make_data), Path(args.data))
        return
    out = Path(args.out)
    data = Path(args.data)
    pairs = {"format": "synapse_npz", "root": str(data / "train_npz"), "list": str(data / "train.txt")}
    volume = load_h5_volume(data / "case0001.npy.h5")
    results: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__}

    def tiny(name: str, *sets: str) -> dict:
        return load_training_config({"extends": "tiny", "data": {"train": pairs}},
                                    [f"output_dir={json.dumps(str(out / name))}", f"device={json.dumps(args.device)}",
                                     "validation.every=0", *sets])

    for amp in ("true", '"fp16"', "false"):
        result, seconds = run(tiny(f"tiny_amp_{amp.strip(chr(34))}", f"amp={amp}"))
        result.model.eval()
        pred = predict_volume(result.model, volume.image, 16, args.device)
        dice = dice_per_organ(pred, volume.label, range(1, 9))
        results[f"tiny_amp={amp}"] = {
            "seconds": round(seconds, 2), "loss_first": result.history[0]["loss"], "loss_last": result.history[-1]["loss"],
            "mean_dice_train_slices": float(np.nanmean(list(dice.values()))), "precision": amp,
        }
        print(amp, results[f"tiny_amp={amp}"], flush=True)

    for amp in ("false", "true"):
        whole, _ = run(tiny(f"resume_whole_{amp}", f"amp={amp}", "epochs=3", "embedding_noise=0.2",
                            "augmentation.p_rotate=0.45", "augmentation.p_crop=0.4125", "augmentation.p_elastic=0.116875"))
        sets = (f"amp={amp}", "epochs=3", "embedding_noise=0.2", "augmentation.p_rotate=0.45",
                "augmentation.p_crop=0.4125", "augmentation.p_elastic=0.116875")
        run(tiny(f"resume_parts_{amp}", *sets), stop_after_epoch=1)
        run(tiny(f"resume_parts_{amp}", *sets), resume=True)
        a = load_state(out / f"resume_whole_{amp}" / "checkpoints" / "last.pt")["model"]
        b = load_state(out / f"resume_parts_{amp}" / "checkpoints" / "last.pt")["model"]
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        results[f"resume_cuda_amp={amp}"] = {"bit_identical": all(torch.equal(a[k], b[k]) for k in a),
                                             "max_abs_diff": worst}
        print("resume", amp, results[f"resume_cuda_amp={amp}"], flush=True)

    if not args.skip_vitb:
        for label, sets in (("vitb512_bf16_b16", ["amp=true"]), ("vitb512_fp32_b16", ["amp=false"]),
                            ("vitb512_bf16_b16_frozen_encoder", ["amp=true", 'model.freeze=["image_encoder"]'])):
            config = load_training_config("synapse_10pct", [
                f"output_dir={json.dumps(str(out / label))}", f"device={json.dumps(args.device)}", "epochs=3",
                "model.init=null", "data.few_shot=null", "num_workers=8", "checkpoint_every=0", *sets,
            ], extra={"data": {"train": pairs}})
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            result, seconds = run(config)
            steps = result.history[-1]["step"]
            later = result.history[1:]  # the first epoch includes warm-up (cudnn, allocator)
            per_epoch = result.history[1]["step"] - result.history[0]["step"]
            per_step = sum(r["seconds"] for r in later) / max(1, per_epoch * len(later))
            results[label] = {"seconds_total": round(seconds, 2), "steps": steps, "seconds_per_step_after_epoch1":
                              round(per_step, 3), "peak_gpu_gb": result.history[-1].get("gpu_max_memory_gb"),
                              "loss": [round(r["loss"], 4) for r in result.history],
                              "trainable_params": sum(p.numel() for p in result.model.parameters() if p.requires_grad)}
            print(label, results[label], flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
