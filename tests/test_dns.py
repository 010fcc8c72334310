"""The DNS resolver (mailengine/dns.py) and its test server (mailengine/testing/dnsserver.py).

Every test talks to a real dnsmasq on loopback: no test ever queries the internet.
"""
from __future__ import annotations

import os
import time

import pytest

from mailengine.testing.dnsserver import TestDNSServer

DKIM_KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 350 + "IDAQAB"

ZONES = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
    "sel._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p=" + DKIM_KEY]},
    "null.test": {"MX": [(0, ".")]},
    "amx.test": {"A": ["127.0.0.4"]},
}


@pytest.fixture(scope="module")
def server():
    with TestDNSServer(ZONES, nxdomain=["nx.test"], servfail=["fail.test"],
                       timeout=["slow.test"]) as s:
        yield s


# -- the test server ---------------------------------------------------------------------------

def test_server_serves_records_and_failure_modes(server):
    assert server.address == f"127.0.0.1:{server.port}"
    mx = server.query("example.test", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx.answer[0]) == [
        (10, "mx1.example.test."), (20, "mx2.example.test.")]
    assert [r.address for r in server.query("mx2.example.test", "AAAA").answer[0]] == ["::1"]
    assert server.query("null.test", "MX").answer[0][0].exchange.to_text() == "."
    assert server.query("amx.test", "MX").answer == []  # NODATA
    assert server.query("amx.test", "MX").rcode() == 0
    assert server.query("nx.test", "MX").rcode() == 3  # NXDOMAIN
    assert server.query("other.example.test", "A").rcode() == 3
    assert server.query("fail.test", "MX").rcode() == 5  # REFUSED: a server failure
    with pytest.raises(Exception):
        server.query("slow.test", "MX", timeout=0.2)


def test_server_splits_long_txt_and_answers_over_tcp(server):
    for tcp in (False, True):
        rr = server.query("sel._domainkey.example.test", "TXT", tcp=tcp).answer[0][0]
        assert [len(s) for s in rr.strings][0] == 255
        assert b"".join(rr.strings).decode() == "v=DKIM1; k=rsa; p=" + DKIM_KEY


def test_server_query_log_is_exact(server):
    server.clear_queries()
    server.query("amx.test", "A")
    server.query("amx.test", "A")
    server.query("example.test", "MX")
    assert server.queries() == [("A", "amx.test"), ("A", "amx.test"), ("MX", "example.test")]
    assert server.count("amx.test") == 2 and server.count("example.test", "A") == 0


def test_server_records_can_change_on_the_same_port():
    with TestDNSServer({"a.test": {"A": ["127.0.0.5"]}}) as s:
        port = s.port
        s.set_records("a.test", {"A": ["127.0.0.6"], "MX": [(5, "a.test")]})
        assert s.port == port
        assert [r.address for r in s.query("a.test", "A").answer[0]] == ["127.0.0.6"]
        s.add_records("b.test", "AAAA", ["::2"])
        assert [r.address for r in s.query("b.test", "AAAA").answer[0]] == ["::2"]
        s.update(nxdomain=["a.test"])
        assert s.query("a.test", "A").rcode() == 3


def test_server_on_ipv6_loopback():
    with TestDNSServer({"a.test": {"AAAA": ["::1"]}}, host="::1") as s:
        assert s.address == f"[::1]:{s.port}"
        assert [r.address for r in s.query("a.test", "AAAA").answer[0]] == ["::1"]


def test_server_leaves_no_process_behind():
    start = time.monotonic()
    with TestDNSServer({"a.test": {"A": ["127.0.0.1"]}}) as s:
        assert time.monotonic() - start < 1.0
        s.query("a.test", "A", tcp=True)  # a TCP query forks a child: it must go too
        pgid = s._proc.pid  # dnsmasq leads its own process group
        assert _live_processes_in_group(pgid)
    assert _live_processes_in_group(pgid) == []


def _live_processes_in_group(pgid: int) -> list[int]:
    """Pids in the process group that are not zombies (a container's init may not reap)."""
    live = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                live.append(int(entry))
    return live
