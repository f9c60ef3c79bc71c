"""Training data for the H-SAM-Lite demo model: a fixed pool of augmented 256x256 slices + held-out validation slices.

Why a fixed pool: H-SAM-Lite keeps LiteMedSAM's encoder frozen, and the encoder is ~70 % of a CPU training step.
With every augmented slice written once, ``hsam train`` sees identical inputs in every epoch and the TinyViT's
embedding cache (``model.init.embedding_cache`` in the training config) computes each embedding once.

Sources (issue 15: a model that holds up on other patients): TotalSegmentator's test CT (``example_ct``: 122x101x112
at 3 mm, pelvis to upper abdomen) with its full label map: ``example_seg`` (``total``, 117 structures) for z 82-111,
where ``example_ct_sm`` is exactly ``example_ct[82:112]``, and ``example_seg_fast_force_split`` (``total --fast``)
below; and the test MR's label map (``example_seg_mr``, ``total_mr``, 20 slices), from which every copy is a
synthetic CT: the MR image itself is never shown, its anatomy (a second patient) is. One CT patient, pseudo-labels:
this is a demonstration model. The dcmqi CT is not used: it is the held-out unseen patient of the evaluation.

Held out for early stopping: two blocks of 4 axial slices (z 68-71: kidneys, liver tip; z 96-99: spleen, pancreas,
stomach, liver), written as two small NIfTI volumes, and the same blocks at 512x512 / 0.98 mm with arms, a table and
another contrast phase (``stress.py``, own seeds); they are not used for training.

Per copy (copy 0 of a CT slice: the slice as inference sees it):
* appearance: CT slices 35 % synthesised from the label map (``synth.synthesize``: a random CT-plausible HU per
  structure, texture, gas or oral contrast in hollow organs, bias field, blur, lower resolution, noise), 30 % real
  with a share of the structures moved to new mean HU (``synth.remap_structures``), 0 % real with every enhancing
  structure and the stomach moved to one coherent contrast phase (``synth.contrast_phase``: native, arterial, venous,
  delayed), 35 % real (``--synth-share``, ``--restyle-share``, ``--phase-share``); MR slices always synthesised;
* framing: with p=0.15 the slice as it comes (resized to 256); otherwise a square field of view of 280-520 mm around
  the body centre (420-600 mm when arms are added, body size x0.7-1.0 then), shifted by up to 25 mm, body size
  x0.8-1.2 with x/y jitter of +-8 %, rotation +-12 deg; 40 % rendered at 512 px and shrunk to 256 exactly as
  ``segment_volume`` does (the fine pixels of 512x512 scans);
* arms down beside the trunk (p=0.55; both with p=0.8): fat, muscle and one or two bones, touching the skin or up to
  30 mm apart, drawn only into air and labelled background; a table (p=0.35), also background;
* shape: with p=0.6 a smooth elastic deformation (up to ~8 px at 256, times ``--elastic-strength``);
* intensity: HU' = (HU - 40) * a + 40 + b with a in [0.85, 1.15], b in [-25, 25] HU; then one of blur, noise or an
  unsharp mask; gamma in [0.85, 1.2] after windowing.
Slices with the small, rare organs (gallbladder, pancreas) get twice the copies.
No left-right flips: they would swap the kidneys.

Usage (from the repository root; writes ``runs/lite-data``)::

    python benchmarks/lite/prepare_data.py --data ../shared/data/real --out runs/lite-data15
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

import synth
from sources import Source, load_ct_source, load_mr_source, write_volume

SIZE = 256
WINDOW = (-160.0, 240.0)  # abdomen W400/L40, the CT window LiteMedSAM's encoder was trained with
AIR_HU = -1024.0
VAL_BLOCKS = ((68, 72), (96, 100))
RARE_ORGANS = (4, 8)  # gallbladder, pancreas


def window01(hu: np.ndarray) -> np.ndarray:
    lo, hi = WINDOW
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def plain(hu: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slice resized to SIZE x SIZE as inference does (cubic image, nearest labels)."""
    h, w = hu.shape
    image = ndimage.zoom(hu, (SIZE / h, SIZE / w), order=3)
    lab = ndimage.zoom(label, (SIZE / h, SIZE / w), order=0)
    return image, lab


