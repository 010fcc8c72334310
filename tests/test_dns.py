"""The DNS resolver (mailengine/dns.py) and its test server (mailengine/testing/dnsserver.py).

Every test talks to a real dnsmasq on loopback: no test ever queries the internet.
"""
from __future__ import annotations

import asyncio
import os
import random
import socket
import time
from collections import Counter

import pytest

from mailengine.config import AddressSet, from_dict
from mailengine.dns import MXResolver
from mailengine.testing.dnsserver import TestDNSServer

DKIM_KEY = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + "x" * 350 + "IDAQAB"

ZONES = {
    "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
    "mx1.example.test": {"A": ["127.0.0.2"]},
    "mx2.example.test": {"A": ["127.0.0.3"], "AAAA": ["::1"]},
    "sel._domainkey.example.test": {"TXT": ["v=DKIM1; k=rsa; p=" + DKIM_KEY]},
    "null.test": {"MX": [(0, ".")]},
    "amx.test": {"A": ["127.0.0.4"]},
    # four hosts of equal preference, one backup
    "shuffle.test": {"MX": [(10, f"{h}.shuffle.test") for h in "abcd"] + [(20, "e.shuffle.test")]},
    **{f"{h}.shuffle.test": {"A": [f"127.0.1.{i}"]} for i, h in enumerate("abcde", 1)},
    "v6.test": {"MX": [(10, "mx.v6.test")]},
    "mx.v6.test": {"AAAA": ["::1", "2001:db8::25"]},
    "nohost.test": {"MX": [(10, "missing.nohost.test")]},
    "failmx.test": {"MX": [(10, "mx.fail.test")]},
}


@pytest.fixture(scope="module")
def server():
    with TestDNSServer(ZONES, nxdomain=["nx.test"], servfail=["fail.test"],
                       timeout=["slow.test"], ttl=300) as s:
        yield s


