"""The simulated internet (mailengine/testing/fakenet.py) behaves as each provider is told to,
over real SMTP on loopback; its domains resolve through a real DNS server; bench/fakenet.py runs
end to end in a tiny mode.

The providers here listen on 127.0.2.x (free ports); the tiny bench on 127.0.3.x, port 25 (DNS
on 127.0.3.53:53), away from the 127.0.1.x a full bench run uses."""
import asyncio
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import pytest

from mailengine.testing.dnsserver import TestDNSServer
from mailengine.testing.fakenet import FakeNet, Provider, message_id, standard_internet

BENCH = Path(__file__).resolve().parent.parent / "bench"
MSG = "Message-ID: <m{n}@test>\r\nSubject: t\r\n\r\nhello\r\n"


def provider(**kw) -> Provider:
    return Provider(kw.pop("name", "p"), kw.pop("ips", ["127.0.2.1"]), port=0, **kw)


def connect(p: Provider, source: str = "127.0.0.1") -> smtplib.SMTP:
    s = smtplib.SMTP(p.ips[0], p.port, timeout=5, source_address=(source, 0))
    s.ehlo("client.test")
    return s


def read_replies(sock: socket.socket, n: int) -> list[bytes]:
    """n complete replies (a multi-line reply counts once)."""
    buf, done = b"", []
    while len(done) < n:
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        buf += chunk
        while b"\r\n" in buf:
            line, buf = buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                done.append(line)
    return done


def wait_closed_sessions(net: FakeNet, name: str, count: int) -> None:
    deadline = time.monotonic() + 5
    while len(net.stats()[name].per_connection) < count:
        assert time.monotonic() < deadline, "the server did not see the connection close"
        time.sleep(0.01)


def test_latency_is_paid_once_per_round_trip_not_per_pipelined_command():
    p = provider(latency=(0.15, 0.15))
    with FakeNet([p]):
        with socket.create_connection((p.ips[0], p.port), timeout=5) as s:
            t0 = time.monotonic()
            read_replies(s, 1)
            assert time.monotonic() - t0 >= 0.14          # the greeting
            s.sendall(b"EHLO c.test\r\n")
            read_replies(s, 1)
            t0 = time.monotonic()
            s.sendall(b"MAIL FROM:<a@src.test>\r\nRCPT TO:<b@p.fake>\r\nDATA\r\n")
            replies = read_replies(s, 3)
            took = time.monotonic() - t0
            assert [r[:3] for r in replies] == [b"250", b"250", b"354"]
            assert 0.14 <= took < 0.3, took                # one round trip, not three


def test_connection_cap_is_per_client_ip_and_answers_421():
    p = provider(max_connections=2)
    with FakeNet([p]) as net:
        a, b = connect(p), connect(p)
        with pytest.raises(smtplib.SMTPConnectError) as e:
            connect(p)
        assert e.value.smtp_code == 421 and b"4.7.0" in e.value.smtp_error
        other = connect(p, source="127.0.0.5")         # another sender's IP is let in
        other.quit()
        a.quit()
        wait_closed_sessions(net, "p", 3)
        connect(p).quit()                              # room again
        b.quit()
        st = net.stats()["p"]
        assert (st.refused_connections, st.throttling, st.connections) == (1, 1, 5)
        assert st.peak_connections == 3


def test_message_rate_per_client_ip_answers_a_provider_like_421_and_closes():
    p = provider(rate=(2, 0.6), texts={"rate": "421 4.7.28 [{ip}] Unusual rate, slow down"})
    with FakeNet([p]) as net:
        s = connect(p)
        s.sendmail("a@src.test", ["x@p.fake"], MSG.format(n=1))
        s.sendmail("a@src.test", ["y@p.fake"], MSG.format(n=2))
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            s.sendmail("a@src.test", ["z@p.fake"], MSG.format(n=3))
        assert e.value.smtp_code == 421
        assert e.value.smtp_error == b"4.7.28 [127.0.0.1] Unusual rate, slow down"
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()                                   # it hung up after the 421
        o = connect(p, source="127.0.0.6")             # the rate is per client IP
        o.sendmail("a@src.test", ["z@p.fake"], MSG.format(n=3))
        o.quit()
        time.sleep(0.65)                               # the window has passed
        s = connect(p)
        s.sendmail("a@src.test", ["z@p.fake"], MSG.format(n=4))
        s.quit()
        st = net.stats()["p"]
        assert (st.throttled, st.transactions) == (1, 4)


