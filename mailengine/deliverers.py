"""The engine's delivery processes, and the session object that stands for one of their connections.

With `network.delivery_processes` of 2 or more, the SMTP conversations (sockets, TLS, the
sans-IO client) run in that many processes (deliverer.py); the engine stays the queue manager,
as Postfix's qmgr is for its `smtp` processes. Its connection pool (pool.py) holds
`RemoteSession`s instead of `SMTPSession`s: the same interface, so the pool, the scheduler, the
windows, the rate and bandwidth buckets and verdict.py count and decide for every connection of
every process in one place, and every limit is exact for the engine as a whole with nothing
shared between processes.

A connection lives in one process for its whole life; a new one goes to the process with the
fewest connections. A process that dies (even SIGKILL) is started again after RESTART_DELAY
(longer after each failed start); its connections end with `ProcessGone`, which is not the
remote site's doing: delivery.py leaves the recipients not decided yet for an attempt a few
seconds later, without counting a try, marking a host down or cutting a window. Only a
transaction that was waiting for its reply may then reach its recipients twice, as when any
connection is lost while waiting for the reply to the data. A process that stops answering
(stopped, stuck) past its sessions' own timeouts is killed, and so ends the same way.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .deliverer import FileBody, unpack_result
from .frames import FrameError, FrameReader, FrameWriter
from .smtp.client import Body, DSNRequest, SMTPClientError, TransactionResult, local_reply
from .smtp_session import ConnectError

log = logging.getLogger("mailengine.deliverers")

RESTART_DELAY = 1.0  # s before a delivery process that died is started again ...
MAX_RESTART_DELAY = 30.0  # ... doubled after each one that failed to start, up to this
START_TIMEOUT = 20.0  # s a new process has to say it is ready (else it is killed)
WAIT_FOR_PROCESS = 10.0  # s a new connection waits for a process when none is running
HUNG_MARGIN = 30.0  # s beyond a session's own timeouts before its process counts as hung
WATCH_EVERY = 1.0  # s between looks at a process's unanswered calls (a hung one is killed)


class ProcessGone(Exception):
    """The delivery process holding a connection ended (or none runs): not the server's fault."""

_cids = itertools.count(1)  # connection ids, unique in the engine's life (not reused after a death)


class _Process:
    """One delivery process: its pipes, the calls waiting for its answer, its connections."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.writer = FrameWriter()  # requests; its transport set once the pipe is connected
        self.calls: dict[int, asyncio.Future] = {}  # cid -> the answer to its one request
        # cid -> (its call's future, the loop time past which the process counts as hung, the
        # limit): one timer per process looks at them (_watch), not one per call (a timer made
        # and cancelled for every transaction was 2 % of the engine's time)
        self.deadlines: dict[int, tuple[asyncio.Future, float, float]] = {}
        self._watching: asyncio.TimerHandle | None = None
        self.sessions: dict[int, "RemoteSession"] = {}  # cid -> its connection (open or opening)
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        self.alive = True

    def post(self, frame: tuple) -> None:
        """Send a request (those of one turn of the event loop go in one write)."""
        if self.alive:
            self.writer.send(frame)

    def call(self, cid: int, frame: tuple, limit: float) -> asyncio.Future:
        """The answer to `frame` (None if the process dies first); a process that has not
        answered within `limit` s is killed (then None as well)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.alive:
            fut.set_result(None)
            return fut
        self.calls[cid] = fut
        self.deadlines[cid] = (fut, loop.time() + limit, limit)
        if self._watching is None:
            self._watching = loop.call_later(WATCH_EVERY, self._watch)
        self.post(frame)
        return fut

    def _watch(self) -> None:
        """Kill the process when a call still waiting is past its limit (it is stopped or
        stuck: the sessions' own timeouts would have answered long before)."""
        self._watching = None
        if not self.alive:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for cid, (fut, deadline, limit) in list(self.deadlines.items()):
            if fut.done():  # answered or given up (cancelled, aborted)
                del self.deadlines[cid]
            elif deadline <= now:
                log.error("delivery process %d (pid %d) did not answer within %g s; killing it",
                          self.index, self.proc.pid, limit)
                self.kill()
                self.died()
                return
        if self.deadlines:
            self._watching = loop.call_later(WATCH_EVERY, self._watch)

    def answered(self, frame: tuple) -> None:
        kind, cid = frame[0], frame[1]
        if kind == "lost":  # a connection its server closed: not to be reused
            s = self.sessions.get(cid)
            if s is not None:
                if s._busy:
                    s._lost = True  # its answer may be read in this same batch: send() ends it
                else:
                    s._ended()
            return
        if kind == "ready":
            if not self.ready.done():
                self.ready.set_result(True)
            return
        fut = self.calls.pop(cid, None)
        self.deadlines.pop(cid, None)
        if fut is not None and not fut.done():
            fut.set_result(frame)

    def kill(self) -> None:
        """Hung or talking nonsense: SIGKILL; its watcher then ends it as any death."""
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass

    def died(self) -> None:
        """Its pipe closed: every call waiting is answered None, every connection ends."""
        if not self.alive:
            return
        self.alive = False
        if not self.ready.done():
            self.ready.set_result(False)
        calls, self.calls = self.calls, {}
        self.deadlines.clear()
        if self._watching is not None:
            self._watching.cancel()
            self._watching = None
        for fut in calls.values():
            if not fut.done():
                fut.set_result(None)
        for s in list(self.sessions.values()):
            s._ended()
        self.writer.close()


