"""The HTTP protocol's own cost a request, in-process: WatchLLM's (`serving.uvicorn_options`:
the header deadline, header checks, one send per answer) against uvicorn's HttpToolsProtocol.

    python bench/bench_protocol.py                # 100,000 requests a variant, 5 rounds
    python bench/bench_protocol.py --requests 20000 --rounds 1

One protocol object is fed one single-event POST at a time through `data_received`, with a
transport that only counts writes and an ASGI app that reads the body and answers 202: no
socket, no kernel, no WatchLLM app, so what is measured is the protocol's Python (parsing
callbacks, the request cycle, our additions). Each variant runs in its own process, rounds
alternating; the figure is the event loop thread's CPU time a request (median of rounds), and
the ratio to uvicorn's protocol measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Any

BODY = b'{"event_type":"prompt_call","model":"gpt-4o","tokens_input":10}' * 10
REQUEST = (
    b"POST /v1/projects/bench/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    b"Authorization: Bearer wllm_0123456789ab_0123456789abcdefghijklmnopqrstuvwxyz0123456\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY
VARIANTS = ("uvicorn", "watchllm")


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.answered: asyncio.Future[None] | None = None
        self.closing = False

    def write(self, data: Any) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8787)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"2")]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": b"{}"})


async def _measure(variant: str, requests: int) -> float:
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from watchllm_ext.serving.protocol import header_timeout_protocol

    config = Config(_app, access_log=False, log_level="warning")
    config.load()
    protocol_class: Any = (
        HttpToolsProtocol if variant == "uvicorn" else header_timeout_protocol(10.0, 64 * 1024)
    )
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = _Transport()
    protocol.connection_made(transport)
    loop = asyncio.get_running_loop()
    spent = 0.0
    for n in (requests // 10, requests):  # a warm-up, then the measured requests
        started = time.thread_time()
        for _ in range(n):
            transport.answered = loop.create_future()
            protocol.data_received(REQUEST)
            await transport.answered
            await asyncio.sleep(0)  # the held head's flush, a turn of the loop
        spent = time.thread_time() - started
    return spent / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--role", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        import uvloop

        print(uvloop.run(_measure(args.role, args.requests)))
        return 0
    found: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            out = subprocess.run(
                [sys.executable, __file__, "--role", variant, "--requests", str(args.requests)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            found[variant].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"  round {round_ + 1} {variant:9s} {found[variant][-1]:6.2f} µs", flush=True)
    base = statistics.median(found["uvicorn"])
    print(f"\nthe protocol's CPU a request, {args.requests:,} requests x {args.rounds} rounds:")
    for variant in VARIANTS:
        us = statistics.median(found[variant])
        print(f"{variant:9s} {us:6.2f} µs  x{us / base:.2f} uvicorn's")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
