"""The docs are tested: every shell and Python block of README.md and docs/*.md runs, in order,
against a real `watchllm serve` started the way the README's quick start says.

The rule:

- Runnable blocks are fenced ```bash, ```sh, ```shell, ```console (its `$ ` lines) and
  ```python. Other fences (output, JSON, TOML, SQL, plain text) are shown, not run.
- A block that cannot run here has `<!-- docs-test: skip (reason) -->` on the line right
  before its fence. Every skip is listed in SKIPPED below, so a new one is a visible change.
- A block for when the server is stopped (commands that open its data folder, which one
  process at a time may hold) has `<!-- docs-test: no server -->` right before its fence: the
  test stops the server before it and starts it again (`watchllm serve`) after it.
- Each file runs in a fresh temporary folder (the cwd), so `./.watchllm` is the server's own
  data folder, as in the quick start. A file whose first block does not start the server gets
  `watchllm serve` run first, exactly as the README runs it.
- `watchllm serve` in a block starts the server in the background (a reader runs it in
  another terminal) and waits until it answers /healthz; a later `watchllm serve` stops the
  previous one first. `pip install` lines are not run: the package under test is installed.
- The blocks of one file share one shell state (what a reader's terminal keeps): variables a
  block sets are seen by the next blocks. The reader's keys come from the first start's
  output: `KEY` (and `ADMIN_KEY`, which it is: the first key is an admin key of `default`),
  `OPERATOR_KEY` (made by `watchllm keys create --project ops --scope operator`), and in
  docs/ also `WATCHLLM_API_KEY`, which the README exports. A placeholder line such as
  `KEY=wllm_...` keeps that real key instead of the placeholder.
- Shell blocks run with `set -eo pipefail`. Every curl answer's status is checked: a 4xx is a
  failure unless the block shows that error in its comments (`# 422 ...`, `# {"error": ...`);
  a 5xx always is. Python blocks run with `python` in the same folder and environment.
- The server listens on the docs' port, 8787. Only if that port is taken on this machine (a
  server of someone else's) do the blocks run against a free port, `:8787` replaced in them.

A failure names the doc file and line.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
RUN_LANGS = SHELL_LANGS | {"python"}
DOCS_PORT = 8787
BLOCK_TIMEOUT_S = 120

FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
SKIP_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
NO_SERVER_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*no server\s*-->\s*$")
ANY_MARKER = re.compile(r"<!--\s*docs-test")
PLACEHOLDER = re.compile(r"^(?P<indent>\s*)(?P<name>[A-Z_][A-Z0-9_]*)=wllm_\.\.\.(?=\s|$)", re.M)
# A comment showing an error answer: `# 422: ...`, `# 400 ...`, `# {"error": ...`.
SHOWS_ERROR = re.compile(r"#\s*(4\d\d\b|\{\s*\"error\")")
SERVE = re.compile(r"\bwatchllm\s+serve\b")

# Every skipped block: (file, its first line). Keep this short; each has its reason in the doc.
SKIPPED: set[tuple[str, str]] = {
    ("README.md", "pip install -e '.[test]' && python -m pytest"),
    (
        "docs/BENCHMARKS.md",
        "python bench/bench_ingest.py --part batch --batches 100 --rounds 3 --only clickhouse"
        " --only nosink",
    ),
    ("docs/DASHBOARD.md", "python bench/bench_dashboard.py --events 10000000"),
    (
        "docs/DEPLOY.md",
        "export WATCHLLM_CLICKHOUSE_URL='https://watchllm:secret@ch.example.com:8443/watchllm'",
    ),
    (
        "docs/DEPLOY.md",
        "cp clickhouse/server/config.d/watchllm.xml /etc/clickhouse-server/config.d/",
    ),
    (
        "docs/DEPLOY.md",
        "export WATCHLLM_CLICKHOUSE_URL='http://watchllm:secret@ch-1a:8123/watchllm'",
    ),
    ("docs/DEPLOY.md", "pip install -e '.[test]'"),
    ("docs/DEPLOY.md", "WATCHLLM_HEADER_TIMEOUT_S=5 WATCHLLM_BODY_TIMEOUT_S=120 watchllm serve"),
    ("docs/DEPLOY.md", "import uvicorn"),
    (
        "docs/MOVING.md",
        "watchllm export ./watchllm-export                  # the embedded folder -> Parquet + "
        "manifest",
    ),
    ("docs/MOVING.md", "watchllm export /backup/watchllm-2026-11-25 --data-dir /var/lib/watchllm"),
    (
        "docs/MOVING.md",
        "export WATCHLLM_CLICKHOUSE_URL='https://watchllm:secret@ch.example.com:8443/watchllm'",
    ),
    (
        "docs/MOVING.md",
        "WATCHLLM_CLICKHOUSE_URL='https://watchllm:secret@ch.example.com:8443/watchllm' watchllm "
        "serve",
    ),
    (
        "docs/MOVING.md",
        "WATCHLLM_CLICKHOUSE_URL='https://watchllm:secret@ch.example.com:8443/watchllm' \\",
    ),
    ("docs/MOVING.md", "watchllm import /backup/watchllm-2026-11-25 --resume"),
    ("docs/QUOTAS.md", "python bench/bench_quota.py --quick"),
    ("docs/SDK.md", "from openai import OpenAI"),
    ("docs/SDK.md", "from anthropic import Anthropic"),
    ("docs/SDK.md", "from watchllm_ext.sdk import WatchLLM"),
    ("docs/OPENTELEMETRY.md", "from openai import OpenAI"),
    (
        "docs/OPENTELEMETRY.md",
        "python bench/bench_otlp.py --only watchllm --rate 0 --before HEAD~5 --rounds 3",
    ),
    (
        "docs/OPENTELEMETRY.md",
        "from openinference.instrumentation.openai import OpenAIInstrumentor",
    ),
}


@dataclass
class Block:
    """One fenced block of a doc: where it is, what it is, and why it is skipped (if it is)."""

    path: str  # relative to the repository, e.g. "docs/API.md"
    line: int  # the line of its opening fence (1-based)
    lang: str
    code: str
    skip: str | None = None
    no_server: bool = False  # the block is for a stopped server (its folder is free)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def first_line(self) -> str:
        return next((s.strip() for s in self.code.splitlines() if s.strip()), "")


def parse_blocks(doc: Path, root: Path = ROOT) -> tuple[list[Block], list[int]]:
    """The fenced blocks of a doc and the lines of any docs-test marker that is not right
    before a fence (a marker that skips nothing is a mistake to report)."""
    rel = doc.relative_to(root).as_posix()
    lines = doc.read_text().splitlines()
    blocks: list[Block] = []
    stray: list[int] = []
    markers = {i for i, text in enumerate(lines) if ANY_MARKER.search(text)}
    used: set[int] = set()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = len(m["indent"]), m["lang"].lower()
        end = i + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        # a fence indented in a list item: its lines lose that indent, and only that
        body = [
            text[indent:] if not text[:indent].strip() else text.lstrip()
            for text in lines[i + 1 : end]
        ]
        skip, no_server = None, False
        if i > 0 and (sm := SKIP_MARKER.match(lines[i - 1])):
            skip = sm["reason"].strip()
            used.add(i - 1)
        elif i > 0 and NO_SERVER_MARKER.match(lines[i - 1]):
            no_server = True
            used.add(i - 1)
        blocks.append(Block(rel, i + 1, lang, "\n".join(body) + "\n", skip, no_server))
        i = end + 1
    stray = sorted(n + 1 for n in markers - used)
    return blocks, stray


def runnable(doc: Path) -> list[Block]:
    return [b for b in parse_blocks(doc)[0] if b.lang in RUN_LANGS and b.skip is None]


# The shell every block runs in: the reader's terminal, with the few stand-ins the rule names.
PRELUDE = r"""
set -a            # what a block sets is exported, so the next blocks (and python) see it
set -eo pipefail
pip() {
  if [ "${1:-}" = install ]; then
    echo "docs-test: not run: pip $* (the package under test is installed)"; return 0
  fi
  command pip "$@"
}
_docs_where() {  # the failing line of the block file, whichever frame it is in
  local i line="$1"
  for i in "${!BASH_SOURCE[@]}"; do
    [ "$i" -gt 0 ] && line="${BASH_LINENO[$((i - 1))]}"
    case "${BASH_SOURCE[$i]}" in
      */block*.sh) echo "docs-test: failed at block line $line" >&2; return;;
    esac
  done
}
curl() {  # every answer's status on stderr, for the test to check
  command curl -w "%{stderr}docs-test: HTTP %{http_code} at block line ${BASH_LINENO[0]}\n" "$@"
}
_docs_stop() {
  local pid
  pid=$(cat "$DOCS_DIR/serve.pid" 2>/dev/null) || return 0
  rm -f "$DOCS_DIR/serve.pid"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}