class Clock:
    """A clock the test moves by hand: cache expiry without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolver(server: TestDNSServer, **kwargs) -> MXResolver:
    kwargs.setdefault("timeout", 2.0)
    return MXResolver([server.address], **kwargs)


def mx(res: MXResolver, domain: str):
    return asyncio.run(res.resolve_mx(domain))


def triples(result) -> list[tuple[str, str, int]]:
    return [(t.host, t.ip, t.port) for t in result.targets]


# -- the test server ---------------------------------------------------------------------------

def test_server_serves_records_and_failure_modes(server):
    assert server.address == f"127.0.0.1:{server.port}"
    mx = server.query("example.test", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx.answer[0]) == [
        (10, "mx1.example.test."), (20, "mx2.example.test.")]
    assert [r.address for r in server.query("mx2.example.test", "AAAA").answer[0]] == ["::1"]
    assert sorted(r.address for r in server.query("mx.v6.test", "AAAA").answer[0]) == [
        "2001:db8::25", "::1"]
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


# -- MX ordering ---------------------------------------------------------------------------------

def test_mx_hosts_in_preference_order_with_their_addresses(server):
    result = mx(resolver(server), "example.test")
    assert result.ok and not result.permanent and not result.temporary
    assert result.source == "dns"
    assert triples(result) == [("mx1.example.test", "127.0.0.2", 25),
                               ("mx2.example.test", "127.0.0.3", 25),
                               ("mx2.example.test", "::1", 25)]
    assert [t.preference for t in result.targets] == [10, 20, 20]
    assert result.text == "DNS lookup succeeded, found 2 acceptable mail servers for example.test"
    assert result.error == ""


def test_equal_preferences_are_shuffled_and_lower_preference_stays_last(server):
    res = resolver(server, rng=random.Random(20260529))

    async def many():
        return [await res.resolve_mx("shuffle.test") for _ in range(400)]

    results = asyncio.run(many())
    firsts = Counter(r.hosts[0] for r in results)
    assert set(firsts) == {f"{h}.shuffle.test" for h in "abcd"}
    assert all(60 <= n <= 140 for n in firsts.values()), firsts  # 100 expected each
    assert len({tuple(r.hosts) for r in results}) > 12  # whole permutations, not a rotation
    assert all(r.hosts[4] == "e.shuffle.test" for r in results)
    # one MX, five A, five AAAA: the shuffle happens on cached answers, per lookup
    assert res.stats.queries == 11


def test_implicit_mx_when_the_domain_has_no_mx(server):
    result = mx(resolver(server), "amx.test")
    assert result.ok and result.source == "implicit"
    assert triples(result) == [("amx.test", "127.0.0.4", 25)]


def test_ipv6_targets(server):
    result = mx(resolver(server, rng=random.Random(1)), "v6.test")
    assert sorted(t.ip for t in result.targets) == ["2001:db8::25", "::1"]
    prefer6 = mx(resolver(server, prefer_ipv6=True), "example.test")
    assert triples(prefer6)[1:] == [("mx2.example.test", "::1", 25),
                                    ("mx2.example.test", "127.0.0.3", 25)]
    only4 = mx(resolver(server, ipv6=False), "example.test")
    assert [t.ip for t in only4.targets] == ["127.0.0.2", "127.0.0.3"]
    assert mx(resolver(server, ipv6=False), "v6.test").permanent


def test_resolver_talks_to_a_name_server_on_ipv6_loopback():
    with TestDNSServer({"a.test": {"MX": [(5, "mx.a.test")]}, "mx.a.test": {"AAAA": ["::1"]}},
                       host="::1") as s6:
        result = mx(MXResolver([s6.address]), "a.test")
    assert triples(result) == [("mx.a.test", "::1", 25)]


# -- failures ------------------------------------------------------------------------------------

def test_null_mx_is_permanent_with_rfc_7505_status(server):
    result = mx(resolver(server), "null.test")
    assert not result.ok and result.permanent and result.targets == ()
    assert "null MX" in result.error and result.text == result.error
    assert (result.code, result.enhanced) == (556, "5.1.10")  # RFC 7505, not 5.1.2


def test_nxdomain_is_permanent_and_names_the_domain(server):
    result = mx(resolver(server), "nx.test")
    assert result.permanent and (result.code, result.enhanced) == (550, "5.1.2")
    assert result.error.startswith("Host or domain name not found. Name service error for "
                                   "name=nx.test type=MX: Host not found")  # Postfix's words
    assert "recipient's domain does not exist" in result.error


def test_mx_host_that_does_not_exist_is_permanent_and_named(server):
    """Not the domain but its mail server is missing: 5.4.4 (unable to route), as Postfix."""
    result = mx(resolver(server), "nohost.test")
    assert result.permanent and (result.code, result.enhanced) == (550, "5.4.4")
    assert result.error.startswith("Host or domain name not found. Name service error for "
                                   "name=missing.nohost.test type=A: Host not found")
    assert "mail servers of nohost.test" in result.error


def test_server_failure_and_timeout_are_temporary(server):
    failed = mx(resolver(server), "fail.test")
    assert failed.temporary and not failed.permanent and "REFUSED" in failed.error
    assert (failed.code, failed.enhanced) == (451, "4.4.3")
    start = time.monotonic()
    slow = mx(resolver(server, timeout=0.3), "slow.test")
    assert slow.temporary and "no answer" in slow.error
    assert time.monotonic() - start < 2
    host_failed = mx(resolver(server), "failmx.test")  # MX found, its host's lookup fails
    assert host_failed.temporary and "mx.fail.test" in host_failed.error


def test_unreachable_name_server_is_temporary():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mx(MXResolver([f"127.0.0.1:{port}"], timeout=0.5), "example.test")
    assert result.temporary


def test_invalid_domain_and_address_literals(server):
    res = resolver(server)
    assert mx(res, "a..b").permanent
    assert triples(mx(res, "[127.0.0.9]")) == [("[127.0.0.9]", "127.0.0.9", 25)]
    assert triples(mx(res, "[IPv6:::1]")) == [("[IPv6:::1]", "::1", 25)]
    assert mx(res, "[not-an-ip]").permanent


def test_refused_mail_servers_are_left_out(server):
    result = mx(resolver(server, refused_ips=AddressSet(["127.0.0.2"])), "example.test")
    assert result.hosts == ["mx2.example.test"]
    assert "found 1 acceptable mail servers" in result.text
    looped = mx(resolver(server, refused_ips=AddressSet(["127.0.0.4"])), "amx.test")
    assert looped.permanent and "refused_mail_servers" in looped.error
    assert looped.enhanced == "5.4.6"


# -- cache ---------------------------------------------------------------------------------------

def test_cache_hit_avoids_a_query_until_the_ttl_runs_out(server):
    clock = Clock()
    res = resolver(server, clock=clock)
    server.clear_queries()
    first = mx(res, "example.test")
    sent = server.queries()
    assert ("MX", "example.test") in sent and ("A", "mx1.example.test") in sent
    clock.now += 299  # the zone's TTL is 300 s
    assert mx(res, "example.test") == first
    assert server.queries() == sent
    clock.now += 2
    mx(res, "example.test")
    assert server.count("example.test", "MX") == 2
    assert server.count("mx1.example.test", "A") == 2


def test_records_changed_in_dns_are_seen_after_the_ttl():
    clock = Clock()
    with TestDNSServer({"a.test": {"A": ["127.0.0.5"]}}, ttl=60) as s:
        res = MXResolver([s.address], clock=clock)
        assert [t.ip for t in mx(res, "a.test").targets] == ["127.0.0.5"]
        s.set_records("a.test", {"A": ["127.0.0.6"]})
        assert [t.ip for t in mx(res, "a.test").targets] == ["127.0.0.5"]  # still cached
        clock.now += 61
        assert [t.ip for t in mx(res, "a.test").targets] == ["127.0.0.6"]


def test_negative_answers_are_cached_for_the_negative_ttl(server):
    clock = Clock()
    res = resolver(server, clock=clock, negative_ttl=60)
    server.clear_queries()
    for _ in range(3):
        assert mx(res, "nx.test").permanent
        assert mx(res, "amx.test").ok  # NODATA for MX, then the A record
    assert server.count("nx.test") == 1 and server.count("amx.test", "MX") == 1
    clock.now += 61
    mx(res, "nx.test")
    mx(res, "amx.test")
    assert server.count("nx.test") == 2 and server.count("amx.test", "MX") == 2


def test_server_failures_are_cached_briefly(server):
    clock = Clock()
    res = resolver(server, clock=clock, failure_ttl=5)
    server.clear_queries()
    assert mx(res, "fail.test").temporary
    assert mx(res, "fail.test").temporary
    assert server.count("fail.test") == 1
    clock.now += 6
    mx(res, "fail.test")
    assert server.count("fail.test") == 2
    uncached = resolver(server, clock=clock, failure_ttl=0)
    mx(uncached, "fail.test")
    mx(uncached, "fail.test")
    assert server.count("fail.test") == 4


def test_cache_is_bounded_and_keeps_the_recently_used(server):
    res = resolver(server, cache_size=2, ipv6=False)
    server.clear_queries()

    async def lookups(*hosts):
        for h in hosts:
            ips, error, _ = await res.resolve_addresses(h)
            assert ips, error

    asyncio.run(lookups("a.shuffle.test", "b.shuffle.test", "a.shuffle.test", "c.shuffle.test"))
    assert len(res._cache) == 2
    asyncio.run(lookups("a.shuffle.test", "c.shuffle.test", "b.shuffle.test"))
    # b was the least recently used when c came in: only b is asked again
    assert [server.count(f"{h}.shuffle.test") for h in "abc"] == [1, 2, 1]


def test_concurrent_lookups_share_one_query(server):
    res = resolver(server)
    server.clear_queries()

    async def together():
        return await asyncio.gather(*(res.resolve_mx("example.test") for _ in range(50)))

    results = asyncio.run(together())
    assert all(r.ok and len(r.targets) == 3 for r in results)
    assert server.count("example.test", "MX") == 1
    assert server.count("mx1.example.test", "A") == 1
    assert res.stats.shared >= 49


def test_a_cancelled_waiter_does_not_cancel_the_shared_query(server):
    res = resolver(server, timeout=0.4)

    async def scenario():
        first = asyncio.create_task(res.resolve_mx("slow.test"))
        second = asyncio.create_task(res.resolve_mx("slow.test"))
        await asyncio.sleep(0.05)
        first.cancel()
        return await second

    result = asyncio.run(scenario())
    assert result.temporary and "no answer" in result.error


def test_preload_fills_the_cache(server):
    res = resolver(server)
    results = asyncio.run(res.preload(["example.test", "amx.test", "nx.test", "example.test"]))
    assert set(results) == {"example.test", "amx.test", "nx.test"}
    assert results["example.test"].ok and results["nx.test"].permanent
    server.clear_queries()

    async def again():
        for d in ("example.test", "amx.test", "nx.test"):
            await res.resolve_mx(d)

    asyncio.run(again())
    assert server.queries() == []


# -- bypass entries (basic.dns_servers) ----------------------------------------------------------

def test_bypass_mx_pins_hosts_and_ports_without_dns(server):
    res = resolver(server, bypass=["example.test,smarthost.local,MX,127.0.0.9:2525",
                                   "example.test,backup.local,MX,[::1]:2526",
                                   "plain.test,mail.plain.test,MX,192.0.2.7"])
    server.clear_queries()
    result = mx(res, "Example.Test.")
    assert triples(result) == [("smarthost.local", "127.0.0.9", 2525),
                               ("backup.local", "::1", 2526)]
    assert result.source == "bypass" and result.text.startswith("DNS bypass, found 2")
    assert triples(mx(res, "plain.test")) == [("mail.plain.test", "192.0.2.7", 25)]
    assert server.queries() == []
    assert mx(res, "amx.test").source == "implicit"  # other domains still use DNS


def test_bypass_ns_sends_the_domain_to_another_name_server(server):
    corp = {"corp.test": {"MX": [(10, "mx.corp.test")]}, "mx.corp.test": {"A": ["127.0.0.7"]},
            "sub.corp.test": {"A": ["127.0.0.8"]}}
    with TestDNSServer(corp) as other:
        res = resolver(server, bypass=[f"corp.test,ns.corp.test,NS,{other.address}"])
        server.clear_queries()
        assert mx(resolver(server), "corp.test").temporary  # the main server does not know it
        server.clear_queries()
        assert triples(mx(res, "corp.test")) == [("mx.corp.test", "127.0.0.7", 25)]
        assert triples(mx(res, "sub.corp.test")) == [("sub.corp.test", "127.0.0.8", 25)]
        assert mx(res, "example.test").ok
        asked_main = {name for _, name in server.queries()}
        asked_other = {name for _, name in other.queries()}
    assert asked_main == {"example.test", "mx1.example.test", "mx2.example.test"}
    assert asked_other == {"corp.test", "mx.corp.test", "sub.corp.test"}


def test_bypass_entries_are_checked():
    with pytest.raises(ValueError):
        MXResolver(["127.0.0.1:1"], ["example.test,host,CNAME,127.0.0.1"])
    with pytest.raises(ValueError):
        MXResolver(["127.0.0.1:1"], ["example.test,host,MX,not-an-ip"])


def test_resolver_from_the_engine_settings(server, tmp_path):
    config = from_dict(tmp_path, {
        "basic": {"nameservers": [server.address],
                  "dns_servers": ["pinned.test,sink.local,MX,127.0.0.1:2525"]},
        "policy": {"refused_mail_servers": ["127.0.0.2"]},
    })
    res = MXResolver.from_config(config, timeout=2.0)
    assert triples(mx(res, "pinned.test")) == [("sink.local", "127.0.0.1", 2525)]
    assert mx(res, "example.test").hosts == ["mx2.example.test"]  # 127.0.0.2 is refused
