"""Delivery status notifications (RFC 3461/3464), parsed back with Python's `email` package and
checked field by field; end to end through a real engine, a real DNS server and scripted sinks.
"""
from __future__ import annotations

import email
import email.policy
import smtplib
import time
from datetime import datetime

import pytest

from mailengine import dsn
from mailengine.bounces import parse_report
from mailengine.envelope import Message
from mailengine.outcome import AttemptResult, Kind, RcptOutcome
from mailengine.testing.dnsserver import TestDNSServer
from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import SinkScript, ThreadedSink

ORIGINAL = (b"From: news@src.test\r\nTo: bad@dest.test\r\nSubject: March news\r\n"
            b"Message-ID: <march.1@src.test>\r\n\r\nHello there.\r\n")
TRANSCRIPT = ("<-- DNS lookup succeeded, found 1 acceptable mail servers for dest.test",
              "--> Attempting to connect to: mx.dest.test (127.0.0.41 25)",
              "<-- Connected to: mx.dest.test (127.0.0.41 25)",
              "<-- 220 mx.dest.test ESMTP", "--> EHLO engine.test", "<-- 250 mx.dest.test",
              "--> MAIL FROM:<news@src.test>", "<-- 250 2.1.0 Ok",
              "--> RCPT TO:<bad@dest.test>", "<-- 550 5.1.1 <bad@dest.test>: no such user",
              "--> QUIT")


def message(**kw) -> Message:
    m = Message(id="P1T1C1@engine.test", mail_from="news@src.test",
                time_created=datetime(2026, 3, 3, 10, 0, 0),
                received={"helo": "app.src.test", "peertcpip": "127.0.0.1"})
    m.send_tries = 1
    m.time_finished = datetime(2026, 3, 3, 10, 0, 5)
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def hard(addr="bad@dest.test") -> RcptOutcome:
    return RcptOutcome.from_reply(addr, 550, "5.1.1", f"<{addr}>: no such user", "rcpt",
                                  "mx.dest.test", TRANSCRIPT)


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.compat32)


def report_parts(data: bytes):
    top = parse(data)
    assert top.get_content_type() == "multipart/report"
    assert top.get_param("report-type") == "delivery-status"
    parts = top.get_payload()
    return top, parts


# ------------------------------------------------------------------------------- which notices

@pytest.mark.parametrize("notify,failed,delayed,relayed", [
    ("", True, False, False),                   # default: failures only
    ("NEVER", False, False, False),
    ("FAILURE", True, False, False),
    ("SUCCESS,FAILURE,DELAY", True, True, True),
    ("DELAY", False, True, False),
    ("SUCCESS", False, False, True),
])
def test_notify_decides_which_notices(notify, failed, delayed, relayed):
    rcpts = {"f@d.test": {"notify": notify} if notify else {},
             "w@d.test": {"notify": notify} if notify else {},
             "s@d.test": {"notify": notify} if notify else {}}
    msg = message(dsn_rcpt=rcpts)
    res = AttemptResult(sent=["s@d.test"], failed=["f@d.test"], deferred=["w@d.test"])
    outs = [hard("f@d.test"),
            RcptOutcome.from_reply("w@d.test", 451, "4.3.0", "later", "rcpt", "mx.d.test"),
            RcptOutcome.from_reply("s@d.test", 250, "2.0.0", "ok", "body", "mx.d.test")]
    got = {n.action: [o.address for o in n.outcomes] for n in dsn.notices(msg, res, outs)}
    assert ("failed" in got) == failed and ("delayed" in got) == delayed
    assert ("relayed" in got) == relayed
    if failed:
        assert got["failed"] == ["f@d.test"]


def test_never_to_the_null_sender():
    msg = message(mail_from="")
    assert dsn.notices(msg, AttemptResult(failed=["bad@dest.test"]), [hard()]) == []


def test_gave_up_recipients_get_a_failure_notice_and_delay_only_once():
    msg = message()
    soft = RcptOutcome.from_reply("slow@d.test", 451, "4.4.1", "timeout", "connect", "mx.d.test")
    n, = dsn.notices(msg, AttemptResult(gave_up=["slow@d.test"]), [soft])
    assert n.action == "failed"
    msg = message(dsn_rcpt={"slow@d.test": {"notify": "DELAY,FAILURE"}})
    msg.send_tries = 2  # not the first deferral: no second delay notice
    assert dsn.notices(msg, AttemptResult(deferred=["slow@d.test"]), [soft]) == []