def test_greylisting_refuses_a_new_triple_until_its_delay_has_passed():
    p = provider(greylist=0.4)
    with FakeNet([p]) as net:
        s = connect(p)
        s.mail("a@src.test")
        code, text = s.rcpt("b@p.fake")
        assert code == 450 and text.startswith(b"4.7.1")
        assert s.rcpt("b@p.fake")[0] == 450           # too soon
        time.sleep(0.45)
        assert s.rcpt("b@p.fake")[0] == 250           # the same triple, later: accepted
        s.rset()
        s.mail("other@src.test")
        assert s.rcpt("b@p.fake")[0] == 450           # another sender: a new triple
        s.quit()
        assert net.stats()["p"].greylisted == 3


def test_unknown_users_are_a_fixed_share_of_addresses_the_same_in_every_run():
    p = provider(unknown_share=0.3)
    addresses = [f"user{i}@p.fake" for i in range(3000)]
    unknown = [a for a in addresses if p.is_unknown(a)]
    assert 0.25 < len(unknown) / len(addresses) < 0.35
    assert unknown == [a for a in addresses if provider(unknown_share=0.3).is_unknown(a)]
    known = next(a for a in addresses if a not in unknown)
    with FakeNet([p]) as net:
        s = connect(p)
        s.mail("a@src.test")
        code, text = s.rcpt(unknown[0])
        assert code == 550 and text.startswith(b"5.1.1")
        assert s.rcpt(unknown[0].upper())[0] == 550    # the same address in other case
        assert s.rcpt(known)[0] == 250
        s.quit()
        assert net.stats()["p"].unknown == 2


def test_tarpit_delays_the_reply_to_the_data_only():
    p = provider(tarpit=0.5)
    with FakeNet([p]):
        s = connect(p)
        t0 = time.monotonic()
        s.mail("a@src.test")
        s.rcpt("b@p.fake")
        assert time.monotonic() - t0 < 0.3
        t0 = time.monotonic()
        code, _ = s.data(MSG.format(n=1))
        assert code == 250 and time.monotonic() - t0 >= 0.5
        s.quit()


def test_counts_deliveries_by_message_id_and_recipient_notices_and_per_connection():
    p, q = provider(), provider(name="q", ips=["127.0.2.2"])
    with FakeNet([p, q], {"p.fake": "p", "q.fake": "q"}) as net:
        s = connect(p)
        s.sendmail("a@src.test", ["x@p.fake", "Y@p.fake"], MSG.format(n=1))
        s.sendmail("a@src.test", ["x@p.fake"], MSG.format(n=1))      # delivered twice
        s.sendmail("", ["x@p.fake"], "Subject: a bounce\r\n\r\nsorry\r\n")
        s.quit()
        connect(q).quit()
        wait_closed_sessions(net, "p", 1)
        wait_closed_sessions(net, "q", 1)
        st = net.stats()["p"]
        assert st.accepted[("<m1@test>", "x@p.fake")] == 2
        assert st.accepted[("<m1@test>", "y@p.fake")] == 1
        assert (st.transactions, st.notices, st.deliveries, st.duplicates) == (3, 1, 4, 1)
        assert (st.connections, st.per_connection) == (1, [3])
        assert net.stats()["q"].per_connection == [0]
        assert net.accepted()[("<m1@test>", "x@p.fake")] == 2
        assert net.provider_of("someone@Q.fake") is q
        net.reset()                                    # counts start again
        assert net.stats()["p"].transactions == 0 and not net.accepted()


def test_message_id_is_read_from_the_header_without_line_ends():
    assert message_id(b"Subject: x\r\nMessage-Id:  <a@b> \r\n\r\nMessage-ID: <no@x>\r\n") == "<a@b>"
    assert message_id(b"Message-ID:\r\n <folded@x>\r\n\r\nbody\r\n") == "<folded@x>"
    assert message_id(b"Subject: none\r\n\r\nbody\r\n").startswith("sha256:")


