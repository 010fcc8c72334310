"""Frames on a pipe between the engine and its delivery processes (deliverers.py, deliverer.py).

A frame is a 4-byte big-endian length, then a pickled tuple. Sans-IO: `encode` makes bytes,
`FrameReader.feed` takes whatever the pipe gave and returns the whole frames in it.

Why pickle: both ends are this program, the engine starts the other end itself and the pipe is
inherited, never a path or a socket anyone else could open; the objects are the SMTP client's
own records (Body, TransactionResult, Capabilities), which pickle copies fastest.
"""
from __future__ import annotations

import asyncio
import pickle
import struct

__all__ = ["encode", "FrameReader", "FrameWriter", "FrameError", "MAX_FRAME"]

HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30  # a message body travels in one frame; the spool caps sizes far below


class FrameError(Exception):
    """The other end sent something that is not a frame: the pipe cannot be trusted further."""


def encode(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class FrameReader:
    """Collects pipe bytes; hands out every whole frame."""
    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        out = []
        start = 0
        end = len(buf)
        with memoryview(buf) as view:  # released before the buffer is cut below
            while end - start >= 4:
                (n,) = HEADER.unpack_from(view, start)
                if n > MAX_FRAME:
                    raise FrameError(f"frame of {n} bytes")
                if end - start - 4 < n:
                    break
                try:
                    out.append(pickle.loads(view[start + 4:start + 4 + n]))
                except Exception as e:
                    raise FrameError(f"undecodable frame: {e}") from None
                start += 4 + n
        if start:
            del buf[:start]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)


class FrameWriter:
    """Frames to a pipe's transport, the ones made in one turn of the event loop in one write
    (a write per frame woke the other end per frame). `transport` is set once the pipe is
    connected; frames sent while it is None, or closing, are dropped (the other end is gone)."""
    __slots__ = ("transport", "_out", "_flushing")

    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self._out: list[bytes] = []
        self._flushing = False

    def send(self, frame: tuple) -> None:
        self._out.append(encode(frame))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        out, self._out = self._out, []
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
