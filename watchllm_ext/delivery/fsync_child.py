"""The spool's fsync helper process: the program fsync_process.py starts.

It receives file descriptors over a Unix socket (each message: one byte, the count of the
descriptors it carries, at most MAX_FDS_PER_MESSAGE), fsyncs them in order, closes them, and
answers each message with REPLY: the index of the descriptor whose fsync failed (-1: none) and
its errno. It stops after the first failure of a message (what follows is not synced: the
spool retries it). A message whose descriptors did not all arrive (the kernel drops what the
helper cannot take, MSG_CTRUNC) is answered LOST and nothing of it is synced: the server then
does the fsyncs itself, rather than count as synced a descriptor this process never had.

Standard library only, and run by path rather than imported: it starts in a few milliseconds
and needs nothing of the server's. It exits when the server closes its end of the socket (or
exits, or is killed), and ignores SIGINT, SIGTERM and SIGHUP: a Ctrl-C in a terminal reaches
the whole process group and a service manager may signal every process of the service, while
the server, stopping, still fsyncs what it has accepted. The server decides when fsyncs are
over; SIGKILL still ends the helper (the server then fsyncs on a worker thread).
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

REPLY = struct.Struct("=ii")  # (index of the failed descriptor or -1, errno or 0)
LOST = -2  # REPLY's index when the message's descriptors did not all arrive
MAX_FDS_PER_MESSAGE = 64  # well under Linux's SCM_MAX_FD (253)


def serve(sock: socket.socket) -> None:
    while True:
        try:
            data, fds, flags, _address = socket.recv_fds(sock, 1, MAX_FDS_PER_MESSAGE)
        except OSError:
            return
        if not data:
            return  # the server closed its end
        failed, errno = -1, 0
        if flags & getattr(socket, "MSG_CTRUNC", 0) or len(fds) != data[0]:
            failed = LOST
        for index, fd in enumerate(fds):
            if failed == -1:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    failed, errno = index, exc.errno or 5  # EIO when the OS names none
            os.close(fd)
        try:
            sock.sendall(REPLY.pack(failed, errno))
        except OSError:
            return


def main() -> None:
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    serve(socket.socket(fileno=int(sys.argv[1])))


if __name__ == "__main__":
    main()
