"""Complaints (issue 18 item 3): feedback-loop reports parsed and matched to the original
recipient, recorded and suppressed on arrival by SMTP, and the complaint rate per sender domain
shown by the web admin, the API and /metrics.

tests/fbl_corpus/ holds report samples written for these tests (ARF with the full message, with
headers only, redacted, Microsoft JMRP-like, a mislabelled ARF with a base64 original, a non-ARF
forward, not-spam, a plain question, garbage); the bounce corpus gives a DSN and an autoreply.
"""
from __future__ import annotations

import http.client
import json
import re
import smtplib
import urllib.parse
from pathlib import Path

import pytest

from mailengine import recipient_token
from mailengine.complaint_rates import (BUCKET, COUNTS_FILE, ComplaintCounts, DeliveredTally,
                                        rates)
from mailengine.complaints import ComplaintDesk, is_redacted, parse
from mailengine.config import Config, ConfigError
from mailengine.suppression import SuppressionStore
from mailengine.testing.engine import RunningEngine, free_port
from mailengine.testing.sink import ThreadedSink

HERE = Path(__file__).parent
CORPUS = HERE / "fbl_corpus"
BOUNCES = HERE / "bounce_corpus"
# The key the corpus's tokens were made with (recipient_token.make, issued 1764800000).
SECRET = b"fbl-corpus-test-key-0123456789ab"

EXPECT = {
    # file: (is complaint, address, matched_by, sender_domain, shape, queue id / message id)
    "arf_full_message_token.eml": (True, "carol@dest.example", "token", "news.example", "arf",
                                   "P4711T1764800000C1@out.news.example"),
    "arf_headers_only_verp.eml": (True, "erin@isp.example", "verp", "news.example", "arf",
                                  "P5000T1764800100C7@out.news.example"),
    "arf_redacted.eml": (True, "", "", "shop.example", "arf", "<sale-7@shop.example>"),
    "arf_jmrp_microsoft.eml": (True, "frank@hotmail.example", "original-rcpt-to", "shop.example",
                               "arf", "<last-chance-3@shop.example>"),
    "forward_yahoo_like.eml": (True, "gina@oldmail.example", "verp", "news.example", "forward",
                               "P6000T1764800200C9@out.news.example"),
    "arf_mislabelled_text.eml": (True, "hank@small-isp.example", "original-rcpt-to",
                                 "shop.example", "arf-text", "<stock-1@shop.example>"),
    "arf_not_spam.eml": (False, "", "", "", "arf", ""),
    "plain_question.eml": (False, "", "", "", "", ""),
    "garbage.bin": (False, "", "", "", "", ""),
}


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# ------------------------------------------------------------------------------------- the parser

def test_every_corpus_file_has_an_expectation():
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(EXPECT)


@pytest.mark.parametrize("name", sorted(EXPECT))
@pytest.mark.parametrize("line_end", ["lf", "crlf"])
def test_corpus(name, line_end):
    data = (CORPUS / name).read_bytes()
    c = parse(crlf(data) if line_end == "crlf" else data, SECRET)
    ok, address, by, domain, shape, ident = EXPECT[name]
    assert (c.is_complaint, c.address, c.matched_by, c.sender_domain) == (ok, address, by, domain), c
    assert c.shape == shape
    if ok:
        assert ident in (c.queue_id, c.message_id)
    else:
        assert c.why


def test_arf_fields_are_kept():
    c = parse((CORPUS / "arf_full_message_token.eml").read_bytes(), SECRET)
    assert (c.feedback_type, c.user_agent, c.version, c.source_ip, c.reported_domain) == (
        "abuse", "ExampleFBL/1.0", "1", "198.51.100.7", "news.example")
    assert c.original_rcpt_to == "carol@dest.example"
    assert c.message_id == "<deals-2026-49.carol@news.example>"
    assert c.subject == "Weekly deals"


def test_without_the_key_or_with_a_forged_token_verp_decides():
    data = (CORPUS / "arf_full_message_token.eml").read_bytes()
    for secret in (b"", b"another engine's key, not ours!"):
        c = parse(data, secret)
        assert (c.address, c.matched_by) == ("carol@dest.example", "verp")
    # a token for someone else, signed with another key, is not believed either
    forged = recipient_token.make(b"x" * 32, "mallory@dest.example", "news.example")
    text = data.replace(b"djF8Y2Fyb2xAZGVzdC5leGFtcGxlfG5ld3MuZXhhbXBsZXwxNzY0ODAwMDAw."
                        b"Ozhy41u9D00w5o6ku6qROQ", forged.encode())
    assert parse(text, SECRET).address == "carol@dest.example"


