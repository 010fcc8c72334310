"""One-click unsubscribe (issue 18 item 4): the header fields, the public listener, the mailto.

The end-to-end tests run a real engine process: it relays to a ThreadedSink (basic.dns_servers
pins the recipient domains to it) and the copies that arrive are checked field by field, their
tokens verified with the home's key and their DKIM signatures by dkimpy (the public key handed
to it directly, no DNS needed). The listener is reached over real HTTP (urllib) and the mailto
address over real SMTP (smtplib); the suppression store they fill is read back from the home.
"""
from __future__ import annotations

import json
import smtplib
import time
import urllib.error
import urllib.request
from email import message_from_bytes
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization

from mailengine import dkim as D
from mailengine import recipient_token as T
from mailengine.config import ConfigError, Config
from mailengine.suppression import SuppressionStore
from mailengine.testing.engine import RunningEngine, free_port, wait_until
from mailengine.testing.sink import SinkScript, ThreadedSink
from mailengine.unsubscribe import HeaderMaker, has_own_field, mailto_token

SRC = "news.test"  # the sender domain configured for unsubscribe
URL = "https://unsub.news.test"
MAILTO = "unsub.news.test"
FAST = {"queue.pause_sending": False, "queue.retry_intervals": [0.02, 0.02],
        "queue.queue_check_interval": 0.5, "network.helo_text": "engine.test"}


