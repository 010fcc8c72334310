"""Sending sources (sources.py) against the simulated internet (testing/fakenet.py), through a
real engine: the fakenet provider counts per client IP, as real ones do. Each source sends from
its own loopback address (127.0.0.x needs no setup on Linux) with its own EHLO name; a
provider's max_connections holds per source; a message's pool comes from its sender domain, its
X-MailEngine-Pool header (which the server never sees) or the API's `pool` field; a source over
its warm-up hands its mail to a warmed one; a source whose reverse DNS names another host is
warned about at start."""
from __future__ import annotations

import json
import smtplib
import socket
import urllib.request

from mailengine import control
from mailengine.testing.dnsserver import TestDNSServer
from mailengine.testing.engine import RunningEngine, free_port, wait_until as wait
from mailengine.testing.fakenet import FakeNet, Provider

from test_delivery import FAST, infs

DOMAINS = ["d0.fake", "d1.fake", "d2.fake"]
# the sources' reverse DNS check at start must never ask the system's resolvers: nothing here
NO_DNS = {"basic.nameservers": ["127.0.0.1:9"]}
PROVIDER = '[provider.bigmail]\nmx = ["bigmail.fake"]\n'
A, B = "127.0.0.31", "127.0.0.32"
SOURCES = f"""
[sources.one]
ip = "{A}"
helo = "one.sender.test"
[sources.two]
ip = "{B}"
helo = "two.sender.test"
"""


