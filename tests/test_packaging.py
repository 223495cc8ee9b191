"""The distribution ships every package of the core: pyproject.toml lists packages by name
(plugins/, contrib/ and clickhouse/ install under other names), so a new subpackage left out
of the list would work in this editable checkout and be missing from a wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_core_package_is_in_the_distribution() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    core = ROOT / "watchllm_ext"
    folders = {p.parent for p in core.rglob("*.py") if "__pycache__" not in p.parts}
    for folder in sorted(folders):
        assert (folder / "__init__.py").is_file(), f"{folder} holds modules but no __init__.py"
        name = ".".join(folder.relative_to(ROOT).parts)
        assert name in listed, f"{name} is not in pyproject.toml's [tool.setuptools] packages"
