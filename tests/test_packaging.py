"""What a built wheel holds: every package of the source tree, so a non-editable install imports what the tests do."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_of_the_source_tree_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "lorabridge").rglob("__init__.py")}
    assert found - listed == set(), "packages missing from pyproject.toml [tool.setuptools] packages"


def test_every_data_file_of_an_architecture_is_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]["package-data"]
    for json_file in (ROOT / "lorabridge" / "architectures").rglob("*.json"):
        package = ".".join(json_file.parent.relative_to(ROOT).parts)
        assert "*.json" in data.get(package, []), f"{json_file.relative_to(ROOT)} is not package data"
