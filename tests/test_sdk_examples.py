"""The SDK's examples run as their docstrings say (examples/sdk_*.py), against a real server;
the OpenAI one against the local fake provider (OPENAI_BASE_URL, which the openai package
reads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Running
from fake_llm import FakeLLM
from test_examples import App, documented, shell

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_sdk_agent_as_documented(server: Running) -> None:
    serve, run = documented("sdk_agent.py")
    assert serve.startswith("watchllm serve")
    done = shell(run.replace("http://127.0.0.1:8787", server.url), KEY=server.key)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "Paris: sunny, Rome: sunny"
    assert "events sent, 0 dropped" in lines[1]
    tree = "\n".join(lines[2:])
    # Each node named: the run's step, its steps, the tools, the model, the error's type.
    assert tree.startswith("- agent_step weather-question (success)\n  - agent_step answer")
    assert "\n    - agent_step plan (success)" in tree  # root > answer > plan
    assert tree.count("\n    - tool_call weather (success)") == 3  # root > answer > weather
    assert "\n    - error LookupError\n" in tree + "\n"
    assert "\n      - prompt_call gpt-4o-mini (success)" in tree  # root > answer > plan > call


def test_sdk_openai_as_documented(server: Running) -> None:
    _, run = documented("sdk_openai.py")
    with FakeLLM() as llm:
        done = shell(
            run.replace("http://127.0.0.1:8787", server.url),
            KEY=server.key,
            OPENAI_API_KEY="sk-fake",
            OPENAI_BASE_URL=llm.openai_url,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[:2] == [llm.reply, llm.reply]
        assert "4 events sent, 0 dropped" in done.stdout  # 3 calls and the run's root
        assert [path for path, _ in llm.requests] == ["/v1/chat/completions"] * 3
    server.flush()
    rows = server.query("SELECT model, tokens_output FROM events WHERE event_type = 'prompt_call'")
    assert rows == [{"model": "gpt-4o-mini", "tokens_output": 5}] * 3


OFFLINE_MODEL = "http://127.0.0.1:8000/fake-llm/v1"


def test_sdk_openai_offline_against_the_fastapi_apps_fake_model(
    server: Running, tmp_path: Path
) -> None:
    """Without an OpenAI key, as the OpenAI examples' docstrings say: examples/fastapi_app.py
    (started by its own documented line) serves the fake model the example then calls."""
    for example in ("sdk_openai.py", "otel_openai.py"):
        said = " ".join((EXAMPLES / example).read_text().split('"""')[1].split())
        served = "`python examples/fastapi_app.py` serves a fake OpenAI-compatible model at"
        assert f"{served} {OFFLINE_MODEL}" in said, example
    start = documented("fastapi_app.py")[1]
    _, run = documented("sdk_openai.py")
    app = App(start, tmp_path / "app")
    try:
        done = shell(
            run.replace("http://127.0.0.1:8787", server.url),
            KEY=server.key,
            OPENAI_API_KEY="any",
            OPENAI_BASE_URL=OFFLINE_MODEL.replace("8000", str(app.port)),
        )
    finally:
        app.stop()
    assert done.returncode == 0, done.stderr
    assert "4 events sent, 0 dropped" in done.stdout  # 3 calls and the run's root
    server.flush()
    rows = server.query("SELECT count() AS n FROM events WHERE event_type = 'prompt_call'")
    assert rows == [{"n": 3}]


def test_the_openai_examples_without_a_key_say_so_in_one_line() -> None:
    for example in ("sdk_openai.py", "otel_openai.py"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / example)],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done
        assert done.stderr.splitlines() == [
            "error: set OPENAI_API_KEY: this example calls the model (for an OpenAI-compatible"
            " server, OPENAI_BASE_URL and any key it takes; offline, the fake one that"
            " examples/fastapi_app.py serves: OPENAI_BASE_URL=http://127.0.0.1:8000/fake-llm/v1)"
        ], (example, done.stderr)