def reframe(hu: np.ndarray, label: np.ndarray, spacing: float, rng: np.random.Generator,
            centre: np.ndarray, size: int = SIZE, fov_mm: tuple[float, float] = (280.0, 520.0),
            body_scale: tuple[float, float] = (0.8, 1.2)) -> tuple[np.ndarray, np.ndarray, float]:
    """Resample into a square field of view (mm) around ``centre`` (pixel row/col) with rotation and scale jitter.

    Returns (image, labels, mm per output pixel). ``size`` 512 gives the fine pixels of a 512x512 clinical scan
    (0.55-1.0 mm); the caller then shrinks the windowed slice to 256 as inference does."""
    fov = rng.uniform(*fov_mm)
    scale = rng.uniform(*body_scale) * rng.uniform(0.92, 1.08, size=2)
    angle = np.deg2rad(rng.uniform(-12.0, 12.0))
    shift = rng.uniform(-25.0, 25.0, size=2)
    mm_per_out = fov / size
    # output pixel (r, c) -> millimetres from the output centre -> rotate/scale -> input pixel
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    matrix = rot @ np.diag(mm_per_out / (spacing * scale))
    out_centre = np.array([(size - 1) / 2, (size - 1) / 2])
    offset = centre + shift / spacing - matrix @ out_centre
    image = ndimage.affine_transform(hu, matrix, offset, output_shape=(size, size), order=3, mode="constant",
                                     cval=AIR_HU)
    lab = ndimage.affine_transform(label, matrix, offset, output_shape=(size, size), order=0, mode="constant",
                                   cval=0)
    return image, lab, mm_per_out


