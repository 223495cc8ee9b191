"""The golden path: send an event over HTTP, wait until the analytics API shows it.

    python examples/golden_path.py --url http://127.0.0.1:8787 --key $KEY
    python examples/golden_path.py           # on a temporary server of its own

`--url` and `--key` default to $WATCHLLM_BASE_URL and $WATCHLLM_API_KEY; with no URL at all
it starts a temporary server. Prints "Success: Event logged, processed, and visible in API."
or names the step that failed (a server that is not there fails at step 'health') in one
line and exits 1. The same as `watchllm golden-path`.
"""

from __future__ import annotations

import argparse
import os
import sys

from watchllm_ext.golden_path import StepFailed, run, run_on_scratch_server


def main() -> int:
    parser = argparse.ArgumentParser(description="Send an event and see it in the API.")
    parser.add_argument(
        "--url",
        default=os.environ.get("WATCHLLM_BASE_URL"),
        help="the server (default: $WATCHLLM_BASE_URL, else a temporary one)",
    )
    parser.add_argument(
        "--key",
        default=os.environ.get("WATCHLLM_API_KEY"),
        help="an admin key for --url (default: $WATCHLLM_API_KEY)",
    )
    args = parser.parse_args()
    if args.url and not args.key:
        parser.error("--url needs --key (or WATCHLLM_API_KEY): a key with ingest and read scopes")
    try:
        if args.url:
            run(args.url, args.key)
        else:
            run_on_scratch_server()
    except StepFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
