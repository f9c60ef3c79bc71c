"""A framing/contrast stress version of a CT volume: 512x512 at 0.98 mm, arms down beside the body, a table,
arterial-phase aorta, water-filled stomach, fine-pixel noise (the setting in which the first demo model failed).

``stress_ct`` is built from the training patient (``example_ct``), so it measures robustness to framing, arms and
contrast, not generalisation to other anatomy. ``unseen_<phase>`` is the other anatomy here: the MR patient's label
map drawn as a CT of one contrast phase (``synth.synthesize`` with ``synth.phase_prior``), framed the same way. It is
held out only from models trained without the MR anatomy (``prepare_data.py --mr-variants 0``), and its images are
synthetic. The arms come from the same generator family as the training pool's (``synth.add_arm``) with their own
seed, so these tests are kinder to the new model than real arms would be.

    python benchmarks/lite/stress.py --data ../shared/data/real --out runs/stress   # stress_ct_*, unseen_venous_*
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

import synth
from sources import body_centre, load_ct_source, load_mr_source, write_volume

OUT_SIZE, OUT_MM = 512, 500.0 / 512  # the hidden patient's grid: 512x512, 0.98 mm pixels
CONTRAST = {"aorta": 140.0, "artery": 120.0, "kidney": 60.0, "spleen": 25.0, "liver": 10.0}  # arterial phase, HU


def restyle(hu: np.ndarray, full: np.ndarray, names: dict[int, str], rng: np.random.Generator) -> np.ndarray:
    """Another contrast phase: brighter arteries/kidneys/spleen; the stomach filled with water (no gas, no food)."""
    out = hu.astype(np.float32).copy()
    for value, name in names.items():
        mask = full == value
        if not mask.any():
            continue
        if name == "stomach":
            out[mask] = rng.uniform(5.0, 15.0) + rng.normal(0.0, 6.0, size=int(mask.sum()))
            continue
        for key, delta in CONTRAST.items():
            if key in name and "cyst" not in name:
                out[mask] += delta
                break
    return out


def stress_volume(ct: np.ndarray, full: np.ndarray, names: dict[int, str], hsam: np.ndarray, spacing: float,
                  centre: np.ndarray, seed: int, render=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 HU [z, 512, 512], uint8 H-SAM labels, uint8 mask of the added arms and table) on a 500 mm field of
    view around ``centre`` (row, col). ``render(z, rng)`` draws slice z in HU (default: ``restyle`` of ``ct[z]``)."""
    rng = np.random.default_rng(seed)
    render = render or (lambda z, rng: restyle(ct[z], full[z], names, rng))
    arms = [synth.arm_params(rng) for _ in range(2)]
    arms[0]["gap"], arms[1]["gap"] = -4.0, 8.0  # one arm resting on the body, one just apart
    arms[0]["bones"] = arms[1]["bones"] = 1  # upper arms
    table_rng_seed = int(rng.integers(1 << 30))
    matrix = np.diag([OUT_MM / spacing, OUT_MM / spacing])
    offset = centre - matrix @ np.array([(OUT_SIZE - 1) / 2, (OUT_SIZE - 1) / 2])
    images, labels, added = [], [], []
    for z in range(ct.shape[0]):
        hu = render(z, rng)
        image = ndimage.affine_transform(hu, matrix, offset, output_shape=(OUT_SIZE, OUT_SIZE), order=3,
                                         mode="constant", cval=synth.AIR_HU)
        label = ndimage.affine_transform(hsam[z], matrix, offset, output_shape=(OUT_SIZE, OUT_SIZE), order=0,
                                         mode="constant", cval=0)
        before = image.copy()
        for side, params in zip((-1, 1), arms):
            synth.add_arm(image, OUT_MM, side, params, np.random.default_rng(seed + z))
        synth.add_table(image, OUT_MM, np.random.default_rng(table_rng_seed))
        added.append((image != before).astype(np.uint8))
        image = image + rng.normal(0.0, 15.0, size=image.shape)  # quantum noise of a thin-pixel reconstruction
        images.append(np.clip(image, -1024, 3071).astype(np.int16))
        labels.append(label.astype(np.uint8))
    return np.stack(images), np.stack(labels), np.stack(added)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"))
    parser.add_argument("--out", type=Path, default=Path("runs/stress"))
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--phases", default="venous,native",
                        help=f"contrast phases of the unseen-anatomy cases, of {','.join(synth.CONTRAST_PHASES)}")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)

    def write(name: str, src, volume) -> None:
        image, label, added = volume
        spacing = (src.spacing, OUT_MM, OUT_MM)
        write_volume(image, spacing, args.out / f"{name}_image.nii.gz")
        write_volume(label, spacing, args.out / f"{name}_label.nii.gz")
        write_volume(added, spacing, args.out / f"{name}_added.nii.gz")  # arms and table (scored: no organ there)
        print(args.out / name, image.shape)

    ct = load_ct_source(args.data)
    write("stress_ct", ct, stress_volume(ct.image, ct.full, ct.names, ct.hsam_labels(ct.full), ct.spacing,
                                         body_centre(ct.image), args.seed))
    mr = load_mr_source(args.data)
    for phase in filter(None, args.phases.split(",")):
        def render(z: int, rng: np.random.Generator, phase: str = phase) -> np.ndarray:
            hu = synth.synthesize(mr.image[z], mr.full[z], mr.names, mr.body[z], False, rng,
                                  priors=synth.phase_prior(phase, rng))
            return synth.degrade(hu, rng)

        write(f"unseen_{phase}", mr, stress_volume(mr.image, mr.full, mr.names, mr.hsam_labels(mr.full), mr.spacing,
                                                   mr.centre, args.seed, render))


if __name__ == "__main__":
    main()
