"""The SMTP listener: runs the sans-IO server (smtp/server.py) over asyncio connections.

This adapter owns everything that touches sockets and time: listening on `smtp_listen_ips` and
`smtp_port`, the `max_inbound_connections` cap (421 beyond it, `inbound_priority_ips` exempt), the
idle timeout `smtp_receive_timeout`, STARTTLS handshakes, and flow control: it stops reading from
a client while that client's message is being stored or while its replies are not being read, so
no client can make memory grow without bound.

Against hostile clients (README "Security"):
- `max_connections_per_ip` sessions per client address (421 4.7.0 at the greeting beyond it).
- Deadlines that trickled bytes do not extend (slowloris): a command line must be whole within
  `smtp_command_deadline` of its first byte; a message gets that much time ahead, and each byte
  received buys 1/`smtp_min_data_rate` s more, never more than the deadline ahead (Postfix's
  smtpd_per_request_deadline with smtpd_min_data_rate). 421 4.4.2 when one passes.
- A memory budget for all sessions of the process together (`max_intake_memory_mb`): what the
  sessions buffer, and the messages being stored, are counted; the session whose message would go
  beyond it has that message released and answered 452 4.3.1.
- AUTH passwords are checked in threads, bounded and throttled per address (auth_checks.py).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from typing import Awaitable, Callable

from .auth_checks import PasswordChecks, SharedThrottle, FILE as AUTH_FAILURES_FILE
from .config import AddressSet, Config, parse_address_range
from .smtp.server import (CLOSE, NO_STORAGE, START_TLS, AuthCheck, MessageReceived, Reply,
                          ServerConnection, ServerOptions, Session)

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
                 hostname: str = "localhost", reuse_port: bool = False, shared_count=None):
        self.hooks = hooks
        # SharedSessionCount (session_slots.py) in an intake process: the cap counts the
        # sessions of every intake process; None: this process's own sessions only.
        self.shared_count = shared_count
        self.on_message = on_message
        self.ssl_context = ssl_context
        self.reuse_port = reuse_port
        self.options = ServerOptions(hostname=hostname, tls_available=ssl_context is not None,
                                     auth_available=auth_available)
        self.auth = PasswordChecks(hooks.on_auth, SharedThrottle(cfg.home / AUTH_FAILURES_FILE))
        self.apply(cfg)
        self.connections: set[SMTPProtocol] = set()
        self.per_ip: dict[str, int] = {}  # client address -> its sessions counted against the cap
        self.held = 0  # bytes all sessions buffer or are storing (the memory budget)
        self.servers: list[asyncio.base_events.Server] = []
        self._sweeper: asyncio.Task | None = None
        self.sessions_total = 0
        self.refused_busy = 0

    def apply(self, cfg: Config, hostname: str | None = None) -> None:
        """Settings that may change while running (`hostname`: the greeting and EHLO name,
        network.helo_text)."""
        if hostname:
            self.options.hostname = hostname
        lim = cfg.limits
        self.options.max_message_size = lim.max_message_size
        self.options.max_recipients = lim.max_recipients
        self.options.max_command_line = lim.max_command_line
        self.options.max_errors = lim.max_errors
        self.options.max_hops = lim.max_hops
        n = cfg.intake_processes
        self.max_connections = lim.max_inbound_connections
        if self.shared_count is None and n > 1:
            # no shared count (not Linux): each intake process takes an equal share of the cap
            self.max_connections = max(1, -(-lim.max_inbound_connections // n))
        self.max_per_ip = lim.max_connections_per_ip
        if self.shared_count is None and n > 1 and self.max_per_ip:
            self.max_per_ip = max(1, -(-self.max_per_ip // n))  # an equal share, as above
        self.priority_ips = AddressSet(lim.inbound_priority_ips)
        self.per_ip_exempt = [self.priority_ips, AddressSet(cfg.policy.relay_ips)]
        self.timeout = lim.smtp_receive_timeout
        self.command_deadline = lim.smtp_command_deadline
        self.min_data_rate = lim.smtp_min_data_rate
        self.memory_budget = lim.max_intake_memory_mb * 1024 * 1024
        self.auth.limit = lim.max_auth_checks
        self.debug = cfg.debug.smtp_in
        self.cfg = cfg

    async def start(self, serve: bool = True) -> list[tuple[str, int]]:
        """Bind every listen address; returns the (address, port) pairs bound. `serve=False`
        only checks that they can be bound (clear errors at start) and closes them again.

        That check binds without SO_REUSEPORT, even for a server that will share the port with
        its intake workers: SO_REUSEPORT would also share it with any other program of this
        user that set it (another engine, from another home), and both would take mail."""
        loop = asyncio.get_running_loop()
        port = self.cfg.network.smtp_port
        bound = []
        for host in listen_addresses(self.cfg.network.smtp_listen_ips):
            try:
                server = await loop.create_server(
                    lambda: SMTPProtocol(self), host=host or None, port=port,
                    reuse_address=True, reuse_port=(self.reuse_port and serve) or None,
                    backlog=1024, start_serving=serve)  # not serving: bound, never listening
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
        self.auth.close()

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
            now = loop.time()
            cutoff = now - self.timeout
            for conn in list(self.connections):
                if conn.storing:
                    continue  # waiting for us (storing, checking a password, TLS), not the client
                if conn.last_active < cutoff:
                    conn.shutdown(b"421 4.4.2 Idle too long, closing connection\r\n")
                elif conn.line_deadline is not None and now > conn.line_deadline:
                    conn.shutdown(b"421 4.4.2 Command line too slow, closing connection\r\n")
                elif conn.message_deadline is not None and now > conn.message_deadline:
                    conn.shutdown(b"421 4.4.2 Message data too slow, closing connection\r\n")

    def admit(self, peer_ip: str) -> bytes | None:
        """Count a new session of `peer_ip` against `max_inbound_connections` (of every intake
        process, when they share a count; `inbound_priority_ips` exempt) and
        `max_connections_per_ip` (`relay_ips` and `inbound_priority_ips` exempt). None when
        counted, else the 421 reply; session_ended() undoes a None."""
        shared = self.shared_count
        if shared is not None:
            why = shared.admit(peer_ip, self.max_connections, self.max_per_ip, False, False)
            if why == "cap" and peer_ip in self.priority_ips:
                why = shared.admit(peer_ip, 0, self.max_per_ip, True, True)
            elif why == "address" and self._exempt_per_ip(peer_ip):
                why = shared.admit(peer_ip, self.max_connections, 0, False, True)
        else:
            why = None
            if len(self.connections) >= self.max_connections and \
                    peer_ip not in self.priority_ips:
                why = "cap"
            elif self.max_per_ip and self.per_ip.get(peer_ip, 0) >= self.max_per_ip and \
                    not self._exempt_per_ip(peer_ip):
                why = "address"
            else:
                self.per_ip[peer_ip] = self.per_ip.get(peer_ip, 0) + 1
        if why is None:
            return None
        self.refused_busy += 1
        return (b"421 4.7.0 Too many connections, try again later\r\n" if why == "cap" else
                b"421 4.7.0 Too many connections from your address, try again later\r\n")

    def _exempt_per_ip(self, peer_ip: str) -> bool:
        return any(peer_ip in exempt for exempt in self.per_ip_exempt)

    def session_ended(self, peer_ip: str) -> None:
        if self.shared_count is not None:
            self.shared_count.release(peer_ip)
            return
        left = self.per_ip.pop(peer_ip, 1) - 1
        if left:
            self.per_ip[peer_ip] = left


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
        self.counted_ip: str | None = None  # its address, while counted against the caps
        self.held = 0  # bytes of this session in the server's memory budget
        self.storing_bytes = 0  # the message being stored
        self.line_deadline: float | None = None  # the unfinished command line must end by then
        self.message_deadline: float | None = None  # the message must progress by then
        self._lines_seen = 0

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
        refusal = srv.admit(peer_ip)
        if refusal is not None:
            self.transport.write(refusal)
            self.transport.close()
            self.closed = True
            return
        self.counted_ip = peer_ip
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
        srv = self.server
        srv.connections.discard(self)
        if self.counted_ip is not None:  # counted against the connection caps until now
            srv.session_ended(self.counted_ip)
            self.counted_ip = None
        srv.held -= self.held
        self.held = 0

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
            self._account()  # before the step: a message over the budget is never stored
            self._drive()
        self._track(len(data))

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
        srv = self.server
        self.machine.room = srv.memory_budget - srv.held
        out, event = self.machine.step()
        self._write(out)
        if event is None:
            return
        if isinstance(event, MessageReceived):
            self.storing = True
            self.storing_bytes = len(event.data)
            self.transport.pause_reading()
            task = self.loop.create_task(self.server.on_message(event))
            task.add_done_callback(self._stored)
        elif isinstance(event, AuthCheck):
            self.storing = True  # nothing is read until the password is checked
            self.transport.pause_reading()
            self.loop.create_task(self._check_password(event))
        elif event is START_TLS:
            self.storing = True  # nothing is read until the handshake is over
            self.tls_switching = True
            self.loop.create_task(self._start_tls())
        elif event is CLOSE:
            self.closed = True
            self.transport.close()

    def _track(self, received: int) -> None:
        """After the machine ran: move the deadlines and count this session's memory."""
        m, srv = self.machine, self.server
        if m is None or self.closed:
            return
        now = self.loop.time()
        # A command line's deadline runs from its first byte to its end.
        if m.lines_read != self._lines_seen:
            self._lines_seen, self.line_deadline = m.lines_read, None
        if not (m.reading_line and m.pending_input):
            self.line_deadline = None
        elif self.line_deadline is None:
            self.line_deadline = now + srv.command_deadline
        # A message's: the deadline ahead at its start; each byte buys 1/rate s, up to that.
        if not (m.receiving_message and srv.min_data_rate):
            self.message_deadline = None
        elif self.message_deadline is None:
            self.message_deadline = now + srv.command_deadline
        else:
            self.message_deadline = min(now + srv.command_deadline,
                                        self.message_deadline + received / srv.min_data_rate)
        if self._account() and not self.storing:
            self._drive()  # drop the released bytes now
            self._account()

    def _account(self) -> bool:
        """Count what this session holds in the memory budget; beyond the budget, the message it
        is receiving is released (its bytes go at the next step, which answers it 452)."""
        m, srv = self.machine, self.server
        held = m.held + self.storing_bytes
        srv.held += held - self.held
        self.held = held
        if srv.held > srv.memory_budget and m.release_message(NO_STORAGE):
            log.warning("intake memory budget (%d MB) spent: the message from %s is refused",
                        srv.memory_budget >> 20, m.session.peer_ip)
            return True
        return False

    async def _check_password(self, event: AuthCheck) -> None:
        try:
            result = await self.server.auth.check(event.session, event.user, event.password)
        except Exception:
            log.exception("checking the password of %r from %s failed", event.user,
                          event.session.peer_ip)
            result = Reply(454, "4.7.0", "Temporary authentication failure")
        self.storing = False
        self.machine.auth_done(result)
        self._resume()

    def _stored(self, task: asyncio.Task) -> None:
        self.storing = False
        self.storing_bytes = 0
        try:
            reply = task.result()
        except Exception:  # the store failed: the client must keep the message (4xx)
            log.exception("storing a message from %s failed", self.machine.session.peer_ip)
            reply = Reply(451, "4.3.0", "Local error while storing the message, try again later")
        self.machine.message_done(reply)
        self._resume()

    def _resume(self) -> None:
        """The machine has its answer (a password check, a store): read and reply again."""
        if self.closed:
            return
        if not self.paused_writing:
            self.transport.resume_reading()
        self._drive()
        self._track(0)

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
        self._track(0)

    def shutdown(self, farewell: bytes) -> None:
        if not self.closed:
            self.transport.write(farewell)
            self.closed = True
            self.transport.close()
