"""Delivery reports (reports.delivery_reports e/f/l/x, reports.recipients, reports.domains)."""
from __future__ import annotations

import email
import email.policy
import smtplib
import time
from datetime import datetime

import pytest

from mailengine import reports
from mailengine.envelope import Message
from mailengine.outcome import AttemptResult, RcptOutcome
from mailengine.testing.engine import RunningEngine
from mailengine.testing.sink import SinkScript, ThreadedSink


@pytest.mark.parametrize("mode,first,last,want", [
    ("e", False, False, True), ("f", True, False, True), ("f", False, True, False),
    ("l", False, True, True), ("l", True, False, False), ("x", True, False, True),
    ("x", False, True, True), ("x", False, False, False), ("", True, True, False)])
def test_when_reports_are_sent(mode, first, last, want):
    msg = Message(id="P1@h", mail_from="a@b.test")
    msg.send_tries = 1 if first else 2
    assert reports.wanted(mode, msg, AttemptResult(done=last)) is want


def test_report_content_counts_transcripts_and_domain_filter():
    msg = Message(id="P9@engine.test", mail_from="news@src.test",
                  time_created=datetime(2026, 3, 3, 10, 0))
    msg.send_tries = 1
    msg.rcpt_sent = ["ok@dest.test"]
    msg.rcpt_failed = ["bad@dest.test", "bad@other.test"]
    msg.rcpt_to_send = ["later@dest.test"]
    msg.retry_time = datetime(2026, 3, 3, 10, 30)
    tr = ("--> RCPT TO:<bad@dest.test>", "<-- 550 5.1.1 no such user")
    outs = [RcptOutcome.from_reply("ok@dest.test", 250, "2.0.0", "ok", "body", "mx"),
            RcptOutcome.from_reply("bad@dest.test", 550, "5.1.1", "no such user", "rcpt", "mx",
                                   tr),
            RcptOutcome.from_reply("bad@other.test", 550, "5.1.1", "nope", "rcpt", "mx2"),
            RcptOutcome.from_reply("later@dest.test", 451, "4.3.0", "later", "rcpt", "mx")]
    res = AttemptResult(sent=["ok@dest.test"], failed=["bad@dest.test", "bad@other.test"],
                        deferred=["later@dest.test"])
    data = reports.build(msg, res, outs, ["ops@ops.test", "boss@ops.test"], ["@dest.test"],
                         "engine.test", now=datetime(2026, 3, 3, 10, 0, 5))
    m = email.message_from_bytes(data, policy=email.policy.default)
    assert str(m["To"]) == "ops@ops.test, boss@ops.test"
    assert m["Subject"] == "Delivery report: P9@engine.test, attempt 1: 1 of 4 delivered"
    assert m["Auto-Submitted"] == "auto-generated"
    text = m.get_content().replace("\r\n", "\n")
    for line in ["Recipients in total: 4", "Delivered so far: 1", "Failed permanently so far: 2",
                 "Waiting for a retry: 1 (next try at 2026/03/03 10:30:00)",
                 "Addresses that failed in this attempt: 3 (2 of 3 shown, "
                 "reports.domains = @dest.test)",
                 "bad@dest.test: 550 5.1.1 no such user (failed permanently)",
                 "--> Sending email to: bad@dest.test\n--> RCPT TO:<bad@dest.test>\n"
                 "<-- 550 5.1.1 no such user\n---",
                 "later@dest.test: 451 4.3.0 later (deferred, will be retried)"]:
        assert line in text
    assert "bad@other.test" not in text


def test_delivery_reports_end_to_end(tmp_path):
    """Mode x: a report after the first and after the last attempt, to the report recipient's
    own mail server, from <>, with the failed address's transcript."""
    dest = ThreadedSink("127.0.0.61", 25, SinkScript(rcpt={
        "bad@rep.test": "550 5.1.1 No such user here",
        "later@rep.test": ["451 4.3.0 Try later", "250 2.1.5 Ok"]})).start()
    ops = ThreadedSink("127.0.0.62", 25).start()
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": False, "queue.retry_intervals": [0.02],
                "network.helo_text": "engine.test",
                "reports.delivery_reports": "x", "reports.recipients": ["ops@ops.test"],
                "basic.dns_servers": ["rep.test,mx.rep.test,MX,127.0.0.61:25",
                                      "ops.test,mx.ops.test,MX,127.0.0.62:25"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("news@src.test", ["ok@rep.test", "bad@rep.test", "later@rep.test"],
                           b"Subject: t\r\n\r\nhi\r\n")
            ops.wait_messages(2, timeout=30)
            time.sleep(1.0)
            n = len(ops.messages)
    finally:
        dest.stop()
        ops.stop()
    assert n == 2  # first and last; none about the reports themselves
    first, last = (email.message_from_bytes(m.data, policy=email.policy.default)
                   for m in ops.messages)
    assert all(m.mail_from == "" and m.rcpts == ["ops@ops.test"] for m in ops.messages)
    assert first["Subject"].endswith("attempt 1: 1 of 3 delivered")
    assert last["Subject"].endswith("attempt 2: 2 of 3 delivered")
    t1 = first.get_content().replace("\r\n", "\n")
    assert "bad@rep.test: 550 5.1.1 No such user here (failed permanently)" in t1
    assert "<-- 550 5.1.1 No such user here" in t1
    assert "--> Attempting to connect to: mx.rep.test (127.0.0.61 25)" in t1
    assert "later@rep.test: 451 4.3.0 Try later (deferred, will be retried)" in t1
    t2 = last.get_content().replace("\r\n", "\n")
    assert "the message is done" in t2 and "Delivered so far: 2" in t2
