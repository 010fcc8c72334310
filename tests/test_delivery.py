"""The delivery engine end to end, with real parts only.

A real engine process (`mailengine start` / `mailengine test`), a real DNS server (dnsmasq via
TestDNSServer) serving the test zones, and scripted SMTP sinks listening on port 25 of several
127.0.0.x addresses (where the zones point). Every check is made through the files in `mailq/`
and what the sinks saw.
"""
from __future__ import annotations

import asyncio
import json
import re
import smtplib
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mailengine.client import enqueue
from mailengine.envelope import Message, format_inf, parse_inf
from mailengine.testing.dnsserver import TestDNSServer
from mailengine.testing.engine import RunningEngine, wait_until as wait
from mailengine.testing.sink import SinkScript, SMTPSink

FAST = {
    "queue.pause_sending": False,
    "queue.retry_intervals": [0.02, 0.02],  # 1.2 s
    "queue.queue_check_interval": 0.5,
    "queue.save_done": True,
    "network.helo_text": "engine.test",
    "logging.stats_interval": 0,
}


class Sinks:
    """SMTP sinks on one event loop in a thread; counts connections open across all of them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sinks: list[SMTPSink] = []
        self.now = 0
        self.peak = 0

    def add(self, host: str, port: int = 25, script: SinkScript | None = None) -> SMTPSink:
        owner = self

        class Counted(SMTPSink):
            async def _handle(self, reader, writer):
                owner.now += 1
                owner.peak = max(owner.peak, owner.now)
                try:
                    await super()._handle(reader, writer)
                finally:
                    owner.now -= 1

        sink = Counted(host, port, script)
        asyncio.run_coroutine_threadsafe(sink.start(), self.loop).result(10)
        self.sinks.append(sink)
        return sink

    def close(self) -> None:
        for s in self.sinks:
            asyncio.run_coroutine_threadsafe(s.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sinks():
    s = Sinks()
    yield s
    s.close()


def send(eng: RunningEngine, rcpts: list[str], body: bytes = b"Subject: test\r\n\r\nhello\r\n",
         mail_from: str = "sender@src.test") -> None:
    with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
        s.sendmail(mail_from, rcpts, body)


def infs(eng: RunningEngine, where: str) -> list[Message]:
    d = eng.mailq / where
    return [parse_inf(p.read_bytes(), p.name[:-4]) for p in sorted(d.glob("*.inf"))]


def settled(eng: RunningEngine, n_done: int):
    return lambda: (len(infs(eng, "done")) >= n_done and not infs(eng, "retry")
                    and not infs(eng, "working"))


def test_relay_to_mx_many_recipients_one_transaction(tmp_path, sinks):
    sink = sinks.add("127.0.0.21")
    zones = {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.21"]}}
    with TestDNSServer(zones) as dns, RunningEngine(tmp_path, {
            **FAST, "basic.nameservers": [dns.address]}) as eng:
        send(eng, ["a@dest.test", "b@dest.test", "c@DEST.test"])
        wait(settled(eng, 1), what="delivery")
        msg, = infs(eng, "done")
    assert len(sink.messages) == 1
    m = sink.messages[0]
    assert sorted(m.rcpts) == ["a@dest.test", "b@dest.test", "c@DEST.test"]
    assert m.mail_from == "sender@src.test"
    assert sink.sessions[0].helo == "engine.test"
    assert m.data.startswith(b"Received: from ")
    assert f"id {msg.id};".encode() in m.data and m.data.endswith(b"Subject: test\r\n\r\nhello\r\n")
    # ID.dat stays as received
    assert (eng.mailq / "done" / f"{msg.id}.dat").read_bytes() == b"Subject: test\r\n\r\nhello\r\n"
    assert msg.status == "done" and msg.send_tries == 1 and msg.rcpt_to_send == []
    assert sorted(msg.rcpt_sent) == ["a@dest.test", "b@dest.test", "c@DEST.test"]
    assert msg.log[-1].endswith("Finished send attempt 1, sent to 3 of 3 recipients, "
                                "now done sending")
    assert msg.time_finished is not None


def test_done_mail_is_deleted_without_save_done(tmp_path, sinks):
    sink = sinks.add("127.0.0.22")
    with RunningEngine(tmp_path, {**FAST, "queue.save_done": False, "basic.dns_servers": [
            "pin.test,mx.pin.test,MX,127.0.0.22:25"]}) as eng:
        for i in range(5):
            send(eng, [f"u{i}@pin.test"])
        wait(lambda: len(sink.messages) == 5, what="5 messages")
        wait(lambda: not list((eng.mailq / "working").iterdir())
             and not list((eng.mailq / "retry").glob("*.inf")), what="empty queue")
        assert not list((eng.mailq / "done").iterdir())
    assert len(sink.sessions) < 5  # the connection was reused
    assert "5 sent" in eng.output.decode() or "sent" in eng.output.decode()


def test_delivered_mail_leaves_spare_files_that_the_next_message_reuses(tmp_path, sinks):
    sink = sinks.add("127.0.0.22")
    spare = tmp_path / "mailq" / "spare"
    inodes = lambda: {p.stat().st_ino for p in spare.iterdir()  # noqa: E731
                      if not p.name.startswith(".")}
    with RunningEngine(tmp_path, {**FAST, "queue.save_done": False, "basic.dns_servers": [
            "pin.test,mx.pin.test,MX,127.0.0.22:25"]}) as eng:
        send(eng, ["first@pin.test"], body=b"Subject: long\r\n\r\n" + b"L" * 3000 + b"\r\n")
        wait(lambda: len(inodes()) == 2, what="the first message's files in spare/")
        first = inodes()
        send(eng, ["second@pin.test"], body=b"Subject: short\r\n\r\nS\r\n")
        wait(lambda: len(sink.messages) == 2 and not list((eng.mailq / "working").iterdir()),
             what="the second delivery")
        wait(lambda: len(inodes()) == 2, what="the second message's files in spare/")
        assert inodes() == first  # stored in the same two files: no new inode, none freed
    assert sink.messages[1].data.endswith(b"\r\n\r\nS\r\n")  # no tail of the longer one
    assert b"L" * 100 not in sink.messages[1].data


def test_mail_taken_by_intake_workers_is_delivered_by_the_engine(tmp_path, sinks):
    """With two intake processes the engine takes no SMTP; the workers store relayed mail
    straight into working/ and tell the engine, which delivers it."""
    sink = sinks.add("127.0.0.71")
    with RunningEngine(tmp_path, {**FAST, "queue.save_done": False, "network.intake_workers": 2,
                                  "basic.dns_servers": ["w.test,mx.w.test,MX,127.0.0.71:25"]}) as eng:
        for i in range(20):
            send(eng, [f"u{i}@w.test"])
        wait(lambda: len(sink.messages) == 20, what="20 messages at the sink")
        wait(lambda: not list((eng.mailq / "working").iterdir())
             and not list((eng.mailq / "retry").glob("*.inf")), what="an empty queue")
        pids = {re.match(r"P(\d+)T", m.data.split(b"id ")[1].decode()).group(1)
                for m in sink.messages}
    assert str(eng.proc.pid) not in pids and len(pids) >= 1  # ids made by the workers
    assert sorted(r for m in sink.messages for r in m.rcpts) == sorted(
        f"u{i}@w.test" for i in range(20))


def test_next_mx_on_connect_failure_and_4xx_greeting(tmp_path, sinks):
    busy = sinks.add("127.0.0.24", script=SinkScript(greeting="421 4.3.2 busy, try later"))
    good = sinks.add("127.0.0.25")
    zones = {"multi.test": {"MX": [(10, "dead.multi.test"), (20, "busy.multi.test"),
                                   (30, "good.multi.test")]},
             "dead.multi.test": {"A": ["127.0.0.23"]},  # nothing listens there
             "busy.multi.test": {"A": ["127.0.0.24"]},
             "good.multi.test": {"A": ["127.0.0.25"]}}
    with TestDNSServer(zones) as dns, RunningEngine(tmp_path, {
            **FAST, "basic.nameservers": [dns.address]}) as eng:
        send(eng, ["x@multi.test"])
        wait(settled(eng, 1), what="delivery")
        msg, = infs(eng, "done")
    assert len(busy.sessions) == 1 and busy.messages == []
    assert len(good.messages) == 1 and msg.rcpt_sent == ["x@multi.test"]
    assert msg.send_tries == 1


def test_4xx_at_rcpt_or_mail_goes_to_the_next_mx_in_the_same_attempt(tmp_path, sinks):
    """Issue 15.2 (Postfix smtp_trouble.c): a primary answering 450 to RCPT (greylisting) or 451
    to MAIL does not hold the mail for the retry schedule: the secondary MX takes it in the same
    attempt. Only a recipient every MX host refuses is kept for a retry."""
    grey = sinks.add("127.0.0.151", script=SinkScript(rcpt={
        "@grey.test": "450 4.7.1 Greylisted, please try again later"}))
    busy = sinks.add("127.0.0.153", script=SinkScript(replies={"MAIL": "451 4.3.0 Try later"}))
    backup = sinks.add("127.0.0.152", script=SinkScript(rcpt={
        "later@grey.test": "451 4.3.0 Not now either"}))
    zones = {"grey.test": {"MX": [(10, "mx1.grey.test"), (20, "mx2.grey.test")]},
             "mx1.grey.test": {"A": ["127.0.0.151"]}, "mx2.grey.test": {"A": ["127.0.0.152"]},
             "busy.test": {"MX": [(10, "mx1.busy.test"), (20, "mx2.busy.test")]},
             "mx1.busy.test": {"A": ["127.0.0.153"]}, "mx2.busy.test": {"A": ["127.0.0.152"]}}
    with TestDNSServer(zones) as dns, RunningEngine(tmp_path, {
            **FAST, "basic.nameservers": [dns.address]}) as eng:
        send(eng, ["a@grey.test", "later@grey.test", "b@busy.test"])
        wait(settled(eng, 1), what="delivery")
        msg, = infs(eng, "done")
    assert grey.messages == [] and busy.messages == []
    assert sorted(r for m in backup.messages for r in m.rcpts) == ["a@grey.test", "b@busy.test"]
    assert msg.log[1].split(": ", 1)[1].startswith(
        "Finished send attempt 1, sent to 2 of 3 recipients, 1 failed temporarily")
    assert sorted(msg.rcpt_sent) == ["a@grey.test", "b@busy.test"]
    # refused by both hosts at every attempt: kept for the retries, then given up
    assert msg.send_tries == 3 and msg.rcpt_failed == ["later@grey.test"]
    assert sum(c.startswith("RCPT TO:<later@grey.test>")
               for sink in (grey, backup) for se in sink.sessions for c in se.commands) == 6
    assert (tmp_path / "soft-undeliverable.txt").read_text() == "later@grey.test\n"


def test_452_too_many_recipients_go_again_on_the_same_session(tmp_path, sinks):
    """verdict.py (RFC 5321 4.5.3.1.10): a server taking two recipients per transaction and
    answering 452 4.5.3 to the rest gets them in further transactions on the same connection,
    in the same attempt, not at the next MX host nor at a retry."""
    def two_per_transaction(sess, verb, arg):
        if verb == "RCPT" and len(sess.rcpts) >= 2:
            return "452 4.5.3 Too many recipients"
        return None

    sink = sinks.add("127.0.0.161", script=SinkScript(on_command=two_per_transaction))
    rcpts = [f"u{i}@many.test" for i in range(5)]
    with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
            "many.test,mx.many.test,MX,127.0.0.161:25"]}) as eng:
        send(eng, rcpts)
        wait(settled(eng, 1), what="delivery")
        msg, = infs(eng, "done")
    assert [m.rcpts for m in sink.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]
    assert len({m.session_id for m in sink.messages}) == 1
    assert msg.send_tries == 1 and sorted(msg.rcpt_sent) == rcpts


def test_implicit_mx_null_mx_nxdomain_and_failing_zone_then_final_failure(tmp_path, sinks):
    sink = sinks.add("127.0.0.26")
    zones = {"implicit.test": {"A": ["127.0.0.26"]}, "null.test": {"MX": [(0, ".")]}}
    with TestDNSServer(zones, nxdomain=["nx.test"], servfail=["fail.test"]) as dns, \
            RunningEngine(tmp_path, {**FAST, "basic.nameservers": [dns.address]}) as eng:
        t0 = time.monotonic()
        send(eng, ["a@implicit.test", "b@null.test", "c@nx.test", "d@fail.test"])
        wait(settled(eng, 1), what="final failure")
        elapsed = time.monotonic() - t0
        msg, = infs(eng, "done")
    assert [m.rcpts for m in sink.messages] == [["a@implicit.test"]]
    assert msg.rcpt_sent == ["a@implicit.test"]
    assert sorted(msg.rcpt_failed) == ["b@null.test", "c@nx.test", "d@fail.test"]
    assert msg.rcpt_to_send == [] and msg.rcpt_transient == []
    assert msg.send_tries == 3 and msg.priority == 2 and msg.status == "done"
    assert elapsed >= 2.0  # two retry intervals of 1.2 s (whole-second retrytime)
    entries = [e.split(": ", 1)[1] for e in msg.log]
    assert entries[1].startswith("Finished send attempt 1, sent to 1 of 4 recipients, 2 failed "
                                 "permanently, 1 failed temporarily, next try at")
    assert entries[-1] == ("Finished send attempt 3, sent to 1 of 4 recipients, 1 still failing "
                           "after the last retry, given up, now done sending")
    assert sorted((tmp_path / "hard-undeliverable.txt").read_text().split()) == [
        "b@null.test", "c@nx.test"]
    assert (tmp_path / "soft-undeliverable.txt").read_text() == "d@fail.test\n"
    # issue 15.5: each DNS failure with its own status (RFC 7505 null MX, RFC 3463)
    events = [e for e in map(json.loads, (tmp_path / "log" / "events.jsonl").read_text()
                             .splitlines()) if e["event"] == "attempt"]
    said = {(e["rcpt"], e["code"], e["enhanced"]) for e in events if e["rcpt"] != "a@implicit.test"}
    assert said == {("b@null.test", 556, "5.1.10"), ("c@nx.test", 550, "5.1.2"),
                    ("d@fail.test", 451, "4.4.3")}
    nx_text, = {e["text"] for e in events if e["rcpt"] == "c@nx.test"}
    assert nx_text.startswith("Host or domain name not found. Name service error for "
                              "name=nx.test type=MX")


def test_4xx_then_accept_and_5xx_for_some_recipients(tmp_path, sinks):
    sink = sinks.add("127.0.0.27", script=SinkScript(rcpt={
        "later@mixed.test": ["451 4.3.0 Try again later", "250 2.1.5 Ok"],
        "bad@mixed.test": "550 5.1.1 No such user"}))
    with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
            "mixed.test,mx.mixed.test,MX,127.0.0.27:25"]}) as eng:
        send(eng, ["ok@mixed.test", "later@mixed.test", "bad@mixed.test"])
        wait(lambda: infs(eng, "retry") and infs(eng, "retry")[0].send_tries == 1,
             what="first attempt")
        first, = infs(eng, "retry")
        assert first.rcpt_to_send == ["later@mixed.test"]
        assert first.rcpt_transient == ["later@mixed.test"]
        assert first.rcpt_sent == ["ok@mixed.test"] and first.rcpt_failed == ["bad@mixed.test"]
        assert first.priority == 1 and first.status == "retry"
        assert first.retry_time is not None and first.retry_time > first.time_finished - \
            timedelta(seconds=1)
        wait(settled(eng, 1), what="the retry")
        msg, = infs(eng, "done")
    assert [sorted(m.rcpts) for m in sink.messages] == [["ok@mixed.test"], ["later@mixed.test"]]
    assert msg.send_tries == 2 and msg.priority == 1 and msg.rcpt_transient == []
    assert sorted(msg.rcpt_sent) == ["later@mixed.test", "ok@mixed.test"]
    assert msg.rcpt_failed == ["bad@mixed.test"]
    assert msg.log[-1].endswith("Finished send attempt 2, sent to 2 of 3 recipients, "
                                "now done sending")


def test_421_and_dropped_connection_are_retried(tmp_path, sinks):
    s421 = sinks.add("127.0.0.28", script=SinkScript(
        replies={"MAIL": ["421 4.7.0 Too busy, closing", "250 2.1.0 Ok"]}))
    drop = sinks.add("127.0.0.29", script=SinkScript(replies={"BODY": ["DROP", "250 2.0.0 Ok"]}))
    with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
            "busy.test,mx.busy.test,MX,127.0.0.28:25",
            "drop.test,mx.drop.test,MX,127.0.0.29:25"]}) as eng:
        send(eng, ["a@busy.test", "b@drop.test"])
        wait(settled(eng, 1), what="delivery after retries")
        msg, = infs(eng, "done")
    assert len(s421.messages) == 1 and len(drop.messages) == 1
    assert len(s421.sessions) == 2 and len(drop.sessions) == 2
    assert msg.send_tries == 2 and sorted(msg.rcpt_sent) == ["a@busy.test", "b@drop.test"]


def test_connection_caps_per_host_and_overall_never_exceeded(tmp_path, sinks):
    slow = SinkScript(delays={"RCPT": 0.05, "BODY": 0.05}, keep_data=False)
    a = sinks.add("127.0.0.31", script=slow)
    b = sinks.add("127.0.0.32", script=slow)
    c = sinks.add("127.0.0.33", script=slow)
    n = 40
    with RunningEngine(tmp_path, {**FAST, "queue.save_done": False,
                                  "limits.max_connections_per_host": 2,
                                  "limits.max_outbound_connections": 5,
                                  "basic.dns_servers": [
                                      "a.test,mx.a.test,MX,127.0.0.31:25",
                                      "b.test,mx.b.test,MX,127.0.0.32:25",
                                      "c.test,mx.c.test,MX,127.0.0.33:25"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            for i in range(n):
                for d in "abc":
                    s.sendmail("f@src.test", [f"u{i}@{d}.test"], b"Subject: cap\r\n\r\nx\r\n")
        wait(lambda: sum(len(x.messages) for x in (a, b, c)) == 3 * n, timeout=60,
             what="all messages")
    assert max(x.peak_connections for x in (a, b, c)) <= 2
    assert sinks.peak <= 5
    assert sinks.peak >= 3  # it did run in parallel
    assert all(len(x.messages) == n for x in (a, b, c))


def test_connection_caps_lowered_while_running_hold_at_once(tmp_path, sinks):
    from mailengine import control
    slow = SinkScript(delays={"RCPT": 0.05, "BODY": 0.05}, keep_data=False)
    a = sinks.add("127.0.0.72", script=slow)
    with RunningEngine(tmp_path, {**FAST, "queue.save_done": False,
                                  "limits.max_connections_per_host": 4,
                                  "basic.dns_servers": ["cap.test,mx.cap.test,MX,127.0.0.72:25"]}
                       ) as eng:
        def burst(tag: str, n: int) -> None:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                for i in range(n):
                    s.sendmail("f@src.test", [f"{tag}{i}@cap.test"], b"Subject: cap\r\n\r\nx\r\n")
        burst("early", 40)
        wait(lambda: sinks.now >= 3, what="parallel connections")
        reply = control.request(tmp_path / "mailengine.sock", "config.set",
                                name="limits.max_connections_per_host", value=1)
        assert reply["applied"]
        time.sleep(1.0)  # messages under way finish; their connections are not kept
        burst("late", 20)
        seen = []
        while len(a.messages) < 60:
            seen.append(sinks.now)
            time.sleep(0.01)
            assert len(seen) < 3000, "the deliveries did not finish"
    assert max(seen) <= 1
    assert a.peak_connections >= 3  # before the change it did run in parallel


def test_a_server_many_domains_share_does_not_hold_up_other_destinations(tmp_path, sinks):
    """Eight domains on one slow server capped at one connection, then one domain elsewhere:
    the units waiting for the busy server do not take the two overall places."""
    shared = sinks.add("127.0.0.73", script=SinkScript(delays={"BODY": 0.3}, keep_data=False))
    other = sinks.add("127.0.0.74")
    bypass = [f"d{i}.test,mx.shared.test,MX,127.0.0.73:25" for i in range(8)]
    with RunningEngine(tmp_path, {**FAST, "queue.save_done": False,
                                  "limits.max_connections_per_host": 1,
                                  "limits.max_outbound_connections": 2,
                                  "basic.dns_servers": bypass + [
                                      "e.test,mx.other.test,MX,127.0.0.74:25"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            for i in range(8):
                s.sendmail("f@src.test", [f"u@d{i}.test"], b"Subject: shared\r\n\r\nx\r\n")
            s.sendmail("f@src.test", ["u@e.test"], b"Subject: other\r\n\r\nx\r\n")
        wait(lambda: len(other.messages) == 1, what="the other domain's message")
        done_on_shared = len(shared.messages)
        wait(lambda: len(shared.messages) == 8, timeout=30, what="the shared server's mail")
    assert done_on_shared <= 2  # it did not wait for its turn behind the busy server's queue
    assert shared.peak_connections == 1 and sinks.peak <= 2


def test_test_mode_says_rset_and_quit_never_data(tmp_path, sinks):
    sink = sinks.add("127.0.0.34")
    with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
            "t.test,mx.t.test,MX,127.0.0.34:25"]}, command="test") as eng:
        send(eng, ["a@t.test", "b@t.test"])
        wait(settled(eng, 1), what="the test-mode attempt")
        msg, = infs(eng, "done")
        assert eng.mailq.name == "mailq-test"
        assert not (tmp_path / "mailq" / "done").exists() or \
            not list((tmp_path / "mailq" / "done").iterdir())
    verbs = sink.verbs
    assert "DATA" not in verbs and sink.messages == []
    assert verbs[-2:] == ["RSET", "QUIT"] and verbs.count("RCPT") == 2
    assert sorted(msg.rcpt_sent) == ["a@t.test", "b@t.test"]


def test_refused_mail_servers_are_never_contacted(tmp_path, sinks):
    own = sinks.add("127.0.0.35")
    other = sinks.add("127.0.0.36")
    zones = {"loop.test": {"MX": [(10, "own.loop.test"), (20, "other.loop.test")]},
             "own.loop.test": {"A": ["127.0.0.35"]}, "other.loop.test": {"A": ["127.0.0.36"]},
             "self.test": {"MX": [(10, "own.loop.test")]}}
    with TestDNSServer(zones) as dns, RunningEngine(tmp_path, {
            **FAST, "basic.nameservers": [dns.address],
            "policy.refused_mail_servers": ["127.0.0.35"]}) as eng:
        send(eng, ["a@loop.test", "b@self.test"])
        wait(settled(eng, 1), what="delivery")
        msg, = infs(eng, "done")
    assert own.sessions == []
    assert [m.rcpts for m in other.messages] == [["a@loop.test"]]
    assert msg.rcpt_failed == ["b@self.test"]


def test_refused_mail_servers_changed_while_running_reach_the_resolver(tmp_path, sinks):
    """Issue 15.7: a server taken off policy.refused_mail_servers while running gets mail at
    once; before, the resolver kept the old list and the mail failed for good."""
    from mailengine import control
    sink = sinks.add("127.0.0.154")
    with RunningEngine(tmp_path, {**FAST, "policy.refused_mail_servers": ["127.0.0.154"],
                                  "basic.dns_servers": ["back.test,mx.back.test,MX,"
                                                        "127.0.0.154:25"]}) as eng:
        reply = control.request(tmp_path / "mailengine.sock", "config.set",
                                name="policy.refused_mail_servers", value=[])
        assert reply["applied"]
        send(eng, ["a@back.test"])
        wait(settled(eng, 1), what="delivery")
        msg, = infs(eng, "done")
    assert msg.rcpt_sent == ["a@back.test"] and msg.rcpt_failed == []
    assert [m.rcpts for m in sink.messages] == [["a@back.test"]]


def test_received_names_the_protocol_and_the_tls_cipher(tmp_path, sinks):
    """Issue 15.4: the Received: header says RFC 3848's SMTP (HELO), ESMTP (EHLO), ESMTPS
    (STARTTLS, with the TLS version and cipher named as Postfix does) and ESMTPSA (and AUTH)."""
    import ssl
    from mailengine.intake import with_protocol
    from mailengine.smtp.server import Session
    sink = sinks.add("127.0.0.155")
    (tmp_path / "password.txt").write_text("alice:opensesame\n")
    body = b"Subject: trace\r\n\r\nhello\r\n"
    with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
            "trace.test,mx.trace.test,MX,127.0.0.155:25"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.helo("old.client.test")
            s.sendmail("a@src.test", ["helo@trace.test"], body)
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.ehlo("new.client.test")
            s.sendmail("a@src.test", ["ehlo@trace.test"], body)
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo("tls.client.test")
            cipher, version, bits = s.sock.cipher()
            s.sendmail("a@src.test", ["tls@trace.test"], body)
            s.rset()
            s.login("alice", "opensesame")
            s.sendmail("a@src.test", ["auth@trace.test"], body)
        wait(lambda: len(sink.messages) == 4, what="four deliveries")
    heads = {m.rcpts[0]: m.data.split(b"\r\n\r\n", 1)[0].decode() for m in sink.messages}
    def received(rcpt: str) -> str:
        return heads[rcpt].split("\r\nSubject:")[0]
    assert re.search(r"^Received: from old.client.test \(.*\)\r\n\tby engine.test "
                     r"\(MailEngine\) with SMTP id ", received("helo@trace.test"))
    assert " with ESMTP id " in received("ehlo@trace.test")
    using = f"\r\n\t(using {version} with cipher {cipher} ({bits}/{bits} bits))\r\n\tby "
    assert version.startswith("TLS") and using in received("tls@trace.test")
    assert " with ESMTPS id " in received("tls@trace.test")
    assert using in received("auth@trace.test")
    assert " with ESMTPSA id " in received("auth@trace.test")
    assert "using" not in received("ehlo@trace.test")
    # ESMTPA: authenticated without TLS (the web API's sessions; SMTP offers AUTH only in TLS)
    assert with_protocol(Session(esmtp=True, auth_user="token")) == "ESMTPA"


def test_pause_sending_keeps_mail_in_retry_until_lifted(tmp_path, sinks):
    sink = sinks.add("127.0.0.37")
    settings = {**FAST, "queue.pause_sending": True,
                "basic.dns_servers": ["p.test,mx.p.test,MX,127.0.0.37:25"]}
    with RunningEngine(tmp_path, settings) as eng:
        send(eng, ["a@p.test"])
        send(eng, ["b@p.test"])
        time.sleep(1.5)
        assert len(infs(eng, "retry")) == 2 and sink.sessions == []
    settings["queue.pause_sending"] = False
    with RunningEngine(tmp_path, settings) as eng:
        wait(settled(eng, 2), what="delivery after the pause")
    assert sorted(r for m in sink.messages for r in m.rcpts) == ["a@p.test", "b@p.test"]


def test_dropin_with_future_retrytime_waits_for_it(tmp_path, sinks):
    sink = sinks.add("127.0.0.38")
    mailq = tmp_path / "mailq"
    with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
            "d.test,mx.d.test,MX,127.0.0.38:25"]}) as eng:
        soon = datetime.now().replace(microsecond=0) + timedelta(seconds=3)
        msg = Message(id="P1T1C1@dropper", mail_from="app@src.test", rcpt_to_send=["x@d.test"],
                      retry_time=soon, priority=7)
        (mailq / "retry" / f"{msg.id}.dat").write_bytes(b"Subject: later\r\n\r\nbody\r\n")
        (mailq / "retry" / f"{msg.id}.inf").write_bytes(format_inf(msg))
        now_id = enqueue(mailq, "app@src.test", "y@d.test", ["Subject: now"], "body")
        wait(lambda: len(sink.messages) >= 1, what="the immediate drop-in")
        assert sink.messages[0].rcpts == ["y@d.test"]
        assert datetime.now() < soon
        wait(lambda: len(sink.messages) == 2, what="the later drop-in")
        assert datetime.now() >= soon - timedelta(seconds=1)
        wait(settled(eng, 2), what="both done")
        done = {m.id: m for m in infs(eng, "done")}
    assert done["P1T1C1@dropper"].priority == 7 and now_id in done


def test_stop_leaves_unfinished_mail_in_retry(tmp_path, sinks):
    sink = sinks.add("127.0.0.39", script=SinkScript(delays={"BODY": 30}))
    eng = RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
        "slow.test,mx.slow.test,MX,127.0.0.39:25"]}).start()
    try:
        send(eng, ["a@slow.test"])
        wait(lambda: infs(eng, "working"), what="delivery to start")
        wait(lambda: "DATA" in sink.verbs, what="the body to go out")
    finally:
        t0 = time.monotonic()
        eng.stop()
    assert time.monotonic() - t0 < 15
    assert infs(eng, "working") == []
    msg, = infs(eng, "retry")
    assert msg.rcpt_to_send == ["a@slow.test"] and msg.rcpt_sent == []
    assert msg.send_tries == 0


def test_slow_server_read_timeout_is_soft(tmp_path, sinks):
    sink = sinks.add("127.0.0.40", script=SinkScript(delays={"RCPT": 7}))
    with RunningEngine(tmp_path, {**FAST, "queue.retry_intervals": [10],
                                  "limits.smtp_read_timeout": 5, "basic.dns_servers": [
                                      "snail.test,mx.snail.test,MX,127.0.0.40:25"]}) as eng:
        send(eng, ["a@snail.test"])
        wait(lambda: infs(eng, "retry") and infs(eng, "retry")[0].send_tries == 1,
             timeout=20, what="the timed-out attempt")
        msg, = infs(eng, "retry")
    assert msg.rcpt_transient == ["a@snail.test"] and sink.messages == []
    assert "failed temporarily" in msg.log[-1]


def test_max_send_rate_holds_mail_back_and_says_so(tmp_path, sinks):
    sink = sinks.add("127.0.0.41")
    with RunningEngine(tmp_path, {**FAST, "limits.max_send_rate": 60,  # one a minute
                                  "basic.dns_servers": ["r.test,mx.r.test,MX,127.0.0.41:25"]}) as eng:
        for i in range(3):
            send(eng, [f"u{i}@r.test"])
        wait(lambda: len(sink.messages) == 1, what="the first message")
        time.sleep(2)
        assert len(sink.messages) == 1
    out = eng.output.decode()
    assert out.count("held back by limits.max_send_rate = 60") == 1


def test_max_bandwidth_spreads_the_bytes(tmp_path, sinks):
    sink = sinks.add("127.0.0.42")
    big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 40  # 40 kB
    with RunningEngine(tmp_path, {**FAST, "limits.max_bandwidth": 30_000 * 60,  # 30 kB/s
                                  "basic.dns_servers": ["bw.test,mx.bw.test,MX,127.0.0.42:25"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            for i in range(4):
                s.sendmail("f@src.test", [f"u{i}@bw.test"], big)
        t0 = time.monotonic()
        wait(lambda: len(sink.messages) == 4, timeout=30, what="4 big messages")
        elapsed = time.monotonic() - t0
    # 64 KiB may go at once; the other ~100 kB take about 3 s at 30 kB/s
    assert elapsed > 2.0


def test_421_lowers_concurrency_and_everything_still_arrives(tmp_path, sinks):
    seen = {"n": 0}

    def busy_first(sess, verb, arg):
        if verb == "MAIL":
            seen["n"] += 1
            if seen["n"] <= 4:
                return "421 4.7.0 Too many connections, slow down"
        return None

    sink = sinks.add("127.0.0.43", script=SinkScript(on_command=busy_first,
                                                     delays={"BODY": 0.1}, keep_data=False))
    with RunningEngine(tmp_path, {**FAST, "queue.save_done": False, "debug.send_loop": True,
                                  "limits.max_connections_per_host": 10,
                                  "basic.dns_servers": ["th.test,mx.th.test,MX,127.0.0.43:25"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            for i in range(30):
                s.sendmail("f@src.test", [f"u{i}@th.test"], b"Subject: t\r\n\r\nx\r\n")
        wait(lambda: len(sink.messages) == 30, timeout=40, what="all 30 after the 421s")
    assert "concurrency lowered" in eng.output.decode()
    assert sink.peak_connections <= 10


def test_starttls_helo_fallback_8bit_refusal_ipv6_and_source_ip(tmp_path, sinks):
    tls = sinks.add("127.0.0.44", script=SinkScript(starttls=True))
    old = sinks.add("127.0.0.45", script=SinkScript(ehlo=False))  # HELO only: no 8BITMIME
    v6 = sinks.add("::1", 25)
    with RunningEngine(tmp_path, {**FAST, "network.smtp_source_ip": "127.0.0.99",
                                  "basic.dns_servers": [
                                      "tls.test,mx.tls.test,MX,127.0.0.44:25",
                                      "old.test,mx.old.test,MX,127.0.0.45:25",
                                      "six.test,mx.six.test,MX,[::1]:25"]}) as eng:
        send(eng, ["a@tls.test", "b@old.test", "c@six.test"])
        send(eng, ["d@old.test"], body="Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode())
        # issue 15.3: 8-bit MIME text is converted to quoted-printable for the HELO-only server
        send(eng, ["e@old.test"], body="MIME-Version: 1.0\r\nContent-Type: text/plain; "
             "charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nd\u00e9j\u00e0 vu\r\n"
             .encode())
        wait(settled(eng, 3), what="the three messages")
        done = sorted(infs(eng, "done"), key=lambda m: len(m.rcpt_sent), reverse=True)
    assert tls.messages[0].tls and tls.sessions[0].peer[0] == "127.0.0.99"
    assert old.sessions[0].helo == "engine.test" and not old.sessions[0].esmtp
    assert [m.rcpts for m in old.messages] == [["b@old.test"], ["e@old.test"]]
    assert old.messages[1].data.endswith(b"Content-Transfer-Encoding: quoted-printable\r\n"
                                         b"\r\nd=C3=A9j=C3=A0 vu\r\n")
    assert [m.rcpts for m in v6.messages] == [["c@six.test"]]
    first, converted, eight_bit = done
    assert converted.rcpt_sent == ["e@old.test"] and converted.send_tries == 1
    assert sorted(first.rcpt_sent) == ["a@tls.test", "b@old.test", "c@six.test"]
    assert eight_bit.rcpt_failed == ["d@old.test"] and eight_bit.send_tries == 1
    assert "554 5.6.3" in eng.output.decode()


def test_bounce_host_gives_each_recipient_its_own_verp_sender(tmp_path, sinks):
    sink = sinks.add("127.0.0.46")
    with RunningEngine(tmp_path, {**FAST, "logging.bounce_host": "bounces.example",
                                  "basic.dns_servers": ["v.test,mx.v.test,MX,127.0.0.46:25"]},
                       command="test") as eng:
        send(eng, ["a@v.test", "b@v.test"])
        wait(settled(eng, 1), what="the attempt")
        msg, = infs(eng, "done")
    mails = sorted(c for c in sink.commands if c.upper().startswith("MAIL FROM"))
    assert [m.split()[1] for m in mails] == ["FROM:<mailengine-bounce-a%v.test@bounces.example>",
                                              "FROM:<mailengine-bounce-b%v.test@bounces.example>"]
    assert "DATA" not in sink.verbs and len(sink.sessions) == 2  # test mode: QUIT after each
    assert sorted(msg.rcpt_sent) == ["a@v.test", "b@v.test"]


# -- in-process: the DeliveryEngine on the test's own event loop --------------------------------

class _Engine:
    """What DeliveryEngine needs of app.Engine."""

    def __init__(self, home: Path, settings: dict) -> None:
        from mailengine.config import from_dict
        from mailengine.ledger import Ledger
        from mailengine.spool import Spool
        from mailengine.stats import Stats
        data: dict = {}
        # the engine sends itself, as on a small machine, whatever this one's cores (these
        # tests look at the engine's own sessions and the bytes it keeps from intake)
        settings = {"network.delivery_processes": 1, **settings}
        for name, value in settings.items():
            sec, key = name.split(".", 1)
            data.setdefault(sec, {})[key] = value
        self.cfg = from_dict(home, data)
        self.spool = Spool(home / "mailq", durable=False, hostname="engine.test")
        self.spool.ensure_dirs()
        self.stats = Stats()
        self.test_mode = False
        self.hostname = "engine.test"
        self.ledger = Ledger()


def test_submitted_in_working_is_sent_without_a_move_and_stop_puts_the_rest_in_retry(tmp_path):
    from mailengine.delivery import DeliveryEngine

    async def main():
        async with SMTPSink("127.0.0.47", 0) as sink:
            eng = _Engine(tmp_path, {**FAST, "basic.dns_servers": [
                f"w.test,mx.w.test,MX,127.0.0.47:{sink.port}"]})
            d = DeliveryEngine(eng)
            msg = Message(id="", mail_from="a@src.test", rcpt_to_send=["x@w.test"],
                          retry_time=datetime.now())
            await eng.spool.store(msg, b"Subject: w\r\n\r\nbody\r\n", "working")
            runner = asyncio.create_task(d.run())
            d.submit(msg, "working", data=b"Subject: w\r\n\r\nfrom memory\r\n")
            await sink.wait_messages(1, 10)
            assert sink.messages[0].data.endswith(b"\r\nfrom memory\r\n")  # not re-read
            assert d.ledger.cached_bytes == 0
            for _ in range(100):
                if not list((tmp_path / "mailq" / "working").iterdir()):
                    break
                await asyncio.sleep(0.02)
            assert not list((tmp_path / "mailq" / "working").iterdir())
            assert eng.stats.sent.total == 1
            # paused: a message stored into working/ never starts; stop() puts it in retry/
            d.set_paused(True)
            later = Message(id="", mail_from="a@src.test", rcpt_to_send=["y@w.test"],
                            retry_time=datetime.now())
            await eng.spool.store(later, b"Subject: w2\r\n\r\nbody\r\n", "working")
            d.submit(later, "working")
            await asyncio.sleep(0.2)
            await d.stop()
            await runner
            assert (tmp_path / "mailq" / "retry" / f"{later.id}.inf").exists()
            assert not list((tmp_path / "mailq" / "working").iterdir())
            assert len(sink.messages) == 1
            # stored into working/ while stopping (intake finishing its last store): to retry/
            last = Message(id="", mail_from="a@src.test", rcpt_to_send=["z@w.test"],
                           retry_time=datetime.now())
            await eng.spool.store(last, b"Subject: w3\r\n\r\nbody\r\n", "working")
            d.submit(last, "working")
            assert (tmp_path / "mailq" / "retry" / f"{last.id}.inf").exists()
            assert not list((tmp_path / "mailq" / "working").iterdir())

    asyncio.run(main())


def test_a_kept_connection_the_server_dropped_is_replaced_not_counted_as_failure(tmp_path):
    """The server closes idle connections: the next message on a kept one finds it gone."""
    from mailengine.delivery import DeliveryEngine

    def stale(sess, verb, arg):
        if verb == "MAIL" and sess.id == 1 and sess.verbs.count("MAIL") == 2:
            return "421 4.4.2 idle timeout, closing"  # as if it had closed while idle
        return None

    async def main():
        async with SMTPSink("127.0.0.48", 0, SinkScript(on_command=stale)) as sink:
            eng = _Engine(tmp_path, {**FAST, "basic.dns_servers": [
                f"k.test,mx.k.test,MX,127.0.0.48:{sink.port}"]})
            d = DeliveryEngine(eng)
            runner = asyncio.create_task(d.run())
            for i in range(2):
                msg = Message(id="", mail_from="a@src.test", rcpt_to_send=[f"x{i}@k.test"],
                              retry_time=datetime.now())
                await eng.spool.store(msg, b"Subject: k\r\n\r\nbody\r\n", "retry")
                d.submit(msg, "retry")
                await sink.wait_messages(i + 1, 10)
            for _ in range(100):
                if not list((tmp_path / "mailq" / "working").iterdir()):
                    break
                await asyncio.sleep(0.02)
            await d.stop()
            await runner
            assert len(sink.messages) == 2 and len(sink.sessions) == 2
            assert sink.sessions[0].verbs.count("MAIL") == 2  # the kept one was used
            assert not list((tmp_path / "mailq" / "retry").glob("*.inf"))
            assert eng.stats.sent.total == 2
            done = [parse_inf(p.read_bytes()) for p in (tmp_path / "mailq" / "done").glob("*.inf")]
            assert sorted(m.send_tries for m in done) == [1, 1]  # no retry was needed

    asyncio.run(main())


def test_many_recipients_split_per_domain_and_100_per_transaction(tmp_path, sinks):
    sink = sinks.add("127.0.0.49", script=SinkScript(keep_data=False))
    rcpts = [f"u{i}@d{i % 3}.fan.test" for i in range(330)]
    with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
            f"d{k}.fan.test,mx.fan.test,MX,127.0.0.49:25" for k in range(3)]}) as eng:
        send(eng, rcpts)
        wait(settled(eng, 1), timeout=30, what="fan-out")
        msg, = infs(eng, "done")
    assert sorted(msg.rcpt_sent) == sorted(rcpts) and msg.send_tries == 1
    sizes = sorted(len(m.rcpts) for m in sink.messages)
    assert sizes == [10, 10, 10, 100, 100, 100]  # 110 per domain
    for m in sink.messages:  # one domain per transaction
        assert len({r.rpartition("@")[2] for r in m.rcpts}) == 1
