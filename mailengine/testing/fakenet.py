"""A simulated internet on loopback: mailbox providers that behave like the big ones, for tests
and for bench/fakenet.py.

Real delivery speed is set by how each provider lets a sender in, not by CPU. This module serves
several providers from one asyncio loop, each on its own loopback addresses (127.0.1.x by
default, port 25), each with its own behaviour:

    gmail = Provider("gmail", ["127.0.1.1", "127.0.1.2"],
                     latency=(0.02, 0.2),        # seconds per reply round trip (uniform)
                     max_connections=10,         # per client IP at once; "421 4.7.0" beyond
                     rate=(100, 10.0),           # messages per client IP per 10 s; 421 beyond
                     greylist=5.0,               # 450 4.7.1 for a new (ip, sender, rcpt)
                     unknown_share=0.02,         # 550 5.1.1 for 2 % of addresses
                     tarpit=0.0)                 # extra seconds before the reply to the data
    with FakeNet([gmail], {"gmail.fake": "gmail"}) as net:   # a thread runs the servers
        ... deliver to gmail.fake via net.zones() in a TestDNSServer ...
        net.stats()["gmail"].accepted       # {(message-id, rcpt): times accepted}

(`async with FakeNet(...)` runs them on the caller's loop instead.) The latency models a round
trip: commands that arrive pipelined are answered together after one delay. Which addresses are
unknown users is decided by a hash of the address, so every run refuses the same ones.
`standard_internet()` builds the mix bench/fakenet.py uses: a large "gmail", "yahoo" and
"outlook", a greylisting ISP, one that tarpits the data, small hosters, and a thousand or more
domains whose MX records (mx1.gmail.fake, ...) point at them; `net.zones()` gives those records
for `TestDNSServer`.

Every provider counts what it saw (`ProviderStats`): connections, connections refused over the
cap, rate throttling replies, greylisting replies, unknown users, messages accepted per
(Message-ID, recipient) so "exactly once" can be checked, bounce notices (null sender), and the
messages delivered on each connection; and per client IP (a sender's several source
addresses): the EHLO names said, the most connections at once, the messages accepted, and
(`keep_messages=True`) each message's bytes as received.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
import re
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from .loop_thread import LoopThread

MAX_LINE = 65536
MAX_DATA = 64 * 1024 * 1024

# The texts of the replies, in the manner of the providers (each may be replaced per provider).
TEXTS = {
    "connections": "421 4.7.0 Too many concurrent connections from your IP; try again later",
    "rate": "421 4.7.0 [{ip}] Unusual rate of mail from your address, deferred; try again later",
    "greylist": "450 4.7.1 <{rcpt}>: Greylisted, please try again later",
    "unknown": "550 5.1.1 <{rcpt}>: The email account that you tried to reach does not exist",
}

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*?)[ \t\r]*$", re.I | re.M)


@dataclass
class Provider:
    """One mailbox provider: its addresses and how it treats a sending client IP."""
    name: str
    ips: list[str]
    latency: tuple[float, float] = (0.0, 0.0)
    max_connections: int | None = None      # per client IP at once
    rate: tuple[int, float] | None = None   # (messages, seconds) per client IP
    greylist: float | None = None           # seconds before a new triple is accepted
    unknown_share: float = 0.0
    tarpit: float = 0.0                     # extra delay of the reply to the message data
    texts: dict[str, str] = field(default_factory=dict)
    mx_domain: str = ""                     # MX host names: mx1.<mx_domain>, ...; default NAME.fake
    port: int = 25
    keep_messages: bool = False             # tests: keep each message's bytes (stats.messages)

    def __post_init__(self) -> None:
        if not self.ips:
            raise ValueError(f"provider {self.name!r} has no addresses")
        self.mx_domain = self.mx_domain or f"{self.name}.fake"

    @property
    def mx_hosts(self) -> list[str]:
        return [f"mx{i + 1}.{self.mx_domain}" for i in range(len(self.ips))]

    def text(self, key: str, **kw: str) -> str:
        return self.texts.get(key, TEXTS[key]).format(**kw)

    def is_unknown(self, address: str) -> bool:
        """Whether `address` is an unknown user here: the same answer in every run."""
        if self.unknown_share <= 0:
            return False
        digest = hashlib.sha256(address.lower().encode("utf-8", "replace")).digest()
        return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < self.unknown_share


@dataclass
class ProviderStats:
    """What one provider saw (each field a count unless said otherwise)."""
    connections: int = 0
    peak_connections: int = 0               # the most at once from any one client IP
    refused_connections: int = 0            # 421 at the greeting: over max_connections
    throttled: int = 0                      # 421 to MAIL FROM: over the message rate
    greylisted: int = 0                     # 450 4.7.1 replies
    unknown: int = 0                        # 550 5.1.1 replies
    transactions: int = 0                   # messages accepted (end of data answered 250)
    notices: int = 0                        # of them, with a null sender (bounces, DSNs)
    accepted: Counter = field(default_factory=Counter)   # (message-id, rcpt) -> times
    per_connection: list[int] = field(default_factory=list)  # messages, per closed connection
    # per client IP (a sender's several source addresses, sources.py)
    helo: dict[str, set] = field(default_factory=dict)   # client ip -> EHLO/HELO names said
    peak_per_ip: Counter = field(default_factory=Counter)  # client ip -> most connections
    per_ip: Counter = field(default_factory=Counter)     # client ip -> messages accepted
    peak_total: int = 0                     # the most connections at once from all clients
    messages: list = field(default_factory=list)  # (client ip, bytes) with keep_messages

    @property
    def throttling(self) -> int:
        """Replies that tell a sender it is too fast: 421s over the cap and over the rate."""
        return self.refused_connections + self.throttled

    @property
    def deliveries(self) -> int:
        return sum(self.accepted.values())

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.accepted.values() if n > 1)

    def copy(self) -> "ProviderStats":
        return ProviderStats(self.connections, self.peak_connections, self.refused_connections,
                             self.throttled, self.greylisted, self.unknown, self.transactions,
                             self.notices, Counter(self.accepted), list(self.per_connection),
                             {ip: set(n) for ip, n in self.helo.items()},
                             Counter(self.peak_per_ip), Counter(self.per_ip), self.peak_total,
                             list(self.messages))


class _State:
    """A provider's memory of its clients (shared by all its addresses)."""

    def __init__(self, provider: Provider, seed: int) -> None:
        self.provider = provider
        self.stats = ProviderStats()
        self.active: Counter = Counter()                      # client ip -> open connections
        self.sent: dict[str, deque] = {}                      # client ip -> accept times
        self.first_seen: dict[tuple[str, str, str], float] = {}
        self.rng = random.Random(f"{seed}:{provider.name}")

    def delay(self) -> float:
        lo, hi = self.provider.latency
        return self.rng.uniform(lo, hi) if hi > 0 else 0.0

    def over_rate(self, ip: str, now: float) -> bool:
        if self.provider.rate is None:
            return False
        limit, window = self.provider.rate
        times = self.sent.get(ip)
        if times is None:
            return limit <= 0
        while times and times[0] <= now - window:
            times.popleft()
        return len(times) >= limit

    def greylisted(self, ip: str, sender: str, rcpt: str, now: float) -> bool:
        wait = self.provider.greylist
        if wait is None:
            return False
        first = self.first_seen.setdefault((ip, sender.lower(), rcpt.lower()), now)
        return now - first < wait


