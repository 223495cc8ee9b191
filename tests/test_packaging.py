"""The editable install (what developers run) and the built wheel (what users get) expose the
same import names, files and entry points."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"watchllm_ext", "watchllm_plugins", "watchllm_contrib", "watchllm_clickhouse"}


def test_wheel_and_editable_install_agree(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("watchllm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        wheel_eps = zf.read(entry_points).decode()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == PACKAGES
    for name in names:
        if name.endswith((".py", ".sql")) and not name.split("/")[0].endswith(".dist-info"):
            package, _, rel = name.partition("/")
            # The same file is reachable under the same import name in the editable install.
            root = Path(importlib.import_module(package).__file__ or "").parent
            assert (root / rel).is_file(), name
    # ...and every source file of the repo is in the wheel (no subpackage left out).
    folders = {
        "watchllm_ext": "watchllm_ext",
        "watchllm_plugins": "plugins",
        "watchllm_contrib": "contrib",
        "watchllm_clickhouse": "clickhouse",
    }
    for package, folder in folders.items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sql") and "__pycache__" not in path.parts:
                rel = path.relative_to(ROOT / folder).as_posix()
                assert f"{package}/{rel}" in names, f"{folder}/{rel} is missing from the wheel"
    installed = {
        (ep.group, ep.name, ep.value) for ep in metadata.distribution("watchllm").entry_points
    }
    for group, name, value in installed:
        assert f"[{group}]" in wheel_eps and f"{name} = {value}" in wheel_eps
    assert ("watchllm", "chdb_store", "watchllm_plugins.chdb_store") in installed