def test_the_token_beats_a_wrong_original_rcpt_to():
    data = (CORPUS / "arf_full_message_token.eml").read_bytes()
    data = data.replace(b"Original-Rcpt-To: <carol@dest.example>",
                        b"Original-Rcpt-To: <someone-else@dest.example>")
    data = data.replace(b"mailengine-bounce-carol%dest.example", b"bounces")
    c = parse(data, SECRET)
    assert (c.address, c.matched_by, c.sender_domain) == ("carol@dest.example", "token",
                                                         "news.example")


def test_bounces_and_autoreplies_are_not_complaints():
    for name in ("gmail_address_not_found.eml", "exim_dsn.eml"):
        c = parse((BOUNCES / name).read_bytes(), SECRET)
        assert not c.is_complaint and "delivery status" in c.why, name
    c = parse((BOUNCES / "autoreply_out_of_office.eml").read_bytes(), SECRET)
    assert not c.is_complaint and "autoreply" in c.why


@pytest.mark.parametrize("data", [b"", b"   \r\n", b"\xff" * 100, b"Content-Type: multipart/report"
                                  b"; report-type=feedback-report; boundary=x\r\n\r\n--x\r\n",
                                  b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: "
                                  b"base64\r\n\r\n!!!not base64!!!", None, "text, not bytes"])
def test_garbage_never_raises(data):
    c = parse(data, SECRET)
    assert not c.is_complaint and c.why


def test_every_truncation_of_the_corpus_parses_without_raising():
    for p in CORPUS.iterdir():
        data = p.read_bytes()
        for cut in range(0, len(data), 97):
            parse(data[:cut], SECRET)  # must not raise


@pytest.mark.parametrize("address,redacted", [
    ("xxxxxxxx@yahoo.example", True), ("redacted@isp.example", True), ("***@isp.example", True),
    ("[redacted]@isp.example", True), ("no-at-sign", True), ("carol@dest.example", False),
    ("xavier@dest.example", False)])
def test_redacted_recipients(address, redacted):
    assert is_redacted(address) is redacted


# ------------------------------------------------------------------------------ the intake's desk

def _cfg(tmp_path, **values) -> Config:
    cfg = Config(home=tmp_path)
    for k, v in values.items():
        cfg.set(k, v)
    return cfg


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_desk_suppresses_records_and_logs(tmp_path, caplog):
    cfg = _cfg(tmp_path, **{"complaints.addresses": ["fbl@news.example"]})
    (tmp_path / recipient_token.KEY_FILE).write_bytes(SECRET)
    desk = ComplaintDesk(cfg)
    caplog.set_level("INFO", "mailengine.complaints")
    c = desk.handle(["fbl@news.example"], (CORPUS / "arf_full_message_token.eml").read_bytes(),
                    "", "R1@mx")
    assert c.address == "carol@dest.example"
    store = SuppressionStore(tmp_path, sync=False)
    e = store.lookup("carol@dest.example", "news.example")
    assert e is not None and e.source == "complaint" and e.sender_domain == "news.example"
    assert store.lookup("carol@dest.example", "other.example") is None  # that sender only
    line, = _jsonl(tmp_path / "log" / "complaints.jsonl")
    assert line["address"] == "carol@dest.example" and line["suppressed"] is True
    assert line["report_id"] == "R1@mx" and line["queue_id"] == "P4711T1764800000C1@out.news.example"
    events = [x for x in _jsonl(tmp_path / "log" / "events.jsonl") if x["event"] == "complaint"]
    assert len(events) == 1 and events[0]["rcpt"] == "carol@dest.example"
    assert events[0]["sender_domain"] == "news.example" and events[0]["id"] == line["queue_id"]
    assert "complaint: carol@dest.example (abuse) about mail from news.example, matched by token" \
        in caplog.text
    # unmatched: recorded without an address, a warning, nothing suppressed
    c = desk.handle(["fbl@news.example"], (CORPUS / "arf_redacted.eml").read_bytes(), "", "R2")
    assert c.is_complaint and not c.address
    assert "could not be matched" in caplog.text and "redacted" in caplog.text
    # not a complaint: a log line saying why, no line in complaints.jsonl (anyone may mail the
    # address: it must not grow the file), no event
    size = (tmp_path / "log" / "complaints.jsonl").stat().st_size
    desk.handle(["fbl@news.example"], (CORPUS / "plain_question.eml").read_bytes(), "x@y", "R3")
    assert "mail R3 from x@y to fbl@news.example is not a complaint" in caplog.text
    assert (tmp_path / "log" / "complaints.jsonl").stat().st_size == size
    lines = _jsonl(tmp_path / "log" / "complaints.jsonl")
    assert [x["is_complaint"] for x in lines] == [True, True]
    assert lines[1]["suppressed"] is False
    assert len([x for x in _jsonl(tmp_path / "log" / "events.jsonl")
                if x["event"] == "complaint"]) == 2
    desk.close()
    store.close()


