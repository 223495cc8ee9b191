"""What the CLI prints reads right: plurals that agree with their counts, no rate over a
duration too short to measure one, and docs that say what the commands do."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import Running, prompt_call

ROOT = Path(__file__).resolve().parents[1]
WATCHLLM = [sys.executable, "-m", "watchllm_ext.cli"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WATCHLLM, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_demo_of_one_run_says_one_model_from_one_provider(server: Running) -> None:
    done = cli("demo", "--url", server.url, "--key", server.key, "--events", "2", "--days", "1")
    assert done.returncode == 0, done.stderr
    assert "Loaded 2 demo events (1 run over the last 1 day) into project acme" in done.stdout
    assert "  1 model from 1 provider: " in done.stdout, done.stdout
    assert "0 failed or timed-out calls, 0 slow calls" in done.stdout
    assert not re.search(r"\b1 (models|providers|runs|days)\b", done.stdout), done.stdout


def test_export_of_a_few_rows_prints_no_rate(server: Running, tmp_path: Path) -> None:
    r = server.client.post(
        "/v1/events/batch", headers=server.headers(), json={"events": [prompt_call("x1")]}
    )
    assert r.status_code == 202, r.text
    server.flush()
    server.stop()  # the folder is open in one process only
    out = tmp_path / "export"
    done = cli("export", "--data-dir", str(server.settings.data_dir), str(out))
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("exported "))
    assert line.startswith("exported 1 row in 1 file ("), line
    took = re.search(r" in ([\d.]+) s", line)
    assert took, line
    if float(took.group(1)) < 0.95:  # under a second (shown rounded to 0.1 s)
        assert "rows/s" not in line, line


def test_a_rate_is_shown_only_over_a_second_or_more() -> None:
    from watchllm_ext.store.transfer import MIN_RATE_S, _rate

    assert _rate(3, 0.13) == ""  # 23 rows/s would be noise
    assert _rate(0, 0.0) == ""
    assert _rate(3_000, 2.0) == "1,500 rows/s"
    assert _rate(55_000, MIN_RATE_S) == "55,000 rows/s"


def test_durability_doc_says_which_dead_letter_command_needs_the_server_stopped(
    tmp_path: Path,
) -> None:
    """`dead-letter list` reads the files (it works while serve runs); only `replay`, which
    writes into the spool, refuses a spool another process holds (test_startup_errors)."""
    text = (ROOT / "docs" / "DURABILITY.md").read_text()
    section = text.split("## Dead letters", 1)[1].split("\n## ", 1)[0]
    stopped, running = [], []
    for marker, block in re.findall(
        r"(<!-- docs-test: no server -->\n)?```bash\n(.*?)```", section, re.S
    ):
        for line in block.splitlines():
            if line.startswith("watchllm dead-letter") and "--url" not in line:
                (stopped if marker else running).append(line.split("#")[0].split())
    assert stopped and all(cmd[2] == "replay" for cmd in stopped), stopped
    assert running and all(cmd[2] == "list" for cmd in running), running
    assert "works whether the server\nruns or not" in section
    # And so the CLI does, in a folder whose spool another process holds.
    env = {**os.environ, "WATCHLLM_DATA_DIR": str(tmp_path / "data")}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from watchllm_ext.locks import"
            " FolderLock; lock = FolderLock(Path(sys.argv[1]), 'spool');"
            " print('held', flush=True); time.sleep(600)",
            str(tmp_path / "data" / "spool"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        for cmd in running:
            done = subprocess.run(
                [*WATCHLLM, *cmd[1:]], capture_output=True, text=True, env=env, check=False
            )
            assert done.returncode == 0, done.stderr
        for cmd in stopped:
            done = subprocess.run(
                [*WATCHLLM, *cmd[1:]], capture_output=True, text=True, env=env, check=False
            )
            assert done.returncode == 1 and "is in use by process" in done.stderr
    finally:
        holder.kill()
        holder.wait(timeout=30)
        assert holder.stdout is not None
        holder.stdout.close()