def _address(arg: str, prefix: str) -> str | None:
    """'FROM:<a@b> SIZE=1' -> 'a@b'; None when it is not that shape."""
    if arg[:len(prefix)].upper() != prefix:
        return None
    rest = arg[len(prefix):].strip()
    if not rest.startswith("<") or ">" not in rest:
        return None
    return rest[1:rest.index(">")]


def message_id(data: bytes) -> str:
    """The Message-ID of a message (in its header), or a digest of it when it has none."""
    head = data.split(b"\r\n\r\n", 1)[0]
    m = _MESSAGE_ID.search(head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" "))
    if m and m.group(1):
        return m.group(1).decode("utf-8", "replace")
    return "sha256:" + hashlib.sha256(data).hexdigest()[:32]


class _Session(asyncio.Protocol):
    """One SMTP connection. Replies are collected while commands are waiting in the input and
    sent together after one latency delay (a round trip), so pipelining pays off as it would."""

    def __init__(self, state: _State, net: "FakeNet") -> None:
        self.state = state
        self.net = net
        self.inbuf = bytearray()
        self.out: list[str] = []
        self.extra = 0.0          # tarpit delay owed by the replies in `out`
        self.waiting = False      # a flush is scheduled: input waits
        self.closing = False
        self.in_data = False
        self.ip = ""
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.delivered = 0
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.net._sessions.add(self)
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.ip = peer[0]
        st, p = self.state.stats, self.state.provider
        st.connections += 1
        self.state.active[self.ip] += 1
        n = self.state.active[self.ip]
        st.peak_connections = max(st.peak_connections, n)
        st.peak_per_ip[self.ip] = max(st.peak_per_ip[self.ip], n)
        st.peak_total = max(st.peak_total, sum(self.state.active.values()))
        if p.max_connections is not None and n > p.max_connections:
            st.refused_connections += 1
            self._say(p.text("connections", ip=self.ip), close=True)
        else:
            self._say(f"220 {p.mx_hosts[0]} ESMTP fakenet")
        self._flush_later()

    def connection_lost(self, exc) -> None:
        self.net._sessions.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.state.active[self.ip] -= 1
        if self.state.active[self.ip] <= 0:
            del self.state.active[self.ip]
        self.state.stats.per_connection.append(self.delivered)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.inbuf += data
        if len(self.inbuf) > MAX_DATA:
            self._say("552 5.3.4 Message too big", close=True)
            self._flush()
            return
        if not self.waiting:
            self._process()

    # -- replies ------------------------------------------------------------------------------

    def _say(self, text: str, close: bool = False, extra: float = 0.0) -> None:
        self.out.append(text)
        self.extra += extra
        if close:
            self.closing = True

    def _flush_later(self) -> None:
        if not self.out or self.waiting:
            return
        delay = self.state.delay() + self.extra
        self.extra = 0.0
        if delay <= 0:
            self._flush()
            return
        self.waiting = True
        self.timer = asyncio.get_running_loop().call_later(delay, self._flush)

    def _flush(self) -> None:
        self.waiting = False
        self.timer = None
        if self.transport is None:
            return
        self.transport.write("".join(t + "\r\n" for t in self.out).encode("utf-8"))
        self.out.clear()
        if self.closing:
            self.transport.close()
            return
        self._process()

    # -- commands -----------------------------------------------------------------------------

    def _process(self) -> None:
        """Answer every complete command (or message) in the input, then send the replies."""
        while not self.closing:
            if self.in_data:
                if self.inbuf.startswith(b".\r\n"):
                    body, end = b"", 3
                else:
                    i = self.inbuf.find(b"\r\n.\r\n")
                    if i < 0:
                        break
                    body, end = bytes(self.inbuf[:i + 2]), i + 5
                del self.inbuf[:end]
                self.in_data = False
                self._end_of_data(body)
                continue
            i = self.inbuf.find(b"\n")
            if i < 0:
                if len(self.inbuf) > MAX_LINE:
                    self._say("500 5.5.6 Line too long", close=True)
                break
            line = bytes(self.inbuf[:i]).rstrip(b"\r").decode("utf-8", "replace")
            del self.inbuf[:i + 1]
            self._command(line)
        self._flush_later()

    def _command(self, line: str) -> None:
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        p, st = self.state.provider, self.state.stats
        if verb in ("EHLO", "HELO"):
            self.sender, self.rcpts = None, []
            st.helo.setdefault(self.ip, set()).add(arg.strip())
            if verb == "HELO":
                self._say(f"250 {p.mx_hosts[0]}")
            else:
                self._say(f"250-{p.mx_hosts[0]} at your service\r\n250-PIPELINING\r\n"
                          "250-SIZE 52428800\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
        elif verb == "MAIL":
            sender = _address(arg, "FROM:")
            if sender is None:
                self._say("501 5.5.4 Syntax: MAIL FROM:<address>")
            elif self.sender is not None:
                self._say("503 5.5.1 Nested MAIL command")
            elif self.state.over_rate(self.ip, time.monotonic()):
                st.throttled += 1
                self._say(p.text("rate", ip=self.ip), close=True)
            else:
                self.sender, self.rcpts = sender, []
                self._say("250 2.1.0 Ok")
        elif verb == "RCPT":
            rcpt = _address(arg, "TO:")
            if self.sender is None:
                self._say("503 5.5.1 Need MAIL command")
            elif not rcpt or "@" not in rcpt:
                self._say("501 5.1.3 Bad recipient address syntax")
            elif p.is_unknown(rcpt):
                st.unknown += 1
                self._say(p.text("unknown", rcpt=rcpt))
            elif self.state.greylisted(self.ip, self.sender, rcpt, time.monotonic()):
                st.greylisted += 1
                self._say(p.text("greylist", rcpt=rcpt))
            else:
                self.rcpts.append(rcpt)
                self._say("250 2.1.5 Ok")
        elif verb == "DATA":
            if self.sender is None:
                self._say("503 5.5.1 Need MAIL command")
            elif not self.rcpts:
                self._say("554 5.5.1 No valid recipients")
            else:
                self.in_data = True
                self._say("354 End data with <CR><LF>.<CR><LF>")
        elif verb == "RSET":
            self.sender, self.rcpts = None, []
            self._say("250 2.0.0 Ok")
        elif verb == "NOOP":
            self._say("250 2.0.0 Ok")
        elif verb == "QUIT":
            self._say("221 2.0.0 Bye", close=True)
        else:
            self._say("502 5.5.2 Command not recognized")

    def _end_of_data(self, body: bytes) -> None:
        st = self.state.stats
        token = message_id(body)
        for rcpt in self.rcpts:
            st.accepted[(token, rcpt.lower())] += 1
        st.transactions += 1
        st.per_ip[self.ip] += 1
        if self.state.provider.keep_messages:
            st.messages.append((self.ip, body))
        if self.sender == "":
            st.notices += 1
        self.delivered += 1
        self.state.sent.setdefault(self.ip, deque()).append(time.monotonic())
        self.sender, self.rcpts = None, []
        self._say(f"250 2.0.0 Ok: queued as F{st.transactions}", extra=self.state.provider.tarpit)
        self.net._notify()


class FakeNet:
    """The providers' servers; `with` runs them in a thread, `async with` on the running loop.

    `domains` maps each mail domain to the name of the provider that hosts it."""

    def __init__(self, providers: list[Provider], domains: dict[str, str] | None = None,
                 seed: int = 1) -> None:
        names = [p.name for p in providers]
        if len(set(names)) != len(names):
            raise ValueError(f"provider names repeat: {names}")
        self.providers = {p.name: p for p in providers}
        self.domains = {d.lower(): n for d, n in (domains or {}).items()}
        for d, n in self.domains.items():
            if n not in self.providers:
                raise ValueError(f"domain {d!r} names an unknown provider {n!r}")
        self.seed = seed
        self._states = {p.name: _State(p, seed) for p in providers}
        self._servers: list[asyncio.AbstractServer] = []
        self._sessions: set[_Session] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: LoopThread | None = None
        self._changed: asyncio.Event | None = None

    # -- DNS ----------------------------------------------------------------------------------

    def zones(self) -> dict[str, dict]:
        """Records for TestDNSServer: every domain's MX hosts, every MX host's address."""
        zones: dict[str, dict] = {}
        for p in self.providers.values():
            for host, ip in zip(p.mx_hosts, p.ips):
                zones[host] = {"A": [ip]}
        for domain, name in self.domains.items():
            hosts = self.providers[name].mx_hosts
            zones[domain] = {"MX": [(10 * (i + 1), h) for i, h in enumerate(hosts)]}
        return zones

    def provider_of(self, address_or_domain: str) -> Provider:
        domain = address_or_domain.rpartition("@")[2].lower()
        return self.providers[self.domains[domain]]

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> "FakeNet":
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        try:
            for name, state in self._states.items():
                for ip in state.provider.ips:
                    server = await self._loop.create_server(
                        lambda n=name: _Session(self._states[n], self), ip, state.provider.port,
                        reuse_address=True, backlog=1024)
                    self._servers.append(server)
                    if state.provider.port == 0:  # tests: the first free port, then keep it
                        state.provider.port = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for sess in list(self._sessions):
            if sess.transport is not None:
                sess.transport.abort()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        await asyncio.sleep(0)  # let the aborted connections report connection_lost

    async def __aenter__(self) -> "FakeNet":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def __enter__(self) -> "FakeNet":
        """Run the servers on a loop in a background thread (for synchronous callers)."""
        self._background = LoopThread("fakenet", self.start, self.stop)
        self._background.run()
        return self

    def __exit__(self, *exc) -> None:
        if self._background is not None:
            self._background.stop()
            self._background = None

    # -- what was seen ------------------------------------------------------------------------

    def _call(self, fn: Callable):
        """fn() on the servers' loop (a consistent picture while they run in a thread)."""
        bg = self._background
        if bg is not None and bg.thread is not None and self._loop is not None and \
                self._loop.is_running() and threading.current_thread() is not bg.thread:
            async def call():
                return fn()
            return asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)
        return fn()

    def stats(self) -> dict[str, ProviderStats]:
        """A copy of every provider's counts, by provider name."""
        return self._call(lambda: {n: s.stats.copy() for n, s in self._states.items()})

    def reset(self) -> None:
        """Forget counts and client memory (rates, greylisting) between two runs."""
        def clear():
            for name, st in self._states.items():
                active = st.active
                self._states[name] = _State(st.provider, self.seed)
                self._states[name].active = active
            for sess in self._sessions:  # sessions still open count into the new state
                sess.state = self._states[sess.state.provider.name]
        self._call(clear)

    def accepted(self) -> Counter:
        """(message-id, rcpt) -> times accepted, over all providers."""
        def total():
            c: Counter = Counter()
            for st in self._states.values():
                c.update(st.stats.accepted)
            return c
        return self._call(total)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """On the servers' loop: wait until predicate() holds (checked after each message)."""
        assert self._changed is not None
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