watchllm() {
  if [ "${1:-}" != serve ]; then command watchllm "$@"; return; fi
  # A reader runs the server in its own terminal: here it runs in the background.
  _docs_stop
  local n log pid url
  n=$(( $(cat "$DOCS_DIR/serves" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$DOCS_DIR/serves"
  log="$DOCS_DIR/serve.$n.log"
  setsid watchllm_real_serve "$@" > "$log" 2>&1 < /dev/null &
  pid=$!; echo "$pid" > "$DOCS_DIR/serve.pid"
  for _ in $(seq 600); do
    url=$(sed -n 's/^.*listening on \(http[^ ]*\).*$/\1/p' "$log" | head -n 1)
    if [ -n "$url" ] && command curl -sf -o /dev/null "$url/healthz"; then cat "$log"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      cat "$log"; echo "docs-test: watchllm serve exited" >&2; return 1
    fi
    sleep 0.1
  done
  cat "$log"; echo "docs-test: watchllm serve did not answer /healthz in 60 s" >&2; return 1
}
"""

STATUS = re.compile(r"^docs-test: HTTP (\d{3}) at block line (\d+)$", re.M)
ERR_LINE = re.compile(r"^docs-test: failed at block line (\d+)$", re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Session:
    """One doc file's terminal: a temp cwd, its shell state and the server it started."""

    dir: Path
    port: int
    env: dict[str, str] = field(default_factory=dict)
    count: int = 0

    def __post_init__(self) -> None:
        bindir = self.dir / ".docs-test-bin"
        bindir.mkdir(parents=True)
        # `setsid` needs a program, not a shell function: the real `watchllm`, by full path.
        real = Path(sys.executable).with_name("watchllm")
        wrapper = bindir / "watchllm_real_serve"
        wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(str(real))} "$@"\n')
        wrapper.chmod(0o755)
        (self.dir / "prelude.sh").write_text(PRELUDE)
        (self.dir / "state.sh").write_text("")
        self.env = {
            **os.environ,
            "PATH": f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
            f"{os.environ.get('PATH', '')}",
            "DOCS_DIR": str(self.dir),
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("WATCHLLM_API_KEY", "WATCHLLM_BASE_URL", "KEY", "ADMIN_KEY", "OPERATOR_KEY"):
            self.env.pop(name, None)
        if self.port != DOCS_PORT:
            self.env["WATCHLLM_PORT"] = str(self.port)

    def adapt(self, code: str) -> str:
        if self.port != DOCS_PORT:
            code = code.replace(f":{DOCS_PORT}", f":{self.port}")
        return code

    def shell(self, block: Block, code: str) -> subprocess.CompletedProcess[str]:
        """Run shell code in the file's state; the state it leaves is kept for the next."""
        self.count += 1
        script = self.dir / f"block{self.count}.sh"
        script.write_text(code)
        runner = (
            'source "$DOCS_DIR/prelude.sh"; source "$DOCS_DIR/state.sh"\n'
            # the block's line that failed, also when it failed inside a prelude function
            "set -E; trap '_docs_where $LINENO' ERR\n"
            f'source "{script}"\n'
            "trap - ERR\n"
            # the terminal's state for the next block: variables and the cwd
            "export -p | grep -Ev '^declare -x (PWD|OLDPWD|SHLVL|_)=' > \"$DOCS_DIR/state.sh\"\n"
            'echo "cd $(printf %q "$PWD")" >> "$DOCS_DIR/state.sh"\n'
        )
        return self._bash(runner)

    def _bash(self, runner: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", runner],
            cwd=self.dir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT_S,
        )

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        self.count += 1
        script = self.dir / f"block{self.count}.py"
        script.write_text(code)
        runner = f'source "$DOCS_DIR/state.sh"; python "{script}"'
        return self._bash(runner)

    def remember(self, **values: str) -> None:
        with (self.dir / "state.sh").open("a") as state:
            for name, value in values.items():
                state.write(f"export {name}={shlex.quote(value)}\n")

    def first_start(self, readme: bool) -> None:
        """After the first `watchllm serve`: the reader's keys, from what it printed."""
        log = self.dir / "serve.1.log"
        text = log.read_text() if log.exists() else ""
        key = re.search(r"Key: (wllm_\S+)", text)
        url = re.search(r"listening on (http\S+)", text)
        assert key and url, f"the first `watchllm serve` printed no key and URL:\n{text}"
        operator = (
            subprocess.run(
                ["watchllm", "keys", "create", "--project", "ops", "--scope", "operator"],
                cwd=self.dir,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        keys = {"KEY": key[1], "ADMIN_KEY": key[1], "OPERATOR_KEY": operator}
        if not readme:  # a reader of docs/ has done the README's `export WATCHLLM_API_KEY=$KEY`
            keys["WATCHLLM_API_KEY"] = key[1]
        self.remember(**keys)

    def stop(self) -> None:
        pidfile = self.dir / "serve.pid"
        if not pidfile.exists():
            return
        pid = int(pidfile.read_text())
        pidfile.unlink()
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def shell_code(block: Block) -> str:
    code = block.code
    if block.lang == "console":  # the commands are the `$ ` lines; the rest is their output
        code = "\n".join(s[2:] for s in code.splitlines() if s.startswith("$ ")) + "\n"
    # `KEY=wllm_...` stands for the reader's key: keep the real one the shell has.
    return PLACEHOLDER.sub(lambda m: f'{m["indent"]}: "${{{m["name"]}:?}}"', code)


def starts_server(block: Block) -> bool:
    """Whether a block runs `watchllm serve` (in a command, not in a comment)."""
    code = "\n".join(re.sub(r"(^|\s)#.*$", "", line) for line in block.code.splitlines())
    return block.lang in SHELL_LANGS and bool(SERVE.search(code))


def failure(
    block: Block, proc: subprocess.CompletedProcess[str], why: str, at: int | None = None
) -> str:
    """The message of a failed block: the doc's file and line first (`at`: within the block)."""
    line = block.line if at is None else block.line + at
    # the line within the block: from the shell's ERR trap, or a Python traceback's last frame
    found = ERR_LINE.findall(proc.stderr) if at is None else []
    if not found and block.lang == "python":
        found = re.findall(r'block\d+\.py", line (\d+)', proc.stderr)
    if found:
        line = block.line + int(found[-1])
    return (
        f"{block.path}:{line} ({block.lang} block at line {block.line}): {why}\n"
        f"--- block ---\n{block.code}--- stdout ---\n{proc.stdout[-4000:]}"
        f"--- stderr ---\n{proc.stderr[-4000:]}"
    )


DOCS = [doc for doc in DOC_FILES if runnable(doc)]


def run_blocks(blocks: list[Block], readme: bool, tmp_path: Path) -> None:
    """Run a doc's runnable blocks in order, in one terminal, against a real server; the
    first failure is an AssertionError naming the doc's file and line."""
    port = DOCS_PORT if not port_taken(DOCS_PORT) else free_port()
    session = Session(tmp_path, port)
    try:
        started = False
        if not starts_server(blocks[0]):  # then the server of the README's quick start
            proc = session.shell(blocks[0], "watchllm serve\n")
            assert proc.returncode == 0, f"watchllm serve, as the README runs it:\n{proc.stderr}"
            session.first_start(readme)
            started = True
        for block in blocks:
            if block.no_server:
                session.stop()
            if block.lang == "python":
                proc = session.python(session.adapt(block.code))
                assert proc.returncode == 0, failure(block, proc, f"exit {proc.returncode}")
            else:
                proc = session.shell(block, session.adapt(shell_code(block)))
                assert proc.returncode == 0, failure(block, proc, f"exit {proc.returncode}")
            allowed_4xx = bool(SHOWS_ERROR.search(block.code))
            for status, at in STATUS.findall(proc.stderr):
                bad = int(status) >= 500 or (int(status) >= 400 and not allowed_4xx)
                assert not bad, failure(block, proc, f"HTTP {status} from curl", int(at))
            if not started and (session.dir / "serve.1.log").exists():
                session.first_start(readme)
                started = True
            if block.no_server and started:
                proc = session.shell(block, "watchllm serve\n")
                assert proc.returncode == 0, f"{block.where}: watchllm serve again:\n{proc.stderr}"
    finally:
        session.stop()


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(ROOT).as_posix() for d in DOCS])
def test_doc_blocks_run(doc: Path, tmp_path: Path) -> None:
    run_blocks(runnable(doc), doc.name == "README.md", tmp_path)


@pytest.mark.slow
def test_a_broken_block_fails_naming_its_line(tmp_path: Path) -> None:
    """What the docs test catches, on a small doc against a real server: a 400 the block does
    not show, and a command that fails, each named by file and line; a 4xx the block shows
    in its comments is what it documents, and passes."""
    doc = tmp_path / "doc" / "SAMPLE.md"
    doc.parent.mkdir()
    doc.write_text(
        "```bash\n"
        'curl -s -H "Authorization: Bearer $KEY" \\\n'
        '  "http://127.0.0.1:8787/v1/analytics/stats?period=forever"\n'
        "```\n"
        "```bash\n"
        'curl -s -H "Authorization: Bearer $KEY" \\\n'
        '  "http://127.0.0.1:8787/v1/analytics/stats?period=forever"\n'
        '# {"error": "bad_parameter", "field": "period", ...}\n'
        "echo fine\n"
        "watchllm count-rows --url http://127.0.0.1:8787 --key $KEY --table no_such_table\n"
        "```\n"
    )
    blocks, _ = parse_blocks(doc, tmp_path / "doc")
    with pytest.raises(AssertionError, match=r"^SAMPLE\.md:2 \(bash block at line 1\): HTTP 400"):
        run_blocks(blocks[:1], False, tmp_path / "first")
    with pytest.raises(AssertionError, match=r"^SAMPLE\.md:10 \(bash block at line 5\): exit"):
        run_blocks(blocks[1:], False, tmp_path / "second")


SKIPS = [b for doc in DOC_FILES for b in parse_blocks(doc)[0] if b.skip is not None]


@pytest.mark.parametrize("block", SKIPS, ids=[b.where for b in SKIPS])
def test_skipped_block(block: Block) -> None:
    """One skip a skipped block, so that every run's summary (-ra) lists them with reasons."""
    pytest.skip(f"{block.where}: {block.skip}")


def test_skips_are_marked_and_listed() -> None:
    """Every skipped block has its reason in the doc and is in SKIPPED; every marker is right
    before a fence; nothing in SKIPPED is stale."""
    found: set[tuple[str, str]] = set()
    problems: list[str] = []
    for doc in DOC_FILES:
        blocks, stray = parse_blocks(doc)
        rel = doc.relative_to(ROOT).as_posix()
        problems += [f"{rel}:{n}: a docs-test marker not right before a fence" for n in stray]
        for block in blocks:
            if block.skip is None:
                continue
            if block.lang not in RUN_LANGS:
                problems.append(f"{block.where}: skip marker on a ```{block.lang} block")
            found.add((block.path, block.first_line))
            print(f"skipped: {block.where} ({block.skip}): {block.first_line}")
    problems += [f"skipped but not in SKIPPED: {p}" for p in sorted(found - SKIPPED)]
    problems += [f"in SKIPPED but not skipped in the docs: {p}" for p in sorted(SKIPPED - found)]
    assert not problems, "\n".join(problems)


def test_parser_reads_fences_markers_and_placeholders(tmp_path: Path) -> None:
    """The rule itself, on a small doc: which blocks run, which are skipped, stray markers."""
    doc = tmp_path / "sample.md"
    text = (
        "```bash\necho one\n```\n"
        "<!-- docs-test: skip (needs a ClickHouse server) -->\n```sh\nwatchllm migrate\n```\n"
        "```json\n{}\n```\n"
        "1. step\n\n   ```python\n   print(2)\n   ```\n"
        "<!-- docs-test: skip (nothing after me) -->\n\ntext\n"
    )
    doc.write_text(text)
    blocks, stray = parse_blocks(doc, tmp_path)
    assert [(b.line, b.lang, b.skip) for b in blocks] == [
        (1, "bash", None),
        (5, "sh", "needs a ClickHouse server"),
        (8, "json", None),
        (13, "python", None),
    ]
    assert blocks[3].code == "print(2)\n"
    assert stray == [16]
    placeholder = Block("x.md", 1, "bash", "KEY=wllm_...   # yours\n  ADMIN_KEY=wllm_...\n")
    assert shell_code(placeholder) == ': "${KEY:?}"   # yours\n  : "${ADMIN_KEY:?}"\n'
    console = Block("x.md", 1, "console", "$ echo hi\nhi\n")
    assert shell_code(console) == "echo hi\n"
