"""Bounce categories (issue 18 item 1): the shipped rules on the bounce corpus and on replies
written in the words of real mailbox providers, the rules file's checks, the operator's override
file, and the category where it shows: events.jsonl, bounces.jsonl, reports, the web admin.
"""
from __future__ import annotations

import json
import re
import smtplib
import time
from datetime import datetime
from pathlib import Path

import pytest

from mailengine import categories, reports
from mailengine.bounces import Bounce, BounceLog, parse_report
from mailengine.categories import (CATEGORIES, PERMANENT, Categorizer, RulesError, categorize,
                                   categorize_reply, parse_rules, shipped_rules, split_reply)
from mailengine.envelope import Message
from mailengine.events import attempt_events
from mailengine.outcome import AttemptResult, RcptOutcome
from mailengine.testing.engine import wait_until
from mailengine.testing.sink import SinkScript, ThreadedSink
from test_web_api import Client, engine, make_home, wait_web

CORPUS = Path(__file__).parent / "bounce_corpus"
ROOT = Path(__file__).resolve().parent.parent

# Each failure report of the corpus: the category of each failure it names, in order.
CORPUS_CATEGORIES = {
    "dsn_no_diagnostic.eml": ["bad-mailbox"],            # Status 5.1.1 and nothing else
    "exchange_ndr.eml": ["bad-mailbox"],                 # 5.1.10 RecipientNotFound
    "exchange_quota.eml": ["quota-issues"],
    "exim_delay_warning.eml": ["policy-related"],        # 451 4.7.1 greylisted
    "exim_dsn.eml": ["bad-mailbox"],
    "exim_plain.eml": ["bad-mailbox"],
    "global_dsn_utf8.eml": ["bad-mailbox"],
    "gmail_address_not_found.eml": ["bad-mailbox"],
    "gmail_over_quota.eml": ["quota-issues"],
    "gmail_policy_block.eml": ["policy-related"],        # 5.7.26 unauthenticated
    "multi_recipient_dsn.eml": ["bad-mailbox", "message-expired"],
    "outlook_auth_5_7_515.eml": ["policy-related"],
    "postfix_delayed.eml": ["no-answer-from-host"],      # connect ... timed out, 4.4.1
    "postfix_domain_not_found.eml": ["bad-domain"],      # Postfix says 5.4.4 for NXDOMAIN
    "postfix_expired.eml": ["message-expired"],
    "postfix_mailbox_full.eml": ["quota-issues"],
    "postfix_spamhaus_block.eml": ["spam-related"],
    "postfix_user_unknown.eml": ["bad-mailbox"],
    "qmail_permanent.eml": ["bad-mailbox"],
    "qmail_remote_said.eml": ["bad-mailbox"],
    "qmail_soft_queue_too_long.eml": ["quota-issues"],   # 452 4.2.2 Mailbox full
    "sendmail_dsn.eml": ["bad-mailbox"],
    "sendmail_old_plain.eml": ["bad-mailbox"],           # 550 User unknown, no enhanced code
    "text_no_code_user_unknown.eml": ["bad-mailbox"],    # words only
    "yahoo_deferred.eml": ["spam-related"],              # [TSS04] ... user complaints
    "yahoo_plain.eml": ["bad-mailbox"],                  # dd This user doesn't have an account
}


def test_every_failure_report_of_the_corpus_has_its_categories():
    reports_ = {p.name for p in CORPUS.glob("*.eml") if parse_report(p.read_bytes()).is_bounce}
    assert reports_ == set(CORPUS_CATEGORIES)


@pytest.mark.parametrize("name", sorted(CORPUS_CATEGORIES))
def test_corpus_categories(name):
    rep = parse_report((CORPUS / name).read_bytes())
    assert [b.category for b in rep.bounces] == CORPUS_CATEGORIES[name]
    for b in rep.bounces:
        assert b.category == categorize(b.code, b.status, b.reason)


