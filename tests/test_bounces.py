"""Bounce intake: VERP addresses, the bounce corpus, the lists and log it writes, end to end.

The corpus (tests/bounce_corpus/*.eml) holds returned mail written for these tests in the shapes
large providers and common MTAs send: RFC 3464 reports from Postfix, Sendmail, Exim, Exchange
and Gmail-like providers; plain-text qmail, old Exim, old Sendmail and Yahoo-like notices; delay
warnings; and mail that is no bounce at all (out-of-office replies, a success notice, a person
answering). Each is parsed with LF and with CRLF line ends (mail arrives by SMTP with CRLF).
"""
from __future__ import annotations

import json
import smtplib
import time
from pathlib import Path

import pytest

from mailengine.bounces import (BounceLog, Report, bounce_for, classify_reply, parse_report,
                                verp_decode, verp_encode)
from mailengine.smtp import wire
from mailengine.testing.engine import RunningEngine

CORPUS = Path(__file__).parent / "bounce_corpus"

# file -> (failures as (address, kind, status, code), Message-ID of the returned mail, our id)
# or the reason it is no bounce.
EXPECTED = {
    "postfix_user_unknown.eml": ([("alice@dest.test", "hard", "5.1.1", 550)],
                                 "<newsletter-2026-03.alice@sender.test>",
                                 "P17000T1C3@engine.sender.test"),
    "postfix_mailbox_full.eml": ([("bob@example.test", "soft", "5.2.2", 552)],
                                 "<offers.123@sender.test>", "P17001T2C9@engine.sender.test"),
    "postfix_delayed.eml": ([("carol@slow.test", "soft", "4.4.1", 0)],
                            "<hello.carol@sender.test>", ""),
    "exim_dsn.eml": ([("dave@exim.test", "hard", "5.1.1", 550)], "<promo-77@sender.test>",
                     "P17002T3C1@engine.sender.test"),
    "exim_plain.eml": ([("erin@oldexim.test", "hard", "5.1.1", 550)], "<news-9@sender.test>",
                       "P17003T4C2@engine.sender.test"),
    "exim_delay_warning.eml": ([("frank@grey.test", "soft", "4.7.1", 451)], "", ""),
    "sendmail_dsn.eml": ([("grace@sm.test", "hard", "5.1.1", 550)], "<news-10@sender.test>", ""),
    "sendmail_old_plain.eml": ([("heidi@legacy.test", "hard", "", 550)],
                               "<news-11@sender.test>", ""),
    "exchange_ndr.eml": ([("ivan@corp.test", "hard", "5.1.10", 550)],
                         "<welcome-ivan@sender.test>", "P17004T5C3@engine.sender.test"),
    "exchange_quota.eml": ([("judy@corp.test", "soft", "5.2.2", 554)], "", ""),
    "gmail_address_not_found.eml": ([("kim@gmail.test", "hard", "5.1.1", 550)],
                                    "<receipt-4411@sender.test>",
                                    "P17005T6C4@engine.sender.test"),
    "gmail_over_quota.eml": ([("lee@gmail.test", "soft", "5.2.2", 552)], "", ""),
    "gmail_policy_block.eml": ([("mia@gmail.test", "hard", "5.7.26", 550)], "", ""),
    "yahoo_plain.eml": ([("nina@yahoo.test", "hard", "", 554)], "<news-12@sender.test>",
                        "P17006T7C5@engine.sender.test"),
    "yahoo_deferred.eml": ([("omar@yahoo.test", "soft", "4.7.0", 421)], "", ""),
    "qmail_permanent.eml": ([("pat@q.test", "hard", "5.1.1", 0)], "<news-13@sender.test>",
                            "P17007T8C6@engine.sender.test"),
    "qmail_remote_said.eml": ([("quinn@remote.test", "hard", "5.1.1", 550)], "", ""),
    "qmail_soft_queue_too_long.eml": ([("rosa@full.test", "soft", "4.2.2", 452)], "", ""),
    "text_no_code_user_unknown.eml": ([("sam@smallisp.test", "hard", "", 0)], "", ""),
    "multi_recipient_dsn.eml": ([("tom@multi.test", "hard", "5.1.1", 550),
                                 ("uma@multi.test", "soft", "4.4.7", 451)], "", ""),
    "dsn_no_diagnostic.eml": ([("wes@bare.test", "hard", "5.1.1", 0)], "", ""),
    "global_dsn_utf8.eml": ([("xavier@intl.test", "hard", "5.1.1", 550)], "", ""),
    "postfix_spamhaus_block.eml": ([("vera@blocky.test", "hard", "5.7.1", 554)],
                                   "<spring-1@sender.test>", ""),
    "outlook_auth_5_7_515.eml": ([("walt@outlook.test", "hard", "5.7.515", 550)],
                                 "<receipt-9001@sender.test>", ""),
    "postfix_domain_not_found.eml": ([("xena@typo-domain.test", "hard", "5.4.4", 0)], "", ""),
    "postfix_expired.eml": ([("yves@slowpoke.test", "soft", "4.4.7", 0)], "", ""),
    # not bounces
    "dsn_success.eml": "success",
    "autoreply_out_of_office.eml": "autoreply",
    "autoreply_automatic_reply.eml": "autoreply",
    "autoreply_vacation_precedence.eml": "autoreply",
    "human_reply.eml": "not a bounce",
}


