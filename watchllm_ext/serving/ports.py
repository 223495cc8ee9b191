"""Whether this process can listen on an address, said in one line before anything is made.

`watchllm serve` and the examples that run a server ask first, so that a busy port is one
line naming what to do, not a key made and printed for a server that then cannot start."""

from __future__ import annotations

import errno
import socket


def port_problem(host: str, port: int, host_source: str = "--host") -> str | None:
    """None when `host:port` can be listened on; else one line saying why not (another
    server has it, or the address is not this machine's). Bound and let go at once, as
    uvicorn binds it (SO_REUSEADDR): a port another process listens on is refused, one in
    TIME_WAIT is not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror} ({host_source})"
    # Every address the host names, as uvicorn (asyncio) binds them; one this machine does not
    # have (an IPv6 localhost with IPv6 off) is skipped, as asyncio skips it.
    failure: OSError | None = None
    bound = False
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
                sock.listen(1)
                bound = True
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return (
                        f"cannot listen on {host}:{port}: {exc.strerror}; another server"
                        " listens there: stop it, or pick another port with --port"
                    )
                failure = failure or exc
    if not bound and failure is not None:
        return f"cannot listen on {host}:{port}: {failure.strerror}; pick another --host or --port"
    return None
