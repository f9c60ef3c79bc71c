"""The packaging metadata stays true to the source tree."""

from __future__ import annotations

import tomllib

from conftest import REPOSITORY


def test_every_hsam_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    source = REPOSITORY / "HSAMSlicer"
    found = {
        ".".join(init.parent.relative_to(source).parts) for init in source.glob("hsam/**/__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert "hsam.resources" in listed


def test_readme_commands_are_marked_for_ci():
    readme = (REPOSITORY / "README.md").read_text()
    for marker in ("main-command", "test-command"):
        assert f"<!-- {marker} -->" in readme and f"<!-- /{marker} -->" in readme


def test_every_data_file_of_the_hsam_package_is_in_package_data():
    """A data file that no package-data pattern matches is silently left out of the wheel."""
    data = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = REPOSITORY / "HSAMSlicer" / "hsam"
    files = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")
             and "__pycache__" not in p.parts}
    shipped = {p for pattern in data["hsam"] + data["*"] for p in package.glob(pattern)}
    for name, patterns in data.items():  # a subpackage's own data (hsam.sample_data), relative to its folder
        if name.startswith("hsam.") and name != "hsam.resources":
            shipped |= {p for pattern in patterns for p in package.joinpath(*name.split(".")[1:]).glob(pattern)}
    assert files, "no data files found"
    assert files <= shipped, f"add {sorted(str(p.relative_to(package)) for p in files - shipped)} to package-data"