class _Answers(asyncio.Protocol):
    def __init__(self, process: _Process) -> None:
        self.process = process
        self.reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except FrameError as e:
            log.error("delivery process %d (pid %d): %s; stopping it", self.process.index,
                      self.process.proc.pid, e)
            self.process.kill()
            self.process.died()
            return
        for f in frames:
            self.process.answered(f)

    def connection_lost(self, exc) -> None:
        self.process.died()


class Deliverers:
    """Starts, watches and stops the delivery processes; picks one for each new connection."""

    def __init__(self, count: int, log_dir: Path, retention_days: int) -> None:
        self.count = count
        self.log_dir = log_dir
        self.retention_days = retention_days
        self.current: dict[int, _Process] = {}
        self.started = 0  # processes started in all, restarts included (for status)
        self.stopping = False
        self._watch: dict[int, asyncio.Task] = {}
        self._any_ready = asyncio.Event()  # some process has said it is ready (take() waits)

    async def start(self) -> None:
        for i in range(self.count):
            await self._spawn(i)
        for p in list(self.current.values()):
            await self._wait_ready(p)

    async def _wait_ready(self, p: _Process) -> bool:
        """True once `p` says it is ready; one that does not within START_TIMEOUT is killed (its
        watcher starts another)."""
        try:
            async with asyncio.timeout(START_TIMEOUT):
                ok = await asyncio.shield(p.ready)
        except TimeoutError:
            log.error("delivery process %d (pid %d) did not start within %g s; killing it",
                      p.index, p.proc.pid, START_TIMEOUT)
            p.kill()
            return False
        if ok:
            self._any_ready.set()
        return ok

    async def _spawn(self, index: int) -> _Process:
        loop = asyncio.get_running_loop()
        from_engine, to_child = os.pipe()
        try:
            from_child, to_engine = os.pipe()
        except OSError:
            os.close(from_engine)
            os.close(to_child)
            raise
        spec = {"read_fd": from_engine, "write_fd": to_engine, "log_dir": str(self.log_dir),
                "log_retention_days": self.retention_days}
        try:
            proc = await asyncio.create_subprocess_exec(
                # imported by its name, not run as __main__: the pickled FileBody must be
                # the class the process checks for
                sys.executable, "-c", "from mailengine.deliverer import main; main()",
                stdin=asyncio.subprocess.PIPE, pass_fds=[from_engine, to_engine])
        except BaseException:
            for fd in (to_child, from_child):
                os.close(fd)
            raise
        finally:
            os.close(from_engine)
            os.close(to_engine)
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        p = _Process(index, proc)
        p.writer.transport, _ = await loop.connect_write_pipe(
            asyncio.Protocol, os.fdopen(to_child, "wb", buffering=0))
        await loop.connect_read_pipe(lambda: _Answers(p), os.fdopen(from_child, "rb", buffering=0))
        self.current[index] = p
        self.started += 1
        self._watch[index] = asyncio.create_task(self._keep_running(p))
        log.info("delivery process %d started, pid %d", index, proc.pid)
        return p

    async def _keep_running(self, p: _Process) -> None:
        """Start `p`'s successor when it ends; after a start that failed, wait longer."""
        code = await p.proc.wait()
        p.died()  # its pipe may close after the exit is seen
        if self.stopping or self.current.get(p.index) is not p:
            return
        if not any(q.alive for q in self.current.values()):
            self._any_ready.clear()
        log.error("delivery process %d (pid %d) exited with %s; its connections are lost, "
                  "starting it again", p.index, p.proc.pid, code)
        delay = RESTART_DELAY
        while not self.stopping and self.current.get(p.index) is p:
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                new = await self._spawn(p.index)
            except Exception as e:  # out of processes or descriptors: try again later
                log.error("delivery process %d cannot be started: %s", p.index, e)
            else:
                await self._wait_ready(new)
                return  # its own watcher takes over (a new one dying is restarted again)
            delay = min(MAX_RESTART_DELAY, delay * 2)

    def pick(self) -> _Process | None:
        """The live process with the fewest connections (None: all are down for now)."""
        live = [p for p in self.current.values() if p.alive and p.ready.done() and
                p.ready.result()]
        return min(live, key=lambda p: len(p.sessions)) if live else None

    async def take(self) -> _Process:
        """pick(), waiting up to WAIT_FOR_PROCESS for one to run again; else ProcessGone."""
        p = self.pick()
        if p is not None:
            return p
        try:
            async with asyncio.timeout(WAIT_FOR_PROCESS):
                while (p := self.pick()) is None:
                    self._any_ready.clear()
                    await self._any_ready.wait()
        except TimeoutError:
            raise ProcessGone("no delivery process is running") from None
        return p

    def counts(self) -> dict:
        """For status and /metrics."""
        live = [p for p in self.current.values() if p.alive]
        return {"processes": self.count, "running": len(live),
                "connections": sum(len(p.sessions) for p in live),
                "restarts": max(0, self.started - self.count)}

    def pids(self) -> list[int]:
        return [p.proc.pid for p in self.current.values() if p.alive]

    async def stop(self, timeout: float = 10.0) -> None:
        """Close the request pipes (each process drops what it still holds and exits)."""
        self.stopping = True
        for t in self._watch.values():
            t.cancel()
        procs = list(self.current.values())
        for p in procs:
            p.writer.close()
        try:
            async with asyncio.timeout(timeout):
                for p in procs:
                    await p.proc.wait()
        except TimeoutError:
            for p in procs:
                if p.proc.returncode is None:
                    p.proc.send_signal(signal.SIGKILL)
        for p in procs:
            p.died()