# Replies as providers and common servers word them (written for these tests), and what the
# engine itself says when there is no reply (dns.py, smtp_session.py, smtp/client.py).
SAMPLES = [
    # Gmail
    (550, "5.1.1", "The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or unnecessary spaces. For more information, go to https://support.google.com/mail/?p=NoSuchUser", "bad-mailbox"),
    (550, "5.2.1", "The email account that you tried to reach is disabled. For more information, go to https://support.google.com/mail/?p=DisabledUser", "inactive-mailbox"),
    (552, "5.2.2", "The recipient's inbox is out of storage space and inactive. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaPerm", "quota-issues"),
    (452, "4.2.2", "The recipient's inbox is out of storage space. Please direct the recipient to https://support.google.com/mail/?p=OverQuotaTemp", "quota-issues"),
    (450, "4.2.1", "The user you are trying to contact is receiving mail at a rate that prevents additional messages from being delivered. Please resend your message at a later point.", "policy-related"),
    (421, "4.7.0", "Try again later, closing connection. (EHLO)", "policy-related"),
    (421, "4.7.28", "Gmail has detected an unusual rate of unsolicited mail originating from your IP Netblock. To protect our users from spam, mail sent from your IP Netblock has been temporarily rate limited.", "spam-related"),
    (550, "5.7.1", "Our system has detected that this message is likely unsolicited mail. To reduce the amount of spam sent to Gmail, this message has been blocked.", "spam-related"),
    (550, "5.7.26", "This mail has been blocked because the sender is unauthenticated. Gmail requires all senders to authenticate with either SPF or DKIM.", "policy-related"),
    (550, "5.7.26", "Unauthenticated email from sender.test is not accepted due to domain's DMARC policy.", "policy-related"),
    (421, "4.7.0", "This message does not meet IPv6 sending guidelines regarding PTR records and authentication.", "policy-related"),
    (552, "5.3.4", "Your message exceeded Google's message size limits.", "content-related"),
    (552, "5.7.0", "This message was blocked because its content presents a potential security issue.", "spam-related"),
    # Microsoft
    (550, "5.5.0", "Requested action not taken: mailbox unavailable", "bad-mailbox"),
    (550, "5.1.10", "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup", "bad-mailbox"),
    (550, "5.7.515", "Access denied, sending domain sender.test doesn't meet the required authentication level.", "policy-related"),
    (550, "5.7.1", "Unfortunately, messages from [192.0.2.10] weren't sent. Please contact your Internet service provider since part of their network is on our block list (S3150).", "spam-related"),
    (550, "5.7.606", "Access denied, banned sending IP [192.0.2.10]. To request removal from this list please visit https://sender.office.com/", "spam-related"),
    (451, "4.7.500", "Server busy. Please try again later from [192.0.2.10]. (S77719)", "policy-related"),
    (550, "5.7.54", "SMTP; Unable to relay recipient in non-accepted domain", "relaying-issues"),
    (554, "5.2.2", "mailbox full; STOREDRV.Deliver.Exception:QuotaExceededException", "quota-issues"),
    # Yahoo / AOL
    (554, "", "delivery error: dd This user doesn't have a yahoo.com account (nobody@yahoo.com) [0] - mta1022.mail.ne1.yahoo.com", "bad-mailbox"),
    (554, "", "delivery error: dd Sorry your message to someone@yahoo.com cannot be delivered. This mailbox is disabled (554.30). - mta4.mail.bf1.yahoo.com", "inactive-mailbox"),
    (421, "4.7.0", "[TSS04] Messages from 192.0.2.10 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes", "spam-related"),
    (553, "5.7.1", "[BL21] Connections will not be accepted from 192.0.2.10, because the ip is in Spamhaus's list; see https://postmaster.yahooinc.com/error-codes", "spam-related"),
    (554, "5.7.9", "Message not accepted for policy reasons.  See https://postmaster.yahooinc.com/error-codes", "policy-related"),
    # Postfix, Exim, Sendmail and small servers
    (550, "5.1.1", "<alice@dest.test>: Recipient address rejected: User unknown in virtual mailbox table", "bad-mailbox"),
    (450, "4.1.2", "<bob@nowhere.test>: Recipient address rejected: Domain not found", "bad-domain"),
    (450, "4.1.8", "<news@sender.test>: Sender address rejected: Domain not found", "invalid-sender"),
    (554, "5.7.1", "<x@dest.test>: Relay access denied", "relaying-issues"),
    (554, "5.7.1", "Service unavailable; Client host [192.0.2.10] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/192.0.2.10", "spam-related"),
    (451, "4.7.1", "Greylisted, please try again later", "policy-related"),
    (550, "", "Sender verify failed", "invalid-sender"),
    (552, "", "Requested mail action aborted: exceeded storage allocation", "quota-issues"),
    (552, "", "Message size exceeds fixed maximum message size", "content-related"),
    (550, "", "Mailbox quota exceeded", "quota-issues"),
    (554, "5.7.1", "This message contains a virus (Eicar-Test-Signature)", "virus-related"),
    (550, "5.7.0", "Message rejected due to content restrictions", "content-related"),
    (550, "", "Account has been disabled or discontinued [#102]", "inactive-mailbox"),
    (550, "", "This address no longer accepts mail.", "inactive-mailbox"),
    (421, "", "Too many concurrent SMTP connections from this IP address; please try again later.", "policy-related"),
    (500, "5.5.1", "Command unrecognized", "protocol-errors"),
    (553, "", "sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)", "relaying-issues"),
    (550, "", "Requested action not taken: mailbox unavailable", "bad-mailbox"),
    (0, "", "Benutzer unbekannt", "bad-mailbox"),
    # what the engine itself says (smtp_session.py, smtp/client.py, dns.py, delivery.py)
    (550, "5.1.2", "Host or domain name not found. Name service error for name=nowhere.test type=MX: Host not found (the recipient's domain does not exist)", "bad-domain"),
    (556, "5.1.10", "Domain nullmx.test does not accept mail (null MX)", "bad-domain"),
    (451, "4.4.3", "DNS lookup of slow.test (MX) failed: timed out", "routing-errors"),
    (550, "5.4.4", "Host or domain name not found. Name service error for name=mx.gone.test type=A: Host not found (none of the mail servers of gone.test has an address)", "routing-errors"),
    (554, "5.4.6", "mail for loop.test loops back to myself", "routing-errors"),
    (451, "4.4.1", "Connection to mx.dest.test (192.0.2.1 25) failed: [Errno 111] Connect call failed ('192.0.2.1', 25)", "no-answer-from-host"),
    (451, "4.4.1", "Connection to mx.dest.test (192.0.2.1 25) failed: timed out", "no-answer-from-host"),
    (451, "4.4.2", "Timed out waiting for the reply to DATA", "bad-connection"),
    (421, "4.4.2", "Connection closed by the server", "bad-connection"),
    (451, "4.5.0", "Protocol error: reply line too long", "protocol-errors"),
    (553, "5.1.3", "Bad recipient address syntax: 'a b@x'", "bad-mailbox"),
    (553, "5.1.7", "Bad sender address syntax: 'x'", "invalid-sender"),
    (554, "5.6.3", "Message has 8-bit content and the server does not offer 8BITMIME", "content-related"),
    (451, "4.3.0", "Internal error while sending", "other"),
    (0, "", "Host not found", "bad-domain"),
    (0, "", "Connection timed out", "bad-connection"),
    (451, "4.4.7", "Delivery time expired", "message-expired"),
]


