"""Where mail for a domain goes: bypass entries, MX lookup, implicit MX, null MX, a TTL cache.

`MXResolver.resolve_mx(domain)` returns an `MXResult`: the ordered `(host, ip, port)` targets to
try, or why there are none and whether that is permanent (bounce) or temporary (retry later):

1. `basic.dns_servers` bypass entries come first. `domain,host,MX,ip[:port]` pins the domain's
   mail hosts without any DNS (several entries = several hosts, in the order given);
   `domain,host,NS,ip[:port]` sends every lookup of that domain and its subdomains to that server.
2. MX records sorted by preference, shuffled among equal preferences (spreads load the way the
   domain's owner asked), each host resolved to its IPv4 then IPv6 addresses.
3. No MX records: the domain's own addresses (implicit MX, RFC 5321 section 5.1).
4. A null MX (`0 .`, RFC 7505) or a domain that does not exist (NXDOMAIN): permanent failure.
   Server failure, timeout or no name server: temporary failure.

Every failure carries its RFC 3463 status for bounces and DSNs, and says which name failed in
Postfix's words ("Host or domain name not found. Name service error for name=X type=MX: Host not
found"): 5.1.10 null MX (RFC 7505, reply 556); 5.1.2 the recipient's domain does not exist or
has neither MX nor address records (X.1.2: the destination system does not exist); 5.4.4 an MX
host that does not exist or has no address (X.4.4: unable to route, as Postfix says); 5.4.6 every
server refused by policy.refused_mail_servers (a loop); 4.4.3 a lookup that failed for now.

Answers are cached per (name, type) for their TTL (negative answers for the SOA's negative TTL,
server failures briefly), the cache is bounded, its clock injectable; concurrent lookups of one
name share one query. Built on dnspython's asyncio resolver.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from collections.abc import Callable, Container, Iterable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from mailengine.config import AddressSet, split_host_port

log = logging.getLogger("mailengine.dns")

A, AAAA, MX = dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.MX
PTR = dns.rdatatype.PTR
NULL_MX = "5.1.10"   # RFC 7505 section 4.2
NO_ROUTE = "5.4.4"   # an MX host that does not exist or has no address (RFC 3463 X.4.4)
LOOP = "5.4.6"      # every server is in policy.refused_mail_servers (RFC 3463 X.4.6)
NOT_FOUND = "Host or domain name not found. Name service error for name={} type={}: {}"


@dataclass(frozen=True)
class Target:
    """One address to try: the MX host it came from, its IP (a string) and the SMTP port."""

    host: str
    ip: str
    port: int = 25
    preference: int = 0


@dataclass(frozen=True)
class MXResult:
    """The outcome of `resolve_mx`: targets in the order to try them, or an error.

    `error` is "" on success, else the reason (for logs, bounces and DSN transcripts); `permanent`
    tells a bounce (True) from a retry later (False). `text` is the transcript line either way.
    """

    domain: str
    targets: tuple[Target, ...] = ()
    error: str = ""
    permanent: bool = False
    source: str = "dns"  # dns | implicit (no MX: the domain's address) | bypass | literal
    status: str = ""  # RFC 3463 code of the error; "" = 5.1.2 when permanent, else 4.4.3

    @property
    def enhanced(self) -> str:
        """The error's RFC 3463 status (what the bounce and the DSN say)."""
        return self.status or ("5.1.2" if self.permanent else "4.4.3")

    @property
    def code(self) -> int:
        """The SMTP reply code that goes with `enhanced` (RFC 7505: 556 for a null MX)."""
        if not self.permanent:
            return 451
        return 556 if self.enhanced == NULL_MX else 550

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def temporary(self) -> bool:
        return bool(self.error) and not self.permanent

    @property
    def hosts(self) -> list[str]:
        """The distinct mail hosts, in the order their targets come."""
        return list(dict.fromkeys(t.host for t in self.targets))

    @property
    def text(self) -> str:
        if self.error:
            return self.error
        how = {"bypass": "DNS bypass", "literal": "Address literal"}.get(
            self.source, "DNS lookup succeeded")
        return f"{how}, found {len(self.hosts)} acceptable mail servers for {self.domain}"

    def __str__(self) -> str:
        return self.text