def test_success_passed_on_to_a_dsn_server_is_its_job():
    msg = message(dsn_rcpt={"s@d.test": {"notify": "SUCCESS"}})
    ok = RcptOutcome("s@d.test", Kind.SENT, 250, "2.0.0", "ok", "body", "mx", dsn_passed=True)
    assert dsn.notices(msg, AttemptResult(sent=["s@d.test"]), [ok]) == []


# ------------------------------------------------------------------------- the message, field by field

def test_failure_notice_is_rfc3464_field_by_field():
    msg = message(dsn_envid="QQ314159", dsn_ret="FULL",
                  dsn_rcpt={"bad@dest.test": {"notify": "FAILURE",
                                              "orcpt": "rfc822;Bad@Dest.test"}})
    n, = dsn.notices(msg, AttemptResult(failed=["bad@dest.test"]), [hard()])
    data = dsn.build(msg, n, "engine.test", ORIGINAL, now=datetime(2026, 3, 3, 10, 0, 6))
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    top, parts = report_parts(data)
    # RFC 3464 section 2 and RFC 3834: headers of the notice itself
    assert top["To"] == "<news@src.test>"
    assert top["From"] == "Mail Delivery System <MAILER-DAEMON@engine.test>"
    assert top["Auto-Submitted"] == "auto-replied"
    assert top["Subject"] == "Undelivered Mail Returned to Sender"
    assert top["MIME-Version"] == "1.0" and top["Message-ID"] and top["Date"]
    # exactly three parts: human text, delivery-status, the returned message
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "message/rfc822"]
    human = parts[0].get_payload(decode=True).decode().replace("\r\n", "\n")
    assert human.startswith("Your message (id P1T1C1@engine.test) could not be delivered to\n"
                            " bad@dest.test\nA transcript of the session follows:\n"
                            "--> Sending email to: bad@dest.test\n"
                            "<-- DNS lookup succeeded, found 1 acceptable mail servers")
    assert "--> RCPT TO:<bad@dest.test>\n<-- 550 5.1.1 <bad@dest.test>: no such user\n" in human
    assert "\n---\nA copy of your message is reproduced below.\n" in human
    # the delivery-status part: per-message fields, then one block per recipient
    per_msg, per_rcpt = parts[1].get_payload()
    assert per_msg["Reporting-MTA"] == "dns; engine.test"
    assert per_msg["Original-Envelope-Id"] == "QQ314159"
    assert per_msg["Received-From-MTA"] == "dns; app.src.test"
    assert email.utils.parsedate_to_datetime(per_msg["Arrival-Date"]).replace(tzinfo=None) == \
        datetime(2026, 3, 3, 10, 0, 0)
    assert per_rcpt["Original-Recipient"] == "rfc822;Bad@Dest.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; bad@dest.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.dest.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <bad@dest.test>: no such user"
    assert email.utils.parsedate_to_datetime(per_rcpt["Last-Attempt-Date"])
    assert per_rcpt["Will-Retry-Until"] is None
    # RET=FULL: the whole message, unchanged
    returned, = parts[2].get_payload()
    assert returned["Message-ID"] == "<march.1@src.test>"
    assert returned.get_payload() == "Hello there.\r\n"
    # and our own bounce parser reads it back
    rep = parse_report(data)
    b, = rep.bounces
    assert (b.address, b.kind, b.status, b.code) == ("bad@dest.test", "hard", "5.1.1", 550)
    assert rep.original_message_id == "<march.1@src.test>"