def message(n: int, extra: bytes = b"", frm: str = SRC) -> bytes:
    return (b"From: News <news@" + frm.encode() + b">\r\nTo: list@" + frm.encode() + b"\r\n"
            + extra + b"Subject: issue " + str(n).encode() + b"\r\n"
            b"Message-ID: <m" + str(n).encode() + b"@news.test>\r\n"
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nHello.\r\n")


def fields(data: bytes, name: str) -> list[str]:
    return [" ".join(v.split()) for v in (message_from_bytes(data).get_all(name) or [])]


def tokens(value: str) -> tuple[str, str]:
    """(token of the https URI, token of the mailto URI) of a List-Unsubscribe value."""
    https, mailto = [u.strip(" <>") for u in value.split(",")]
    assert https.startswith(URL + "/u/") and mailto.startswith("mailto:unsubscribe+")
    assert mailto.endswith("@" + MAILTO)
    return https[len(URL + "/u/"):], mailto[len("mailto:unsubscribe+"):-len("@" + MAILTO)]


# --- the parts by themselves ----------------------------------------------------------------------

def test_header_fields_name_the_recipient_and_sender_domain():
    key = b"k" * 32
    m = HeaderMaker(key, [SRC], URL + "/", MAILTO)
    assert m.applies("news@" + SRC) and m.applies("x@NEWS.test")
    assert not m.applies("x@other.test") and not m.applies("")  # bounces never
    out = m.fields("Alice@Dest.test", "news@" + SRC)
    lines = out.decode().split("\r\n")
    assert lines[0].startswith("List-Unsubscribe: <" + URL + "/u/")  # no double slash
    assert out.endswith(b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    a, b = tokens(fields(out + b"\r\n", "List-Unsubscribe")[0])
    for tok in (a, b):
        who = T.verify(key, tok)
        assert (who.address, who.sender_domain) == ("alice@dest.test", SRC)
    assert HeaderMaker(key, ["*"], "", MAILTO).applies("x@any.test")
    only_mailto = HeaderMaker(key, ["*"], "", MAILTO).fields("a@b.test", "x@any.test")
    assert b"mailto:" in only_mailto and b"Post" not in only_mailto  # one-click needs https
    plain = HeaderMaker(key, ["*"], "http://u.test", MAILTO).fields("a@b.test", "x@any.test")
    assert b"<http://u.test/u/" in plain and b"Post" not in plain  # nor an http:// link
    assert HeaderMaker(key, ["*"], URL, "").fields("a|b@b.test", "x@y.test") == b""


def test_own_field_and_mailto_address_recognised():
    assert has_own_field(b"From: a@b\r\nlist-UNSUBSCRIBE : <x>\r\n\r\nbody")
    # the sender's own Post field alone: ours would make a second one (RFC 8058 wants one)
    assert has_own_field(b"From: a@b\r\nList-Unsubscribe-Post: x\r\n\r\nbody")
    assert not has_own_field(b"From: a@b\r\n\r\nList-Unsubscribe: y")  # in the body
    assert mailto_token("Unsubscribe+abc.def@UNSUB.news.test", MAILTO) == "abc.def"
    assert mailto_token("unsubscribe+@unsub.news.test", MAILTO) is None
    assert mailto_token("unsubscribe+abc@other.test", MAILTO) is None
    assert mailto_token("someone@unsub.news.test", MAILTO) is None


@pytest.mark.parametrize("name,value", [("unsubscribe.listen", "localhost:80"),
                                        ("unsubscribe.url_base", "ftp://x.test"),
                                        ("unsubscribe.url_base", "https://x.test/a b"),
                                        ("unsubscribe.url_base", "https://x.test/\r\nX: y"),
                                        ("unsubscribe.sender_domains", ["not a domain"]),
                                        ("unsubscribe.mailto_domain", "x@y.test")])
def test_bad_settings_are_refused(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        Config(home=tmp_path).set(name, value)


# --- headers on the wire, signed ------------------------------------------------------------------

def rsa_key(home: Path) -> tuple[str, bytes]:
    """An RSA key in HOME/dkim for news.test: (signing table entry, the DNS TXT value)."""
    key = D.generate_key("rsa", 2048)
    (home / "dkim").mkdir(mode=0o700, parents=True)
    path = home / "dkim" / "news.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return f"{SRC},s1,dkim/news.key,rsa", "".join(D.dns_txt_strings(key)).encode()


def test_each_recipient_gets_its_own_signed_fields(tmp_path):
    home = tmp_path / "home"
    entry, txt = rsa_key(home)
    eight = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n")
    with ThreadedSink("127.0.0.1") as sink, \
            ThreadedSink("127.0.0.1", script=SinkScript(eightbitmime=False)) as old, \
            RunningEngine(home, {
            **FAST, "basic.dns_servers": [f"{d},mx.{d},MX,127.0.0.1:{sink.port}"
                                          for d in ("d1.test", "d2.test")]
            + [f"d3.test,mx.d3.test,MX,127.0.0.1:{old.port}"],
            "dkim.signing_table": [entry],
            # left out of dkim.headers on purpose: the engine's own fields are signed anyway
            "dkim.headers": ["From", "To", "Subject", "Date", "Message-ID"],
            "unsubscribe.sender_domains": [SRC], "unsubscribe.url_base": URL,
            "unsubscribe.mailto_domain": MAILTO}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.sendmail("bounces@" + SRC, ["x@d1.test", "y@d1.test", "z@d2.test"], message(1))
            # the sender's own List-Unsubscribe: kept, nothing added, one transaction
            own = b"List-Unsubscribe: <https://sender.test/own>\r\n"
            s.sendmail("bounces@" + SRC, ["p@d1.test", "q@d1.test"], message(2, own))
            # a sender domain not configured: nothing added
            s.sendmail("x@other.test", ["r@d1.test", "t@d1.test"], message(3, frm="other.test"))
            # 8-bit mail for a server without 8BITMIME: each copy re-encoded, then signed
            s.sendmail("bounces@" + SRC, ["u@d3.test", "v@d3.test"],
                       message(4, eight).replace(b"Hello.", "Grüße.".encode()))
        sink.wait_messages(5, timeout=20)
        old.wait_messages(2, timeout=20)
        secret = T.load_secret(home)
    by_subject: dict[str, list] = {}
    for m in sink.messages:
        by_subject.setdefault(fields(m.data, "Subject")[0], []).append(m)
    firsts = by_subject["issue 1"]
    assert sorted(tuple(m.rcpts) for m in firsts) == [("x@d1.test",), ("y@d1.test",),
                                                      ("z@d2.test",)]
    seen = set()
    for m in firsts:
        [value] = fields(m.data, "List-Unsubscribe")
        assert fields(m.data, "List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
        for tok in tokens(value):
            who = T.verify(secret, tok)
            assert (who.address, who.sender_domain) == (m.rcpts[0], SRC)
        seen.add(value)
        sig = [f for f in D.split_message(m.data)[0] if f.lower().startswith(b"dkim-signature")]
        assert len(sig) == 1
        h = "".join(sig[0].decode().split("h=")[1].split(";")[0].split()).split(":")
        assert "list-unsubscribe" in h and "list-unsubscribe-post" in h
        assert dkimpy.verify(m.data, dnsfunc=lambda name, timeout=5: txt)
        # the fields really are covered: another recipient's link breaks the signature
        forged = m.data.replace(tokens(value)[0].encode(), T.make(secret, "evil@x.test").encode())
        assert not dkimpy.verify(forged, dnsfunc=lambda name, timeout=5: txt)
    assert len(seen) == 3  # a link per recipient
    [own_copy] = by_subject["issue 2"]
    assert sorted(own_copy.rcpts) == ["p@d1.test", "q@d1.test"]
    assert fields(own_copy.data, "List-Unsubscribe") == ["<https://sender.test/own>"]
    assert fields(own_copy.data, "List-Unsubscribe-Post") == []
    assert dkimpy.verify(own_copy.data, dnsfunc=lambda name, timeout=5: txt)
    [other] = by_subject["issue 3"]
    assert len(other.rcpts) == 2 and fields(other.data, "List-Unsubscribe") == []
    assert sorted(m.rcpts[0] for m in old.messages) == ["u@d3.test", "v@d3.test"]
    for m in old.messages:
        assert m.data.isascii() and b"quoted-printable" in m.data
        who = T.verify(secret, tokens(fields(m.data, "List-Unsubscribe")[0])[0])
        assert who.address == m.rcpts[0]
        assert dkimpy.verify(m.data, dnsfunc=lambda name, timeout=5: txt)


# --- the listener and the mailto ------------------------------------------------------------------

@pytest.fixture(scope="module")
def listener(tmp_path_factory):
    home = tmp_path_factory.mktemp("unsub")
    port = free_port()
    with RunningEngine(home, {"unsubscribe.listen": f"127.0.0.1:{port}",
                              "unsubscribe.sender_domains": [SRC], "unsubscribe.url_base": URL,
                              "unsubscribe.mailto_domain": MAILTO}) as eng:
        wait_until(lambda: "unsubscribe listener on" in eng.read_output(), what="listener")
        yield eng, f"http://127.0.0.1:{port}", T.load_secret(home)


def http(url: str, body: bytes | None = None, headers: dict | None = None):
    req = urllib.request.Request(url, data=body, headers=headers or {},
                                 method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


ONE_CLICK = b"List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def suppressed(home: Path, address: str, domain: str = SRC):
    return SuppressionStore(home).lookup(address, domain)


def test_get_shows_a_button_and_does_not_unsubscribe(listener):
    eng, base, secret = listener
    status, page, headers = http(f"{base}/u/{T.make(secret, 'look@d.test', SRC)}")
    assert status == 200 and "look@d.test" in page and '<form method="post">' in page
    assert 'name="List-Unsubscribe" value="One-Click"' in page
    assert headers["Referrer-Policy"] == "no-referrer"
    assert suppressed(eng.home, "look@d.test") is None


def test_one_click_post_suppresses_at_once_for_that_sender(listener):
    eng, base, secret = listener
    status, page, _ = http(f"{base}/u/{T.make(secret, 'Ann@D.test', SRC)}", ONE_CLICK, FORM)
    assert status == 200 and "ann@d.test" in page
    e = suppressed(eng.home, "ann@d.test")
    assert e is not None and e.source == "unsubscribe" and e.sender_domain == SRC
    assert suppressed(eng.home, "ann@d.test", "other.test") is None  # that sender only
    # posted again (a second click): still fine
    assert http(f"{base}/u/{T.make(secret, 'ann@d.test', SRC)}", ONE_CLICK, FORM)[0] == 200
    # as multipart/form-data, which RFC 8058 allows too
    multipart = (b'--b1\r\nContent-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
                 b"One-Click\r\n--b1--\r\n")
    assert http(f"{base}/u/{T.make(secret, 'gus@d.test', SRC)}", multipart,
                {"Content-Type": "multipart/form-data; boundary=b1"})[0] == 200
    assert suppressed(eng.home, "gus@d.test") is not None
    events = [json.loads(line) for line in
              (eng.home / "log" / "events.jsonl").read_text().splitlines()]
    assert {"event": "unsubscribed", "address": "ann@d.test", "via": "https"}.items() <= \
        next(e for e in events if e["event"] == "unsubscribed").items()
    assert "unsubscribe: ann@d.test for mail from news.test (via https" in eng.read_output()


def test_forged_swapped_and_bad_requests_are_refused(listener):
    eng, base, secret = listener
    mine, other = T.make(secret, "bob@d.test", SRC), T.make(secret, "eve@d.test", SRC)
    swapped = mine.split(".")[0] + "." + other.split(".")[1]  # bob's payload, eve's signature
    forged = T.make(b"x" * 32, "bob@d.test", SRC)  # not our key
    for tok in (swapped, forged, "garbage", "a.b", "x" * 3000):
        status, text, _ = http(f"{base}/u/{tok}", ONE_CLICK, FORM)
        assert status in (400, 404, 414) and "Traceback" not in text, (tok[:20], status)
        assert http(f"{base}/u/{tok}")[0] in (400, 404, 414)
    assert http(f"{base}/u/{mine}", b"", FORM)[0] == 400  # no List-Unsubscribe=One-Click
    assert http(f"{base}/u/{mine}", b"List-Unsubscribe=Yes", FORM)[0] == 400
    assert http(f"{base}/u/{mine}", ONE_CLICK + b"&x=" + b"y" * 10000, FORM)[0] == 413
    assert http(f"{base}/u/{mine}", ONE_CLICK, {**FORM, "X-Big": "z" * 10000})[0] == 400
    assert http(f"{base}/admin")[0] == 404
    assert suppressed(eng.home, "bob@d.test") is None and suppressed(eng.home, "eve@d.test") is None
    assert "Traceback" not in eng.read_output()


def test_mailto_unsubscribes_and_forged_mailto_is_refused_at_rcpt(listener):
    eng, _, secret = listener
    tok = T.make(secret, "carol@d.test", SRC)
    with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
        s.ehlo("mua.test")
        s.mail("carol@d.test")
        assert s.rcpt(f"unsubscribe+{tok}@{MAILTO}")[0] == 250
        code, text = s.rcpt(f"unsubscribe+{T.make(b'y' * 32, 'dan@d.test', SRC)}@{MAILTO}")
        assert code == 550 and b"unsubscribe" in text
        assert s.data(b"Subject: unsubscribe\r\n\r\n.\r\n")[0] == 250
    e = suppressed(eng.home, "carol@d.test")
    assert e is not None and e.source == "unsubscribe" and "mailto" in e.reason
    assert suppressed(eng.home, "dan@d.test") is None
    assert not list((eng.mailq / "retry").glob("*.inf"))  # handled, not relayed


# --- a suppression store that cannot be written: nothing promised ---------------------------------

class BrokenStore:
    def add(self, *a, **k):
        raise OSError("disk gone")


def test_store_failure_answers_try_again_in_smtp_and_http(tmp_path):
    import asyncio

    from mailengine.config import from_dict
    from mailengine.intake import Intake
    from mailengine.smtp.server import MessageReceived, Session, Transaction
    from mailengine.spool import Spool
    from mailengine.unsubscribe import Unsubscriber
    from mailengine.unsubscribe_web import UnsubscribeListener

    port = free_port()
    cfg = from_dict(tmp_path, {"unsubscribe": {"mailto_domain": MAILTO,
                                               "listen": f"127.0.0.1:{port}"},
                               "queue": {"save_incoming": True}})
    broken = Unsubscriber(tmp_path, BrokenStore())
    tok = T.make(broken.secret, "fay@d.test", SRC)

    class Engine:  # what the listener reads of the engine
        hostname = "engine.test"
    Engine.cfg = cfg

    async def main():
        spool = Spool(tmp_path / "mailq", hostname="e.test")
        spool.ensure_dirs()
        intake = Intake(cfg, spool, "e.test", lambda *a: None)
        intake._unsubscriber = broken
        rcpt = f"unsubscribe+{tok}@{MAILTO}"
        txn = Transaction(mail_from="fay@d.test", rcpts=[rcpt], local={rcpt})
        try:
            reply = await intake.on_message(MessageReceived(Session(peer_ip="127.0.0.1"), txn,
                                                            b"Subject: x\r\n\r\nx\r\n"))
            assert reply.code == 451  # the sender tries again
            assert not list((tmp_path / "mailq" / "incoming").iterdir())  # nothing kept
        finally:
            spool.close()
        web = UnsubscribeListener(Engine, broken)
        assert await web.start()
        try:
            status, text, _ = await asyncio.to_thread(
                http, f"http://127.0.0.1:{port}/u/{tok}", ONE_CLICK, FORM)
        finally:
            await web.stop()
        assert status == 503 and "try again" in text and "Traceback" not in text
    asyncio.run(main())


def test_settings_apply_while_running_in_two_intake_processes(tmp_path):
    """sender_domains / url_base reach delivery, mailto_domain the intake worker processes,
    without a restart (config.set over the control socket)."""
    from mailengine import control
    with ThreadedSink("127.0.0.1") as sink, RunningEngine(tmp_path, {
            **FAST, "network.intake_workers": 2,
            "basic.dns_servers": [f"d1.test,mx.d1.test,MX,127.0.0.1:{sink.port}"]}) as eng:
        def set_(name, value):
            before = eng.read_output().count("intake processes restarted")
            answer = control.request(eng.home / "mailengine.sock", "config.set", name=name,
                                     value=value)
            assert answer["applied"], answer
            if any("intake processes are restarted" in n for n in answer.get("notes", [])):
                wait_until(lambda: eng.read_output().count("intake processes restarted")
                           > before, what="intake processes replaced")
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.sendmail("bounces@" + SRC, ["x@d1.test"], message(1))
        sink.wait_messages(1, timeout=20)
        assert fields(sink.messages[0].data, "List-Unsubscribe") == []
        set_("unsubscribe.url_base", URL)
        set_("unsubscribe.sender_domains", [SRC])
        set_("unsubscribe.mailto_domain", MAILTO)
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.sendmail("bounces@" + SRC, ["y@d1.test"], message(2))
        sink.wait_messages(2, timeout=20)
        secret = T.load_secret(tmp_path)
        https, _ = tokens(fields(sink.messages[1].data, "List-Unsubscribe")[0])
        assert T.verify(secret, https).address == "y@d1.test"
        body, sig = https.split(".")
        damaged = f"{body}.{'B' if sig[0] == 'A' else 'A'}{sig[1:]}"
        for _ in range(4):  # each intake process (a connection may reach either) knows it
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.ehlo("mua.test")
                s.mail("y@d1.test")
                assert s.rcpt(f"unsubscribe+{https}@{MAILTO}")[0] == 250
                assert s.rcpt(f"unsubscribe+{damaged}@{MAILTO}")[0] == 550
                assert s.data(b"Subject: unsubscribe\r\n\r\n.\r\n")[0] == 250
        assert SuppressionStore(tmp_path).lookup("y@d1.test", SRC) is not None


def test_an_unsubscribed_address_is_refused_for_that_sender_only(listener):
    eng, base, secret = listener
    assert http(f"{base}/u/{T.make(secret, 'hal@d.test', SRC)}", ONE_CLICK, FORM)[0] == 200
    time.sleep(0.2)  # intake sees another store's change within suppression.REFRESH_EVERY
    with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("bounces@" + SRC)
        code, text = s.rcpt("hal@d.test")
        assert code == 550 and b"suppression" in text, text
        s.rset()
        s.mail("someone@other.test")
        assert s.rcpt("hal@d.test")[0] == 250  # another sender may still write to hal


def test_two_stores_in_one_process_keep_their_locks(tmp_path):
    """The engine process holds two suppression stores (the policy's, the listener's): opening
    the second must not drop the first one's SQLite locks, else another process closing its
    connection deletes the WAL under them (seen as 'disk I/O error' at RCPT)."""
    import subprocess
    import sys
    first = SuppressionStore(tmp_path)
    first.add("x@d.test", reason="r", sender_domain=SRC)
    second = SuppressionStore(tmp_path)
    second.add("y@d.test", reason="r", sender_domain=SRC)
    code = ("import sys; from mailengine.suppression import SuppressionStore as S; "
            "s = S(sys.argv[1]); assert s.lookup('y@d.test', 'news.test'); s.db.close()")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=30)
    assert (tmp_path / "suppression.db-wal").exists()  # still ours
    first.add("z@d.test", reason="r", sender_domain=SRC)
    assert second.lookup("z@d.test", SRC) is not None


def test_a_link_used_again_writes_nothing_more(tmp_path):
    """A link POSTed again (a user's second click, a scanner, a loop) finds the address
    suppressed already: no second entry, event line or webhook event."""
    from mailengine.suppression import SuppressionStore
    from mailengine.unsubscribe import Unsubscriber
    store = SuppressionStore(tmp_path)
    u = Unsubscriber(tmp_path, store)
    tok = T.make(T.load_secret(tmp_path), "pat@dest.test", SRC)
    for _ in range(3):
        assert u.unsubscribe(tok, "https").address == "pat@dest.test"
    lines = (tmp_path / "log" / "events.jsonl").read_text().splitlines()
    assert len([x for x in lines if '"unsubscribed"' in x]) == 1
    assert len([x for x in lines if '"suppressed"' in x]) == 1
    u.events.close()
    store.close()
