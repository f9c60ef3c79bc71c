"""Child process for the fault-injection tests (Testing/test_reliability_faults.py): one real operation per run.

    python fault_child.py labels OUT SEED DEPTH [REPEAT]   write_labels of seeded random labels [DEPTH, 128, 128]
    python fault_child.py model FOLDER SEED                 save_model of a seeded tiny H-SAM into FOLDER
    python fault_child.py install FOLDER [REPEAT]           hsam.weights.store.import_model(FOLDER), REPEAT times
    python fault_child.py fetch MODEL_ID                    hsam.weights.fetch.fetch(MODEL_ID)
    python fault_child.py cli ARG...                        hsam.cli.main([ARG...])
    python fault_child.py export DATA ROOT NAME [REPEAT]    Slicer export_case of the real CT + reference labels

Exit status: 0 done, 2 HSAMError (its message on stderr as ``error: ...``), 3 any other exception (type and message).
SIGXFSZ is ignored so that a file size limit (RLIMIT_FSIZE, set by the parent) makes writes fail with EFBIG, as a
full disk makes them fail with ENOSPC, instead of killing the process.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path


def labels_volume(seed: int, depth: int):
    """Seeded random labels (incompressible enough that a 128 x 128 slice costs ~10 kB in .nii.gz)."""
    import numpy as np
    import SimpleITK as sitk

    array = np.random.default_rng(seed).integers(0, 9, size=(depth, 128, 128), dtype=np.uint8)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-100.0, 50.0, 7.0))
    return image


def tiny_model(seed: int):
    import torch

    from hsam.model.build import build_hsam
    from hsam.model.checkpoint import ModelCard
    from hsam.model.config import load_model_config

    torch.manual_seed(seed)
    config = load_model_config("vit_tiny")
    return build_hsam(config), ModelCard.for_config(config, "tiny", title=f"tiny seed {seed}", demo=True)


def slicer_case(data: Path):
    """Headless Slicer scene with the real CT and a module result holding its reference organ labels."""
    import numpy as np
    import SimpleITK as sitk
    import slicer_headless

    from hsam.pipeline.result import organ_volumes_ml
    from hsam.labels import CLASS_NAMES, remap_labels
    from HSAMSlicerLib.logic import HSAMSlicerLogic, ModelInfo, RunOptions, SegmentationOutput

    app = slicer_headless.start()
    folder = data / "totalsegmentator"
    volume = app.load_volume(folder / "example_ct_sm.nii.gz", "CT abdomen")
    reference = sitk.ReadImage(str(folder / "example_seg.nii.gz"))
    labels = remap_labels(sitk.GetArrayFromImage(reference), "totalseg_total").astype(np.uint8)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    model = ModelInfo(id="reference", name="reference", title="reference labels", sha256="ab" * 32,
                      classes=list(CLASS_NAMES))
    result = SegmentationOutput(labels=labels, confidence=labels, model=model,
                                volumes_ml=organ_volumes_ml(image, CLASS_NAMES), device="cpu", seconds=1.0)
    segmentation = HSAMSlicerLogic(app.scene).apply_result(volume, result, RunOptions(model="reference",
                                                                                      show_3d=False))
    return app, volume, segmentation, labels


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from hsam.errors import HSAMError

    action, args = argv[0], argv[1:]
    try:
        if action == "labels":
            from hsam.volume import write_labels

            image = labels_volume(int(args[1]), int(args[2]))
            for _ in range(int(args[3]) if len(args) > 3 else 1):
                write_labels(image, args[0])
        elif action == "model":
            from hsam.model.checkpoint import save_model

            model, card = tiny_model(int(args[1]))
            save_model(model, card, args[0])
        elif action == "install":
            from hsam.weights.store import import_model

            for _ in range(int(args[1]) if len(args) > 1 else 1):
                import_model(args[0])
        elif action == "fetch":
            from hsam.weights.fetch import fetch

            fetch(args[0])
        elif action == "export":
            _, volume, segmentation, _ = slicer_case(Path(args[0]))
            from HSAMSlicerLib.export import export_case

            for _ in range(int(args[3]) if len(args) > 3 else 1):
                print(export_case(segmentation, args[1], case_name=args[2]), flush=True)
        elif action == "cli":
            from hsam.cli import main as cli

            return cli(args)
        else:
            raise SystemExit(f"unknown action {action}")
    except HSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 (reported to the parent test, which fails on it)
        print(f"unexpected {type(error).__name__}: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main(sys.argv[1:]))
