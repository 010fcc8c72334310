"""Mail loops end: a message with too many Received: fields is refused after DATA (554 5.4.6),
and mail whose mail server is the engine itself fails at once with "loops back to myself"."""
from __future__ import annotations

import re
import smtplib
import time

import pytest

from mailengine.config import Config
from mailengine.loops import Listeners
from mailengine.testing.dnsserver import TestDNSServer
from mailengine.testing.engine import RunningEngine, free_port, wait_until as wait
from test_delivery import FAST, infs, send, settled, sinks  # noqa: F401  (sinks: a fixture)


def received(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.test by hop%d.test; Fri, 4 Dec 2026 10:00:00 +0000\r\n"
                    % (i, i + 1) for i in range(n))


def test_a_message_with_too_many_hops_is_refused_after_data(tmp_path):
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            body = received(60) + b"Subject: loop\r\n\r\nround and round\r\n"
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail("a@example.org", ["r@dest.test"], body)
            assert e.value.smtp_code == 554 and b"5.4.6 Too many hops" in e.value.smtp_error
            # the session goes on; at the limit a message still passes (folded lines and the
            # body's Received: lines are not hops)
            ok = received(50) + b"X-Note: a\r\n Received: folded\r\n\r\nReceived: in the body\r\n"
            assert s.sendmail("a@example.org", ["r@dest.test"], ok) == {}
        wait(lambda: len(list((eng.mailq / "retry").glob("*.inf"))) == 1, what="one stored")
        time.sleep(0.3)
        assert len(list((eng.mailq / "retry").glob("*.inf"))) == 1  # the looping one is not


def test_max_hops_is_a_setting(tmp_path):
    with RunningEngine(tmp_path, {"limits.max_hops": 3}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            assert s.sendmail("a@example.org", ["r@dest.test"], received(3) + b"\r\nx\r\n") == {}
            with pytest.raises(smtplib.SMTPDataError):
                s.sendmail("a@example.org", ["r@dest.test"], received(4) + b"\r\nx\r\n")


def test_mail_pinned_to_the_engines_own_address_loops_back_to_myself(tmp_path):
    port = free_port()
    with RunningEngine(tmp_path, {**FAST, "network.smtp_port": port, "basic.dns_servers": [
            f"loop.test,mx.loop.test,MX,127.0.0.1:{port}"]}) as eng:
        send(eng, ["a@loop.test"])
        wait(settled(eng, 1), what="the loop to be stopped")
        time.sleep(0.5)
        msgs = infs(eng, "done")
        log = eng.read_output()
    # Today: the engine took its own message back, again and again (each copy a new id).
    assert len(msgs) == 1, f"{len(msgs)} messages: it looped"
    msg = msgs[0]
    assert msg.rcpt_failed == ["a@loop.test"] and msg.send_tries == 1  # not retried
    assert "a@loop.test failed: 554 5.4.6 mail for loop.test loops back to myself" in log


def test_only_mx_hosts_preferred_to_the_engine_are_tried(tmp_path, sinks):  # noqa: F811
    # The engine listens on port 25 of its own address, as an MX does (the zones name port 25).
    me, better, worse, down = "127.0.0.150", "127.0.0.151", "127.0.0.152", "127.0.0.153"
    better_sink, worse_sink = sinks.add(better), sinks.add(worse)
    zones = {
        # we are its best MX: the backup would only send it back to us
        "primary.test": {"MX": [(10, "me.test"), (20, "worse.test")]},
        # we are a backup MX: the better host takes it
        "backup.test": {"MX": [(5, "better.test"), (10, "me.test"), (20, "worse.test")]},
        # the better host is down: wait for it (a retry), never the worse one, never a loop
        "waiting.test": {"MX": [(5, "down.test"), (10, "me.test"), (20, "worse.test")]},
        "me.test": {"A": [me]}, "better.test": {"A": [better]}, "worse.test": {"A": [worse]},
        "down.test": {"A": [down]}}
    with TestDNSServer(zones) as dns, RunningEngine(tmp_path, {
            **FAST, "network.smtp_port": 25, "network.smtp_listen_ips": [me],
            "policy.relay_ips": ["127.0.0.0/8"], "basic.nameservers": [dns.address]},
            ready_host=me) as eng:
        with smtplib.SMTP(me, 25, timeout=10) as s:
            s.sendmail("sender@src.test", ["a@primary.test", "b@backup.test", "c@waiting.test"],
                       b"Subject: mx\r\n\r\nhello\r\n")
        wait(settled(eng, 1), what="delivery")
        msg, = infs(eng, "done")
        log = eng.read_output()
    assert [m.rcpts for m in better_sink.messages] == [["b@backup.test"]]
    assert worse_sink.sessions == []
    assert sorted(msg.rcpt_failed) == ["a@primary.test", "c@waiting.test"]
    assert re.search(r"a@primary\.test failed: 554 5\.4\.6 mail for primary\.test loops back "
                     r"to myself", log), log
    assert msg.send_tries == 3  # c@ was retried while down.test was down (not failed at once)
    assert not re.search(r"c@waiting\.test (failed|deferred): \S+ \S+ mail for", log)


def test_the_listeners_of_a_wildcard_engine_are_every_local_address():
    cfg = Config(home=".")
    cfg.set("network.smtp_port", 2525)
    everywhere = Listeners(cfg)
    assert everywhere.is_me("127.0.0.1", 2525) and everywhere.is_me("127.0.0.9", 2525)
    assert everywhere.is_me("::1", 2525) and everywhere.is_me("0.0.0.0", 2525)
    assert not everywhere.is_me("127.0.0.1", 25)  # another port: another server
    assert not everywhere.is_me("192.0.2.1", 2525)  # TEST-NET-1: not this machine's
    cfg.set("network.smtp_listen_ips", ["127.0.0.5"])
    one = Listeners(cfg)
    assert one.is_me("127.0.0.5", 2525) and one.is_me("::ffff:127.0.0.5", 2525)
    assert not one.is_me("127.0.0.6", 2525)  # local, but nothing of ours listens there
    cfg.set("network.smtp_port", 1)
    assert not Listeners(cfg).is_me("127.0.0.5", 1)
