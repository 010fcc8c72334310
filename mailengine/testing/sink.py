"""A scriptable SMTP sink on loopback, for tests and benchmarks of outbound delivery.

It accepts mail like a real server and remembers everything it saw: sessions (peer, HELO, TLS,
every command line), messages (envelope and data), the number of connections open at once and
its peak. A test scripts how it answers:

    script = SinkScript(
        rcpt={"bad@x.test": "550 5.1.1 No such user",             # 5xx for one recipient
              "later@x.test": ["451 4.3.0 Try later", "250 2.1.5 Ok"],  # 4xx, then accept
              "@slow.test": "250 2.1.5 Ok"},                      # a whole domain
        replies={"BODY": "250 2.0.0 queued"},   # any verb, "GREETING", or "BODY" (end of data)
        delays={"RCPT": 0.5},                   # slow replies (`delay` slows every reply)
        pipelining=False, ehlo=False,           # no PIPELINING; EHLO refused (HELO only)
        starttls=True,                          # STARTTLS with a self-signed certificate
        drop_after_body_bytes=100,              # hang up in the middle of DATA
        max_connections=2)                      # 421 to the third concurrent connection
    async with SMTPSink("127.0.0.2", 0, script) as sink:
        ... sink.port, sink.messages, sink.sessions[0].verbs, sink.peak_connections

A reply spec is a reply text (lines separated by "\\n", each sent as written, so garbage can be
scripted too), a list of them used one per attempt (the last one repeats; attempts are counted
across sessions, so "4xx then accept" survives a reconnect), "DROP" to close the connection
instead of replying, or a callable (session, verb, argument) -> spec. `on_command` sees every
command first and may return a spec to override the script. A greeting of "421 ..." is sent and
the connection closed, as real servers do.

`ThreadedSink` runs one in a background thread for synchronous tests or an engine in another
process; `python -m mailengine.testing.sink HOST:PORT` runs one from the shell.
"""
from __future__ import annotations

import asyncio
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

from ..smtp.wire import dot_unstuff
from .loop_thread import LoopThread

Spec = Union[str, list, Callable[..., Any], None]

MAX_LINE = 65536
MAX_DATA = 64 * 1024 * 1024


@dataclass
class SinkScript:
    hostname: str = "sink.test"
    greeting: str | None = None        # default "220 <hostname> ESMTP sink"
    ehlo: bool = True                  # False: EHLO gets 502 and the client must use HELO
    pipelining: bool = True
    eightbitmime: bool = True
    smtputf8: bool = True
    dsn: bool = True
    enhancedstatuscodes: bool = True
    size: int | None = 0               # None: SIZE not offered; 0: offered, no limit; n: limit
    starttls: bool = False
    max_connections: int | None = None  # beyond it, greet with 421 and hang up
    replies: dict[str, Spec] = field(default_factory=dict)
    rcpt: dict[str, Spec] = field(default_factory=dict)  # "user@domain" or "@domain" -> spec
    delay: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)
    drop_after_body_bytes: int | None = None
    on_command: Callable[["SinkSession", str, str], Spec] | None = None
    keep_data: bool = True             # False: count messages, do not keep their bytes
    tls_context: ssl.SSLContext | None = None  # default: a self-signed certificate


@dataclass
class SinkMessage:
    session_id: int
    mail_from: str
    mail_params: str
    rcpts: list[str]                   # the recipients the sink accepted
    data: bytes                        # as the client meant it: dot-unstuffed, CRLF endings
    size: int
    tls: bool


@dataclass
class SinkSession:
    id: int
    peer: tuple
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    commands: list[str] = field(default_factory=list)
    pipelined: int = 0  # commands that had arrived before the previous one was answered
    messages: list[SinkMessage] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    # the transaction in progress
    mail_from: str | None = None
    mail_params: str = ""
    rcpts: list[str] = field(default_factory=list)

    @property
    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].upper() for c in self.commands]

    @property
    def closed(self) -> bool:
        return self.ended is not None


class _Drop(Exception):
    """Close the connection now (scripted, or the client went away)."""


