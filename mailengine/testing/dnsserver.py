"""A real DNS server on loopback for tests: dnsmasq serving zones written as Python dicts.

Resolver and delivery tests must never query the internet, and a fake resolver would hide the
bugs that matter (TTLs, TCP fallback for long TXT records, SERVFAIL handling). So tests start
dnsmasq on a free high port of 127.0.0.1 (or ::1) with only the records they give:

    zones = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
        "null.test": {"MX": [(0, ".")]},                      # null MX (RFC 7505)
        "amx.test": {"A": ["127.0.0.3"]},                     # no MX: implicit MX
        "sel._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p=" + key]},  # > 255: split
    }
    with TestDNSServer(zones, nxdomain=["nx.test"], servfail=["fail.test"]) as dns:
        settings = {"basic.nameservers": [dns.address]}     # "127.0.0.1:PORT"

Record values: "A"/"AAAA" a list of IP strings; "MX" a list of (preference, host) pairs (or
"10 host" strings); "TXT" a list of records, each a str (split into 255-byte strings when longer)
or a tuple of strings; any other type a list of zone-file texts ("10 5 25 mx.example.test." for
SRV). Every name given is served authoritatively ("local"): other names under it are NXDOMAIN,
other types of it are empty answers (NOERROR/NODATA); names outside all zones get REFUSED.
Quirk of dnsmasq: a name that has records but no A/AAAA answers A/AAAA queries with NXDOMAIN.

Failure modes: `nxdomain` names (and their subdomains) answer NXDOMAIN; `servfail` names answer
REFUSED at once (a server failure: resolvers give up on that server, as on SERVFAIL); `timeout`
names are forwarded to a socket that never answers, so the client times out. A name in a failure
list (or under one) fails that way even if `zones` also has records for it.

The process runs in the foreground in its own process group and dies with this object, with its
context, at interpreter exit, and (Linux) when the thread that started it dies.
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterable

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT

DNSMASQ_CANDIDATES = ("/usr/sbin/dnsmasq", "/usr/local/sbin/dnsmasq")
_MARKER_ZONE = "log-marker.invalid"  # names used to sync the query log; hidden from queries()
_QUERY_LINE = re.compile(r"query\[([A-Za-z0-9]+)\] (\S+) from ")

Records = dict[str, list[Any]]


def find_dnsmasq() -> str:
    """Path of the dnsmasq binary (Debian package: dnsmasq-base); raises RuntimeError if absent."""
    found = shutil.which("dnsmasq") or next(
        (p for p in DNSMASQ_CANDIDATES if os.access(p, os.X_OK)), None)
    if not found:
        raise RuntimeError("dnsmasq is not installed (Debian: apt-get install dnsmasq-base)")
    return found


def _norm(name: str) -> str:
    name = name.strip().rstrip(".").lower()
    if not name:
        raise ValueError("empty domain name")
    return name


def _fqdn(host: str) -> str:
    return host if host.endswith(".") else host + "."


def _txt_strings(value: str | bytes | Iterable[str | bytes]) -> list[bytes]:
    if isinstance(value, (str, bytes)):
        data = value.encode() if isinstance(value, str) else value
        # One TXT string holds at most 255 bytes; longer text (DKIM RSA-2048 keys) is split.
        return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
    parts = [v.encode() if isinstance(v, str) else v for v in value]
    if any(len(p) > 255 for p in parts):
        raise ValueError("a TXT string given as a tuple part may be at most 255 bytes")
    return parts


def _rdata_wire(rtype: str, value: Any) -> bytes:
    """The RDATA of one record, in wire format, for dnsmasq's generic `dns-rr`."""
    if rtype == "TXT":
        rd = dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, _txt_strings(value))
    elif rtype == "MX" and not isinstance(value, str):
        pref, host = value
        rd = dns.rdata.from_text("IN", "MX", f"{int(pref)} {_fqdn(host)}")
    else:
        # names in the data (PTR, CNAME...) stay absolute: a relative one has no wire form
        rd = dns.rdata.from_text("IN", rtype, str(value), origin=dns.name.root,
                                 relativize=False)
    return rd.to_wire()


def _config_lines(zones: dict[str, Records], nxdomain: list[str], servfail: list[str],
                  timeout: list[str], blackhole: str) -> list[str]:
    lines: list[str] = []
    failing = [_norm(n) for n in (*nxdomain, *servfail, *timeout)]
    for raw_name, records in zones.items():
        name = _norm(raw_name)
        if any(name == f or name.endswith("." + f) for f in failing):
            continue  # a failure mode wins over records (dnsmasq would answer the records)
        lines.append(f"local=/{name}/")
        addresses: list[str] = []
        for raw_type, values in records.items():
            rtype = raw_type.upper()
            if rtype in ("A", "AAAA"):
                for ip in values:
                    version = ipaddress.ip_address(ip).version
                    if (version == 4) != (rtype == "A"):
                        raise ValueError(f"{ip!r} is not an {rtype} address ({name})")
                    addresses.append(str(ip))
                continue
            number = dns.rdatatype.from_text(rtype).value
            for value in values:
                lines.append(f"dns-rr={name},{number},{_rdata_wire(rtype, value).hex()}")
        # One address per line: a host-record holds only one IPv4 and one IPv6 address.
        lines += [f"host-record={name},{ip}" for ip in addresses]
    lines += [f"address=/{_norm(n)}/" for n in nxdomain]
    # "#" = the standard upstream servers; there are none (no-resolv), so dnsmasq refuses at once.
    lines += [f"server=/{_norm(n)}/#" for n in servfail]
    lines += [f"server=/{_norm(n)}/{blackhole}" for n in timeout]
    return lines