@dataclass
class ResolverStats:
    queries: int = 0  # sent to a name server
    cache_hits: int = 0
    shared: int = 0  # lookups that joined a query already in flight
    failures: int = 0  # server failures and timeouts


@dataclass
class _Answer:
    """One cached (name, type) lookup."""

    status: str  # ok | nodata | nxdomain | fail
    values: list[Any] = field(default_factory=list)  # addresses, or (preference, host) for MX
    ttl: float = 0.0  # seconds, from the answer (negative answers: the SOA's negative TTL)
    expires: float = 0.0  # by the resolver's clock
    error: str = ""


@dataclass(frozen=True)
class Bypass:
    """One parsed `basic.dns_servers` entry."""

    domain: str
    host: str
    kind: str  # MX | NS
    ip: str
    port: int

    @classmethod
    def parse(cls, entry: str) -> Bypass:
        parts = [p.strip() for p in entry.split(",")]
        if len(parts) != 4 or parts[2].upper() not in ("MX", "NS"):
            raise ValueError(f"{entry!r} must be 'domain,hostname,MX|NS,ip[:port]'")
        kind = parts[2].upper()
        ip, port = split_host_port(parts[3], 25 if kind == "MX" else 53)
        return cls(_normalise(parts[0]), _normalise(parts[1]), kind, ip, port)


def _normalise(domain: str) -> str:
    """Lower-case ASCII (IDNA) form without the final dot; ValueError when not a domain name."""
    text = domain.strip().rstrip(".")
    if not text:
        raise ValueError("empty domain name")
    try:
        return dns.name.from_text(text).to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, UnicodeError) as e:
        raise ValueError(f"{domain!r} is not a valid domain name: {e}") from None


