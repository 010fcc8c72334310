"""A delivery process: runs the SMTP sessions the engine asks for, and decides nothing.

Started by the engine (deliverers.py) running `main()` in a fresh interpreter with
`network.delivery_processes` of 2 or more. It reads a small JSON spec on stdin (the home, for
its log) and then frames (frames.py) on one pipe, answering on another:

    ("open", cid, kwargs)                  -> ("up", cid, capabilities, tls_version)
                                              or ("down", cid, reply, transcript)
    ("send", cid, mail_from, rcpts, body, dsn, test_mode)
                                           -> ("sent", cid, pack_result(...), reusable)
    ("close", cid, timeout)                -> ("closed", cid)
    ("abort", cid)                         (no answer)
    and, unasked, ("lost", cid) when an idle connection is closed by its server.

`kwargs` are SMTPSession's own (the engine builds them as it would for a session of its own),
so every setting a session reads reaches this process with each new connection. Which server,
when, how many connections and what a reply means stay the engine's (its queue manager, pool
and verdict.py), so every limit holds for the engine as a whole.

The engine's death ends this process (PR_SET_PDEATHSIG), and end of its pipe too: a session in
the middle of a transaction is dropped, the engine's recovery sends that message again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .frames import FrameError, FrameReader, FrameWriter
from .smtp.client import (Body, Reply, SMTPClientError, TransactionResult, RecipientResult,
                          local_reply)
from .smtp_session import ConnectError, SMTPSession

log = logging.getLogger("mailengine.deliverer")

BODY_CACHE = 64  # bodies kept made (a message going to many domains is read once) ...
BODY_CACHE_BYTES = 32 << 20  # ... within this much memory


@dataclass(frozen=True, slots=True)
class FileBody:
    """A body the delivery process makes itself: `prefix` (our Received field, DKIM signature
    fields) then the file at `path` (ID.dat in working/, where the message stays while any of
    its transactions runs). So the pipe carries a name, not the message: writing every message
    through it cost the engine a third of its time in bench/drain. `size` is for the engine's
    bandwidth cap; `eight_bit` None when the engine has not looked (it only needs to know for a
    server without 8BITMIME, delivery._needs_seven_bit)."""
    path: str
    prefix: bytes
    size: int
    eight_bit: bool | None


def failed_result(mail_from: str, rcpts, test_mode: bool, why: str,
                  stage: str = "connection") -> TransactionResult:
    """A transaction that never ran: by default because its session is gone (every recipient
    a temporary connection failure, so verdict.py sends them to a new connection or the next
    MX host); stage "local": a trouble of ours, not the server's (no window is cut for it)."""
    reply = local_reply(451, "4.4.2" if stage == "connection" else "4.3.0", why)
    return TransactionResult(mail_from, [RecipientResult(a, reply.code, reply.enhanced,
                                                         reply.text, stage)
                                         for a in rcpts],
                             reply, stage == "connection", test_mode, [f"<-- [local] {reply}"],
                             [])


def pack_result(r: TransactionResult, session: list[str] | None) -> tuple:
    """A TransactionResult as plain tuples, which unpickle in C (a slotted dataclass unpickles
    through Python code: a tenth of the engine's time in bench/drain). `session`: the session
    transcript, None when it is the one sent with the connection's previous result."""
    reply = r.reply
    return (r.mail_from, [tuple(x) for x in r.recipients],
            None if reply is None else (reply.code, reply.enhanced, reply.lines, reply.raw,
                                        reply.local),
            r.site_failure, r.test_mode, r.transcript, session)


def unpack_result(packed: tuple, session_before: list[str]) -> TransactionResult:
    mail_from, rcpts, reply, site_failure, test_mode, transcript, session = packed
    return TransactionResult(mail_from, [RecipientResult(*x) for x in rcpts],
                             None if reply is None else Reply(*reply), site_failure, test_mode,
                             transcript, session_before if session is None else session)


