"""One outbound SMTP connection: the asyncio adapter that runs the sans-IO client (smtp/client.py).

    session = SMTPSession("192.0.2.25", 25, helo_name="mail.example.com", host_name="mx.example.net",
                          connect_timeout=240, read_timeout=240, write_timeout=240, body_timeout=600)
    await session.connect()                     # raises ConnectError: try the next MX
    result = await session.send("a@example.com", ["b@example.net"], data)
    if session.is_reusable: ...                 # keep it for the next message to this host
    await session.close()                       # QUIT

Everything protocol-shaped lives in the client; this module only moves bytes and keeps time. It
is an `asyncio.Protocol`, not streams: server bytes go straight into the client from
`data_received` and the commands they produce are written in the same callback, so a whole
transaction runs without waking a task until its result is ready. The body goes out in one write.

Timeouts (SPEC 3): `connect_timeout` for the TCP connect, `read_timeout` for each reply (and the
TLS handshake), `body_timeout` for the reply after the message, `write_timeout` while the kernel
will not take our bytes. One lazily re-armed timer serves all of them.

TLS is opportunistic: STARTTLS when offered, no certificate checks; when the handshake fails the
session connects once more without it, as mail must not stop for a broken TLS stack.
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from typing import Callable, Iterable

from .smtp.client import (Body, DSNRequest, Reply, SMTPClient, SMTPClientError, State,
                          TransactionResult, local_reply)

__all__ = ["SMTPSession", "ConnectError", "opportunistic_tls_context"]

_IDLE = (State.READY, State.CLOSED, State.ERROR)
_SETTLED = (State.READY, State.TLS_PENDING, State.CLOSED, State.ERROR)

_tls_context: ssl.SSLContext | None = None


def opportunistic_tls_context() -> ssl.SSLContext:
    """A shared client context that checks no certificate (RFC 7435: something beats nothing)."""
    global _tls_context
    if _tls_context is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _tls_context = ctx
    return _tls_context


class ConnectError(Exception):
    """No usable session: connection refused or timed out, greeting or EHLO refused, 421.

    `reply` is the server's reply or a made-up one (code 4xx for network trouble); `transcript`
    the session so far, in the manual's format."""

    def __init__(self, reply: Reply, transcript: list[str]) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.transcript = transcript


class _TLSFailed(Exception):
    pass


class _Protocol(asyncio.Protocol):
    """Hands one connection's events to the session, as long as that connection is the current
    one (after a failed TLS handshake the old connection's last events must not reach the new)."""
    __slots__ = ("session", "client")

    def __init__(self, session: "SMTPSession", client: SMTPClient) -> None:
        self.session = session
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.client is self.session.client:
            self.session._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client is self.session.client:
            self.session._on_data(data)

    def eof_received(self) -> bool:
        if self.client is self.session.client:
            self.session._on_lost()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is self.session.client:
            self.session._on_lost()

    def pause_writing(self) -> None:
        if self.client is self.session.client:
            self.session._paused = True
            self.session._arm()

    def resume_writing(self) -> None:
        if self.client is self.session.client:
            self.session._paused = False
            self.session._arm()