def test_desk_may_suppress_for_every_sender(tmp_path):
    cfg = _cfg(tmp_path, **{"complaints.addresses": ["fbl@news.example"],
                            "complaints.suppress_all_senders": True,
                            "complaints.trust_unsigned": True})  # JMRP names the recipient
    desk = ComplaintDesk(cfg)
    desk.handle(["fbl@news.example"], (CORPUS / "arf_jmrp_microsoft.eml").read_bytes())
    store = SuppressionStore(tmp_path, sync=False)
    e = store.lookup("frank@hotmail.example", "any.example")
    assert e is not None and e.sender_domain == ""
    desk.close()
    store.close()


def test_complaint_addresses_setting_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="not an address"):
        _cfg(tmp_path, **{"complaints.addresses": ["fbl"]})
    with pytest.raises(ConfigError):
        _cfg(tmp_path, **{"complaints.rate_threshold_percent": -1})


# ---------------------------------------------------------------------------------------- rates

class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_delivered_tally_windows_and_persistence(tmp_path):
    clock = Clock(1_800_000_000.0)
    tally = DeliveredTally(tmp_path, clock=clock, save_every=3600)
    tally.add("news@News.Example", 1000)
    tally.add("shop@shop.example", 10)
    tally.add("x@news.example", 0)
    assert not (tmp_path / COUNTS_FILE).exists()  # not yet due
    clock.t += 3 * 86400  # three days later: the next add saves
    tally.add("news@news.example", 500)
    assert (tmp_path / COUNTS_FILE).exists()
    assert tally.since(clock.t - 86400) == {"news.example": 500}
    assert tally.since(clock.t - 7 * 86400) == {"news.example": 1500, "shop.example": 10}
    again = DeliveredTally(tmp_path, clock=clock)
    assert again.since(clock.t - 7 * 86400) == {"news.example": 1500, "shop.example": 10}
    clock.t += 9 * 86400  # old buckets are dropped
    again.add("news@news.example", 1)
    assert list(again.buckets) == [int(clock.t // BUCKET * BUCKET)]
    (tmp_path / COUNTS_FILE).write_text("{not json")
    assert DeliveredTally(tmp_path, clock=clock).buckets == {}  # a warning, not a crash


def test_rates_against_the_threshold(tmp_path):
    now = 1_800_000_000.0
    tally = DeliveredTally(tmp_path, clock=Clock(now - 2 * 86400))
    tally.add("a@good.example", 10000)
    tally.add("a@bad.example", 1000)
    tally.clock = Clock(now - 600)
    tally.add("a@bad.example", 100)
    log = tmp_path / "log"
    log.mkdir()
    recs = [(now - 300, "bad.example"), (now - 3 * 86400, "bad.example"),
            (now - 3 * 86400, "bad.example"), (now - 3 * 86400, "bad.example"),
            (now - 86400 * 2, "good.example"), (now - 10 * 86400, "good.example"),
            (now - 100, "")]
    with open(log / "complaints.jsonl", "w") as f:
        for t, d in recs:
            f.write(json.dumps({"unix": t, "sender_domain": d, "is_complaint": True}) + "\n")
        f.write(json.dumps({"unix": now, "is_complaint": False}) + "\ncut li\n")
    counts = ComplaintCounts(log, clock=Clock(now))
    counts.refresh()
    rows = {r["domain"]: r for r in rates(tally, counts, 0.3, now)}
    bad, good, unknown = rows["bad.example"], rows["good.example"], rows[""]
    assert bad["1d"] == {"delivered": 100, "complaints": 1, "rate_percent": 1.0}
    assert bad["7d"] == {"delivered": 1100, "complaints": 4, "rate_percent": round(400 / 1100, 4)}
    assert bad["over"] is True
    assert good["7d"] == {"delivered": 10000, "complaints": 1, "rate_percent": 0.01}
    assert good["1d"]["rate_percent"] is None and good["over"] is False
    assert unknown["7d"]["complaints"] == 1 and unknown["7d"]["rate_percent"] is None
    assert list(rows)[0] == "bad.example"  # worst first


# ------------------------------------------------------------------------------------ end to end

def _get(port: int, path: str, headers=None, cookies="") -> tuple[int, str, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        h = dict(headers or {})
        if cookies:
            h["Cookie"] = cookies
        conn.request("GET", path, headers=h)
        r = conn.getresponse()
        return r.status, r.read().decode(), dict(r.getheaders())
    finally:
        conn.close()


def _login(port: int) -> str:
    """The session cookie of user admin (form login with its CSRF token)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/gui/login")
    r = conn.getresponse()
    page = r.read().decode()
    login = re.search(r"(mailengine_login=[^;]+)", r.getheader("Set-Cookie")).group(1)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    body = urllib.parse.urlencode({"csrf": csrf, "user": "admin", "password": "opensesame",
                                   "next": "/gui/admin"})
    conn.request("POST", "/gui/login", body=body, headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": login})
    r = conn.getresponse()
    r.read()
    conn.close()
    return "; ".join(c.split(";", 1)[0] for c in r.headers.get_all("Set-Cookie")
                     if "=" in c and "Max-Age=0" not in c)


def test_complaint_by_smtp_end_to_end(tmp_path):
    """Mail goes out (VERP, a List-Unsubscribe token of the home's key); the receiving side's
    feedback loop sends ARF reports back to the complaint address from a client that may not
    relay; the recipients are suppressed, complaints.jsonl and events.jsonl have the lines, and
    the web page, the API and /metrics show the sender domain's rate over the 0.3 % line."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "password.txt").write_text("admin:opensesame\n")
    (home / "api-tokens.txt").write_text("tests:tok-for-complaints\n")
    secret = recipient_token.load_secret(home)
    sink = ThreadedSink("127.0.0.1", 0).start()
    web_port = free_port()
    try:
        with RunningEngine(home, {
                "queue.pause_sending": False, "network.helo_text": "out.news.example",
                "network.web_port": web_port, "network.web_ip": "127.0.0.1",
                "logging.bounce_host": "bounces.news.example",
                "basic.local_domains": ["bounces.news.example"],
                "policy.relay_ips": ["127.0.0.1"],
                "complaints.addresses": ["FBL@news.example"],
                "basic.dns_servers": [f"dest.example,mx.dest.example,MX,127.0.0.1:{sink.port}"],
        }) as eng:
            rcpts = [f"r{i}@dest.example" for i in range(6)]
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                for r in rcpts:  # one message each, as a list sender personalises them
                    tok = recipient_token.make(secret, r, "news.example")
                    s.sendmail("letters@news.example", [r], (
                        f"From: News <letters@news.example>\r\nTo: {r}\r\nSubject: Hi\r\n"
                        f"Message-ID: <hi.{r}>\r\nList-Unsubscribe: "
                        f"<https://news.example/u/{tok}>\r\n\r\nHello\r\n").encode())
            sink.wait_messages(6, timeout=20)
            got = {m.rcpts[0]: m for m in sink.messages}

            def report(rcpt: str, with_token: bool) -> bytes:
                m = got[rcpt]
                head, _, _ = m.data.partition(b"\r\n\r\n")
                if not with_token:  # a loop that strips List-Unsubscribe: VERP decides
                    head = re.sub(rb"List-Unsubscribe:[^\r]*\r\n", b"", head + b"\r\n")[:-2]
                return crlf(
                    b"From: fbl@dest.example\nTo: fbl@news.example\nSubject: complaint\n"
                    b"MIME-Version: 1.0\nContent-Type: multipart/report; "
                    b"report-type=feedback-report; boundary=B\n\n--B\nContent-Type: text/plain"
                    b"\n\nA spam complaint.\n\n--B\nContent-Type: message/feedback-report\n\n"
                    b"Feedback-Type: abuse\nUser-Agent: DestFBL/1\nVersion: 1\n"
                    b"Original-Rcpt-To: <redacted@dest.example>\n\n--B\n"
                    b"Content-Type: text/rfc822-headers\n\nReturn-Path: <"
                    + m.mail_from.encode() + b">\n" + head + b"\n\n--B--\n")

            # from 127.0.0.2, which may not relay: the complaint address takes it all the same
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10,
                              source_address=("127.0.0.2", 0)) as s:
                assert s.ehlo()[0] == 250 and s.mail("")[0] == 250
                assert s.rcpt("someone@elsewhere.example")[0] == 554  # no relaying for it
                s.rset()
                s.sendmail("", ["fbl@NEWS.example"], report("r1@dest.example", True))
                s.sendmail("", ["fbl@news.example"], report("r2@dest.example", False))
                s.sendmail("fbl@dest.example", ["fbl@news.example"],
                           crlf((CORPUS / "plain_question.eml").read_bytes()))
            # recorded before the 250
            lines = _jsonl(home / "log" / "complaints.jsonl")
            assert [(x["address"], x["matched_by"]) for x in lines] == [
                ("r1@dest.example", "token"), ("r2@dest.example", "verp")]  # not the question
            assert lines[0]["sender_domain"] == "news.example" and lines[0]["suppressed"]
            assert lines[0]["queue_id"]  # our Received: line named the original
            store = SuppressionStore(home, sync=False)
            assert store.lookup("r1@dest.example", "news.example").source == "complaint"
            # matched by VERP only, which anyone can write: counted, not suppressed
            assert store.lookup("r2@dest.example", "news.example") is None
            assert lines[1]["suppressed"] is False
            assert store.lookup("r3@dest.example", "news.example") is None
            store.close()
            events = [x for x in _jsonl(home / "log" / "events.jsonl")
                      if x["event"] == "complaint"]
            assert [x["rcpt"] for x in events] == ["r1@dest.example", "r2@dest.example"]
            assert not list((eng.mailq / "retry").glob("*.inf"))  # nothing relayed
            assert "complaint: r1@dest.example (abuse)" in eng.read_output()

            # 2 complaints for 6 delivered: 33 %, far over the line
            status, body, _ = _get(web_port, "/api/v1/complaints",
                                   {"Authorization": "Bearer tok-for-complaints"})
            assert status == 200, body
            row, = [r for r in json.loads(body)["domains"] if r["domain"] == "news.example"]
            assert row["1d"] == {"delivered": 6, "complaints": 2,
                                 "rate_percent": round(200 / 6, 4)}
            assert row["over"] is True
            cookie = _login(web_port)
            status, page, _ = _get(web_port, "/gui/admin/complaints", cookies=cookie)
            assert status == 200
            tr = re.search(r'<tr class="over" data-domain="news.example">(.*?)</tr>', page, re.S)
            assert tr and "33.333 %" in tr.group(1) and "over 0.3 %" in tr.group(1)
            assert "r1@dest.example" in page
            status, metrics, _ = _get(web_port, "/metrics")
            assert 'mailengine_complaints{domain="news.example",window="7d"} 2' in metrics
        # the delivered counts outlive the engine
        saved = json.loads((home / COUNTS_FILE).read_text())
        assert sum(d.get("news.example", 0) for d in saved["hours"].values()) == 6
    finally:
        sink.stop()


def test_complaints_page_in_a_browser(tmp_path):
    """Chromium: log in, follow the Complaints link, see the domain over the line flagged and
    the one under it not. The counts are those a running engine left in the home."""
    import os
    import shutil
    import time
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip("Debian's chromium is not installed")
    home = tmp_path / "home"
    (home / "log").mkdir(parents=True)
    (home / "password.txt").write_text("admin:opensesame\n")
    now = time.time()
    hour = int(now // BUCKET * BUCKET)
    (home / COUNTS_FILE).write_text(json.dumps({"hours": {str(hour): {
        "bad.example": 200, "good.example": 5000}}}))
    with open(home / "log" / "complaints.jsonl", "w") as f:
        for dom, n in (("bad.example", 3), ("good.example", 2)):
            for i in range(n):
                f.write(json.dumps({"unix": now - 60, "time": "now", "is_complaint": True,
                                    "sender_domain": dom, "address": f"u{i}@{dom}",
                                    "feedback_type": "abuse", "matched_by": "verp"}) + "\n")
    web_port = free_port()
    with RunningEngine(home, {"network.web_port": web_port, "network.web_ip": "127.0.0.1",
                              "complaints.addresses": ["fbl@news.example"]}):
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, headless=True, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{web_port}/gui/login")
                page.fill("input[name=user]", "admin")
                page.fill("input[name=password]", "opensesame")
                page.click("button[type=submit]")
                page.click("nav >> text=Complaints")
                page.wait_for_selector("#complaint-rates", timeout=5000)
                bad = page.locator('tr[data-domain="bad.example"]')
                assert "over" in bad.get_attribute("class")
                assert "1.500 %" in bad.inner_text() and "over 0.3 %" in bad.inner_text()
                good = page.locator('tr[data-domain="good.example"]')
                assert "0.040 %" in good.inner_text() and "over" not in good.inner_text()
                assert "fbl@news.example" in page.inner_text("main")
                page.screenshot(path=str(tmp_path / "complaints.png"), full_page=True)
            finally:
                browser.close()


def test_complaint_taken_by_an_intake_worker_process(tmp_path):
    """With several intake processes the report is parsed, suppressed and logged in the worker
    that took it, before its 250, as in the engine's own process."""
    with RunningEngine(tmp_path, {"network.intake_workers": 2,
                                  "complaints.trust_unsigned": True,  # VERP-matched
                                  "complaints.addresses": ["fbl@news.example"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10,
                          source_address=("127.0.0.3", 0)) as s:
            s.sendmail("", ["fbl@news.example"],
                       crlf((CORPUS / "arf_headers_only_verp.eml").read_bytes()))
        line, = _jsonl(tmp_path / "log" / "complaints.jsonl")
        assert line["address"] == "erin@isp.example" and line["suppressed"] is True
        store = SuppressionStore(tmp_path, sync=False)
        assert store.lookup("erin@isp.example", "news.example").source == "complaint"
        store.close()


def test_a_base64_encoded_feedback_part_is_decoded():
    import base64
    fields = (b"Feedback-Type: fraud\r\nUser-Agent: B64/1\r\nVersion: 1\r\n"
              b"Original-Rcpt-To: <kim@b64.example>\r\n")
    data = crlf(b"From: a@b64.example\nTo: fbl@news.example\nSubject: report\nMIME-Version: 1.0\n"
                b"Content-Type: multipart/report; report-type=feedback-report; boundary=Z\n\n"
                b"--Z\nContent-Type: text/plain\n\nspam\n\n--Z\n"
                b"Content-Type: message/feedback-report\nContent-Transfer-Encoding: base64\n\n"
                + base64.encodebytes(fields) + b"\n--Z--\n")
    c = parse(data, SECRET)
    assert (c.is_complaint, c.feedback_type, c.user_agent, c.address) == (
        True, "fraud", "B64/1", "kim@b64.example")


def test_blank_lines_do_not_make_parsing_take_minutes():
    """A mail of a few thousand blank lines to a complaint (or VERP) address made the search
    for the quoted original backtrack for minutes (`\\s` crossing lines), holding a thread."""
    import threading
    from mailengine import bounces
    data = b"From: a@b.test\r\nTo: fbl@x.test\r\nSubject: x\r\n\r\n" + b"\r\n" * 4000
    done = []
    t = threading.Thread(target=lambda: done.append((parse(data, b"k" * 32),
                                                     bounces.parse_report(data))), daemon=True)
    t.start()
    t.join(10)
    assert done and not done[0][0].is_complaint


def test_an_unsigned_match_is_counted_but_suppresses_only_when_trusted(tmp_path):
    """Anyone may mail the complaint address: a report naming its recipient in Original-Rcpt-To
    (or by an unsigned VERP address) is recorded, and suppresses only with
    complaints.trust_unsigned; a signed List-Unsubscribe token always does."""
    data = (CORPUS / "arf_jmrp_microsoft.eml").read_bytes()
    for trusted in (False, True):
        home = tmp_path / str(trusted)
        home.mkdir()
        cfg = _cfg(home, **{"complaints.addresses": ["fbl@news.example"],
                            "complaints.trust_unsigned": trusted})
        desk = ComplaintDesk(cfg)
        c = desk.handle(["fbl@news.example"], data)
        assert c.is_complaint and c.matched_by == "original-rcpt-to"
        store = SuppressionStore(home, sync=False)
        assert (store.lookup("frank@hotmail.example", c.sender_domain) is not None) is trusted
        line, = _jsonl(home / "log" / "complaints.jsonl")
        assert line["suppressed"] is trusted
        desk.close()
        store.close()