def test_servers_stop_with_the_block_and_async_use_works():
    p = provider()

    async def run():
        async with FakeNet([p]) as net:
            r, w = await asyncio.open_connection(p.ips[0], p.port)
            assert (await r.readline()).startswith(b"220")
            w.write(b"QUIT\r\n")
            assert (await r.readline()).startswith(b"221")
            w.close()
            await net.wait_for(lambda: net.stats()["p"].per_connection == [0], 5)
    asyncio.run(run())
    with pytest.raises(OSError):
        socket.create_connection((p.ips[0], p.port), timeout=1).close()
    with FakeNet([p]):
        connect(p).quit()
    with pytest.raises(OSError):
        socket.create_connection((p.ips[0], p.port), timeout=1).close()


def test_bad_configurations_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown provider"):
        FakeNet([provider()], {"x.fake": "nobody"})
    with pytest.raises(ValueError, match="repeat"):
        FakeNet([provider(), provider()])
    with pytest.raises(ValueError, match="no addresses"):
        Provider("p", [])


def test_a_thousand_domains_resolve_to_their_providers_through_loopback_dns():
    internet = standard_internet(1000, net="127.0.2")
    net = internet.net
    assert len(net.domains) >= 1000
    with TestDNSServer(net.zones()) as server:
        def answer(name, rtype):
            msg = dns.query.udp(dns.message.make_query(name, rtype), server.host,
                                port=server.port, timeout=2)
            return sorted(rd.to_text() for rrset in msg.answer for rd in rrset)
        assert answer("gmail.fake", "MX") == ["10 mx1.gmail.fake.", "20 mx2.gmail.fake."]
        assert answer("mx2.gmail.fake", "A") == ["127.0.2.2"]
        assert answer("hotmail.fake", "MX") == ["10 mx1.outlook.fake."]
        # The long tail: company domains hosted by the providers, found by their MX hosts.
        for domain in ("d0000.fake", "d0003.fake", "d0007.fake", "d0994.fake"):
            hosts = net.providers[net.domains[domain]].mx_hosts
            assert answer(domain, "MX") == [f"{10 * (i + 1)} {h}." for i, h in enumerate(hosts)]
        assert answer("mx1.tarpit.fake", "A") == ["127.0.2.6"]
    rcpts = internet.recipients(5000)
    assert rcpts == internet.recipients(5000) and len(set(rcpts)) == 5000
    shares = {}
    for r in rcpts:
        name = net.provider_of(r).name
        shares[name] = shares.get(name, 0) + 1 / len(rcpts)
    assert 0.35 < shares["gmail"] < 0.6 and shares["yahoo"] > 0.08 and shares["outlook"] > 0.15
    assert {"greyisp", "tarpit", "hostone", "hosttwo"} <= set(shares)
    assert len({r.partition("@")[2] for r in rcpts}) > 300  # a long tail, not a few domains


needs_root_postfix = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("postfix", path="/usr/sbin:/usr/bin")
    or not shutil.which("unshare"),
    reason="needs root (ports 25 and 53, a mount namespace) and Debian's postfix package")


@needs_root_postfix
def test_bench_runs_end_to_end_in_a_tiny_mode():
    cmd = [sys.executable, str(BENCH / "fakenet.py"), "--quick", "--messages", "40",
           "--domains", "20", "--time-scale", "1000", "--net", "127.0.3", "--no-save",
           "--timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150,
                          env={**os.environ, "PYTHONPATH": str(BENCH.parent)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "time scale 1000: MailEngine retries after 1.8, " in out
    rows = [line for line in out.splitlines() if line.startswith((
        "(a) MailEngine ", "(c) MailEngine, shaping.toml ", "(b) Postfix "))]
    assert len(rows) == 3, out  # the shaping rules of (c) loaded: it ran like the others
    for row in rows:
        cells = row.split()
        assert cells[-1] == "yes", out                 # exactly once
        assert int(cells[-8]) + int(cells[-7]) == 40   # sent + failed: every message final
