"""The SMTP listener: runs the sans-IO server (smtp/server.py) over asyncio connections.

This adapter owns everything that touches sockets and time: listening on `smtp_listen_ips` and
`smtp_port`, the `max_inbound_connections` cap (421 beyond it, `inbound_priority_ips` exempt), the
idle timeout `smtp_receive_timeout`, STARTTLS handshakes, and flow control: it stops reading from
a client while that client's message is being stored or while its replies are not being read, so
no client can make memory grow without bound.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from typing import Awaitable, Callable

from .config import AddressSet, Config, parse_address_range
from .smtp.server import (CLOSE, START_TLS, MessageReceived, Reply, ServerConnection,
                          ServerOptions, Session)

log = logging.getLogger("mailengine.inbound")
trace = logging.getLogger("mailengine.debug.smtp_in")

MessageHandler = Callable[[MessageReceived], Awaitable[Reply]]

MAX_RANGE_ADDRESSES = 256  # a listen range wider than this is a typo, not a plan


def listen_addresses(entries: list[str]) -> list[str]:
    """smtp_listen_ips entries (addresses, CIDR networks, ranges) -> addresses to bind.

    Empty means every address, IPv4 and IPv6 ("" lets asyncio bind both wildcards).
    """
    if not entries:
        return [""]
    out: list[str] = []
    for entry in entries:
        first, last = parse_address_range(entry)
        count = int(last) - int(first) + 1
        if count > MAX_RANGE_ADDRESSES:
            raise ValueError(f"network.smtp_listen_ips: {entry!r} spans {count} addresses; "
                             f"at most {MAX_RANGE_ADDRESSES} are allowed")
        out += [str(ipaddress.ip_address(int(first) + i) if first.version == 4
                    else ipaddress.IPv6Address(int(first) + i)) for i in range(count)]
    return out


class InboundServer:
    def __init__(self, cfg: Config, hooks, on_message: MessageHandler,
                 ssl_context: ssl.SSLContext | None = None, auth_available: bool = False,
                 hostname: str = "localhost", reuse_port: bool = False):
        self.hooks = hooks
        self.on_message = on_message
        self.ssl_context = ssl_context
        self.reuse_port = reuse_port
        self.options = ServerOptions(hostname=hostname, tls_available=ssl_context is not None,
                                     auth_available=auth_available)
        self.apply(cfg)
        self.connections: set[SMTPProtocol] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task | None = None
        self.sessions_total = 0
        self.refused_busy = 0

    def apply(self, cfg: Config) -> None:
        """Settings that may change while running."""
        lim = cfg.limits
        self.options.max_message_size = lim.max_message_size
        self.options.max_recipients = lim.max_recipients
        self.options.max_command_line = lim.max_command_line
        self.options.max_errors = lim.max_errors
        # Each intake process takes its share of the cap (the kernel spreads connections evenly).
        self.max_connections = max(1, -(-lim.max_inbound_connections // cfg.intake_processes))
        self.priority_ips = AddressSet(lim.inbound_priority_ips)
        self.timeout = lim.smtp_receive_timeout
        self.debug = cfg.debug.smtp_in
        self.cfg = cfg

    async def start(self, serve: bool = True) -> list[tuple[str, int]]:
        """Bind every listen address; returns the (address, port) pairs bound. `serve=False`
        only checks that they can be bound (clear errors at start) and closes them again."""
        loop = asyncio.get_running_loop()
        port = self.cfg.network.smtp_port
        bound = []
        for host in listen_addresses(self.cfg.network.smtp_listen_ips):
            try:
                server = await loop.create_server(
                    lambda: SMTPProtocol(self), host=host or None, port=port,
                    reuse_address=True, reuse_port=self.reuse_port or None, backlog=1024,
                    start_serving=serve)  # not serving: bound, never listening
            except PermissionError:
                raise SystemExit(
                    f"Cannot listen on port {port}: binding a port below 1024 needs root or "
                    f"CAP_NET_BIND_SERVICE. Choose another with --smtp-port or network.smtp_port.")
            except OSError as e:
                raise SystemExit(f"Cannot listen for SMTP on {host or '*'} port {port}: "
                                 f"{e.strerror}. Is another mail server running there?")
            self.servers.append(server)
            bound += [s.getsockname()[:2] for s in server.sockets]
        if not serve:
            for server in self.servers:
                server.close()
            self.servers = []
            return bound
        self._sweeper = asyncio.create_task(self._sweep_idle())
        return bound

    async def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop accepting; let sessions storing a message finish; close the rest with 421."""
        for server in self.servers:
            server.close()
        if self._sweeper:
            self._sweeper.cancel()
        deadline = asyncio.get_running_loop().time() + drain_seconds
        while any(c.storing for c in self.connections) and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.shutdown(b"421 4.3.2 Service shutting down, try again later\r\n")
        for server in self.servers:
            await server.wait_closed()

    def counts(self) -> dict:
        """Open sessions, sessions since start, sessions refused at the connection cap."""
        return {"open": len(self.connections), "sessions_total": self.sessions_total,
                "refused_busy": self.refused_busy}

    async def retire(self, max_seconds: float = 600.0) -> None:
        """Stop accepting, and let the sessions in progress end as they would (the idle timeout
        still applies); those still open after `max_seconds` are closed as by stop()."""
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_seconds
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.1)
        await self.stop(drain_seconds=10.0)

    async def _sweep_idle(self) -> None:
        # One timer for all sessions: cheaper than re-arming a timer on every packet.
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(1.0)
            cutoff = loop.time() - self.timeout
            for conn in list(self.connections):
                if conn.last_active < cutoff and not conn.storing:
                    conn.shutdown(b"421 4.4.2 Idle too long, closing connection\r\n")

    def admit(self, peer_ip: str) -> bool:
        return len(self.connections) < self.max_connections or peer_ip in self.priority_ips


