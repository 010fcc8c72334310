"""Hard bounces fill the suppression list (issue 18 items 1+2, bounce_suppression.py): a
recipient refused for good in a category that means "this address will never work" is
suppressed for every sender, whether the refusal came in the SMTP session or later as a bounce
report; soft failures, give-ups and other categories are not."""
from __future__ import annotations

import smtplib
import time

import pytest

from mailengine import bounce_suppression as bs
from mailengine.bounces import Bounce
from mailengine.outcome import AttemptResult, Kind, RcptOutcome
from mailengine.suppression import SuppressionStore
from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import SinkScript, ThreadedSink

PERMANENT = ["bad-domain", "bad-mailbox", "inactive-mailbox"]


def out(addr, kind, code, enhanced, text):
    return RcptOutcome(addr, kind, code, enhanced, text, stage="rcpt")


def test_only_hard_failures_of_the_chosen_categories_are_suppressed():
    outcomes = [out("gone@d.test", Kind.HARD, 550, "5.1.1", "User unknown"),
                out("full@d.test", Kind.HARD, 552, "5.2.2", "Mailbox full"),
                out("spam@d.test", Kind.HARD, 554, "5.7.1", "Message rejected as spam"),
                out("grey@d.test", Kind.SOFT, 450, "4.1.1", "User unknown (try later)"),
                out("late@d.test", Kind.HARD, 550, "5.1.1", "User unknown"),
                out("ok@d.test", Kind.SENT, 250, "2.0.0", "OK")]
    res = AttemptResult(sent=["ok@d.test"], failed=["gone@d.test", "full@d.test", "spam@d.test",
                                                    "late@d.test"],
                        deferred=["grey@d.test"], gave_up=["late@d.test"])
    got = bs.from_attempt(PERMANENT, outcomes, res)
    assert [a for a, _ in got] == ["gone@d.test"]  # give-ups are not the address's fault
    assert got[0][1] == "bad-mailbox: 550 5.1.1 User unknown"
    assert bs.from_attempt([], outcomes, res) == []
    assert [a for a, _ in bs.from_attempt(["spam-related"], outcomes, res)] == ["spam@d.test"]


def test_bounce_reports_count_when_hard():
    hard = Bounce("gone@d.test", "hard", status="5.1.1", code=550, reason="no such user")
    soft = Bounce("busy@d.test", "soft", status="4.1.1", code=450, reason="no such user")
    full = Bounce("full@d.test", "hard", status="5.2.2", code=552, reason="quota")
    got = bs.from_bounces(PERMANENT, [hard, soft, full])
    assert got == [("gone@d.test", "bad-mailbox: bounce report: 550 5.1.1 no such user")]


def test_suppress_writes_for_every_sender_with_the_configured_expiry(tmp_path):
    store = SuppressionStore(tmp_path)
    assert bs.suppress(store, [("Gone@D.test", "bad-mailbox: 550 5.1.1 x"),
                               ("not an address", "x")], days=2) == 1
    e = store.lookup("gone@d.test", "any-sender.test")
    assert e is not None and e.source == "bounce" and e.sender_domain == ""
    assert abs(e.expires - (time.time() + 2 * 86400)) < 60
    bs.suppress(store, [("forever@d.test", "r")], days=0)
    assert store.lookup("forever@d.test").expires is None
    store.close()


def test_bad_category_setting_is_refused(tmp_path):
    from mailengine import config
    with pytest.raises(config.ConfigError, match="no such bounce category: bad-mailboxes"):
        config.from_dict(tmp_path, {"suppression": {"bounce_categories": ["bad-mailboxes"]}})


def bounce_report(address: str, quoted: bytes = b"") -> bytes:
    """A plain bounce for `address` quoting part of the returned message."""
    local, domain = address.split("@")
    return (f"From: MAILER-DAEMON@mx.{domain}\r\n"
            f"To: mailengine-bounce-{local}%{domain}@bounces.sender.test\r\n"
            f"Subject: Undelivered Mail Returned to Sender\r\n\r\n"
            f"<{address}>: host mx.{domain} said: 550 5.1.1 user unknown\r\n\r\n"
            f"--- Below this line is a copy of the message.\r\n\r\n").encode() + quoted + \
        b"Subject: t\r\n\r\nhi\r\n"


