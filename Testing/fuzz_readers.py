"""Bounded-time fuzzing of hsam's file readers with hypothesis (run by Testing/test_fuzz_readers.py).

    python fuzz_readers.py TARGET SECONDS OUT_DIR

Each target starts from a valid seed file, lets hypothesis draw a short list of mutations (bit flips, byte writes,
inserts, deletes, truncation, "interesting" integers at any offset, numbers in text headers replaced, mutations of
the decompressed stream of gzip files) and hands the result to the real reader. The contract: the reader returns, or
raises :class:`hsam.errors.HSAMError` with a one-line message. Anything else is a finding: its input is saved in
OUT_DIR. The current input is written to ``OUT_DIR/last_input`` before each call so that a hard crash (a signal
from native code) can be reproduced. Prints one JSON line: ``{"target", "examples", "findings": [...]}``.

Hypothesis runs rounds of 25 examples until the time budget is spent (an example started after the budget returns
at once), so a run takes about SECONDS plus one slow example.
"""

from __future__ import annotations

import gzip
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

INTERESTING = [0, 1, 2, 3, 4, 7, 8, 16, 255, 256, 348, 352, 540, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 2**63 - 1, 2**64 - 1]  # fmt: skip
TEXT_NUMBERS = ["0", "-1", "1", "65535", "2147483648", "99999999999", "1e308", "nan", "-0", "3.5", "inf", ""]

mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1), st.integers(0, 7)),
    st.tuples(st.just("set"), st.floats(0, 1), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("int"), st.floats(0, 1), st.tuples(st.sampled_from([1, 2, 4, 8]), st.sampled_from(INTERESTING),
                                                         st.sampled_from(["little", "big"]))),  # fmt: skip
    st.tuples(st.just("number"), st.integers(0, 40), st.sampled_from(TEXT_NUMBERS)),
)
programs = st.lists(mutation, min_size=1, max_size=4)


def mutate(data: bytes, program: list) -> bytes:
    """Apply a mutation program; positions are fractions of the current length (so they scale with the file)."""
    buffer = bytearray(data)
    for op, where, arg in program:
        if op == "number":
            # the where-th number in the (text) header, replaced by an edge value
            head = bytes(buffer[:2048])
            matches = list(re.finditer(rb"-?\d+(\.\d+)?(e[-+]?\d+)?", head))
            if matches:
                m = matches[where % len(matches)]
                buffer[m.start() : m.end()] = arg.encode()
            continue
        pos = min(len(buffer), int(where * len(buffer)))
        if op == "flip" and pos < len(buffer):
            buffer[pos] ^= 1 << arg
        elif op == "set" and pos < len(buffer):
            buffer[pos] = arg
        elif op == "insert":
            buffer[pos:pos] = arg
        elif op == "delete":
            del buffer[pos : pos + arg]
        elif op == "truncate":
            del buffer[pos:]
        elif op == "int":
            width, value, order = arg
            buffer[pos : pos + width] = (value % (1 << (8 * width))).to_bytes(width, order)
    return bytes(buffer)


# ---------------------------------------------------------------------------------------------------- targets


def _seed_image(work: Path):
    import numpy as np
    import SimpleITK as sitk

    array = np.random.default_rng(0).integers(-1000, 1000, size=(4, 8, 8)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 20.0, 30.0))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


def image_target(suffix: str, inner_gzip: bool = False) -> Callable[[Path], tuple[bytes, Callable[[bytes], None]]]:
    def setup(work: Path):
        import SimpleITK as sitk

        from hsam.volume import read_image

        seed = work / f"seed{suffix}"
        sitk.WriteImage(_seed_image(work), str(seed), useCompression=suffix in (".nrrd", ".mha"))
        data = seed.read_bytes()
        if inner_gzip:
            data = gzip.decompress(data)
        target = work / f"case{suffix}"

        def run(mutated: bytes) -> None:
            target.write_bytes(gzip.compress(mutated, mtime=0) if inner_gzip else mutated)
            read_image(target)

        return data, run

    return setup


def dicom_target(work: Path):
    import SimpleITK as sitk

    from hsam.volume import read_image

    image = _seed_image(work)
    folder = work / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(2):
        slice_ = image[:, :, k]
        for key, value in {
            "0008|0060": "CT", "0020|000e": "1.2.3.4", "0020|000d": "1.2.3", "0008|0018": f"1.2.3.4.{k}",
            "0020|0013": str(k + 1), "0020|0032": f"0\\0\\{2.5 * k}", "0020|0037": "1\\0\\0\\0\\1\\0",
        }.items():  # fmt: skip
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(slice_)
    victim = folder / "1.dcm"
    data = victim.read_bytes()

    def run(mutated: bytes) -> None:
        victim.write_bytes(mutated)
        read_image(folder)

    return data, run


