"""Measure the orientation self-check and the laterality check on real scans: each scan as given, mirrored
left-right, mirrored front-back and turned 180 degrees (voxel arrays flipped in-plane, header kept: a scan whose
header lies), and optionally cut to sub-ranges of its slices (scans that start or stop at other heights).

Two parts, both with the shipped code (hsam.checks.orientation.check_orientation, hsam.checks.laterality):

* cost: ``segment_volume`` run for real on each scan as given (``--live-copies`` adds the copies): wall and CPU
  seconds of the whole run and of the check, and the check's forward passes against the run's;
* detection: every slice of every scan is predicted once in each of the four layouts (the model is 2-D, so a copy's
  run and every pass the check makes on it are among these predictions), then the check is replayed on each copy and
  cut, its passes answered from those predictions. This gives the verdicts of 4 x (cuts + 1) runs per scan for the
  price of 4 runs.

    python benchmarks/orientation/measure_check.py -o benchmarks/orientation/results.json \\
        ../shared/data/real/totalsegmentator/example_ct_sm.nii.gz ../shared/data/real/dcmqi/ct-3slice \\
        ../shared/data/real/totalsegmentator/example_ct.nii.gz --cuts 0:90,0:100,20:112,30:100,40:112,50:112,60:112,70:112

(``--cache FILE.npz`` keeps the per-slice predictions for a rerun with the same model and speed mode.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from hsam.pipeline.options import SegmentOptions
from hsam.pipeline.predict import predict_slices_skipping_air
from hsam.pipeline.run import segment_volume
from hsam.checks.laterality import check_laterality
from hsam.checks.orientation import check_orientation
from hsam.volume import from_canonical, read_image, to_canonical
from hsam.weights.store import load_named_model

COPIES = {"as given": (), "mirrored left-right": (2,), "mirrored front-back": (1,), "turned 180 degrees": (1, 2)}
Prediction = tuple[np.ndarray, np.ndarray]


def flipped(image: sitk.Image, axes: tuple[int, ...]) -> sitk.Image:
    """The same header with the voxel array flipped along numpy axes ``axes`` (1 = rows/y, 2 = columns/x)."""
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(array, axis=axes)) if axes else array)
    out.CopyInformation(image)
    return out


def key(slice_: np.ndarray) -> str:
    """A slice's identity by content (float32, so int16 and int32 copies of one scan share their predictions)."""
    return hashlib.sha1(np.ascontiguousarray(slice_, dtype=np.float32).tobytes()).hexdigest()


class Predictions:
    """Per-slice model outputs by slice content, filled once; answers the check's passes in a replay."""

    def __init__(self, model, card) -> None:
        self.model, self.window = model, list(card.window)
        from hsam.engines.modes import choose_engine, encoder_family, prepare

        self.device = torch.device("cpu")
        self.predictor = prepare(model, choose_engine("auto", self.device, encoder_family(model)).mode, self.device)
        self.table: dict[str, Prediction] = {}
        self.passes = 0

    def fill(self, volume: np.ndarray) -> None:
        """Predict the slices of ``volume`` [z, y, x] not predicted before, two at a time (the CPU batch)."""
        missing = [z for z in range(len(volume)) if key(volume[z]) not in self.table]
        cache: dict = {}
        for start in range(0, len(missing), 2):
            batch = missing[start:start + 2]
            labels, confidence = predict_slices_skipping_air(self.model, volume[batch], self.window, self.device, None,
                                                             None, self.predictor, cache)
            for i, z in enumerate(batch):
                self.table[key(volume[z])] = (labels[i], confidence[i])

    def load(self, path: Path) -> None:
        """Predictions saved by an earlier run of this script with the same model (``--cache``)."""
        if path.is_file():
            with np.load(path) as saved:
                for name in saved.files:
                    if name.endswith("|labels"):
                        digest = name[: -len("|labels")]
                        self.table[digest] = (saved[name], saved[digest + "|confidence"])

    def save(self, path: Path) -> None:
        arrays = {}
        for digest, (labels, confidence) in self.table.items():
            arrays[digest + "|labels"], arrays[digest + "|confidence"] = labels, confidence
        np.savez_compressed(path, **arrays)

    def volume(self, volume: np.ndarray) -> Prediction:
        outs = [self.table[key(s)] for s in volume]
        return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])

    def predict(self, slices: np.ndarray) -> Prediction:
        self.passes += len(slices)
        return self.volume(slices)