class _Conn:
    """A line/data reader with its own buffer over a StreamReader (the end of data may arrive in
    the same chunk as the next pipelined command, and StreamReader cannot give bytes back)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buf = bytearray()
        self.waited = False  # whether the last readline() had to wait for the network

    async def fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise _Drop("eof")
        self.buf += data

    async def readline(self) -> bytes:
        start = 0
        self.waited = False
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line.rstrip(b"\r\n")
            if len(self.buf) > MAX_LINE:
                raise _Drop("line too long")
            start = len(self.buf)
            self.waited = True
            await self.fill()

    async def read_data(self) -> bytes:
        """The body after 354, up to and without the final '.' line, still dot-stuffed."""
        start = 0
        while True:
            if self.buf.startswith(b".\r\n"):  # empty message: the DATA line's CRLF came first
                del self.buf[:3]
                return b""
            i = self.buf.find(b"\r\n.\r\n", start)
            if i >= 0:
                body = bytes(self.buf[:i + 2])
                del self.buf[:i + 5]
                return body
            if len(self.buf) > MAX_DATA:
                raise _Drop("message too big")
            start = max(0, len(self.buf) - 4)
            await self.fill()


_server_tls: ssl.SSLContext | None = None


def self_signed_server_context(hostname: str = "sink.test") -> ssl.SSLContext:
    """A server context with a freshly made self-signed certificate (made once per process)."""
    global _server_tls
    if _server_tls is not None:
        return _server_tls
    from ..tls import make_self_signed  # the engine's own maker of certificates

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:  # load_cert_chain wants files
        certfile, keyfile = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        make_self_signed(certfile, keyfile, hostname)
        ctx.load_cert_chain(certfile, keyfile)
    _server_tls = ctx
    return ctx


def _path(arg: str, prefix: str) -> tuple[str, str]:
    """'FROM:<a@b> SIZE=1' -> ('a@b', 'SIZE=1'); ValueError when it is not that shape."""
    if arg[:len(prefix)].upper() != prefix:
        raise ValueError
    rest = arg[len(prefix):].lstrip()
    if not rest.startswith("<") or ">" not in rest:
        raise ValueError
    address, _, params = rest[1:].partition(">")
    return address, params.strip()


class SMTPSink:
    """The sink server; start with `await sink.start()` or `async with`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 script: SinkScript | None = None) -> None:
        self.host = host
        self.port = port
        self.script = script or SinkScript()
        self.sessions: list[SinkSession] = []
        self.messages: list[SinkMessage] = []
        self.active_connections = 0
        self.peak_connections = 0
        self._attempts: dict[tuple[str, str], int] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._changed: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def commands(self) -> list[str]:
        return [c for s in self.sessions for c in s.commands]

    @property
    def verbs(self) -> list[str]:
        return [v for s in self.sessions for v in s.verbs]

    def reset(self) -> None:
        """Forget what was seen (sessions, messages, peak, attempt counters)."""
        self.sessions.clear()
        self.messages.clear()
        self.peak_connections = self.active_connections
        self._attempts.clear()

    async def start(self) -> "SMTPSink":
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=MAX_LINE, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.transport.abort()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "SMTPSink":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until predicate() holds (checked whenever a session or message changes)."""
        assert self._changed is not None
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_messages(self, n: int, timeout: float = 10.0) -> None:
        await self.wait_for(lambda: len(self.messages) >= n, timeout)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    # -- one connection ------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        sess = SinkSession(len(self.sessions) + 1, writer.get_extra_info("peername") or ())
        self.sessions.append(sess)
        self.active_connections += 1
        self.peak_connections = max(self.peak_connections, self.active_connections)
        self._notify()
        try:
            await self._converse(sess, _Conn(reader), writer)
        except (_Drop, ConnectionError, OSError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): the handler ends here; asyncio's streams would log a re-raise
        finally:
            writer.transport.abort()
            self.active_connections -= 1
            sess.ended = time.monotonic()
            self._writers.discard(writer)
            self._tasks.discard(task)
            self._notify()

    def _spec(self, sess: SinkSession, verb: str, arg: str, *keys: str) -> str | None:
        """The scripted reply for this command, or None for the sink's default.

        `keys` are the rcpt-table keys to try (the address, then "@domain")."""
        script = self.script
        spec: Spec = script.on_command(sess, verb, arg) if script.on_command else None
        counter = (verb, "")
        if spec is None:
            for key in keys:
                if key in script.rcpt:
                    spec, counter = script.rcpt[key], (verb, arg)  # attempts per address
                    break
            else:
                spec = script.replies.get(verb)
        if callable(spec):
            spec = spec(sess, verb, arg)
        if isinstance(spec, list):
            n = self._attempts.get(counter, 0)
            self._attempts[counter] = n + 1
            spec = spec[min(n, len(spec) - 1)] if spec else None
        return spec

    async def _reply(self, writer: asyncio.StreamWriter, verb: str, text: str) -> None:
        if text == "DROP":
            raise _Drop("scripted")
        delay = self.script.delays.get(verb, self.script.delay)
        if delay:
            await asyncio.sleep(delay)
        writer.write(text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8") + b"\r\n")
        await writer.drain()

    async def _converse(self, sess: SinkSession, conn: _Conn, writer: asyncio.StreamWriter) -> None:
        script = self.script
        if script.max_connections is not None and self.active_connections > script.max_connections:
            greeting = "421 4.7.0 Too many connections"
        else:
            greeting = self._spec(sess, "GREETING", "") or script.greeting \
                or f"220 {script.hostname} ESMTP sink"
        await self._reply(writer, "GREETING", greeting)
        if not greeting.startswith("2"):
            if greeting.startswith("421"):
                return
            # Other refusals: answer QUIT politely, anything else with 503.
            while True:
                line = (await conn.readline()).decode("utf-8", "replace")
                sess.commands.append(line)
                if line.upper() == "QUIT":
                    await self._reply(writer, "QUIT", "221 2.0.0 Bye")
                    return
                await self._reply(writer, "ERROR", "503 5.5.1 Service not available")
        while True:
            line = (await conn.readline()).decode("utf-8", "replace")
            if not conn.waited and sess.commands:
                sess.pipelined += 1
            sess.commands.append(line)
            self._notify()
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            handler = getattr(self, "_cmd_" + verb, None)
            if handler is None:
                text = self._spec(sess, verb, arg) or "502 5.5.2 Error: command not recognized"
                await self._reply(writer, verb, text)
                continue
            if await handler(sess, arg, conn, writer) is False:
                return

    async def _cmd_EHLO(self, sess, arg, conn, writer):
        s = self.script
        if not s.ehlo:
            await self._reply(writer, "EHLO", self._spec(sess, "EHLO", arg)
                              or "502 5.5.2 Error: command not recognized")
            return
        caps = [f"{s.hostname} Hello {arg}"]
        if s.pipelining:
            caps.append("PIPELINING")
        if s.size is not None:
            caps.append(f"SIZE {s.size}" if s.size else "SIZE")
        if s.starttls and not sess.tls:
            caps.append("STARTTLS")
        if s.eightbitmime:
            caps.append("8BITMIME")
        if s.smtputf8:
            caps.append("SMTPUTF8")
        if s.enhancedstatuscodes:
            caps.append("ENHANCEDSTATUSCODES")
        if s.dsn:
            caps.append("DSN")
        default = "\n".join(f"250{'-' if i < len(caps) - 1 else ' '}{c}" for i, c in enumerate(caps))
        text = self._spec(sess, "EHLO", arg) or default
        await self._reply(writer, "EHLO", text)
        if text.startswith("2"):
            sess.helo, sess.esmtp = arg, True
            sess.mail_from, sess.rcpts = None, []

    async def _cmd_HELO(self, sess, arg, conn, writer):
        text = self._spec(sess, "HELO", arg) or f"250 {self.script.hostname}"
        await self._reply(writer, "HELO", text)
        if text.startswith("2"):
            sess.helo, sess.esmtp = arg, False
            sess.mail_from, sess.rcpts = None, []

    async def _cmd_STARTTLS(self, sess, arg, conn, writer):
        if not self.script.starttls or sess.tls:
            await self._reply(writer, "STARTTLS", "502 5.5.1 STARTTLS not available")
            return
        text = self._spec(sess, "STARTTLS", arg) or "220 2.0.0 Ready to start TLS"
        await self._reply(writer, "STARTTLS", text)
        if text.startswith("2"):
            conn.buf.clear()  # nothing sent before the handshake may count after it
            await writer.start_tls(self.script.tls_context
                                   or self_signed_server_context(self.script.hostname))
            sess.tls = True
            sess.helo, sess.mail_from, sess.rcpts = None, None, []

    async def _cmd_MAIL(self, sess, arg, conn, writer):
        try:
            address, params = _path(arg, "FROM:")
        except ValueError:
            return await self._reply(writer, "MAIL", "501 5.5.4 Syntax: MAIL FROM:<address>")
        if sess.helo is None:
            return await self._reply(writer, "MAIL", "503 5.5.1 Error: send HELO/EHLO first")
        if sess.mail_from is not None:
            return await self._reply(writer, "MAIL", "503 5.5.1 Error: nested MAIL command")
        default = "250 2.1.0 Ok"
        limit = self.script.size
        for p in params.split():
            key, _, value = p.partition("=")
            if key.upper() == "SIZE" and limit and value.isdigit() and int(value) > limit:
                default = "552 5.3.4 Message size exceeds fixed limit"
        text = self._spec(sess, "MAIL", arg) or default
        await self._reply(writer, "MAIL", text)
        if text.startswith("2"):
            sess.mail_from, sess.mail_params, sess.rcpts = address, params, []

    async def _cmd_RCPT(self, sess, arg, conn, writer):
        try:
            address, _ = _path(arg, "TO:")
        except ValueError:
            return await self._reply(writer, "RCPT", "501 5.5.4 Syntax: RCPT TO:<address>")
        if sess.mail_from is None:
            return await self._reply(writer, "RCPT", "503 5.5.1 Error: need MAIL command")
        key = address.lower()
        text = self._spec(sess, "RCPT", key, key, "@" + key.rpartition("@")[2]) \
            or "250 2.1.5 Ok"
        await self._reply(writer, "RCPT", text)
        if text.startswith("2"):
            sess.rcpts.append(address)

    async def _cmd_DATA(self, sess, arg, conn, writer):
        if sess.mail_from is None:
            return await self._reply(writer, "DATA", "503 5.5.1 Error: need MAIL command")
        if not sess.rcpts:
            return await self._reply(writer, "DATA", "554 5.5.1 Error: no valid recipients")
        text = self._spec(sess, "DATA", arg) or "354 End data with <CR><LF>.<CR><LF>"
        await self._reply(writer, "DATA", text)
        if not text.startswith("3"):
            return
        cut = self.script.drop_after_body_bytes
        if cut is not None:
            while len(conn.buf) < max(cut, 1):
                await conn.fill()
            raise _Drop("scripted, mid-DATA")
        body = dot_unstuff(await conn.read_data())
        text = self._spec(sess, "BODY", "") or f"250 2.0.0 Ok: queued as S{len(self.messages) + 1}"
        await self._reply(writer, "BODY", text)
        if text.startswith("2"):
            msg = SinkMessage(sess.id, sess.mail_from, sess.mail_params, list(sess.rcpts),
                              body if self.script.keep_data else b"", len(body), sess.tls)
            sess.messages.append(msg)
            self.messages.append(msg)
            self._notify()
        sess.mail_from, sess.rcpts = None, []

    async def _cmd_RSET(self, sess, arg, conn, writer):
        await self._reply(writer, "RSET", self._spec(sess, "RSET", arg) or "250 2.0.0 Ok")
        sess.mail_from, sess.rcpts = None, []

    async def _cmd_NOOP(self, sess, arg, conn, writer):
        await self._reply(writer, "NOOP", self._spec(sess, "NOOP", arg) or "250 2.0.0 Ok")

    async def _cmd_QUIT(self, sess, arg, conn, writer):
        await self._reply(writer, "QUIT", self._spec(sess, "QUIT", arg) or "221 2.0.0 Bye")
        return False


class ThreadedSink:
    """An SMTPSink running on its own event loop in a daemon thread (for synchronous code)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 script: SinkScript | None = None) -> None:
        self.sink = SMTPSink(host, port, script)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: LoopThread | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)

    def start(self) -> "ThreadedSink":
        self._background = LoopThread(f"sink-{self.sink.host}", self.sink.start, self.sink.stop)
        self._loop = self._background.run()
        return self

    def stop(self) -> None:
        if self._background is not None:
            self._background.stop()
            self._background = None

    def wait_messages(self, n: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.sink.messages) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"sink has {len(self.sink.messages)} messages, wanted {n}")
            time.sleep(0.01)

    def __enter__(self) -> "ThreadedSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    import argparse
    p = argparse.ArgumentParser(description="Run an SMTP sink that accepts everything.")
    p.add_argument("address", help="HOST:PORT, e.g. 127.0.0.2:2525 or [::1]:2525")
    p.add_argument("--no-pipelining", action="store_true")
    p.add_argument("--starttls", action="store_true")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before every reply")
    a = p.parse_args(argv)
    host, _, port = a.address.rpartition(":")
    script = SinkScript(pipelining=not a.no_pipelining, starttls=a.starttls, delay=a.delay,
                        keep_data=False)

    async def run() -> None:
        async with SMTPSink(host.strip("[]"), int(port), script) as sink:
            print(f"sink listening on {sink.address}", flush=True)
            last = -1
            while True:
                await asyncio.sleep(5)
                if len(sink.messages) != last:
                    last = len(sink.messages)
                    print(f"{last} messages, peak {sink.peak_connections} connections", flush=True)

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