def _host(name: dns.name.Name) -> str:
    """An MX exchange as text; "" for the root (a null MX)."""
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def _under(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def _nameserver(ip: str, port: int) -> dns.nameserver.Do53Nameserver:
    return dns.nameserver.Do53Nameserver(ip, port)


class MXResolver:
    """Resolves recipient domains to delivery targets; one per engine, used from one event loop.

    `nameservers`: `basic.nameservers` ("ip" or "ip:port"; empty = the system's resolvers).
    `bypass`: `basic.dns_servers` entries. `refused_ips`: a container of IP strings never to
    deliver to (e.g. `config.AddressSet(policy.refused_mail_servers)`), left out of the targets.
    `clock` is only used for cache expiry (tests pass a fake); `rng` shuffles equal preferences.
    """

    def __init__(self, nameservers: Iterable[str] = (), bypass: Iterable[str] = (), *,
                 debug: bool = False, clock: Callable[[], float] = time.monotonic,
                 timeout: float = 10.0, cache_size: int = 10000, negative_ttl: float = 300,
                 failure_ttl: float = 30, min_ttl: float = 0, max_ttl: float = 86400,
                 max_targets: int = 16, prefer_ipv6: bool = False, ipv6: bool = True,
                 refused_ips: Container[str] = (), rng: random.Random | None = None) -> None:
        self.debug = debug
        self.clock = clock
        self.timeout = timeout
        self.cache_size = cache_size
        self.negative_ttl = negative_ttl
        self.failure_ttl = failure_ttl
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.max_targets = max_targets
        self.prefer_ipv6 = prefer_ipv6
        self.ipv6 = ipv6
        self.refused_ips = refused_ips
        self.rng = rng or random.Random()
        self.stats = ResolverStats()
        self._cache: OrderedDict[tuple[str, int], _Answer] = OrderedDict()
        self._inflight: dict[tuple[str, int], asyncio.Task[_Answer]] = {}
        self._default = self._make_resolver([split_host_port(n, 53) for n in nameservers])
        self.bypass: tuple[str, ...] = ()
        self.bypass_mx: dict[str, list[Bypass]] = {}
        self._bypass_ns: list[tuple[str, dns.asyncresolver.Resolver | None]] = []
        self.set_bypass(bypass)

    def set_bypass(self, bypass: Iterable[str]) -> bool:
        """Take `basic.dns_servers` entries (at start, and when the setting changes while
        running); True when they differ from the ones in use. Cached answers are dropped on a
        change: one from a name server that is no longer asked must not outlive it."""
        entries = tuple(bypass)
        if entries == self.bypass:
            return False
        mx: dict[str, list[Bypass]] = {}
        ns: dict[str, list[tuple[str, int]]] = {}
        for entry in entries:
            b = Bypass.parse(entry)
            if b.kind == "MX":
                mx.setdefault(b.domain, []).append(b)
            else:
                ns.setdefault(b.domain, []).append((b.ip, b.port))
        self.bypass, self.bypass_mx = entries, mx
        # Longest domain first, so the most specific NS bypass wins.
        self._bypass_ns = [(d, self._make_resolver(servers))
                           for d, servers in sorted(ns.items(), key=lambda i: -len(i[0]))]
        self._cache.clear()
        return True

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> MXResolver:
        """A resolver for the settings basic.*, debug.dns and policy.refused_mail_servers."""
        return cls(config.get("basic.nameservers"), config.get("basic.dns_servers"),
                   debug=config.get("debug.dns"),
                   refused_ips=AddressSet(config.get("policy.refused_mail_servers")), **kwargs)

    def _make_resolver(self, servers: list[tuple[str, int]]) -> dns.asyncresolver.Resolver | None:
        if servers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [_nameserver(ip, port) for ip, port in servers]
        else:
            try:
                r = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            except dns.exception.DNSException:
                return None  # every lookup fails temporarily: "no name server"
        r.cache = None  # ours honours an injectable clock and negative answers
        r.search = []
        r.timeout = min(2.0, self.timeout)  # per server try; `lifetime` bounds the whole lookup
        r.lifetime = self.timeout
        return r

    # -- public API --------------------------------------------------------------------------

    async def resolve_mx(self, domain: str) -> MXResult:
        """The targets for mail to `domain`, best first; never raises for DNS trouble."""
        if domain.strip().startswith("["):
            literal = _address_literal(domain)
            if literal is None:
                return MXResult(domain, error=f"{domain!r} is not an address literal",
                                permanent=True, source="literal")
            return self._filter(MXResult(domain, (Target(domain, literal, 25),), source="literal"))
        try:
            name = _normalise(domain)
        except ValueError as e:
            return MXResult(domain, error=str(e), permanent=True)
        entries = self.bypass_mx.get(name)
        if entries:
            targets = tuple(Target(b.host, b.ip, b.port) for b in entries)
            result = self._filter(MXResult(name, targets, source="bypass"))
        else:
            result = await self._resolve_dns(name)
        if self.debug:
            log.info("DNS %s: %s %s", name, result.text,
                     " ".join(f"{t.host}={t.ip}:{t.port}" for t in result.targets))
        return result

    async def resolve_addresses(self, host: str) -> tuple[list[str], str, bool]:
        """`host`'s addresses (IPv4 first unless prefer_ipv6) -> (ips, error, permanent)."""
        try:
            name = _normalise(host)
        except ValueError as e:
            return [], str(e), True
        families = [A, AAAA] if self.ipv6 else [A]
        if self.prefer_ipv6:
            families.reverse()
        answers = await asyncio.gather(*(self._lookup(name, t) for t in families))
        ips: list[str] = []
        for answer in answers:
            found = list(answer.values)
            self.rng.shuffle(found)  # several addresses of one host: spread the load
            ips += found
        if ips:
            return ips, "", False
        failed = [a for a in answers if a.status == "fail"]
        if failed:
            return [], failed[0].error, False
        if any(a.status == "nxdomain" for a in answers):
            return [], NOT_FOUND.format(name, "A", "Host not found"), True
        return [], NOT_FOUND.format(name, "A", "Host found but no data record of requested "
                                    "type"), True

    async def resolve_ptr(self, ip: str) -> tuple[list[str], str]:
        """The reverse DNS names of an address -> (names, error); for the sending sources'
        check at start (sources.py)."""
        try:
            name = dns.reversename.from_address(ip).to_text(omit_final_dot=True)
        except (ValueError, dns.exception.SyntaxError) as e:
            return [], str(e)
        answer = await self._lookup(name, PTR)
        return list(answer.values), answer.error or ("" if answer.values else answer.status)

    async def preload(self, domains: Iterable[str], concurrency: int = 20) -> dict[str, MXResult]:
        """Resolve `basic.preload_domains` ahead of the first mail, a few at a time."""
        gate = asyncio.Semaphore(concurrency)

        async def one(domain: str) -> tuple[str, MXResult]:
            async with gate:
                return domain, await self.resolve_mx(domain)

        results = dict(await asyncio.gather(*(one(d) for d in dict.fromkeys(domains))))
        for domain, result in results.items():
            if not result.ok:
                log.warning("preloading %s: %s", domain, result.error)
        return results

    def clear_cache(self) -> None:
        self._cache.clear()

    async def aclose(self) -> None:
        """Cancel lookups still in flight (at shutdown)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- composing a result ------------------------------------------------------------------

    async def _resolve_dns(self, domain: str) -> MXResult:
        answer = await self._lookup(domain, MX)
        if answer.status == "fail":
            return MXResult(domain, error=answer.error)
        if answer.status == "nxdomain":
            return MXResult(domain, error=NOT_FOUND.format(domain, "MX", "Host not found") +
                            " (the recipient's domain does not exist)", permanent=True)
        if answer.status == "nodata":  # no MX: the domain itself is the mail host
            ips, error, permanent = await self.resolve_addresses(domain)
            if not ips:
                if permanent:
                    error += " (the recipient's domain has no MX and no address records)"
                return MXResult(domain, error=error, permanent=permanent)
            targets = tuple(Target(domain, ip) for ip in ips[:self.max_targets])
            return self._filter(MXResult(domain, targets, source="implicit"))
        records = [(p, h) for p, h in answer.values if h]
        if not records:  # only "0 ." (RFC 7505)
            return MXResult(domain, error=f"Domain {domain} does not accept mail (null MX)",
                            permanent=True, status=NULL_MX)
        hosts = self._order(records)
        found = await asyncio.gather(*(self.resolve_addresses(h) for _, h in hosts))
        targets = [Target(host, ip, 25, pref)
                   for (pref, host), (ips, _, _) in zip(hosts, found) for ip in ips]
        if not targets:
            errors = [(error, permanent) for _, error, permanent in found]
            temporary = [e for e, permanent in errors if not permanent]
            if temporary:
                return MXResult(domain, error=f"cannot resolve the mail servers of {domain}: "
                                              f"{temporary[0]}")
            return MXResult(domain, error=f"{errors[0][0]} (none of the mail servers of "
                                          f"{domain} has an address)", permanent=True,
                            status=NO_ROUTE)
        return self._filter(MXResult(domain, tuple(targets[:self.max_targets])))

    def _order(self, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """By preference; equal preferences in random order (RFC 5321 section 5.1)."""
        by_pref: dict[int, list[str]] = {}
        for pref, host in records:
            if host not in by_pref.setdefault(pref, []):
                by_pref[pref].append(host)
        ordered: list[tuple[int, str]] = []
        seen: set[str] = set()
        for pref in sorted(by_pref):
            group = [h for h in by_pref[pref] if h not in seen]
            self.rng.shuffle(group)
            seen.update(group)
            ordered += [(pref, h) for h in group]
        return ordered

    def _filter(self, result: MXResult) -> MXResult:
        """Drop refused addresses (our own: a mail loop); nothing left is a permanent failure."""
        if not self.refused_ips:
            return result
        kept = tuple(t for t in result.targets if t.ip not in self.refused_ips)
        if kept or not result.targets:
            return MXResult(result.domain, kept, result.error, result.permanent, result.source,
                            result.status)
        return MXResult(result.domain, error=f"all mail servers of {result.domain} are in "
                        "policy.refused_mail_servers (a mail loop?)", permanent=True,
                        source=result.source, status=LOOP)

    # -- cached, shared lookups --------------------------------------------------------------

    async def _lookup(self, name: str, rdtype: int) -> _Answer:
        key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None:
            if cached.expires > self.clock():
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return cached
            del self._cache[key]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._inflight.pop(key, None)
                                   if self._inflight.get(key) is t else None)
        else:
            self.stats.shared += 1
        # shield: one caller giving up (cancelled) must not cancel the others' shared query.
        return await asyncio.shield(task)

    async def _query(self, name: str, rdtype: int) -> _Answer:
        answer = await self._ask(name, rdtype)
        if answer.status == "fail":
            ttl = self.failure_ttl  # briefly: a burst of mail must not hammer a broken server
        else:
            ttl = min(max(answer.ttl, self.min_ttl), self.max_ttl)
        answer.expires = self.clock() + ttl
        if ttl > 0:
            self._cache[(name, rdtype)] = answer
            self._cache.move_to_end((name, rdtype))
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return answer

    def _resolver_for(self, name: str) -> dns.asyncresolver.Resolver | None:
        for domain, resolver in self._bypass_ns:
            if _under(name, domain):
                return resolver
        return self._default

    async def _ask(self, name: str, rdtype: int) -> _Answer:
        """One query to the name servers, its outcome as an uncached `_Answer`."""
        tname = dns.rdatatype.to_text(rdtype)
        resolver = self._resolver_for(name)
        if resolver is None or not resolver.nameservers:
            self.stats.failures += 1
            return _Answer("fail", error=f"DNS lookup of {name} ({tname}) failed: "
                                         "no name server configured")
        self.stats.queries += 1
        started = time.monotonic()
        try:
            reply = await resolver.resolve(dns.name.from_text(name), rdtype,
                                           raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as e:
            result = _Answer("nxdomain", ttl=self._negative_ttl(e.responses().values()))
        except dns.resolver.NoNameservers as e:
            result = _Answer("fail", error=f"DNS lookup of {name} ({tname}) failed: "
                                           f"{_server_errors(e)}")
        except dns.exception.Timeout:
            result = _Answer("fail", error=f"DNS lookup of {name} ({tname}) failed: "
                                           f"no answer within {self.timeout:g} s")
        except dns.exception.DNSException as e:
            result = _Answer("fail", error=f"DNS lookup of {name} ({tname}) failed: {e}")
        except Exception as e:  # a bug or odd reply must not kill every waiter: log, retry later
            log.exception("DNS lookup of %s (%s) raised", name, tname)
            result = _Answer("fail", error=f"DNS lookup of {name} ({tname}) failed: {e!r}")
        else:
            if reply.rrset is None:
                result = _Answer("nodata", ttl=self._negative_ttl([reply.response]))
            else:
                values = [(r.preference, _host(r.exchange)) if rdtype == MX else
                          _host(r.target) if rdtype == PTR else r.address for r in reply.rrset]
                result = _Answer("ok", values, ttl=reply.chaining_result.minimum_ttl)
        if result.status == "fail":
            self.stats.failures += 1
        if self.debug:
            log.info("DNS query %s %s -> %s %s (%.1f ms)", tname, name, result.status,
                     result.error or result.values, (time.monotonic() - started) * 1000)
        return result

    def _negative_ttl(self, responses: Iterable[Any]) -> float:
        """RFC 2308: min(SOA TTL, SOA minimum) from the authority section, else our default."""
        for response in responses:
            for rrset in getattr(response, "authority", []):
                if rrset.rdtype == dns.rdatatype.SOA:
                    return float(min(rrset.ttl, rrset[0].minimum))
        return float(self.negative_ttl)


def _server_errors(e: dns.resolver.NoNameservers) -> str:
    """'127.0.0.1:53 answered SERVFAIL' rather than dnspython's long message."""
    errors = e.kwargs.get("errors") or []
    parts = []
    for err in errors[:3]:
        server, answer = err[0].removeprefix("Do53:"), err[3]  # "ip@port", rcode or exception
        parts.append(f"{server} answered {answer}" if isinstance(answer, str)
                     else f"{server}: {answer or type(answer).__name__}")
    return "; ".join(parts) or "all name servers failed"


def _address_literal(domain: str) -> str | None:
    """'[192.0.2.1]' or '[IPv6:2001:db8::1]' (RFC 5321 address literals) -> the IP."""
    text = domain.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None