@pytest.mark.parametrize("code,enhanced,text,want", SAMPLES,
                         ids=[f"{i}-{s[3]}" for i, s in enumerate(SAMPLES)])
def test_real_world_replies(code, enhanced, text, want):
    assert categorize(code, enhanced, text) == want


def test_samples_cover_every_category():
    assert {s[3] for s in SAMPLES} | {"message-expired"} == set(CATEGORIES)


def test_permanent_categories_are_the_ones_that_never_work():
    assert PERMANENT == {"bad-mailbox", "bad-domain", "inactive-mailbox"}
    assert PERMANENT <= set(CATEGORIES)


@pytest.mark.parametrize("reply,parts", [
    ("550 5.1.1 No such user", (550, "5.1.1", "No such user")),
    ("550-5.1.1 No such user", (550, "5.1.1", "No such user")),
    ("421 Too busy", (421, "", "Too busy")),
    ("451 4.4.2", (451, "4.4.2", "")),
    ("User unknown", (0, "", "User unknown")),
    ("", (0, "", "")),
])
def test_split_reply(reply, parts):
    assert split_reply(reply) == parts


def test_categorize_reply_reads_a_whole_reply_line():
    assert categorize_reply("550 5.1.1 <a@b.test>: Recipient address rejected") == "bad-mailbox"
    assert categorize_reply("something odd happened") == "other"


# ------------------------------------------------------------------------------------- the rules

def test_first_matching_rule_wins_and_all_conditions_must_hold():
    rules = parse_rules("""
[[rule]]
category = "spam-related"
code = "55x"
text = "listed"
[[rule]]
category = "bad-mailbox"
enhanced = "x.1.1"
[[rule]]
category = "policy-related"
code = ["4xx", 554]
""")
    c = Categorizer(rules)
    assert c.categorize(550, "5.1.1", "you are listed") == "spam-related"   # first wins
    assert c.categorize(450, "4.1.1", "you are listed") == "bad-mailbox"    # 45x is not 55x
    assert c.categorize(550, "5.1.10", "") == "other"       # x.1.1 is not a prefix of 5.1.10
    assert c.categorize(554, "", "") == "policy-related"
    assert c.categorize(421, "", "") == "policy-related"
    assert c.categorize(250, "2.0.0", "ok") == "other"      # nothing matched
    assert c.categorize(0, "", "you are LISTED") == "other"  # the code did not match