def test_ret_hdrs_returns_headers_only_and_delay_has_will_retry_until():
    msg = message(dsn_ret="HDRS", dsn_rcpt={"slow@d.test": {"notify": "DELAY"}})
    soft = RcptOutcome.from_reply("slow@d.test", 451, "4.7.1", "greylisted", "rcpt", "mx.d.test",
                                  ("--> RCPT TO:<slow@d.test>", "<-- 451 4.7.1 greylisted"))
    n, = dsn.notices(msg, AttemptResult(deferred=["slow@d.test"]), [soft])
    until = dsn.retry_until(msg, [30, 120])
    data = dsn.build(msg, n, "engine.test", ORIGINAL, until)
    top, parts = report_parts(data)
    assert top["Subject"] == "Delayed Mail (still being retried)"
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert "Hello there" not in parts[2].get_payload()
    assert "Message-ID: <march.1@src.test>" in parts[2].get_payload()
    _, r = parts[1].get_payload()
    assert r["Action"] == "delayed" and r["Status"] == "4.7.1"
    assert email.utils.parsedate_to_datetime(r["Will-Retry-Until"]).replace(tzinfo=None) == \
        datetime(2026, 3, 3, 12, 30)
    human = parts[0].get_payload().replace("\r\n", "\n")
    assert "has not yet been delivered to\n slow@d.test" in human
    assert "will keep trying until 2026/03/03 12:30:00" in human


def test_gave_up_soft_failure_keeps_its_4_status_and_dns_failures_have_no_smtp_code():
    """Issue 15.1: given up after the last retry, the notice says Action: failed with the 4.x.x
    code (RFC 3463, Postfix: 4.4.3), so a bounce processor (this engine's own included) counts a
    soft bounce and keeps the address."""
    msg = message()
    o = RcptOutcome.from_reply("x@nx.test", 451, "4.4.3", "DNS lookup of nx.test failed", "dns")
    n, = dsn.notices(msg, AttemptResult(gave_up=["x@nx.test"]), [o])
    data = dsn.build(msg, n, "engine.test", ORIGINAL)
    _, parts = report_parts(data)
    _, r = parts[1].get_payload()
    assert r["Status"] == "4.4.3" and r["Action"] == "failed"
    b, = parse_report(data).bounces
    assert (b.address, b.kind, b.status, b.action) == ("x@nx.test", "soft", "4.4.3", "failed")
    assert r["Diagnostic-Code"].startswith("X-MailEngine; 451 4.4.3 DNS lookup")
    assert r["Remote-MTA"] is None
    assert "<-- 451 4.4.3 DNS lookup of nx.test failed" in parts[0].get_payload()


def test_eight_bit_original_without_ret_comes_back_as_headers():
    msg = message()
    n, = dsn.notices(msg, AttemptResult(failed=["bad@dest.test"]), [hard()])
    data = dsn.build(msg, n, "engine.test", ORIGINAL.replace(b"Hello", "Grüße".encode()))
    _, parts = report_parts(data)
    assert parts[2].get_content_type() == "text/rfc822-headers"
    assert data.isascii()


# ---------------------------------------------------------------------------------- end to end

FAST = {"queue.pause_sending": False, "queue.retry_intervals": [0.02],
        "queue.queue_check_interval": 0.5, "network.helo_text": "engine.test",
        "queue.dsn": True}


def wait(pred, timeout=30.0, what="condition"):
    wait_until(pred, timeout, what)