def live_row(image: sitk.Image, model, card, scan: str, copy: str) -> dict:
    """One real run with the check: wall and process-CPU seconds of the run and of the check."""
    cpu, started = time.process_time(), time.perf_counter()
    result = segment_volume(flipped(image, COPIES[copy]), model, card, SegmentOptions(device="cpu"))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    check = result.orientation_check or {}
    return {"scan": scan, "copy": copy, "slices": image.GetSize()[2], "run_s": round(wall, 2), "run_cpu_s": round(cpu, 2),
            "check_s": round(check.get("seconds", 0.0), 2), "check_cpu_s": round(check.get("cpu_seconds", 0.0), 2),
            "checked_slices": check.get("slices"), "fired": check.get("suspect"), "warnings": result.warnings,
            "laterality": (result.laterality_check or {}).get("groups")}


def replay_rows(image: sitk.Image, scan: str, cut: tuple[int, int], predictions: Predictions, card) -> list[dict]:
    """The check and the laterality check on each copy of ``image[:, :, cut]``, passes answered from ``predictions``."""
    low, high = cut
    part = image[:, :, low:high]
    orientation = card.orientation or "LPS"
    canonical, _ = to_canonical(part, orientation)
    for axes in COPIES.values():
        predictions.fill(np.flip(canonical, axis=axes) if axes else canonical)
    rows = []
    for copy, axes in COPIES.items():
        copy_image = flipped(part, axes)
        volume, how = to_canonical(copy_image, orientation)
        labels, confidence = predictions.volume(volume)
        tissue = (volume.reshape(len(volume), -1) > float(card.window[0])).any(axis=1)
        predictions.passes = 0
        check = check_orientation(volume, labels, confidence, predictions.predict, orientation, tissue)
        laterality = check_laterality(from_canonical(labels, how), copy_image, list(card.classes))
        rows.append({"scan": scan, "cut": [low, high], "copy": copy, "slices": high - low,
                     "body_slices": int(tissue.sum()), "checked_slices": [low + s for s in check.slices],
                     "check_passes": predictions.passes, "fired": check.suspect, "scores": check.scores,
                     "per_slice": {str(low + int(z)): v for z, v in check.per_slice.items()},
                     "organ_voxels_per_slice": (labels.reshape(len(labels), -1) > 0).sum(axis=1).tolist(),
                     "laterality": laterality.groups, "laterality_warning": laterality.warning})
    return rows


def parse_cuts(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans", nargs="+")
    parser.add_argument("--model", default=None)
    parser.add_argument("--cuts", default="", help="slice ranges LOW:HIGH replayed besides the whole scan, for scans "
                        "with at least HIGH slices (e.g. 0:90,40:112)")
    parser.add_argument("--parts", default="live,replay", help="live (cost), replay (detection) or both; a part "
                        "run alone replaces that part in an existing --output file and keeps the other")
    parser.add_argument("--live-copies", action="store_true", help="run every copy for real, not only the scan as given")
    parser.add_argument("--cache", type=Path, default=None, help="npz of per-slice predictions to reuse and extend "
                        "(only with the same model and speed mode; it saves predicting the four layouts again)")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, card = load_named_model(args.model)
    predictions = Predictions(model, card)
    if args.cache:
        predictions.load(args.cache)
    parts = args.parts.split(",")
    out: dict[str, list] = {"live": [], "replay": []}
    if args.output and Path(args.output).is_file():
        kept = json.loads(Path(args.output).read_text())
        if isinstance(kept, dict):  # (an older layout of the file, a list, is replaced)
            out.update({part: rows for part, rows in kept.items() if part in out and part not in parts})
    for scan in args.scans:
        image, name = read_image(scan), Path(scan).name
        for copy in (COPIES if args.live_copies else ["as given"]) if "live" in parts else []:
            row = live_row(image, model, card, name, copy)
            out["live"].append(row)
            print(f"live   {name:<22} {copy:<20} run {row['run_s']:6.1f} s ({row['run_cpu_s']:.1f} CPU s), check "
                  f"{row['check_s']:.2f} s ({row['check_cpu_s']:.2f} CPU s), slices {row['checked_slices']}, "
                  f"fired {row['fired']}, warnings {row['warnings']}", flush=True)
        depth = image.GetSize()[2]
        cuts = [(0, depth)] + [c for c in parse_cuts(args.cuts) if c[1] <= depth and c != (0, depth)]
        for cut in cuts if "replay" in parts else []:
            for row in replay_rows(image, name, cut, predictions, card):
                out["replay"].append(row)
                right = row["fired"] == (None if row["copy"] == "as given" else row["copy"])
                scores = "; ".join(f"{k}: {v['organ_voxels']}/{v['mean_confidence']:.3f}" for k, v in row["scores"].items())
                print(f"replay {name:<22} {cut[0]:>3}:{cut[1]:<3} {row['copy']:<20} {'right' if right else 'WRONG'} "
                      f"fired {row['fired']}, slices {row['checked_slices']}, laterality "
                      f"{'warns' if row['laterality_warning'] else 'silent'}\n    {scores}", flush=True)
        if args.cache:
            predictions.save(args.cache)
        if args.output:  # after every scan: a long measurement keeps what it has
            Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