def run(tmp_path, rules: str, mails, settings=None, provider=None, after=None, api=()):
    """Deliver `mails` ((sender, rcpt, extra header lines) each), and `api` (request documents
    for POST /api/v1/messages), through an engine with these shaping rules; the provider's
    counts and, when given, after(eng)'s answer."""
    p = provider or Provider("bigmail", ["127.0.2.51"], port=0, latency=(0.01, 0.03))
    with FakeNet([p], {d: "bigmail" for d in DOMAINS}) as net:
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "shaping.toml").write_text(rules)
        web = {}
        if api:
            (tmp_path / "api-tokens.txt").write_text("tests:t0ken-for-tests\n")
            web = {"network.web_port": free_port(), "network.web_ip": "127.0.0.1"}
        with RunningEngine(tmp_path, {
                **FAST, **NO_DNS, "limits.max_connections_per_host": 20,
                "queue.pause_sending": True,
                "basic.dns_servers": [f"{d},mx1.bigmail.fake,MX,{p.ips[0]}:{p.port}"
                                      for d in DOMAINS], **web, **(settings or {})}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                for i, (sender, rcpt, head) in enumerate(mails):
                    s.sendmail(sender, [rcpt], f"Message-ID: <m{i}@src.test>\r\n{head}"
                               f"Subject: {i}\r\n\r\nhi\r\n")
            for doc in api:
                post(web["network.web_port"], doc)
            control.request(eng.home / "mailengine.sock", "config.set",
                            name="queue.pause_sending", value=False)  # all of it at once
            wait(lambda: len(infs(eng, "done")) == len(mails) + len(api), timeout=30,
                 what="delivery")
            extra = after(eng) if after else None
        return net.stats()["bigmail"], extra


def post(port: int, doc: dict) -> None:
    """POST /api/v1/messages, once the web server answers."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/messages",
                                 json.dumps(doc).encode(), method="POST", headers={
                                     "Authorization": "Bearer t0ken-for-tests",
                                     "Content-Type": "application/json"})
    wait(lambda: _answers(port), timeout=10, what="the web server")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def to(n: int, sender: str = "a@src.test", head: str = ""):
    return [(sender, f"u{i}@{DOMAINS[i % 3]}", head) for i in range(n)]


def test_each_source_says_its_own_ehlo_and_the_providers_cap_holds_per_source(tmp_path):
    bigmail = Provider("bigmail", ["127.0.2.51"], port=0, latency=(0.02, 0.05),
                       max_connections=2)  # per client IP, as the real ones
    st, _ = run(tmp_path / "shaped", "builtin = false\n" + SOURCES + PROVIDER +
                "max_connections = 2\n", to(30), provider=bigmail)
    assert st.helo == {A: {"one.sender.test"}, B: {"two.sender.test"}}
    # equal weights: each in turn, unless its place at the cap is taken (then the other)
    assert st.per_ip[A] >= 5 and st.per_ip[B] >= 5 and st.per_ip.total() == 30
    assert st.refused_connections == 0 and max(st.peak_per_ip.values()) <= 2
    assert st.peak_total > 2  # the provider as a whole: its cap times the two sources
    assert st.deliveries == 30 and st.duplicates == 0
    # contrast: a cap above what the server lets each IP have; the server refuses connections
    # (so the run above kept within 2 per source while 4 went at once in all)
    bigmail = Provider("bigmail", ["127.0.2.51"], port=0, latency=(0.02, 0.05),
                       max_connections=2)
    st, _ = run(tmp_path / "not", "builtin = false\n" + SOURCES + PROVIDER +
                "max_connections = 4\n", to(30), provider=bigmail)
    assert st.refused_connections > 0


def test_the_pool_comes_from_the_header_the_sender_domain_or_the_api(tmp_path):
    rules = 'default_pool = "first"\n' + SOURCES + """
[pools.first]
sources = ["one"]
[pools.second]
sources = ["two"]
[sender_pools]
"bulk.test" = "second"
"""
    kept = Provider("bigmail", ["127.0.2.51"], port=0, keep_messages=True)

    mails = [("a@src.test", "u0@d0.fake", ""),                          # default: one
             ("a@bulk.test", "u1@d1.fake", ""),                         # sender domain: two
             ("a@src.test", "u2@d2.fake", "X-MailEngine-Pool: second\r\n")]  # header: two
    api = {"from": "a@src.test", "to": ["u3@d0.fake"], "pool": "second",  # API field: two
           "headers": {"Subject": "3", "Message-ID": "<m3@src.test>"}, "body": "hi"}
    def stats(eng):
        req = urllib.request.Request(
            f"http://127.0.0.1:{eng.settings['network.web_port']}/api/v1/stats",
            headers={"Authorization": "Bearer t0ken-for-tests"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    st, got = run(tmp_path, rules, mails, provider=kept, api=[api], after=stats)
    assert {u["source"]: u["warmed"] for u in got["sources"]} == {"one": True, "two": True}
    by_subject = {body.split(b"Subject: ")[1][:1].decode(): ip for ip, body in st.messages}
    assert by_subject == {"0": A, "1": B, "2": B, "3": B}
    assert not any(b"x-mailengine-pool" in body.lower() for _, body in st.messages)


def test_a_source_over_its_warm_up_hands_its_mail_to_a_warmed_one(tmp_path):
    import datetime as dt
    today = dt.date.today().isoformat()
    rules = f"""builtin = false
{PROVIDER}
[sources.new]
ip = "{A}"
helo = "one.sender.test"
warmup_start = {today}
warmup = [4, 40]
[sources.old]
ip = "{B}"
helo = "two.sender.test"
[pools.main]
sources = {{ new = 10, old = 1 }}
"""

    def status(eng):
        return control.request(eng.home / "mailengine.sock", "shaping.list")

    # retries a minute apart: mail that waited for the warm-up would not be done in 30 s
    st, listed = run(tmp_path, rules, to(12), {"queue.retry_intervals": [1]}, after=status)
    assert st.per_ip[A] == 4 and st.per_ip[B] == 8  # 4 on day 1 from "new", the rest moved
    assert st.deliveries == 12
    new = next(u for u in listed["sources"] if u["source"] == "new")
    assert new["today"] == {"bigmail": {"used": 4, "limit": 4}} and new["warmup_day"] == 1
    saved = json.loads((tmp_path / "warmup.json").read_text())
    assert saved["used"]["new"] == {"bigmail": 4}  # kept for a restart the same day


def test_a_source_whose_reverse_dns_names_another_host_is_warned_about(tmp_path):
    zones = {"31.0.0.127.in-addr.arpa": {"PTR": ["one.sender.test"]},
             "32.0.0.127.in-addr.arpa": {"PTR": ["mail.elsewhere.test"]}}
    with TestDNSServer(zones) as dns:
        (tmp_path / "shaping.toml").write_text(SOURCES)
        with RunningEngine(tmp_path, {**FAST, "basic.nameservers": [dns.address]}) as eng:
            wait(lambda: "mail.elsewhere.test" in eng.read_output(), timeout=15,
                 what="the rDNS warning")
        out = eng.read_output()
    assert ("sending source two (127.0.0.32): its reverse DNS says mail.elsewhere.test, not "
            "its EHLO name two.sender.test") in out
    assert "sending source one" not in out


def test_when_no_source_of_the_pool_has_budget_the_mail_waits_in_retry(tmp_path):
    import datetime as dt
    rules = f"""builtin = false
{PROVIDER}
[sources.new]
ip = "{A}"
helo = "one.sender.test"
warmup_start = {dt.date.today().isoformat()}
warmup = [2]
"""
    p = Provider("bigmail", ["127.0.2.51"], port=0)
    with FakeNet([p], {d: "bigmail" for d in DOMAINS}) as net:
        (tmp_path / "shaping.toml").write_text(rules)
        with RunningEngine(tmp_path, {
                **FAST, **NO_DNS, "basic.dns_servers": [
                    f"{d},mx1.bigmail.fake,MX,{p.ips[0]}:{p.port}" for d in DOMAINS]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                for sender, rcpt, _ in to(5):
                    s.sendmail(sender, [rcpt], "Subject: x\r\n\r\nhi\r\n")
            wait(lambda: len(infs(eng, "done")) == 2 and len(infs(eng, "retry")) == 3,
                 timeout=20, what="two sent, three held")
            held = infs(eng, "retry")
        assert net.stats()["bigmail"].per_ip == {A: 2}
    # not a send try: they wait for the next day's budget (or a rule change), not failing
    assert all(m.send_tries == 0 and m.retry_time > dt.datetime.now() + dt.timedelta(minutes=5)
               for m in held)


def test_a_v4_source_sending_to_an_ipv6_server_uses_the_default_address_and_name(tmp_path):
    """The source's IPv4 address cannot reach an IPv6 server: the connection goes from the
    default address, and says the engine's own name, not the source's (its reverse DNS would
    not match)."""
    from mailengine.testing.sink import ThreadedSink
    v6 = ThreadedSink("::1", 0).start()
    v4 = ThreadedSink("127.0.0.33", 0).start()
    try:
        (tmp_path / "shaping.toml").write_text(SOURCES.split("[sources.two]")[0])
        with RunningEngine(tmp_path, {**FAST, **NO_DNS, "basic.dns_servers": [
                f"six.test,mx.six.test,MX,[::1]:{v6.port}",
                f"four.test,mx.four.test,MX,127.0.0.33:{v4.port}"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("a@src.test", ["x@six.test"], b"Subject: 6\r\n\r\nhi\r\n")
                s.sendmail("a@src.test", ["y@four.test"], b"Subject: 4\r\n\r\nhi\r\n")
            wait(lambda: len(v6.messages) == 1 and len(v4.messages) == 1, what="both")
        assert [s.helo for s in v6.sessions] == ["engine.test"]
        assert [(s.helo, s.peer[0]) for s in v4.sessions] == [("one.sender.test", A)]
    finally:
        v6.stop()
        v4.stop()