def _kill_group(pgid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if sig == signal.SIGTERM:
            time.sleep(0.02)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the finalizer and atexit still clean up
        pass


class TestDNSServer:
    """dnsmasq on a free loopback port serving `zones`; use as a context manager.

    Attributes after start: `host`, `port`, `address` ("127.0.0.1:PORT" or "[::1]:PORT", the
    form `basic.nameservers` and `basic.dns_servers` take), `nameserver` ((host, port)).
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, zones: dict[str, Records] | None = None, *, nxdomain: Iterable[str] = (),
                 servfail: Iterable[str] = (), timeout: Iterable[str] = (), ttl: int = 300,
                 host: str = "127.0.0.1", port: int = 0, dnsmasq: str | None = None) -> None:
        self.zones: dict[str, Records] = {_norm(k): {t.upper(): list(v) for t, v in r.items()}
                                          for k, r in (zones or {}).items()}
        self.nxdomain = [_norm(n) for n in nxdomain]
        self.servfail = [_norm(n) for n in servfail]
        self.timeout = [_norm(n) for n in timeout]
        self.ttl = ttl
        self.host = str(ipaddress.ip_address(host))
        self.port = port
        self._fixed_port = port != 0
        self._dnsmasq = dnsmasq or find_dnsmasq()
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._blackhole: socket.socket | None = None
        self._generation = 0
        self._log_offset = 0
        self._old_queries: list[tuple[str, str]] = []
        self._marker = 0
        self._lock = threading.Lock()

    # -- life cycle --------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def nameserver(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> TestDNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> TestDNSServer:
        """Start dnsmasq and return once it answers queries (typically in a few milliseconds)."""
        if self.running:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="mailengine-dns-")
        if self._blackhole is None:
            # Bound but never read: queries forwarded here get no answer and no ICMP error.
            self._blackhole = socket.socket(family, socket.SOCK_DGRAM)
            self._blackhole.bind((self.host, 0))
        for attempt in range(8):
            if not self._fixed_port:
                self.port = _free_port(self.host, family)
            error = self._spawn()
            if error is None:
                return self
            if self._fixed_port and "in use" in error and attempt < 7:
                time.sleep(0.05)  # restart on the same port: the old socket may linger briefly
                continue
            if not self._fixed_port and "in use" in error:
                continue  # another process took the port between our probe and dnsmasq's bind
            break
        self.stop()
        raise RuntimeError(f"dnsmasq did not start on {self.address}: {error}")

    def stop(self) -> None:
        """Kill dnsmasq (and any TCP children); safe to call twice. Queries stay readable."""
        if self._proc is not None:
            self._stash_queries()
            if self._finalizer is not None:
                self._finalizer()  # kills the process group
                self._finalizer = None
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
                pass
            self._proc = None
        if self._blackhole is not None:
            self._blackhole.close()
            self._blackhole = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def restart(self) -> None:
        """Apply changed records: dnsmasq re-reads its records only at start (not on SIGHUP)."""
        if self._proc is None:
            self.start()
            return
        self._stash_queries()
        assert self._finalizer is not None
        self._finalizer()
        self._proc.wait(timeout=5)
        self._proc = None
        fixed, self._fixed_port = self._fixed_port, True  # keep the address clients know
        try:
            self.start()
        finally:
            self._fixed_port = fixed

    # -- records -----------------------------------------------------------------------------

    def set_records(self, name: str, records: Records | None, *, restart: bool = True) -> None:
        """Replace all records of `name` (None removes the name), then restart."""
        name = _norm(name)
        if records is None:
            self.zones.pop(name, None)
        else:
            self.zones[name] = {t.upper(): list(v) for t, v in records.items()}
        if restart and self._proc is not None:
            self.restart()

    def add_records(self, name: str, rtype: str, values: Iterable[Any], *,
                    restart: bool = True) -> None:
        """Append records of one type to `name`, then restart."""
        entry = self.zones.setdefault(_norm(name), {})
        entry.setdefault(rtype.upper(), []).extend(values)
        if restart and self._proc is not None:
            self.restart()

    def update(self, zones: dict[str, Records] | None = None, *,
               nxdomain: Iterable[str] | None = None, servfail: Iterable[str] | None = None,
               timeout: Iterable[str] | None = None, ttl: int | None = None) -> None:
        """Replace the records of the names in `zones` and any failure list given; restart."""
        for name, records in (zones or {}).items():
            self.set_records(name, records, restart=False)
        if nxdomain is not None:
            self.nxdomain = [_norm(n) for n in nxdomain]
        if servfail is not None:
            self.servfail = [_norm(n) for n in servfail]
        if timeout is not None:
            self.timeout = [_norm(n) for n in timeout]
        if ttl is not None:
            self.ttl = ttl
        if self._proc is not None:
            self.restart()

    # -- query log ---------------------------------------------------------------------------

    def queries(self) -> list[tuple[str, str]]:
        """Every query received since start or `clear_queries()`: [(TYPE, name), ...] in order.

        Waits until dnsmasq has written all queries made so far to its log (it sends itself a
        marker query and waits for it to appear), so a count taken right after a lookup is exact.
        """
        with self._lock:
            if self._dir is None:
                return list(self._old_queries)
            return self._old_queries + self._read_log(sync=True)[0]

    def count(self, name: str, rtype: str | None = None) -> int:
        """How many queries for `name` (of type `rtype`, if given) the server has received."""
        name = _norm(name)
        return sum(1 for t, n in self.queries() if n == name and (rtype is None or t == rtype))

    def clear_queries(self) -> None:
        with self._lock:
            self._old_queries = []
            if self._dir is not None:
                self._log_offset = self._read_log(sync=True)[1]

    def query(self, name: str, rtype: str = "A", *, tcp: bool = False,
              timeout: float = 2.0) -> dns.message.Message:
        """Ask the server directly (no resolver, no cache): handy when writing a test."""
        msg = dns.message.make_query(_fqdn(name), rtype)
        send = dns.query.tcp if tcp else dns.query.udp
        return send(msg, self.host, port=self.port, timeout=timeout)

    # -- internals ---------------------------------------------------------------------------

    def _paths(self) -> tuple[Path, Path, Path]:
        assert self._dir is not None
        base = Path(self._dir.name)
        g = self._generation
        return base / f"dnsmasq-{g}.conf", base / f"queries-{g}.log", base / f"stderr-{g}.txt"

    def _spawn(self) -> str | None:
        """Start one dnsmasq; None when it answers, else the reason it did not."""
        self._generation += 1
        self._log_offset = 0
        conf, log, err = self._paths()
        assert self._blackhole is not None
        bh_host, bh_port = self._blackhole.getsockname()[:2]
        lines = [
            "no-resolv", "no-hosts", "no-poll", "bind-interfaces", "log-queries", "no-negcache",
            "pid-file=", f"port={self.port}", f"listen-address={self.host}",
            f"local-ttl={self.ttl}", f"log-facility={log}",
            # Run as ourselves: dnsmasq would otherwise switch to 'nobody' and, doing so,
            # drop the parent-death signal that stops it if the test process is killed.
            f"user={pwd.getpwuid(os.getuid()).pw_name}",
            f"group={_group_name()}",
        ]
        lines += _config_lines(self.zones, self.nxdomain, self.servfail, self.timeout,
                               f"{bh_host}#{bh_port}")
        conf.write_text("\n".join(lines) + "\n")
        with open(err, "wb") as err_file:
            proc = subprocess.Popen(
                [self._dnsmasq, "--keep-in-foreground", f"--conf-file={conf}"],
                stdin=subprocess.DEVNULL, stdout=err_file, stderr=err_file,
                start_new_session=True, preexec_fn=_die_with_parent)
        self._proc = proc
        self._finalizer = weakref.finalize(self, _kill_group, proc.pid)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._finalizer()
                self._finalizer = None
                self._proc = None
                return err.read_text(errors="replace").strip() or f"exit status {proc.returncode}"
            try:
                self.query(f"ready.{_MARKER_ZONE}", "TXT", timeout=0.05)
                return None
            except (dns.exception.Timeout, OSError):
                continue
        return "no answer within 5 s"

    def _stash_queries(self) -> None:
        if self._proc is None or self._dir is None:
            return
        with self._lock:
            self._old_queries += self._read_log(sync=self.running)[0]

    def _read_log(self, sync: bool) -> tuple[list[tuple[str, str]], int]:
        _, log, _ = self._paths()
        if sync and self.running:
            self._marker += 1
            marker = f"sync{self._marker}.{_MARKER_ZONE}"
            try:
                self.query(marker, "TXT", timeout=1)
            except (dns.exception.Timeout, OSError):
                pass
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                if log.exists() and marker.encode() in log.read_bytes()[self._log_offset:]:
                    break
                time.sleep(0.002)
        data = log.read_bytes() if log.exists() else b""
        found = []
        for line in data[self._log_offset:].decode(errors="replace").splitlines():
            m = _QUERY_LINE.search(line)
            if m and not m.group(2).lower().endswith(_MARKER_ZONE):
                found.append((m.group(1).upper(), m.group(2).rstrip(".").lower()))
        return found, len(data)


def _group_name() -> str:
    import grp
    return grp.getgrgid(os.getgid()).gr_name


def _free_port(host: str, family: int) -> int:
    """A port free for both UDP and TCP on `host` (dnsmasq needs both)."""
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as udp:
                    udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {host}")