def test_every_corpus_file_has_an_expectation():
    assert sorted(p.name for p in CORPUS.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_classified_as_expected(name, crlf):
    data = (CORPUS / name).read_bytes()
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    rep = parse_report(data)
    want = EXPECTED[name]
    if isinstance(want, str):
        assert not rep.is_bounce and rep.why == want, rep
        return
    failures, mid, qid = want
    got = [(b.address, b.kind, b.status, b.code) for b in rep.bounces]
    assert got == failures
    assert rep.original_message_id == mid
    assert rep.queue_id == qid
    for b in rep.bounces:
        assert b.reason or name == "dsn_no_diagnostic.eml"
        assert "\n" not in b.reason


def test_reasons_are_the_servers_words():
    rep = parse_report((CORPUS / "postfix_user_unknown.eml").read_bytes())
    b, = rep.bounces
    assert b.reason.startswith("550 5.1.1 <alice@dest.test>: Recipient address rejected")
    assert b.remote_mta == "store1.dest.test" and b.action == "failed" and b.shape == "rfc3464"
    assert b.bounce_class == "address"
    rep = parse_report((CORPUS / "gmail_policy_block.eml").read_bytes())
    assert rep.bounces[0].bounce_class == "policy"
    rep = parse_report((CORPUS / "qmail_permanent.eml").read_bytes())
    assert rep.shape == "qmail" and rep.bounces[0].reason == (
        "Sorry, no mailbox here by that name. (#5.1.1)")


def test_exchange_status_5_0_0_takes_the_servers_detail():
    rep = parse_report((CORPUS / "exim_dsn.eml").read_bytes())
    assert rep.bounces[0].status == "5.1.1"  # Status: 5.0.0, the server said 550 5.1.1


def test_addresses_in_the_returned_message_are_not_failures():
    # exim_plain quotes the original message, which has a Cc address; it is not a failure
    rep = parse_report((CORPUS / "exim_plain.eml").read_bytes())
    assert [b.address for b in rep.bounces] == ["erin@oldexim.test"]


@pytest.mark.parametrize("status,code,text,kind", [
    ("5.1.1", 550, "", "hard"),
    ("5.2.2", 552, "mailbox full", "soft"),     # passes with time even behind a 5xx
    ("5.7.1", 554, "blocked", "hard"),
    ("4.4.7", 0, "", "soft"),
    ("", 550, "", "hard"),
    ("", 421, "", "soft"),
    ("", 0, "User unknown", "hard"),
    ("", 0, "the recipient's mailbox is full", "soft"),
    ("", 0, "This is a permanent error; I've given up.", "hard"),
    ("", 0, "something odd happened", "soft"),  # no evidence: soft, kept on the list
])
def test_classify_reply(status, code, text, kind):
    assert classify_reply(status, code, text) == kind


# ------------------------------------------------------------------------------------------- VERP

def test_verp_round_trip():
    v = verp_encode("john.doe+tag@Example.COM", "bounces.sender.test")
    assert v == "mailengine-bounce-john.doe+tag%Example.COM@bounces.sender.test"
    assert verp_decode(v) == "john.doe+tag@Example.COM"
    # a '%' in the user part survives: the domain is after the last '%'
    assert verp_decode(verp_encode("a%b@c.test", "h.test")) == "a%b@c.test"
    assert verp_decode("MAILENGINE-BOUNCE-x%y.test@h.test") == "x@y.test"


@pytest.mark.parametrize("addr, verp", [
    ('"john doe"@d.test', '"mailengine-bounce-john doe%d.test"@h.test'),
    ('"doe,john"@d.test', '"mailengine-bounce-doe,john%d.test"@h.test'),
    ('"a\\"b"@d.test', '"mailengine-bounce-a\\"b%d.test"@h.test'),
    ("x@[192.0.2.1]", '"mailengine-bounce-x%[192.0.2.1]"@h.test'),  # '[' is no atext
])
def test_verp_of_a_quoted_local_part_is_a_valid_quoted_address(addr, verp):
    v = verp_encode(addr, "h.test")
    assert v == verp
    wire.parse_mailbox(f"<{v}>")  # a valid address, not mailengine-bounce-"john doe"%d@h
    assert verp_decode(v) == addr


@pytest.mark.parametrize("addr", ["", "nobody", "@x.test"])
def test_verp_leaves_null_and_odd_senders_alone(addr):
    assert verp_encode(addr, "h.test") == addr


@pytest.mark.parametrize("addr", ["someone@h.test", "mailengine-bounce-nodomain@h.test",
                                  "mailengine-bounce-%x.test@h.test",
                                  "mailengine-bounce-x%@h.test", "mailengine-bounce-x%y.test"])
def test_verp_decode_refuses_other_addresses(addr):
    assert verp_decode(addr) is None


def test_verp_without_bounce_host_is_unchanged():
    assert verp_encode("a@b.test", "") == "a@b.test"


# ------------------------------------------------------------------------------------- the records

def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bounce_log_writes_lists_and_json(tmp_path):
    bl = BounceLog(tmp_path)
    data = (CORPUS / "postfix_user_unknown.eml").read_bytes()
    out = bl.handle(["mailengine-bounce-alice%dest.test@bounces.sender.test"], data,
                    "", "P1T1C1@me")
    assert [b.address for b in out] == ["alice@dest.test"]
    bl.handle(["mailengine-bounce-bob%example.test@bounces.sender.test"],
              (CORPUS / "postfix_mailbox_full.eml").read_bytes())
    bl.handle(["mailengine-bounce-yolanda%corp.test@bounces.sender.test"],
              (CORPUS / "autoreply_out_of_office.eml").read_bytes())
    assert (tmp_path / "hard-bounces.txt").read_text() == "alice@dest.test\n"
    assert (tmp_path / "soft-bounces.txt").read_text() == "bob@example.test\n"
    lines = read_jsonl(tmp_path / "log" / "bounces.jsonl")
    assert [(x["address"], x["kind"]) for x in lines] == [
        ("alice@dest.test", "hard"), ("bob@example.test", "soft"),
        ("yolanda@corp.test", "ignored")]
    a = lines[0]
    assert a["status"] == "5.1.1" and a["code"] == 550 and a["class"] == "address"
    assert a["category"] == "bad-mailbox" and lines[1]["category"] == "quota-issues"
    assert a["original_message_id"] == "<newsletter-2026-03.alice@sender.test>"
    assert a["queue_id"] == "P17000T1C3@engine.sender.test"
    assert a["bounce_id"] == "P1T1C1@me" and "User unknown" in a["reason"]
    assert lines[2]["why"] == "autoreply"


def test_verp_address_wins_over_the_reported_one():
    """Forwarded mail fails under another name: the VERP address is the list's address."""
    rep = parse_report((CORPUS / "postfix_user_unknown.eml").read_bytes())
    b = bounce_for(rep, "old.alias@sender-list.test")
    assert b.address == "old.alias@sender-list.test" and b.reported_recipient == "alice@dest.test"
    assert b.kind == "hard"
    assert bounce_for(Report(why="autoreply"), "x@y.test") is None
    unknown = bounce_for(Report(why="no recipient named"), "x@y.test")
    assert unknown.kind == "soft"


def test_garbage_is_not_a_bounce_and_does_not_raise(tmp_path):
    bl = BounceLog(tmp_path)
    assert bl.handle(["mailengine-bounce-a%b.test@h.test"], b"\xff\xfe\x00garbage") == []
    assert bl.handle(["someone@h.test"], b"Subject: x\r\n\r\nhello\r\n") == []
    assert not (tmp_path / "hard-bounces.txt").exists()


# ------------------------------------------------------------------------------------- end to end

def test_bounce_by_smtp_lands_in_the_lists(tmp_path):
    """A real engine: bounces to VERP addresses arrive by SMTP, at a local domain or at the
    bounce host (which need not be a local domain), an autoreply is not counted, ordinary local
    mail is untouched."""
    with RunningEngine(tmp_path, {"basic.local_domains": ["sender.test"],
                                  "logging.bounce_host": "bounces.other.test",
                                  "queue.save_incoming": True}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            for name, rcpt in [
                    ("gmail_address_not_found.eml", "mailengine-bounce-kim%gmail.test@sender.test"),
                    ("qmail_soft_queue_too_long.eml", "mailengine-bounce-rosa%full.test@bounces.other.test"),
                    ("autoreply_automatic_reply.eml", "mailengine-bounce-zoe%corp.test@sender.test")]:
                data = (CORPUS / name).read_bytes().replace(b"\n", b"\r\n")
                s.sendmail("", [rcpt], data)
            s.sendmail("a@x.test", ["list-owner@sender.test"], b"Subject: hi\r\n\r\nhi\r\n")
        # the 250 is sent after the lists are written
        hard = (tmp_path / "hard-bounces.txt").read_text()
        soft = (tmp_path / "soft-bounces.txt").read_text()
    assert hard == "kim@gmail.test\n"
    assert soft == "rosa@full.test\n"
    lines = read_jsonl(tmp_path / "log" / "bounces.jsonl")
    assert [x["kind"] for x in lines] == ["hard", "soft", "ignored"]
    assert lines[0]["original_message_id"] == "<receipt-4411@sender.test>"
    assert lines[0]["bounce_id"]  # the id it was stored under in mailq/incoming
    assert len(list((eng.mailq / "incoming").glob("*.dat"))) == 4
    assert "bounce: kim@gmail.test hard 5.1.1 550" in eng.output.decode()


def test_verp_addresses_are_bounces_only_at_the_bounce_host_or_a_local_domain(tmp_path):
    """Issue 14 item 7: a VERP-shaped address at another domain is an ordinary address, so a
    client that may not relay gets 554 for it, and nothing is queued or recorded."""
    notice = (CORPUS / "qmail_permanent.eml").read_bytes().replace(b"\n", b"\r\n")
    with RunningEngine(tmp_path, {"policy.relay_ips": ["10.9.9.9"],  # 127.0.0.1 may not relay
                                  "basic.local_domains": ["sender.test"],
                                  "logging.bounce_host": "bounces.sender.test",
                                  "queue.save_incoming": True}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.ehlo("client.test")
            s.mail("")
            for rcpt in ["mailengine-bounce-user%x@evil.example",
                         "MAILENGINE-BOUNCE-user%x@Evil.Example",
                         "mailengine-bounce-user%x@bounces.sender.test.evil.example"]:
                assert s.rcpt(rcpt) == (554, b"5.7.1 relay not approved"), rcpt
            assert s.rcpt("mailengine-bounce-ann%x.test@bounces.sender.test")[0] == 250
            assert s.rcpt("mailengine-bounce-bob%x.test@Sender.Test")[0] == 250
            assert s.data(notice)[0] == 250
        assert not list((eng.mailq / "retry").glob("*.inf"))  # nothing relayed
        assert len(list((eng.mailq / "incoming").glob("*.inf"))) == 1
    assert [x["address"] for x in read_jsonl(tmp_path / "log" / "bounces.jsonl")] == [
        "ann@x.test", "bob@x.test"]


def test_verp_loop_end_to_end(tmp_path):
    """With bounce_host set, each recipient's mail goes out from its own VERP address; the
    remote side's bounce, sent back to that address, lands in the lists under the right name."""
    from mailengine.testing.sink import ThreadedSink
    sink = ThreadedSink("127.0.0.52", 25).start()
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": False, "network.helo_text": "engine.test",
                "logging.bounce_host": "bounces.sender.test",
                "basic.local_domains": ["bounces.sender.test"],
                "basic.dns_servers": ["verp.test,mx.verp.test,MX,127.0.0.52:25"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("news@sender.test", ["Ann@verp.test", "bo.b+x@verp.test"],
                           b"Subject: t\r\nMessage-ID: <t1@sender.test>\r\n\r\nhi\r\n")
            sink.wait_messages(2, timeout=20)
            senders = sorted(m.mail_from for m in sink.messages)
            assert senders == ["mailengine-bounce-Ann%verp.test@bounces.sender.test",
                               "mailengine-bounce-bo.b+x%verp.test@bounces.sender.test"]
            # the remote MTA bounces one of them, as a plain qmail notice, to its VERP sender
            notice = (CORPUS / "qmail_permanent.eml").read_bytes().replace(b"\n", b"\r\n")
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("", [senders[1]], notice)
            assert (tmp_path / "hard-bounces.txt").read_text() == "bo.b+x@verp.test\n"
    finally:
        sink.stop()
    line, = read_jsonl(tmp_path / "log" / "bounces.jsonl")
    assert line["reported_recipient"] == "pat@q.test" and line["kind"] == "hard"


def test_verp_loop_for_a_quoted_local_part(tmp_path):
    """A recipient with a quoted local part gets a quoted VERP sender (a valid address), and the
    bounce sent back to it is taken at the bounce host and recorded under the recipient."""
    from mailengine.testing.sink import ThreadedSink
    sink = ThreadedSink("127.0.0.141", 0).start()
    rcpt = '"doe, john"@verp.test'
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": False, "network.helo_text": "engine.test",
                "logging.bounce_host": "bounces.sender.test",
                "policy.relay_ips": ["10.9.9.9"],  # the bounce comes from a client that may not relay
                "queue.queue_check_interval": 0.5,  # the drop-in is picked up at once
                "basic.dns_servers": [f"verp.test,mx.verp.test,MX,127.0.0.141:{sink.port}"]}) as eng:
            from mailengine.client import enqueue
            enqueue(eng.mailq, "news@sender.test", [rcpt], "Subject: t", "hi")
            sink.wait_messages(1, timeout=20)
            m, = sink.messages
            assert m.rcpts == [rcpt]
            assert m.mail_from == '"mailengine-bounce-doe, john%verp.test"@bounces.sender.test'
            notice = (CORPUS / "qmail_permanent.eml").read_bytes().replace(b"\n", b"\r\n")
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("", [m.mail_from], notice)
            assert (tmp_path / "hard-bounces.txt").read_text() == rcpt + "\n"
    finally:
        sink.stop()