def seg_target(work: Path):
    import SimpleITK as sitk

    from hsam.volume import read_labels, write_labels

    labels = sitk.Cast(sitk.Abs(_seed_image(work)) // 120, sitk.sitkUInt8)
    seed = work / "seed.seg.nrrd"
    write_labels(labels, seed)
    target = work / "case.seg.nrrd"

    def run(mutated: bytes) -> None:
        target.write_bytes(mutated)
        read_labels(target)

    return seed.read_bytes(), run


def dicom_seg_target(work: Path):
    """The real dcmqi DICOM SEG (../shared/data/real or HSAM_REAL_DATA), read on its own grid and on its CT's."""
    import os

    from hsam.volume import read_image, read_labels

    real = Path(os.environ.get("HSAM_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    ct = read_image(real / "dcmqi" / "ct-3slice")
    target = work / "case.dcm"

    def run(mutated: bytes) -> None:
        target.write_bytes(mutated)
        read_labels(target)
        read_labels(target, reference=ct)

    return (real / "dcmqi" / "liver.dcm").read_bytes(), run


def _tiny_saved(work: Path) -> Path:
    import torch

    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard, save_model
    from hsam.model.config import load_model_config

    torch.manual_seed(0)
    config = load_model_config("vit_tiny")
    return save_model(build_hsam(config), ModelCard.for_config(config, "tiny"), work / "tiny")


def card_target(work: Path):
    from hsam.model.checkpoint import read_card

    folder = _tiny_saved(work)
    card = folder / "model.json"

    def run(mutated: bytes) -> None:
        card.write_bytes(mutated)
        read_card(folder)

    return card.read_bytes(), run


def safetensors_target(work: Path):
    import hashlib

    from hsam.model.checkpoint import load_model

    folder = _tiny_saved(work)
    tensors, card = folder / "model.safetensors", folder / "model.json"
    data = tensors.read_bytes()
    card_json = json.loads(card.read_text())
    header_end = 8 + int.from_bytes(data[:8], "little")
    head = data[:header_end]  # mutate the header region (+ a little data) only: the body is 49 MB of floats
    body = data[header_end:]

    def run(mutated: bytes) -> None:
        whole = mutated + body
        tensors.write_bytes(whole)
        card.write_text(json.dumps({**card_json, "sha256": hashlib.sha256(whole).hexdigest()}))
        load_model(folder)

    return head, run


def pth_target(legacy: bool):
    def setup(work: Path):
        import torch

        from hsam.model.official import load_pth

        seed = work / "seed.pth"
        state = {"w_a_000": torch.arange(6, dtype=torch.float32).reshape(2, 3), "mask_decoder.x": torch.ones(2)}
        torch.save(state, seed, _use_new_zipfile_serialization=not legacy)
        target = work / "case.pth"

        def run(mutated: bytes) -> None:
            target.write_bytes(mutated)
            load_pth(target, "H-SAM checkpoint")

        return seed.read_bytes(), run

    return setup


def manifest_target(work: Path):
    from hsam.weights.manifest import load_manifest
    from hsam.paths import resources_dir

    seed = (resources_dir() / "models.json").read_bytes()
    target = work / "models.json"

    def run(mutated: bytes) -> None:
        target.write_bytes(mutated)
        load_manifest(target)

    return seed, run


TARGETS = {
    "nifti": image_target(".nii"),
    "nifti-gz-inner": image_target(".nii.gz", inner_gzip=True),
    "nrrd": image_target(".nrrd"),
    "mha": image_target(".mha"),
    "dicom": dicom_target,
    "seg-nrrd": seg_target,
    "dicom-seg": dicom_seg_target,
    "model-card": card_target,
    "safetensors": safetensors_target,
    "pth-zip": pth_target(legacy=False),
    "pth-legacy": pth_target(legacy=True),
    "manifest": manifest_target,
}


def fuzz(name: str, seconds: float, out: Path) -> dict:
    import SimpleITK as sitk

    from hsam.errors import HSAMError

    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)
    seed, run = TARGETS[name](work)
    run(seed)  # the seed itself must be accepted (or refused with HSAMError for a 2-D DICOM etc.)
    stop = time.monotonic() + seconds
    findings: list[dict] = []
    count = [0]

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(programs)
    def example(program):
        if time.monotonic() > stop:
            return
        count[0] += 1
        data = mutate(seed, program)
        (out / "last_input").write_bytes(data)
        try:
            run(data)
        except HSAMError as error:
            if "\n" in str(error):
                findings.append({"kind": "multi-line HSAMError", "message": str(error)[:300]})
        except Exception as error:  # noqa: BLE001 (every other exception is what we look for)
            findings.append({"kind": type(error).__name__, "message": str(error)[:300],
                             "where": traceback.format_exc().strip().splitlines()[-3][:200]})  # fmt: skip
        if findings and "saved" not in findings[-1]:
            path = out / f"finding_{len(findings)}.bin"
            path.write_bytes(data)
            findings[-1]["saved"] = str(path)

    while time.monotonic() < stop:  # rounds of 25 examples until the budget is spent
        example()
    (out / "last_input").unlink(missing_ok=True)
    return {"target": name, "examples": count[0], "findings": findings[:20], "total_findings": len(findings)}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(fuzz(sys.argv[1], float(sys.argv[2]), Path(sys.argv[3]))))