def test_a_bounce_report_counts_only_with_our_token_for_that_address(tmp_path):
    """Anyone can mail a VERP address: a report suppresses only when the copy it quotes holds
    this engine's signed List-Unsubscribe token for the same address."""
    from mailengine import recipient_token
    from mailengine.bounces import parse_report
    secret = recipient_token.load_secret(tmp_path)
    tok = recipient_token.make(secret, "tom@gmail.test", "sender.test")
    other = recipient_token.make(secret, "ann@gmail.test", "sender.test")
    forged = recipient_token.make(b"x" * 32, "tom@gmail.test", "sender.test")
    for quoted, want in [(b"", []),
                         (f"List-Unsubscribe: <https://u.test/u/{tok}>\r\n".encode(),
                          ["tom@gmail.test"]),
                         (f"List-Unsubscribe: <mailto:unsubscribe+{tok}@u.test>\r\n".encode(),
                          ["tom@gmail.test"]),
                         (f"List-Unsubscribe: <https://u.test/u/{other}>\r\n".encode(), []),
                         (f"List-Unsubscribe: <https://u.test/u/{forged}>\r\n".encode(), [])]:
        data = bounce_report("tom@gmail.test", quoted)
        rep = parse_report(data)
        proven = recipient_token.quoted_recipients(secret, data)
        got = bs.from_bounces(PERMANENT, rep.bounces, proven)
        assert [a for a, _ in got] == want, quoted
        assert [a for a, _ in bs.from_bounces(PERMANENT, rep.bounces, None)] == \
            ["tom@gmail.test"]  # suppression.trust_unsigned_bounces


def test_engine_suppresses_after_a_hard_refusal_and_a_proven_bounce_report(tmp_path):
    """A real engine: the sink refuses one recipient 550 5.1.1 and another 552 (quota); bounce
    reports come back by SMTP for two more, one quoting our token for its address. The refused
    one and the proven one are then refused at RCPT for any sender; the quota one and the one
    of the unproven report are not."""
    from mailengine import recipient_token
    sink = ThreadedSink("127.0.0.172", 0, SinkScript(rcpt={
        "gone@sup.test": "550 5.1.1 The email account that you tried to reach does not exist",
        "full@sup.test": "552 5.2.2 Mailbox full"})).start()
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": False, "network.helo_text": "engine.test",
                "logging.bounce_host": "bounces.sender.test",
                "basic.local_domains": ["bounces.sender.test"],
                "basic.dns_servers": [f"sup.test,mx.sup.test,MX,127.0.0.172:{sink.port}"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("news@sender.test", ["ok@sup.test", "gone@sup.test", "full@sup.test"],
                           b"Subject: t\r\n\r\nhi\r\n")
            store = SuppressionStore(tmp_path)
            wait_until(lambda: store.lookup("gone@sup.test") is not None, 20, "suppressed")
            tok = recipient_token.make(recipient_token.load_secret(tmp_path), "tom@gmail.test",
                                       "sender.test")
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("", ["mailengine-bounce-kim%gmail.test@bounces.sender.test"],
                           bounce_report("kim@gmail.test"))
                s.sendmail("", ["mailengine-bounce-tom%gmail.test@bounces.sender.test"],
                           bounce_report("tom@gmail.test", (
                               f"List-Unsubscribe: <https://u.test/u/{tok}>\r\n").encode()))
                # recorded before the 250: refused at once, for another sender too
                s.ehlo()
                s.mail("other@elsewhere.test")
                code, text = s.rcpt("tom@gmail.test")
                assert code == 550 and b"suppression list" in text
                assert s.rcpt("gone@sup.test")[0] == 550
                assert s.rcpt("full@sup.test")[0] == 250
                assert s.rcpt("kim@gmail.test")[0] == 250  # a report anyone could have sent
                s.rset()
            hard = (tmp_path / "hard-bounces.txt").read_text()
    finally:
        sink.stop()
    assert "kim@gmail.test" in hard and "tom@gmail.test" in hard  # both recorded as bounces
    wait_until(lambda: store.lookup("tom@gmail.test") is not None, 5, "tom suppressed")
    gone, tom = store.lookup("gone@sup.test"), store.lookup("tom@gmail.test")
    assert gone.source == "bounce" and gone.reason.startswith("bad-mailbox: 550 5.1.1")
    assert tom.source == "bounce" and "bounce report" in tom.reason
    assert store.lookup("kim@gmail.test") is None
    assert store.lookup("full@sup.test") is None and store.lookup("ok@sup.test") is None
    store.close()


def test_the_engine_removes_expired_entries_in_its_housekeeping(tmp_path):
    """app.Engine._purge_suppressions (hourly, from the expiry loop): expired entries go, others
    stay; a home without a list opens none."""
    import asyncio
    from mailengine.app import Engine
    from mailengine.config import from_dict
    eng = Engine(from_dict(tmp_path, {}))
    asyncio.run(eng._purge_suppressions())
    assert not (tmp_path / "suppression.db").exists()
    store = SuppressionStore(tmp_path)
    store.add("old@d.test", reason="r", expires=time.time() - 10)
    store.add("new@d.test", reason="r", expires=time.time() + 3600)
    asyncio.run(eng._purge_suppressions())
    assert [e.address for e in store.entries(include_expired=True)] == ["new@d.test"]
    store.close()