def test_dsn_end_to_end_reaches_the_senders_domain(tmp_path):
    """550 for one recipient, 4xx to the end for another, one delivered: the sender's domain
    gets a DSN (MAIL FROM:<>) for each failure when it becomes final (the 550 at once, the 4xx
    after the last retry); the delivered recipient is never mentioned."""
    dest = ThreadedSink("127.0.0.41", 25, SinkScript(rcpt={
        "bad@dest.test": "550 5.1.1 <bad@dest.test>: no such user",
        "full@dest.test": "452 4.2.2 mailbox full"})).start()
    home = ThreadedSink("127.0.0.42", 25).start()
    zones = {"dest.test": {"MX": [(10, "mx.dest.test")]}, "mx.dest.test": {"A": ["127.0.0.41"]},
             "src.test": {"MX": [(10, "mx.src.test")]}, "mx.src.test": {"A": ["127.0.0.42"]}}
    try:
        with TestDNSServer(zones) as dns_server, RunningEngine(tmp_path, {
                **FAST, "basic.nameservers": [dns_server.address]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.ehlo("app.src.test")
                s.sendmail("news@src.test", ["bad@dest.test", "full@dest.test",
                                             "good@dest.test"], ORIGINAL,
                           mail_options=["RET=HDRS", "ENVID=QQ314159"],
                           rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;Bad@Dest.test"])
            home.wait_messages(2, timeout=30)
            time.sleep(1.5)  # no third notice comes
            n_home = len(home.messages)
        assert n_home == 2
        first, second = home.messages
        for m in (first, second):
            assert m.mail_from == "" and m.rcpts == ["news@src.test"]
            assert b"Final-Recipient: rfc822; good@dest.test" not in m.data
            assert b"delivered to\r\n good@dest.test" not in m.data
        top, parts = report_parts(first.data)
        assert top["To"] == "<news@src.test>"
        per_msg, bad = parts[1].get_payload()
        assert per_msg["Reporting-MTA"] == "dns; engine.test"
        assert per_msg["Original-Envelope-Id"] == "QQ314159"
        assert per_msg["Received-From-MTA"] == "dns; app.src.test"
        assert bad["Final-Recipient"] == "rfc822; bad@dest.test"
        assert bad["Action"] == "failed" and bad["Status"] == "5.1.1"
        assert bad["Diagnostic-Code"] == "smtp; 550 5.1.1 <bad@dest.test>: no such user"
        assert bad["Remote-MTA"] == "dns; mx.dest.test"
        assert bad["Original-Recipient"] == "rfc822;Bad@Dest.test"
        human = parts[0].get_payload().replace("\r\n", "\n")
        assert human.startswith("Your message (id ")
        assert ("--> Sending email to: bad@dest.test\n"
                "<-- DNS lookup succeeded, found 1 acceptable mail servers for dest.test\n"
                "--> Attempting to connect to: mx.dest.test (127.0.0.41 25)\n") in human
        assert "--> RCPT TO:<bad@dest.test>" in human and "<-- 550 5.1.1" in human
        assert parts[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
        assert "Subject: March news" in parts[2].get_payload()
        _, parts = report_parts(second.data)
        _, full = parts[1].get_payload()
        assert full["Final-Recipient"] == "rfc822; full@dest.test"
        assert full["Action"] == "failed" and full["Status"] == "4.2.2"  # given up at the end
        assert full["Diagnostic-Code"] == "smtp; 452 4.2.2 mailbox full"
        # the lists saw it too
        assert (tmp_path / "hard-undeliverable.txt").read_text() == "bad@dest.test\n"
        assert (tmp_path / "soft-undeliverable.txt").read_text() == "full@dest.test\n"
    finally:
        dest.stop()
        home.stop()


def test_a_failing_dsn_causes_no_further_notice(tmp_path):
    """The sender's own domain refuses everything: its DSN fails, and nothing more is sent."""
    dest = ThreadedSink("127.0.0.43", 25, SinkScript(rcpt={"@dest2.test": "550 5.1.1 no"})).start()
    home = ThreadedSink("127.0.0.44", 25, SinkScript(rcpt={"@src2.test": "550 5.1.1 gone"})).start()
    try:
        with RunningEngine(tmp_path, {**FAST, "queue.save_done": True, "basic.dns_servers": [
                "dest2.test,mx.dest2.test,MX,127.0.0.43:25",
                "src2.test,mx.src2.test,MX,127.0.0.44:25"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("news@src2.test", ["x@dest2.test"], ORIGINAL)
            wait(lambda: len(list((eng.mailq / "done").glob("*.inf"))) >= 2, what="both done")
            time.sleep(1.5)
            done = sorted(p.read_text() for p in (eng.mailq / "done").glob("*.inf"))
            sessions = [c.split(" SIZE=")[0] for s in home.sessions for c in s.commands
                        if c.startswith("MAIL")]
        assert len(done) == 2  # the message and its one notice; no notice about the notice
        assert sessions == ["MAIL FROM:<>"]
        assert any("generated=dsn" in d for d in done)
    finally:
        dest.stop()
        home.stop()


def test_no_dsn_without_queue_dsn(tmp_path):
    dest = ThreadedSink("127.0.0.45", 25, SinkScript(rcpt={"@dest3.test": "550 5.1.1 no"})).start()
    home = ThreadedSink("127.0.0.46", 25).start()
    try:
        with RunningEngine(tmp_path, {**FAST, "queue.dsn": False, "queue.save_done": True,
                                      "basic.dns_servers": [
                                          "dest3.test,mx.dest3.test,MX,127.0.0.45:25",
                                          "src3.test,mx.src3.test,MX,127.0.0.46:25"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("news@src3.test", ["x@dest3.test"], ORIGINAL)
            wait(lambda: list((eng.mailq / "done").glob("*.inf")), what="done")
            time.sleep(1.0)
        assert home.messages == []
    finally:
        dest.stop()
        home.stop()


# ------------------------------------------------------------------- internationalized (RFC 6533)

def test_a_notice_naming_utf8_addresses_is_a_global_delivery_status():
    sender, rcpt = "ニュース@送信.example", "受信者@宛先.example"
    original = ("From: ニュース@送信.example\r\nTo: 受信者@宛先.example\r\nSubject: お知らせ\r\n"
                "Message-ID: <g.1@src.test>\r\n\r\nこんにちは\r\n").encode()
    msg = message(mail_from=sender, dsn_rcpt={rcpt: {"orcpt": f"utf-8;{rcpt}"}})
    out = dsn.build(msg, dsn.Notice("failed", [hard(rcpt)]), "engine.test", original)
    top = email.message_from_bytes(out, policy=email.policy.SMTPUTF8)
    assert top.get_content_type() == "multipart/report"
    assert top.get_param("report-type") == "global-delivery-status"
    assert f"\r\nTo: <{sender}>\r\n" in out.decode("utf-8")  # raw UTF-8 (RFC 6532)
    human, status, returned = top.get_payload()
    assert status.get_content_type() == "message/global-delivery-status"
    assert status["Content-Transfer-Encoding"] == "8bit"
    text = out.decode("utf-8")
    assert f"Final-Recipient: utf-8; {rcpt}\r\n" in text
    assert f"Original-Recipient: utf-8;{rcpt}\r\n" in text
    assert returned.get_content_type() == "message/global"
    assert "Subject: お知らせ\r\n" in text  # the original comes back as it was
    # and the engine's own bounce intake understands it
    rep = parse_report(out)
    b, = rep.bounces
    assert (b.address, b.status, b.kind) == (rcpt, "5.1.1", "hard")


def test_ascii_addresses_with_utf8_headers_return_the_original_as_message_global():
    original = ("From: news@src.test\r\nTo: bad@dest.test\r\nSubject: Grüße\r\n\r\n"
                "Hallo\r\n").encode()
    out = dsn.build(message(), dsn.Notice("failed", [hard()]), "engine.test", original)
    top, parts = report_parts(out)
    assert parts[1].get_content_type() == "message/delivery-status"  # nothing non-ASCII in it
    assert parts[2].get_content_type() == "message/global"
    hdrs = dsn.build(message(dsn_ret="HDRS"), dsn.Notice("failed", [hard()]), "engine.test",
                     original)
    assert report_parts(hdrs)[1][2].get_content_type() == "message/global-headers"
    assert b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n" in hdrs and b"Hallo" not in hdrs


def test_a_notice_to_a_utf8_sender_goes_out_with_smtputf8(tmp_path):
    dest = ThreadedSink(script=SinkScript(rcpt={"@dest7.test": "550 5.1.1 no such user"})).start()
    home = ThreadedSink().start()
    sender, rcpt = "ニュース@src7.test", "受信者@dest7.test"
    try:
        with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
                f"dest7.test,mx.dest7.test,MX,127.0.0.1:{dest.port}",
                f"src7.test,mx.src7.test,MX,127.0.0.1:{home.port}"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.ehlo("app.src.test")
                s.sendmail(sender, [rcpt], ORIGINAL, mail_options=["SMTPUTF8"])
            home.wait_messages(1, timeout=30)
        m, = home.messages
        mail = [c for sess in home.sessions for c in sess.commands if c.startswith("MAIL")]
    finally:
        dest.stop()
        home.stop()
    assert m.mail_from == "" and m.rcpts == [sender]
    assert "SMTPUTF8" in mail[0].split()
    top = email.message_from_bytes(m.data, policy=email.policy.SMTPUTF8)
    assert top.get_param("report-type") == "global-delivery-status"
    assert top.get_payload()[1].get_content_type() == "message/global-delivery-status"
    assert f"Final-Recipient: utf-8; {rcpt}\r\n".encode() in m.data
