"""The golden path: send an event over HTTP, wait until the analytics API shows it.

    python examples/golden_path.py --url http://127.0.0.1:8787 --key wllm_...
    python examples/golden_path.py           # on a temporary server of its own

Prints "Success: Event logged, processed, and visible in API." or names the step that
failed and exits 1. The same as `watchllm golden-path`.
"""

from __future__ import annotations

import argparse
import sys

from watchllm_ext.golden_path import StepFailed, run, run_on_scratch_server

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--key")
    args = parser.parse_args()
    try:
        if args.url:
            run(args.url, args.key or "")
        else:
            run_on_scratch_server()
    except StepFailed as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