def test_text_is_case_insensitive_and_long_texts_are_cut():
    c = Categorizer(parse_rules('[[rule]]\ncategory = "virus-related"\ntext = "eicar"\n'))
    assert c.categorize(554, "", "found EICAR here") == "virus-related"
    assert c.categorize(554, "", "x" * categories.MAX_TEXT + "eicar") == "other"


def test_shipped_rules_load_and_name_only_known_categories():
    rules = shipped_rules()
    assert len(rules) > 20
    assert {r.category for r in rules} <= set(CATEGORIES)
    assert all(r.enhanced or r.code or r.text for r in rules)


@pytest.mark.parametrize("text,error", [
    ('[[rule]]\ncategory = "bad-mailbox"\n', r"rule 1 \(bad-mailbox\): give at least one"),
    ('[[rule]]\ncategory = "bad-mailboxes"\ncode = 550\n',
     r"rule 1: category 'bad-mailboxes' is not one of bad-mailbox"),
    ('[[rule]]\ncategory = "other"\ncode = 550\n[[rule]]\ncategory = "other"\ncode = 55\n',
     r"rule 2 \(other\): code 55 is not like 550"),
    ('[[rule]]\ncategory = "other"\nenhanced = "5.1"\n', r"enhanced '5.1' is not like 5.1.1"),
    ('[[rule]]\ncategory = "other"\nenhanced = "7.1.1"\n', r"enhanced '7.1.1'"),
    ('[[rule]]\ncategory = "other"\ntext = "(unclosed"\n',
     r"rule 1 \(other\): text '\(unclosed' is not a regular expression"),
    ('[[rule]]\ncategory = "other"\ntext = ""\n', r"text must be a non-empty"),
    ('[[rule]]\ncategory = "other"\ncode = []\n', r"an empty list matches nothing"),
    ('[[rule]]\ncategory = "other"\ncode = 550\ncolour = "red"\n', r"unknown key colour"),
    ('[[rules]]\ncategory = "other"\n', r"unknown key rules"),
    ('rule = 5\n', r"write each rule as \[\[rule\]\]"),
    ('[[rule]\n', r"not valid TOML"),
])
def test_a_bad_rule_is_a_clear_error_naming_it(text, error):
    with pytest.raises(RulesError, match=r"^mine.toml[:,] .*" + error):
        parse_rules(text, "mine.toml")


# ------------------------------------------------------------------------------ the override file

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_override_rules_come_first_and_are_reread_when_the_file_changes(tmp_path, caplog):
    path = tmp_path / "bounce_categories.toml"
    clock = Clock()
    c = Categorizer(override=path, clock=clock)
    reply = (550, "5.1.1", "mailbox frozen by the Ministry")
    assert c.categorize(*reply) == "bad-mailbox"          # no file: the shipped rules
    path.write_text('[[rule]]\ncategory = "inactive-mailbox"\ntext = "frozen"\n')
    assert c.categorize(*reply) == "bad-mailbox"          # not looked at again yet
    clock.now += categories.RECHECK
    assert c.categorize(*reply) == "inactive-mailbox"     # in front of the shipped rules
    assert c.categorize(550, "5.1.1", "no such user") == "bad-mailbox"  # the rest still apply
    path.write_text('[[rule]]\ncategory = "policy-related"\ntext = "ministry"\n')
    clock.now += categories.RECHECK
    assert c.categorize(*reply) == "policy-related"
    # a broken file: logged once, the rules read before stay, nothing raises
    path.write_text('[[rule]]\ncategory = "policy-related"\ntext = "(ministry"\n')
    clock.now += categories.RECHECK
    assert c.categorize(*reply) == "policy-related"
    clock.now += categories.RECHECK
    assert c.categorize(*reply) == "policy-related"
    assert "rule 1 (policy-related): text '(ministry' is not a regular expression" in c.problem
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "ignored until it is fixed" in errors[0].getMessage()
    path.unlink()
    clock.now += categories.RECHECK
    assert c.categorize(*reply) == "bad-mailbox" and c.problem == ""


