"""Slice embeddings kept by an automatic run (``hsam segment --keep-embeddings``) and read by the prompt tools: the
same embeddings the prompt session would compute, used only for the same volume, encoder and window, never trusted
half-written, and never able to fail the run that keeps them."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import needs_litemedsam

from hsam.pipeline.options import SegmentOptions
from hsam.prompting.kept import INDEX, EmbeddingWriter, KeptEmbeddings

pytestmark = needs_litemedsam
FIRST, SLICES = 13, 3  # a few slices of the sample CT through liver, spleen and kidneys


@pytest.fixture(scope="module")
def ct(real_data) -> sitk.Image:
    image = sitk.ReadImage(str(real_data / "totalsegmentator" / "example_ct_sm.nii.gz"))
    return image[:, :, FIRST:FIRST + SLICES]


@pytest.fixture(scope="module")
def demo():
    from hsam.weights.store import load_named_model

    return load_named_model(None, device="cpu")


@pytest.fixture(scope="module")
def kept_run(ct, demo, tmp_path_factory):
    """One automatic run of the demo model that keeps its embeddings, and its folder."""
    from hsam.pipeline.run import segment_volume

    folder = tmp_path_factory.mktemp("kept") / "embeddings"
    options = SegmentOptions(device="cpu", mode="eager", slab=False, check_orientation=False,
                             keep_embeddings=str(folder))
    return segment_volume(ct, *demo, options), folder


def test_the_run_keeps_every_encoded_slice_and_its_labels_do_not_change(ct, demo, kept_run):
    from hsam.pipeline.run import segment_volume

    result, folder = kept_run
    assert result.embeddings == str(folder)
    index = json.loads((folder / INDEX).read_text())
    assert index["slices"] == list(range(SLICES)) and index["depth"] == SLICES
    plain = segment_volume(ct, *demo, SegmentOptions(device="cpu", mode="eager", slab=False,
                                                     check_orientation=False))
    assert np.array_equal(sitk.GetArrayFromImage(result.labels), sitk.GetArrayFromImage(plain.labels))


def test_a_prompt_session_reads_the_kept_embedding_instead_of_encoding(ct, demo, kept_run):
    from hsam.pipeline.window import model_images
    from hsam.prompting.build import attach_kept, open_session
    from hsam.prompting.session import SlicePrompt

    session = open_session(ct, *demo)
    assert attach_kept(session, kept_run[1]) == ""
    embeddings = session.embeddings
    with torch.inference_mode():
        own = embeddings.encoder(model_images(embeddings.volume[2:3], embeddings.window_hu, 256, torch.device("cpu")))
    assert torch.allclose(embeddings.kept.get(2), own[0], atol=2e-3)  # stored as float16
    mask = session.set_prompt(5, 2, SlicePrompt(box=(20.0, 20.0, 70.0, 70.0)))
    assert mask.any() and embeddings.computed == 0, "the encoder did not run"


def test_kept_embeddings_of_another_volume_or_window_are_not_used(ct, demo, kept_run):
    from hsam.prompting.build import attach_kept, open_session

    other = sitk.Cast(ct, sitk.sitkFloat32) + 1.0
    session = open_session(other, *demo)
    assert "another volume" in attach_kept(session, kept_run[1]) and session.embeddings.kept is None
    session = open_session(ct, *demo)
    why = KeptEmbeddings.open(kept_run[1], session.embeddings.volume, session.embeddings.encoder, (-100.0, 200.0))[1]
    assert "another window" in why
    assert "no kept embeddings" in attach_kept(session, kept_run[1].parent / "nowhere")


def test_a_folder_being_rewritten_is_not_trusted(ct, demo, kept_run, tmp_path):
    from hsam.prompting.build import open_session

    session = open_session(ct, *demo)
    volume, encoder, window = session.embeddings.volume, session.embeddings.encoder, session.embeddings.window_hu
    writer = EmbeddingWriter(tmp_path, volume, encoder, window)
    writer.put([0, 1], torch.zeros(2, 256, 64, 64))
    assert KeptEmbeddings.open(tmp_path, volume, encoder, window)[0] is None, "no index before close()"
    writer.close()
    kept = KeptEmbeddings.open(tmp_path, volume, encoder, window)[0]
    assert kept is not None and 1 in kept and 2 not in kept and len(kept) == 2
    EmbeddingWriter(tmp_path, volume, encoder, window)  # a new run starts: the old index is gone at once
    assert KeptEmbeddings.open(tmp_path, volume, encoder, window)[0] is None


def test_a_full_disk_drops_the_keeping_not_the_run(ct, demo, tmp_path, monkeypatch):
    import errno

    from hsam.pipeline.run import segment_volume

    def disk_full(self, slices, embeddings):  # noqa: ANN001
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(EmbeddingWriter, "put", disk_full)
    options = SegmentOptions(device="cpu", mode="eager", slab=False, check_orientation=False,
                             keep_embeddings=str(tmp_path / "e"))
    result = segment_volume(ct[:, :, :2], *demo, options)
    assert result.embeddings is None
    assert any("No space left" in w and "the run goes on" in w for w in result.warnings)


def test_modes_with_approximate_embeddings_keep_nothing_and_say_why(ct, demo, tmp_path):
    from hsam.pipeline.run import segment_volume

    options = SegmentOptions(device="cpu", mode="int8", slab=False, check_orientation=False,
                             keep_embeddings=str(tmp_path / "e"))
    said: list[str] = []
    result = segment_volume(ct[:, :, :2], *demo, options, status=said.append)
    assert result.embeddings is None and not (tmp_path / "e").exists()
    assert any(s.startswith("--keep-embeddings: nothing kept: the int8 mode") for s in said)
    assert not any("keep" in w for w in result.warnings), "a status line, not a warning (Slicer asks on every run)"


def test_serve_takes_the_kept_embeddings_on_open_and_later(ct, demo, kept_run, tmp_path):
    from hsam.cli.serve import Server, serve

    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(ct, str(path))
    requests = [{"cmd": "open", "volume": str(path), "embeddings": str(kept_run[1])},
                {"cmd": "prompt", "organ": "liver", "slice": 2, "box": [20, 20, 70, 70]},
                {"cmd": "embeddings", "folder": str(tmp_path / "nowhere")},
                {"cmd": "embeddings", "folder": str(kept_run[1])}]
    server, answers = Server(None), io.StringIO()
    serve(server, io.StringIO("\n".join(json.dumps(r) for r in requests)), answers)
    opened, prompted, missing, again = [json.loads(line) for line in answers.getvalue().splitlines()]
    assert opened["kept_slices"] == SLICES and "kept_note" not in opened
    assert prompted["voxels"] > 0 and server.session.embeddings.computed == 0
    assert missing["kept_slices"] == 0 and "no kept embeddings" in missing["kept_note"]
    assert again["kept_slices"] == SLICES