class Deliverer:
    """The sessions of this process by the engine's connection id; answers go out in one write
    per turn of the event loop."""

    def __init__(self, write_fd: int) -> None:
        self.write_fd = write_fd
        self.sessions: dict[int, SMTPSession] = {}
        self._told: dict[int, list[str]] = {}  # cid -> the session transcript last sent
        self._opening: dict[int, asyncio.Task] = {}  # cid -> its connect, until it answers
        self.tasks: set[asyncio.Task] = set()
        self._answers = FrameWriter()
        self._bodies: OrderedDict[tuple[str, bytes], Body] = OrderedDict()
        self._body_bytes = 0

    async def attach(self) -> None:
        loop = asyncio.get_running_loop()
        self._answers.transport, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(self.write_fd, "wb", buffering=0))

    def answer(self, frame: tuple) -> None:
        self._answers.send(frame)

    def handle(self, frame: tuple) -> None:
        op, cid = frame[0], frame[1]
        if op == "open":
            self._opening[cid] = self._spawn(self._open(cid, frame[2]))
        elif op == "send":
            self._spawn(self._send(cid, *frame[2:]))
        elif op == "close":
            self._spawn(self._close(cid, frame[2]))
        elif op == "abort":  # whatever it is doing: connecting, idle, in a transaction, closing
            self._told.pop(cid, None)
            opening = self._opening.pop(cid, None)
            if opening is not None:
                opening.cancel()
            s = self.sessions.pop(cid, None)
            if s is not None:
                s.abort()
        else:
            log.error("unknown request %r from the engine", op)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    async def _open(self, cid: int, kwargs: dict) -> None:
        """Always answers (unless aborted: then the engine has stopped waiting)."""
        try:
            s = SMTPSession(**kwargs)
            self.sessions[cid] = s
            await s.connect()
        except ConnectError as e:
            self.sessions.pop(cid, None)
            self.answer(("down", cid, e.reply, e.transcript))
            return
        except asyncio.CancelledError:  # aborted while connecting
            s = self.sessions.pop(cid, None)
            if s is not None:
                s.abort()
            return
        except Exception as e:  # never silence: the engine's connect waits for an answer
            s = self.sessions.pop(cid, None)
            if s is not None:
                s.abort()
            log.exception("connecting to %s failed unexpectedly", kwargs.get("ip"))
            reply = local_reply(451, "4.3.0", f"Delivery process error: {e}")
            self.answer(("down", cid, reply, [f"<-- [local] {reply}"]))
            return
        finally:
            self._opening.pop(cid, None)
        s.on_lost = lambda: self._lost(cid, s)
        self.answer(("up", cid, s.capabilities, s.tls_version))

    def _lost(self, cid: int, s: SMTPSession) -> None:
        """Its server closed it: forgotten here, and the engine is told (once)."""
        if self.sessions.get(cid) is s:
            del self.sessions[cid]
            self._told.pop(cid, None)
            self.answer(("lost", cid))

    def _body(self, body: Body | FileBody) -> Body:
        if not isinstance(body, FileBody):
            return body
        key = (body.path, body.prefix)
        made = self._bodies.get(key)
        if made is None:
            with open(body.path, "rb") as f:
                made = Body.from_bytes(body.prefix + f.read())
            self._bodies[key] = made
            self._body_bytes += len(made.payload)
            while len(self._bodies) > BODY_CACHE or self._body_bytes > BODY_CACHE_BYTES:
                self._body_bytes -= len(self._bodies.popitem(last=False)[1].payload)
        else:
            self._bodies.move_to_end(key)
        return made

    async def _send(self, cid: int, mail_from, rcpts, body, dsn, test_mode) -> None:
        """Always answers: the engine's unit waits for it."""
        s = self.sessions.get(cid)
        try:
            if s is None:
                raise SMTPClientError("no such session")
            try:
                made = self._body(body)
            except OSError as e:  # removed by hand meanwhile: not sent, the engine decides
                result = failed_result(mail_from, rcpts, test_mode,
                                       f"Cannot read the message: {e.strerror or e}", "local")
            else:
                result = await s.send(mail_from, rcpts, made, dsn=dsn, test_mode=test_mode)
        except SMTPClientError as e:
            result = failed_result(mail_from, rcpts, test_mode, f"Session not ready: {e}")
        except Exception as e:
            log.exception("a transaction failed unexpectedly")
            if s is not None:
                s.abort()
            result = failed_result(mail_from, rcpts, test_mode, f"Delivery process error: {e}")
        reusable = s is not None and s.is_reusable
        told = self._told.get(cid)
        session = None if told == result.session_transcript else result.session_transcript
        if reusable:
            self._told[cid] = result.session_transcript
        else:
            self.sessions.pop(cid, None)
            self._told.pop(cid, None)
        self.answer(("sent", cid, pack_result(result, session), reusable))

    async def _close(self, cid: int, timeout) -> None:
        """QUIT; the session stays findable meanwhile, so an "abort" can drop it."""
        self._told.pop(cid, None)
        s = self.sessions.get(cid)
        if s is not None:
            s.on_lost = None
            try:
                await s.close(timeout)
            except Exception:
                s.abort()
            if self.sessions.get(cid) is s:
                del self.sessions[cid]
        self.answer(("closed", cid))


class _Requests(asyncio.Protocol):
    def __init__(self, deliverer: Deliverer, done: asyncio.Future) -> None:
        self.deliverer = deliverer
        self.done = done
        self.reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameError as e:
            log.error("the engine's pipe: %s; stopping", e)
            self._end()
            return
        for f in frames:
            self.deliverer.handle(f)

    def connection_lost(self, exc) -> None:
        self._end()

    def _end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def serve(read_fd: int, write_fd: int) -> None:
    """Until the engine closes its end of the request pipe."""
    loop = asyncio.get_running_loop()
    d = Deliverer(write_fd)
    await d.attach()
    done = loop.create_future()
    await loop.connect_read_pipe(lambda: _Requests(d, done),
                                 os.fdopen(read_fd, "rb", buffering=0))
    d.answer(("ready", 0))
    await done
    for s in d.sessions.values():
        s.abort()
    for t in list(d.tasks):
        t.cancel()


def main() -> None:
    from .child_process import die_with_parent
    die_with_parent()
    from . import logs
    from .eventloop import loop_factory
    spec = json.loads(sys.stdin.read())
    logs.setup(Path(spec["log_dir"]), spec.get("log_retention_days", 0), debug_any=False,
               program=False)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(serve(spec["read_fd"], spec["write_fd"]))