def test_use_home_points_the_default_at_the_homes_file(tmp_path):
    (tmp_path / "bounce_categories.toml").write_text(
        '[[rule]]\ncategory = "spam-related"\ntext = "zorblax"\n')
    try:
        categories.use_home(tmp_path)
        assert categorize(550, "5.1.1", "zorblax") == "spam-related"
        assert Bounce("a@b.test", "hard", "5.1.1", 550, "zorblax").category == "spam-related"
    finally:
        categories.use_home(None)
    assert categorize(550, "5.1.1", "zorblax") == "bad-mailbox"


# --------------------------------------------------------------------------- where it is written

def test_event_lines_carry_the_category():
    msg = Message(id="P1@h", mail_from="s@src.test", time_created=datetime.now())
    msg.send_tries = 3
    outs = [RcptOutcome.from_reply("a@d.test", 250, "2.0.0", "Ok", "body"),
            RcptOutcome.from_reply("b@d.test", 550, "5.1.1", "No such user", "rcpt"),
            RcptOutcome.from_reply("c@d.test", 452, "4.2.2", "Mailbox full", "rcpt"),
            RcptOutcome.from_reply("e@d.test", 451, "4.4.1", "Connection refused", "connect")]
    res = AttemptResult(sent=["a@d.test"], failed=["b@d.test"], deferred=["c@d.test"],
                        gave_up=["e@d.test"])
    lines = attempt_events(msg, outs, res)
    assert [(x["rcpt"], x["category"]) for x in lines] == [
        ("a@d.test", ""), ("b@d.test", "bad-mailbox"), ("c@d.test", "quota-issues"),
        ("e@d.test", "message-expired")]       # given up after the last retry
    assert [x["class"] for x in lines] == ["", "address", "mailbox", "network"]  # unchanged


def test_bounces_jsonl_lines_carry_the_category(tmp_path):
    bl = BounceLog(tmp_path)
    for name, who in [("postfix_spamhaus_block.eml", "vera%blocky.test"),
                      ("gmail_over_quota.eml", "lee%gmail.test")]:
        bl.handle([f"mailengine-bounce-{who}@bounces.sender.test"], (CORPUS / name).read_bytes())
    lines = [json.loads(x) for x in (tmp_path / "log" / "bounces.jsonl").read_text().splitlines()]
    assert [(x["address"], x["category"], x["class"]) for x in lines] == [
        ("vera@blocky.test", "spam-related", "policy"), ("lee@gmail.test", "quota-issues",
                                                          "mailbox")]


def test_reports_show_each_failures_category_and_the_counts():
    msg = Message(id="P9@e.test", mail_from="n@src.test", time_created=datetime.now(),
                  rcpt_failed=["a@d.test", "b@d.test", "c@d.test"])
    msg.send_tries = 1
    outs = [RcptOutcome.from_reply("a@d.test", 550, "5.1.1", "no such user", "rcpt"),
            RcptOutcome.from_reply("b@d.test", 550, "5.1.1", "unknown", "rcpt"),
            RcptOutcome.from_reply("c@d.test", 554, "5.7.1", "blocked using zen.spamhaus.test",
                                   "rcpt")]
    res = AttemptResult(failed=["a@d.test", "b@d.test", "c@d.test"], done=True)
    text = reports.build(msg, res, outs, ["ops@o.test"], [], "e.test").decode()
    text = text.replace("\r\n", "\n")
    assert "By category: bad-mailbox 2, spam-related 1\n" in text
    assert "a@d.test: 550 5.1.1 no such user (failed permanently)\nCategory: bad-mailbox\n" in text
    assert "c@d.test: 554 5.7.1 blocked using zen.spamhaus.test (failed permanently)\n" \
        "Category: spam-related\n" in text


def test_readme_documents_every_category():
    readme = (ROOT / "README.md").read_text()
    for c in CATEGORIES:
        assert f"| `{c}` |" in readme, c
    doc = categories.__doc__
    for c in CATEGORIES:
        assert re.search(rf"^    {re.escape(c)} ", doc, re.M), c


# ------------------------------------------------------------------------------------- end to end

def attempts(path):
    """The attempt lines of events.jsonl (suppressions of the bad addresses share it)."""
    if not path.exists():
        return []
    return [x for x in map(json.loads, path.read_text().splitlines()) if x["event"] == "attempt"]