def elastic(hu: np.ndarray, label: np.ndarray, rng: np.random.Generator,
            strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The same smooth random displacement applied to image (cubic) and labels (nearest); sized for 256 px (up to
    8 px times ``strength``), scaled with the slice."""
    factor = hu.shape[0] / SIZE
    sigma = rng.uniform(10.0, 16.0) * factor
    amplitude = rng.uniform(3.0, 8.0) * factor * strength
    fields = []
    for _ in range(2):
        field = ndimage.gaussian_filter(rng.standard_normal(hu.shape), sigma)
        fields.append(field * amplitude / (np.abs(field).max() + 1e-6))
    rows, cols = np.meshgrid(np.arange(hu.shape[0]), np.arange(hu.shape[1]), indexing="ij")
    coords = np.stack([rows + fields[0], cols + fields[1]])
    image = ndimage.map_coordinates(hu, coords, order=3, mode="constant", cval=AIR_HU)
    lab = ndimage.map_coordinates(label, coords, order=0, mode="constant", cval=0)
    return image, lab


def intensity(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a, b = rng.uniform(0.85, 1.15), rng.uniform(-25.0, 25.0)
    hu = (hu - 40.0) * a + 40.0 + b
    kind = rng.random()
    if kind < 0.35:
        hu = ndimage.gaussian_filter(hu, rng.uniform(0.0, 0.8))
    elif kind < 0.75:
        hu = hu + rng.normal(0.0, rng.uniform(0.0, 18.0), size=hu.shape)
    else:
        hu = hu + rng.uniform(0.3, 1.0) * (hu - ndimage.gaussian_filter(hu, rng.uniform(1.0, 2.0)))
    return hu


def shrink_like_inference(image01: np.ndarray) -> np.ndarray:
    """A windowed slice of any size to SIZE x SIZE exactly as ``segment_volume`` does (torch bicubic, no
    anti-aliasing, clamped): a 512x512 scan's fine-pixel noise and edges reach the model as they will at inference."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image01, dtype=np.float32))[None, None]
    return F.interpolate(tensor, (SIZE, SIZE), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)[0, 0].numpy()


def variant(src: Source, z: int, rng: np.random.Generator, augment: bool, synth_share: float = 0.35,
            restyle_share: float = 0.30, phase_share: float = 0.0,
            elastic_strength: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One training copy of slice ``z``: appearance (real / remapped / contrast phase / synthesised, the shares of
    augmented CT copies given), framing, arms, table, shape, scanner effects. Copy 0 of a CT slice is the slice as
    inference sees it."""
    hu, full = src.image[z].astype(np.float32), src.full[z]
    if not augment and src.is_ct:
        image, lab = plain(hu, full)
        return window01(image), src.hsam_labels(lab)
    look = rng.random()
    if not src.is_ct or look < synth_share:
        hu = synth.degrade(synth.synthesize(hu, full, src.names, src.body[z], src.is_ct, rng), rng)
    elif look < synth_share + restyle_share:
        hu = synth.remap_structures(hu, full, src.names, rng)
    elif look < synth_share + restyle_share + phase_share:
        hu = synth.contrast_phase(hu, full, src.names, str(rng.choice(list(synth.CONTRAST_PHASES))), rng)
    if rng.random() < 0.15:
        image, lab = plain(hu, full)
    else:
        arms = rng.random() < 0.55  # arms down beside the trunk need a wide field of view, as on such scans
        image, lab, mm = reframe(hu, full, src.spacing, rng, src.centre, size=512 if rng.random() < 0.4 else SIZE,
                                 fov_mm=(420.0, 600.0) if arms else (280.0, 520.0),
                                 body_scale=(0.7, 1.0) if arms else (0.8, 1.2))  # this patient is wide
        if arms:  # both arms, or one (the other raised or out of view)
            sides = (-1, 1) if rng.random() < 0.8 else (int(rng.choice((-1, 1))),)
            for side in sides:
                synth.add_arm(image, mm, side, synth.arm_params(rng), rng)
        if rng.random() < 0.35:
            synth.add_table(image, mm, rng)
    if rng.random() < 0.6:
        image, lab = elastic(image, lab, rng, elastic_strength)
    image = window01(intensity(image, rng))
    if image.shape != (SIZE, SIZE):
        image = shrink_like_inference(image)
        lab = ndimage.zoom(lab, (SIZE / lab.shape[0], SIZE / lab.shape[1]), order=0)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(0.85, 1.2)
    return image.astype(np.float32), src.hsam_labels(lab)


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    temp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(temp, **arrays)
    os.replace(temp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/real"), help="folder with totalsegmentator/")
    parser.add_argument("--out", type=Path, default=Path("runs/lite-data"))
    parser.add_argument("--variants", type=int, default=12, help="copies of each organ slice (x2 with rare organs)")
    parser.add_argument("--mr-variants", type=int, default=10, help="synthetic CT copies of each MR organ slice "
                        "(0: leave the MR patient out)")
    parser.add_argument("--negatives-every", type=int, default=4, help="keep every N-th organ-free pelvic slice")
    parser.add_argument("--negative-variants", type=int, default=4)
    parser.add_argument("--list-every", type=int, default=4, help="train.txt lists copies 0, N, 2N, ... of each slice "
                        "(all copies: train_all.txt); 4 quarters the frozen encoder's CPU time, as issue 15's run did")
    parser.add_argument("--synth-share", type=float, default=0.35,
                        help="share of augmented CT copies synthesised from the label map")
    parser.add_argument("--restyle-share", type=float, default=0.30,
                        help="share of augmented CT copies with structures moved to new HU")
    parser.add_argument("--phase-share", type=float, default=0.0,
                        help="share of augmented CT copies drawn as in a random contrast phase "
                        "(synth.CONTRAST_PHASES; the rest: real HU)")
    parser.add_argument("--elastic-strength", type=float, default=1.0,
                        help="scales the elastic deformation's amplitude (1: up to ~8 px at 256)")
    parser.add_argument("--seed", type=int, default=2345)
    args = parser.parse_args()
    shares = (args.synth_share, args.restyle_share, args.phase_share)
    if min(shares) < 0.0 or sum(shares) > 1.0:
        parser.error("--synth-share, --restyle-share and --phase-share must be >= 0 and add up to at most 1 "
                     "(the rest keeps the real HU)")

    ct_src = load_ct_source(args.data)
    sources = [ct_src] + ([load_mr_source(args.data)] if args.mr_variants else [])
    held = {z for lo, hi in VAL_BLOCKS for z in range(lo, hi)}

    out_train = args.out / "train"
    out_train.mkdir(parents=True, exist_ok=True)
    (args.out / "val").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    names: list[str] = []
    counts: dict[str, int] = {}
    listed: list[str] = []
    for src in sources:
        labels = src.hsam_labels(src.full)
        organ_slices = [z for z in range(len(labels)) if labels[z].any()]
        negatives = [z for z in range(len(labels)) if not labels[z].any()][:: args.negatives_every]
        per_slice = args.variants if src.is_ct else args.mr_variants
        for z in organ_slices + negatives:
            if src.is_ct and z in held:
                continue
            organ = z in organ_slices
            key = f"{src.name}_{'organ' if organ else 'negative'}_slices"
            counts[key] = counts.get(key, 0) + 1
            copies = per_slice * (2 if np.isin(labels[z], RARE_ORGANS).any() else 1)
            for v in range(copies if organ else args.negative_variants):
                image, lab = variant(src, z, rng, augment=v > 0 or not src.is_ct, synth_share=args.synth_share,
                                     restyle_share=args.restyle_share, phase_share=args.phase_share,
                                     elastic_strength=args.elastic_strength)
                name = f"{src.name}{v}_slice{z:03d}"  # one "case" per variant; slice names stay Synapse-style
                atomic_savez(out_train / f"{name}.npz", image=image, label=lab)
                names.append(name)
                if v % args.list_every == 0:
                    listed.append(name)
    (args.out / "train_all.txt").write_text("\n".join(names) + "\n")
    (args.out / "train.txt").write_text("\n".join(listed) + "\n")

    from stress import stress_volume

    labels = ct_src.hsam_labels(ct_src.full)
    for i, (lo, hi) in enumerate(VAL_BLOCKS):
        write_volume(ct_src.image[lo:hi].astype(np.int16), (ct_src.spacing,) * 3,
                     args.out / "val" / f"heldout{i}_image.nii.gz")
        write_volume(labels[lo:hi], (ct_src.spacing,) * 3, args.out / "val" / f"heldout{i}_label.nii.gz")
        # the same held-out slices at 512x512 / 0.98 mm with arms, table and another contrast phase: early
        # stopping also watches robustness to the hidden patient's setting (seed apart from the stress test's)
        image, label, _ = stress_volume(ct_src.image[lo:hi], ct_src.full[lo:hi], ct_src.names, labels[lo:hi],
                                     ct_src.spacing, ct_src.centre, seed=100 + i)
        spacing = (ct_src.spacing, 500.0 / 512, 500.0 / 512)
        write_volume(image, spacing, args.out / "val" / f"heldout{i}_arms_image.nii.gz")
        write_volume(label, spacing, args.out / "val" / f"heldout{i}_arms_label.nii.gz")
    organ_voxels = {int(k): int((labels[sorted(held)] == k).sum()) for k in range(1, 9)}
    summary = {"written_samples": len(names), "train_samples": len(listed), **counts, "held_out_z": sorted(held),
               "held_out_organ_voxels": organ_voxels,
               "window": WINDOW, "size": SIZE, "seed": args.seed, "variants": args.variants,
               "mr_variants": args.mr_variants, "synth_share": args.synth_share,
               "restyle_share": args.restyle_share, "phase_share": args.phase_share,
               "elastic_strength": args.elastic_strength}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
