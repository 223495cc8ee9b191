"""What an operator following the docs met at the `watchllm` command: a revoked key's
secret printed back, an error's source misnamed, a multi-line error with one prefix, help
that said what the server refuses, and flags taken without effect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import clear_watchllm_env

from watchllm_ext.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_watchllm_env(monkeypatch, tmp_path)


def test_revoking_by_the_whole_key_prints_only_its_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["keys", "create", "--project", "p", *data]) == 0
    key = capsys.readouterr().out.splitlines()[-1]
    secret = key.split("_", 2)[2]
    assert main(["keys", "revoke", key, *data]) == 0
    assert main(["keys", "revoke", key, *data]) == 1  # revoked already
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    assert out.out.startswith(f"revoked {key.split('_')[1]};")


def test_a_bad_host_from_the_environment_is_named_so(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WATCHLLM_HOST": "999.1.1.1"}
    done = subprocess.run(
        [sys.executable, "-m", "watchllm_ext.cli", "serve", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot listen on 999.1.1.1:8787:")
    assert done.stderr.rstrip().endswith("(env WATCHLLM_HOST)"), done.stderr


def test_every_line_of_a_settings_error_is_prefixed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WATCHLLM_PORT", "abc")
    monkeypatch.setenv("WATCHLLM_FLUSH_INTERVAL_S", "soon")
    assert main(["keys", "list"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: invalid setting ") for line in lines)


def test_help_says_which_key_changes_usage_and_the_default_scope(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in (["usage", "set"], ["keys", "create"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "an operator API key for --url" in text
    assert "admin (its own project) or operator" not in text  # an admin key gets 403
    assert "default: ingest" in text


def test_cluster_without_print_sql_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["migrate", "--cluster", "c1", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --cluster only goes with --print-sql")
    assert not (tmp_path / "data").exists()  # nothing opened or applied


def test_listing_or_revoking_keys_where_there_is_no_key_file_says_so_and_makes_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "elsewhere"
    for command in (["keys", "list"], ["keys", "revoke", "abcdefabcdef"]):
        assert main([*command, "--data-dir", str(data)]) == 1
        err = capsys.readouterr().err
        assert f"no key file at {data / 'keys.sqlite3'}" in err, err
    assert not data.exists()  # neither an empty key file nor its folder
    assert main(["keys", "create", "--project", "p", "--data-dir", str(data)]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--data-dir", str(data)]) == 0
    assert " p " in capsys.readouterr().out