def test_engine_writes_categories_and_the_web_admin_shows_them(tmp_path):
    """A real engine delivers to a sink that refuses one recipient with 550 5.1.1 and another
    with words only the operator's own rule knows; events.jsonl names their categories, a bounce
    sent back by SMTP gets one in bounces.jsonl, and the admin's pages and /metrics show them."""
    sink = ThreadedSink("127.0.0.171", 0, SinkScript(rcpt={
        "gone@cat.test": "550 5.1.1 The email account that you tried to reach does not exist",
        "odd@cat.test": "550 5.0.0 flibbertigibbet",
        "grey@cat.test": "451 4.7.1 Greylisted, please try again later"})).start()
    home = make_home(tmp_path)
    (home / "bounce_categories.toml").write_text(
        '[[rule]]\ncategory = "inactive-mailbox"\ntext = "flibbertigibbet"\n')
    (home / "log").mkdir()
    old = {"time": "2026-12-01T10:00:00.000+0000", "address": "old@x.test", "kind": "hard",
           "status": "5.2.2", "code": 552, "reason": "mailbox full"}  # before categories
    (home / "log" / "bounces.jsonl").write_text(json.dumps(old) + "\n")
    try:
        with engine(home, {"queue.pause_sending": False, "network.helo_text": "engine.test",
                           "logging.bounce_host": "bounces.sender.test",
                           "basic.local_domains": ["bounces.sender.test"],
                           "basic.dns_servers": [
                               f"cat.test,mx.cat.test,MX,127.0.0.171:{sink.port}"]}) as eng:
            wait_web(eng)
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("news@sender.test", ["ok@cat.test", "gone@cat.test", "odd@cat.test",
                                                "grey@cat.test"], b"Subject: t\r\n\r\nhi\r\n")
            path = home / "log" / "events.jsonl"
            wait_until(lambda: len(attempts(path)) >= 4, 20, "4 events")
            msg_id = attempts(path)[0]["id"]  # waits for a retry
            notice = (CORPUS / "postfix_spamhaus_block.eml").read_bytes().replace(b"\n", b"\r\n")
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("", ["mailengine-bounce-vera%blocky.test@bounces.sender.test"], notice)
            c = Client(eng.web_port)
            c.login()
            status = c.get("/gui/admin").text
            message = c.get(f"/gui/admin/queue/message/{msg_id}").text
            api = c.api("GET", f"/api/v1/queue/{msg_id}").json
            lists = c.get("/gui/admin/lists").text
            metrics = c.get("/metrics").text
            (home / "bounce_categories.toml").write_text('[[rule]]\ncategory = "nope"\ncode = 5\n')
            time.sleep(categories.RECHECK + 0.1)
            broken = c.get("/gui/admin/lists").text
    finally:
        sink.stop()
    events = {x["rcpt"]: x for x in attempts(path)}
    assert events["gone@cat.test"]["category"] == "bad-mailbox"
    assert events["gone@cat.test"]["class"] == "address"
    assert events["odd@cat.test"]["category"] == "inactive-mailbox"  # the operator's rule
    assert events["ok@cat.test"]["category"] == ""
    assert events["grey@cat.test"]["category"] == "policy-related"
    _, bounce = [json.loads(x) for x in (home / "log" / "bounces.jsonl").read_text().splitlines()]
    assert bounce["address"] == "vera@blocky.test" and bounce["category"] == "spam-related"
    table = status[status.index('id="categories"'):]
    assert re.search(r"<td>bad-mailbox</td><td>1</td><td>0</td>", table)
    assert re.search(r"<td>inactive-mailbox</td><td>1</td><td>0</td>", table)
    assert re.search(r"<td>policy-related</td><td>0</td><td>1</td>", table)
    # the destination's last reply, and the waiting message's
    assert "grey@cat.test deferred (policy-related): 451 4.7.1 Greylisted" in status
    assert re.search(r'id="last-reply">grey@cat.test \([^)]*\): 451 4.7.1 Greylisted, please try '
                     r'again later<span class="category"> \[policy-related\]</span>', message)
    assert api["last_replies"]["grey@cat.test"]["category"] == "policy-related"
    rows = lists[lists.index('id="bounces"'):]
    assert "vera@blocky.test" in rows and '<td class="category">spam-related</td>' in rows
    assert rows.index("vera@blocky.test") < rows.index("old@x.test")  # newest first
    assert re.search(r'old@x.test</td><td>hard</td><td class="category">quota-issues</td>', rows)
    assert 'mailengine_failures_by_category_total{category="bad-mailbox",result="failed"} 1' \
        in metrics
    assert "category-problem" not in lists
    assert re.search(r'id="category-problem">Your bounce categories are ignored: \S+'
                     r'bounce_categories.toml, rule 1: category &#39;nope&#39; is not one of', broken)