# -- the standard mix ---------------------------------------------------------------------------

@dataclass
class Internet:
    """`standard_internet()`'s result: the FakeNet, and how a list's recipients spread."""
    net: FakeNet
    weights: dict[str, float]    # domain -> share of a mailing list's recipients
    sender_domain: str

    def recipients(self, count: int, seed: int = 7) -> list[str]:
        """`count` distinct addresses spread over the domains by their shares (the same list
        for the same arguments)."""
        rng = random.Random(seed)
        domains = list(self.weights)
        picks = rng.choices(domains, weights=[self.weights[d] for d in domains], k=count)
        return [f"user{i}@{d}" for i, d in enumerate(picks)]


def standard_internet(domains: int = 1000, net: str = "127.0.1",
                      latency: tuple[float, float] = (0.02, 0.2), port: int = 25,
                      greylist: float = 10.0, tarpit: float = 2.0, seed: int = 1) -> Internet:
    """Providers like the real ones on `net`.1 to `net`.9, and `domains` domains hosted by them.

    Shares of a list's recipients: the big consumer domains (gmail.fake 30 %, yahoo.fake and
    aol.fake 12 %, outlook.fake and hotmail.fake 13 %), the rest over a long tail of `domains`
    company and ISP domains (Zipf-like), hosted by gmail (Workspace) and outlook (365) for half,
    the rest by a greylisting ISP, an ISP that tarpits the data, and two small hosters. The
    limits are per client IP: gmail 20 connections and 400 messages per 10 s, yahoo 5 and 100,
    outlook 10 and 200, the ISPs 5 to 10 connections. `sender.fake` (the senders' own domain,
    where bounces go) accepts everything.
    """
    if domains < 10:
        raise ValueError("standard_internet needs at least 10 domains")
    ip = lambda k: f"{net}.{k}"  # noqa: E731
    providers = [
        Provider("gmail", [ip(1), ip(2)], latency, max_connections=20, rate=(400, 10.0),
                 unknown_share=0.02, port=port,
                 texts={"rate": "421 4.7.28 [{ip}] Our system has detected an unusual rate of "
                                "mail from your IP address; try again later"}),
        Provider("yahoo", [ip(3)], latency, max_connections=5, rate=(100, 10.0),
                 unknown_share=0.03, port=port,
                 texts={"rate": "421 4.7.0 [TSS04] Messages from {ip} temporarily deferred "
                                "due to unexpected volume"}),
        Provider("outlook", [ip(4)], latency, max_connections=10, rate=(200, 10.0),
                 unknown_share=0.02, port=port,
                 texts={"rate": "421 4.7.500 Server busy, please try again later from {ip}"}),
        Provider("greyisp", [ip(5)], latency, max_connections=5, greylist=greylist,
                 unknown_share=0.05, port=port),
        Provider("tarpit", [ip(6)], latency, max_connections=10, tarpit=tarpit,
                 unknown_share=0.05, port=port),
        Provider("hostone", [ip(7)], latency, max_connections=5, unknown_share=0.05, port=port),
        Provider("hosttwo", [ip(8)], latency, max_connections=8, unknown_share=0.05, port=port),
        Provider("home", [ip(9)], (0.0, 0.0), port=port),
    ]
    mapping = {"gmail.fake": "gmail", "yahoo.fake": "yahoo", "aol.fake": "yahoo",
               "outlook.fake": "outlook", "hotmail.fake": "outlook", "sender.fake": "home"}
    weights = {"gmail.fake": 30.0, "yahoo.fake": 9.0, "aol.fake": 3.0, "outlook.fake": 7.0,
               "hotmail.fake": 6.0}
    # The tail: domain i hosted by the i-th entry of this cycle (50 % Google/Microsoft).
    hosts = ["gmail", "outlook", "gmail", "greyisp", "outlook", "hostone", "gmail", "tarpit",
             "outlook", "hosttwo"]
    tail = domains - len(weights)
    harmonic = sum(1.0 / (i + 1) for i in range(tail))
    for i in range(tail):
        d = f"d{i:04d}.fake"
        mapping[d] = hosts[i % len(hosts)]
        weights[d] = 45.0 * (1.0 / (i + 1)) / harmonic
    return Internet(FakeNet(providers, mapping, seed=seed), weights, "sender.fake")