class RemoteSession:
    """A connection held by a delivery process, with SMTPSession's interface for pool.Pool and
    delivery.py (connect, send, close, abort, is_reusable, capabilities, messages_sent...).
    connect() and send() raise ProcessGone when the process ends under them."""

    def __init__(self, deliverers: Deliverers, ip: str, port: int = 25, **kwargs) -> None:
        self.deliverers = deliverers
        self.ip = ip
        self.port = port
        self.kwargs = dict(kwargs, ip=ip, port=port)  # SMTPSession's, made in the process
        self.capabilities = None
        self.tls_version: str | None = None
        self.messages_sent = 0
        self.last_used = 0.0
        self.lease: str | None = None  # its place in the engines' shared per-host cap
        self._proc: _Process | None = None
        self._cid = 0
        self._ready = False
        self._busy = False
        self._lost = False  # the server closed it while a transaction's answer was on its way
        self._session_transcript: list[str] = []  # sent once per connection (pack_result)
        # a transaction's: made once, not for each message sent
        self._send_limit = self._limit("write_timeout", "body_timeout", *["read_timeout"] * 4)

    @property
    def is_reusable(self) -> bool:
        return self._ready and not self._busy

    def _limit(self, *timeouts: str) -> float:
        """How long the process may take before it counts as hung: the session's own timeouts
        for this step (SMTPSession's defaults when not given) and a margin."""
        default = {"connect_timeout": 240.0, "read_timeout": 240.0, "write_timeout": 240.0,
                   "body_timeout": 600.0}
        return sum(self.kwargs.get(t, default[t]) for t in timeouts) + HUNG_MARGIN

    async def _call(self, frame: tuple, limit: float):
        """The answer to `frame`, or None when the process ended; a process silent past `limit`
        is killed (then None as well: _Process._watch)."""
        proc = self._proc
        assert proc is not None
        return await proc.call(self._cid, frame, limit)

    async def connect(self) -> None:
        if self._cid:
            raise SMTPClientError("connect() called twice")
        proc = await self.deliverers.take()  # raises ProcessGone
        self._cid = cid = next(_cids)
        self._proc = proc
        proc.sessions[cid] = self
        try:
            # connect, then greeting, EHLO, STARTTLS, EHLO again (and once more without TLS)
            answer = await self._call(("open", cid, self.kwargs),
                                      self._limit("connect_timeout", "connect_timeout",
                                                  *["read_timeout"] * 6))
        except asyncio.CancelledError:
            self.abort()
            raise
        if answer is None:
            self._ended()
            raise ProcessGone("the delivery process ended while connecting")
        if answer[0] == "down":
            self._ended()
            raise ConnectError(answer[2], answer[3])
        self.capabilities, self.tls_version = answer[2], answer[3]
        if self._proc is None:  # its server closed it at once (a "lost" came with the "up")
            reply = local_reply(421, "4.4.2", "Connection closed right after the greeting")
            raise ConnectError(reply, [f"<-- [local] {reply}"])
        self._ready = True

    async def send(self, mail_from: str, rcpts, data: bytes | Body | FileBody, *,
                   dsn: DSNRequest | None = None, test_mode: bool = False) -> TransactionResult:
        if not self.is_reusable or self._proc is None:
            raise SMTPClientError("send() on a session that is not ready")
        rcpts = list(rcpts)
        body = Body.from_bytes(data) if isinstance(data, bytes) else data  # Body or FileBody
        self._busy = True
        try:
            answer = await self._call(
                ("send", self._cid, mail_from, rcpts, body, dsn, test_mode),
                self._send_limit)
        except asyncio.CancelledError:
            self.abort()  # half a conversation cannot be resumed
            raise
        finally:
            self._busy = False
        self.messages_sent += 1
        self.last_used = asyncio.get_running_loop().time()
        if answer is None:
            self._ended()
            raise ProcessGone("the delivery process ended during a transaction")
        result = unpack_result(answer[2], self._session_transcript)
        self._session_transcript = result.session_transcript
        if not answer[3] or self._lost:
            self._ended()
        return result

    async def close(self, timeout: float | None = None) -> None:
        """QUIT (in the process), or drop it when it is not idle."""
        proc = self._proc
        if proc is None:
            return
        if not self.is_reusable:
            self.abort()
            return
        self._ready = False
        try:
            await self._call(("close", self._cid, timeout), self._limit("read_timeout"))
        except asyncio.CancelledError:
            self.abort()  # QUIT took too long: the process drops it now (its place frees)
            raise
        finally:
            self._ended()

    def abort(self) -> None:
        proc = self._proc
        if proc is not None and proc.alive:
            fut = proc.calls.pop(self._cid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            proc.post(("abort", self._cid))
        self._ended()

    def _ended(self) -> None:
        self._ready = False
        if self._proc is not None:
            self._proc.sessions.pop(self._cid, None)
            self._proc = None
