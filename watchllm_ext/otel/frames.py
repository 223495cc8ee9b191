"""The frames between the server and its worker processes (pool.py, worker.py): a 4-byte
big-endian length, then that many bytes (msgpack; an events job starts with a mark byte)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import IO

# A frame bigger than this is a broken stream, not a request (bodies are capped far lower).
MAX_FRAME_BYTES = 1 << 30


def read_frame(stream: IO[bytes]) -> bytes | None:
    """A frame's bytes; None at the end of the stream."""
    header = _read_exactly(stream, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {size} bytes")
    data = _read_exactly(stream, size)
    if data is None:
        raise EOFError("the stream ended inside a frame")
    return data


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    chunks: list[bytes] = []
    left = size
    while left:
        chunk = stream.read(left)
        if not chunk:
            if left == size:
                return None
            raise EOFError("the stream ended inside a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# A frame written in parts, one after the other (write_frame): a big body is not copied into
# one buffer on the way (encoding a 45 MB body into a request copied it twice, ~0.1-0.2 s with
# the GIL held: every other request waited).
Parts = Sequence[bytes]
_EMPTY_BIN = b"\xc4\x00"  # msgpack: bytes of length 0 (bin 8)
_BIN32 = b"\xc6"  # msgpack: bytes with a 4-byte length (valid at any length)


def body_first(encoded: bytes, body: bytes, mark: bytes = b"") -> list[bytes]:
    """`encoded`, a msgpack array (up to 15 items) whose first item is b"" as the encoder wrote
    it, with `body` in that place instead: the parts of `mark` and that array, the body among
    them as it is. The parts joined are a msgpack array that decodes as the encoder's own
    encoding of the array with `body` would (byte for byte the same from 64 KiB on)."""
    if not 0x90 <= encoded[0] <= 0x9F or encoded[1:3] != _EMPTY_BIN:
        raise ValueError("not a short msgpack array whose first item is empty bytes")
    return [mark + encoded[:1] + _BIN32 + len(body).to_bytes(4, "big"), body, encoded[3:]]


def write_frame(stream: IO[bytes], parts: bytes | Parts) -> None:
    """Write a frame of `parts` (or of one bytes), not joined first."""
    if isinstance(parts, bytes):
        parts = (parts,)
    stream.write(sum(len(part) for part in parts).to_bytes(4, "big"))
    for part in parts:
        stream.write(part)
