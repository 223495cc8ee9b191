"""Move the embedded store's data to a ClickHouse server: export, import, counts checked.

    python examples/move_to_server.py --url 'https://watchllm:secret@ch.example.com:8443/watchllm'
    python examples/move_to_server.py --data-dir /var/lib/watchllm --export-dir /backup/wl

Stop `watchllm serve` first (the data folder can be open in one process only). It runs
the two commands of docs/MOVING.md, as you would:

    watchllm export EXPORT_DIR --data-dir DATA_DIR
    watchllm import EXPORT_DIR --url URL

Without --export-dir the export goes to a temporary folder that is deleted once the import
has succeeded; if the import fails, the folder is kept and the command to resume is
printed. An --export-dir that already holds a finished export (a manifest.json) is imported
as it is, so `--export-dir DIR --resume` finishes an interrupted move. The URL defaults to
$WATCHLLM_CLICKHOUSE_URL. API keys are not copied: create keys for the server's WatchLLM.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WATCHLLM = [sys.executable, "-m", "watchllm_ext.cli"]


def run(*args: str, url: str | None = None) -> int:
    """Run `watchllm ARGS`; a URL goes in the environment, where `ps` does not show it."""
    env = dict(os.environ)
    if url is not None:
        env["WATCHLLM_CLICKHOUSE_URL"] = url
    shown = "WATCHLLM_CLICKHOUSE_URL=... " if url is not None else ""
    print(f"$ {shown}watchllm {' '.join(args)}", flush=True)
    return subprocess.run([*WATCHLLM, *args], check=False, env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url",
        default=os.environ.get("WATCHLLM_CLICKHOUSE_URL"),
        help="the ClickHouse server, http(s)://user:password@host:port/database"
        " (default: $WATCHLLM_CLICKHOUSE_URL)",
    )
    parser.add_argument("--data-dir", type=Path, help="the data folder (default: as `serve`)")
    parser.add_argument("--export-dir", type=Path, help="keep the export here")
    parser.add_argument(
        "--resume", action="store_true", help="finish an interrupted import of --export-dir"
    )
    args = parser.parse_args()
    if not args.url:
        parser.error("--url (or WATCHLLM_CLICKHOUSE_URL) is required")

    temporary = args.export_dir is None
    export_dir = args.export_dir or Path(tempfile.mkdtemp(prefix="watchllm-export-")) / "export"
    if (export_dir / "manifest.json").is_file():
        print(f"using the finished export in {export_dir}")
    else:
        data = ["--data-dir", str(args.data_dir)] if args.data_dir else []
        if run("export", str(export_dir), *data) != 0:
            if temporary:  # nothing worth keeping: a failed export is written again
                shutil.rmtree(export_dir.parent, ignore_errors=True)
            return 1
    resume = ["--resume"] if args.resume else []
    if run("import", str(export_dir), *resume, url=args.url) != 0:
        print(
            f"the export is kept in {export_dir}; once the cause is fixed, finish with:\n"
            f"  watchllm import {export_dir} --url URL --resume",
            file=sys.stderr,
        )
        return 1
    if temporary:
        shutil.rmtree(export_dir.parent)
    print("moved: point WatchLLM at the server with WATCHLLM_CLICKHOUSE_URL (docs/DEPLOY.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