class SMTPProtocol(asyncio.Protocol):
    def __init__(self, server: InboundServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.machine: ServerConnection | None = None
        self.storing = False
        self.paused_writing = False
        self.tls_switching = False  # between our 220 to STARTTLS and the start of the handshake
        self.closed = False
        self.last_active = 0.0

    # --- asyncio callbacks -----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        srv = self.server
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.last_active = self.loop.time()
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        peer_ip = peer[0]
        if peer_ip.startswith("::ffff:"):
            peer_ip = peer_ip[7:]
        if not srv.admit(peer_ip):
            srv.refused_busy += 1
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()
            self.closed = True
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = Session(peer_ip=peer_ip, peer_port=peer[1], local_ip=local[0],
                          local_port=local[1])
        self.machine = ServerConnection(srv.options, srv.hooks, session)
        srv.connections.add(self)
        srv.sessions_total += 1
        self._write(self.machine.greeting())

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.machine is None or self.closed or self.tls_switching:
            # Clear text sent after STARTTLS but before the handshake is dropped: it must not
            # be taken as commands of the encrypted session (CVE-2011-0411).
            return
        if self.server.debug:
            trace.debug("%s <<< %r", self.machine.session.peer_ip, data[:500])
        self.last_active = self.loop.time()
        self.machine.receive(data)
        if not self.storing:
            self._drive()

    def pause_writing(self) -> None:
        # The client is not reading our replies: stop reading its commands until it does.
        self.paused_writing = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused_writing = False
        if not self.storing and not self.closed:
            self.transport.resume_reading()

    # --- driving the state machine ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if data and not self.closed:
            if self.server.debug:
                trace.debug("%s >>> %r", self.machine.session.peer_ip, data[:500])
            self.transport.write(data)

    def _drive(self) -> None:
        out, event = self.machine.step()
        self._write(out)
        if event is None:
            return
        if isinstance(event, MessageReceived):
            self.storing = True
            self.transport.pause_reading()
            task = self.loop.create_task(self.server.on_message(event))
            task.add_done_callback(self._stored)
        elif event is START_TLS:
            self.storing = True  # nothing is read until the handshake is over
            self.tls_switching = True
            self.loop.create_task(self._start_tls())
        elif event is CLOSE:
            self.closed = True
            self.transport.close()

    def _stored(self, task: asyncio.Task) -> None:
        self.storing = False
        try:
            reply = task.result()
        except Exception:  # the store failed: the client must keep the message (4xx)
            log.exception("storing a message from %s failed", self.machine.session.peer_ip)
            reply = Reply(451, "4.3.0", "Local error while storing the message, try again later")
        self.machine.message_done(reply)
        if self.closed:
            return
        if not self.paused_writing:
            self.transport.resume_reading()
        self._drive()

    async def _start_tls(self) -> None:
        # start_tls swaps the protocol before its first await: from here on bytes are decrypted
        # (and may reach data_received before it returns, e.g. an EHLO sent with the handshake).
        self.tls_switching = False
        try:
            new = await self.loop.start_tls(self.transport, self, self.server.ssl_context,
                                            server_side=True,
                                            ssl_handshake_timeout=min(60.0, self.server.timeout))
        except (ssl.SSLError, OSError, ConnectionError, asyncio.TimeoutError) as e:
            log.info("TLS handshake with %s failed: %s", self.machine.session.peer_ip, e)
            self.closed = True
            self.transport.abort()
            return
        self.transport = new
        tls = new.get_extra_info("ssl_object")
        self.machine.tls_started(tls.version() or "TLS")
        cipher = tls.cipher()  # (name, protocol, secret bits)
        if cipher:
            self.machine.session.tls_cipher = f"{cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
        self.storing = False
        self.last_active = self.loop.time()
        self._drive()

    def shutdown(self, farewell: bytes) -> None:
        if not self.closed:
            self.transport.write(farewell)
            self.closed = True
            self.transport.close()