class SMTPSession:
    """One connection to one mail server; one transaction at a time, many in a row."""

    def __init__(self, ip: str, port: int = 25, *, helo_name: str | None = None,
                 host_name: str | None = None, source_ip: str | None = None,
                 connect_timeout: float = 240.0, read_timeout: float = 240.0,
                 write_timeout: float = 240.0, body_timeout: float = 600.0,
                 starttls: bool = True, tls_context: ssl.SSLContext | None = None) -> None:
        self.ip = ip
        self.port = port
        self.helo_name = helo_name or socket.gethostname()
        self.host_name = host_name or ip
        self.source_ip = source_ip or None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.body_timeout = body_timeout
        self.starttls = starttls
        self.tls_context = tls_context
        self.client: SMTPClient | None = None
        self.tls_version: str | None = None
        self.messages_sent = 0  # transactions run on this connection
        self.bytes_sent = 0
        self.last_used = 0.0  # loop time of the last transaction's end (for idle eviction)
        self.lease: str | None = None  # its place in the engines' shared per-host cap (shared.py)
        # called when the connection ends while idle (a delivery process tells the engine)
        self.on_lost: Callable[[], None] | None = None
        self._transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused = False
        self._lost = False
        self._busy = False
        self._waiter: asyncio.Future | None = None
        self._until: Callable[[], bool] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- public ------------------------------------------------------------------------------------

    @property
    def is_reusable(self) -> bool:
        """Connected, idle, and the server is still willing: fit for the next message."""
        return (self.client is not None and self.client.is_ready and not self._lost
                and not self._busy)

    @property
    def capabilities(self):
        return self.client.capabilities if self.client is not None else None

    @property
    def transcript(self) -> list[str]:
        return self.client.session_log if self.client is not None else []

    async def __aenter__(self) -> "SMTPSession":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Connect, read the greeting, EHLO/HELO, STARTTLS when offered. Raises ConnectError."""
        if self.client is not None:
            raise SMTPClientError("connect() called twice")
        self._loop = asyncio.get_running_loop()
        try:
            await self._open(self.starttls, [])
        except _TLSFailed as e:
            await self._open(False, e.args[0])

    async def send(self, mail_from: str, rcpts: Iterable[str], data: bytes | Body, *,
                   dsn: DSNRequest | None = None, test_mode: bool = False) -> TransactionResult:
        """Run one transaction. Server trouble never raises: it is in the result, and the session
        is then no longer reusable. Only a session that is not `is_reusable` raises."""
        client = self.client
        if client is None or not self.is_reusable:
            raise SMTPClientError("send() on a session that is not ready")
        tx = client.start_transaction(mail_from, rcpts, data, dsn=dsn, test_mode=test_mode)
        self._busy = True
        try:
            self._flush()
            await self._wait(lambda: tx.done and client.state in _IDLE)
        finally:
            self._busy = False
        if client.is_finished:
            self._close_transport(client.state is State.ERROR)
        self.messages_sent += 1
        self.last_used = self._loop.time()  # type: ignore[union-attr]
        assert tx.result is not None
        return tx.result

    async def close(self, timeout: float | None = None) -> None:
        """QUIT, wait for the reply (at most `timeout`, default read_timeout), close."""
        client = self.client
        if client is not None and client.is_ready and not self._lost and not self._busy:
            client.quit()
            self._busy = True
            try:
                self._flush()
                async with asyncio.timeout(timeout):
                    await self._wait(lambda: client.is_finished)
            except TimeoutError:
                pass  # _wait has dropped the connection
            finally:
                self._busy = False
        self._close_transport(client is None or client.state is State.ERROR)

    def abort(self) -> None:
        """Drop the connection now, without QUIT (shutdown, or a session left in a bad state)."""
        self._close_transport(True)

    # -- connecting ----------------------------------------------------------------------------------

    async def _open(self, starttls: bool, notes: list[str]) -> None:
        loop = self._loop
        assert loop is not None
        client = self.client = SMTPClient(self.helo_name, starttls=starttls)
        self._lost = self._paused = False
        for line in notes:
            client.note(line)
        where = f"{self.host_name} ({self.ip} {self.port})"
        client.note(f"--> Attempting to connect to: {where}")
        local = (self.source_ip, 0) if self.source_ip else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: _Protocol(self, client), self.ip, self.port,
                                             local_addr=local)
        except (OSError, TimeoutError) as e:
            why = str(e) or "timed out"
            reply = local_reply(451, "4.4.1", f"Connection to {where} failed: {why}")
            client.note(f"<-- [local] {reply}")
            raise ConnectError(reply, client.session_log) from None
        client.note(f"<-- Connected to: {where}")
        await self._wait(lambda: client.state in _SETTLED)
        if client.state is State.TLS_PENDING:
            await self._start_tls(client)
            await self._wait(lambda: client.state in _SETTLED)
        if not client.is_ready:
            self._close_transport(client.state is State.ERROR)
            reply = client.failure or local_reply(451, "4.4.2", "Session could not be set up")
            raise ConnectError(reply, client.session_log)

    async def _start_tls(self, client: SMTPClient) -> None:
        loop = self._loop
        assert loop is not None and self._transport is not None
        hostname = None
        try:
            ipaddress.ip_address(self.host_name)
        except ValueError:
            hostname = self.host_name  # SNI only for names
        try:
            async with asyncio.timeout(self.read_timeout):
                transport = await loop.start_tls(
                    self._transport, self._transport.get_protocol(),
                    self.tls_context or opportunistic_tls_context(),
                    server_hostname=hostname)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, RuntimeError) as e:
            self._close_transport(True)
            note = f"<-- [local] TLS handshake failed ({e or 'timed out'}); trying again without TLS"
            raise _TLSFailed(client.session_log + [note]) from None
        if transport is None:  # the connection closed during the handshake
            raise _TLSFailed(client.session_log + ["<-- [local] connection closed during TLS handshake"])
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        self.tls_version = ssl_object.version() if ssl_object is not None else "TLS"
        cipher = transport.get_extra_info("cipher")
        client.note(f"<-- TLS established: {self.tls_version} {cipher[0] if cipher else ''}".rstrip())
        client.tls_started()
        self._flush()

    # -- bytes and time ------------------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        client = self.client
        assert client is not None
        client.receive_data(data)
        self._flush()
        if client.is_finished:
            self._close_transport(client.state is State.ERROR)
        if self._waiter is not None:
            self._arm()
            self._check()

    def _on_lost(self) -> None:
        self._lost = True
        if self.client is not None:
            self.client.connection_lost()
        self._check()
        if self.on_lost is not None and not self._busy:
            self.on_lost()

    def _flush(self) -> None:
        out = self.client.data_to_send()  # type: ignore[union-attr]
        if out and self._transport is not None and not self._lost:
            self.bytes_sent += len(out)
            self._transport.write(out)

    async def _wait(self, until: Callable[[], bool]) -> None:
        if until():
            return
        self._until = until
        self._waiter = self._loop.create_future()  # type: ignore[union-attr]
        self._arm()
        try:
            await self._waiter
        except asyncio.CancelledError:
            self._close_transport(True)  # half a conversation cannot be resumed
            raise
        finally:
            self._waiter = self._until = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _check(self) -> None:
        w = self._waiter
        if w is not None and not w.done() and self._until is not None and self._until():
            w.set_result(None)

    def _arm(self) -> None:
        """(Re)start the clock for what we are waiting on now."""
        if self._waiter is None or self._loop is None:
            return
        if self._paused:
            timeout = self.write_timeout
        elif self.client is not None and self.client.waiting_for == "BODY":
            timeout = self.body_timeout
        else:
            timeout = self.read_timeout
        self._deadline = deadline = self._loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None:
            return
        if self._loop.time() < self._deadline:  # type: ignore[union-attr]
            self._timer = self._loop.call_at(self._deadline, self._on_timer)  # type: ignore[union-attr]
            return
        if self.client is not None:
            self.client.timed_out()
        self._close_transport(True)
        self._check()

    def _close_transport(self, abort: bool) -> None:
        t = self._transport
        if t is None:
            return
        self._transport = None
        self._lost = True
        if abort:
            t.abort()
        else:
            t.close()
