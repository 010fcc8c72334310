"""DKIM signing wired into the running engine: relayed mail goes out signed, once per message.

A real engine process relays to ThreadedSinks (basic.dns_servers entries pin the recipient
domains to them); the keys are made by `mailengine dkim genkey` into HOME and published in a
TestDNSServer (dnsmasq), from which dkimpy reads them over DNS to verify what the sinks got. The
web admin's DKIM page is fetched over HTTP after a real login.
"""
from __future__ import annotations

import json
import re
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailengine import dkim as D
from mailengine.envelope import parse_inf
from mailengine.testing.dnsserver import TestDNSServer
from mailengine.testing.engine import RunningEngine, free_port, wait_until as wait
from mailengine.testing.sink import SinkScript, ThreadedSink

from test_dkim import dkimpy_verify, tags
from test_web_api import Client, make_home, wait_web

SRC = "src.test"  # the From domain: signed
FAST = {
    "queue.pause_sending": False,
    "queue.retry_intervals": [0.02, 0.02],  # 1.2 s
    "queue.queue_check_interval": 0.5,
    "network.helo_text": "engine.test",
}
MESSAGE = (b"From: Sender <sender@src.test>\r\n"
           b"To: x@d1.test, y@d1.test, z@d2.test\r\n"
           b"Subject: signed  at\r\n\tsend time\r\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <wiring-1@src.test>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"\r\n"
           b"Hello,\r\n.a line that starts with a dot\r\nGr\xc3\xbc\xc3\x9fe\r\n")


def genkey(home: Path, domain: str, selector: str, algorithm: str = "rsa") -> tuple[str, str]:
    """`mailengine dkim genkey` into HOME/dkim: (signing table entry, TXT record value)."""
    p = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(home), "dkim",
                        "genkey", domain, selector, "--algorithm", algorithm],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    keyfile = f"dkim/{domain}.{selector}.{algorithm}.key"
    assert (home / keyfile).exists() and f'"{domain},{selector},{keyfile},{algorithm}"' in p.stdout
    key = D.load_private_key(home / keyfile)
    return f"{domain},{selector},{keyfile},{algorithm}", key


def pin(sink: ThreadedSink, *domains: str) -> list[str]:
    return [f"{d},mx.{d},MX,127.0.0.1:{sink.port}" for d in domains]


def send(eng: RunningEngine, rcpts: list[str], body: bytes = MESSAGE,
         mail_from: str = "bounces@src.test") -> None:
    with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
        s.sendmail(mail_from, rcpts, body)


def infs(eng: RunningEngine, where: str):
    return [parse_inf(p.read_bytes(), p.name[:-4]) for p in sorted((eng.mailq / where).glob(
        "*.inf"))]


def signatures(data: bytes) -> list[bytes]:
    """The DKIM-Signature fields at the top of a message, before anything else."""
    fields, _ = D.split_message(data)
    out = []
    for f in fields:
        if not f.lower().startswith(b"dkim-signature:"):
            break
        out.append(f)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A HOME with an RSA and an Ed25519 key for src.test, and a DNS server publishing them."""
    home = tmp_path_factory.mktemp("dkimhome")
    rsa_entry, rsa_key = genkey(home, SRC, "s1", "rsa")
    ed_entry, ed_key = genkey(home, SRC, "e1", "ed25519")
    zones = {f"s1._domainkey.{SRC}": {"TXT": [tuple(D.dns_txt_strings(rsa_key))]},
             f"e1._domainkey.{SRC}": {"TXT": [tuple(D.dns_txt_strings(ed_key))]}}
    with TestDNSServer(zones) as dns:
        yield {"home": home, "entries": [rsa_entry, ed_entry], "dns": dns}


def engine_home(tmp_path: Path, keys) -> Path:
    """A fresh HOME holding the module's keys (genkey made them mode 600 in a 700 folder)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "dkim").mkdir(mode=0o700)
    for f in (keys["home"] / "dkim").iterdir():
        (home / "dkim" / f.name).write_bytes(f.read_bytes())
        (home / "dkim" / f.name).chmod(0o600)
    return home


def test_relayed_mail_is_signed_once_for_all_transactions(tmp_path, keys):
    dns = keys["dns"]
    with ThreadedSink("127.0.0.1") as sink, RunningEngine(engine_home(tmp_path, keys), {
            **FAST, "queue.save_done": False, "basic.nameservers": [dns.address],
            "basic.dns_servers": pin(sink, "d1.test", "d2.test"),
            "dkim.signing_table": keys["entries"]}) as eng:
        send(eng, ["x@d1.test", "y@d1.test", "z@d2.test"])
        sink.wait_messages(2, timeout=20)
        wait(lambda: not infs(eng, "retry") and not infs(eng, "working"), what="queue empty")
        wait(lambda: not list(eng.mailq.rglob("*.dat")), what="files removed")
        leftovers = list(eng.mailq.rglob("*.dkim*"))
    out = eng.output.decode()
    assert "DKIM: signing mail of src.test" in out
    assert "DKIM src.test" not in out and "unsigned" not in out, out  # no key problem
    assert leftovers == []  # ID.dkim went with the message
    by_rcpts = {tuple(sorted(m.rcpts)): m for m in sink.messages}
    assert set(by_rcpts) == {("x@d1.test", "y@d1.test"), ("z@d2.test",)}  # two transactions
    datas = [m.data for m in sink.messages]
    sigs = [signatures(d) for d in datas]
    assert len(sigs[0]) == 2 and sigs[0] == sigs[1]  # signed once: the same fields in both
    assert {tags(s + b"\r\n")["a"] for s in sigs[0]} == {"rsa-sha256", "ed25519-sha256"}
    assert all(tags(s + b"\r\n")["d"] == SRC for s in sigs[0])
    for data in datas:
        # signature(s), then our Received field (added after signing, not signed), then ID.dat
        rest = data
        for s in sigs[0]:
            assert rest.startswith(s + b"\r\n")
            rest = rest[len(s) + 2:]
        assert rest.startswith(b"Received: from ") and rest.endswith(MESSAGE)
        assert dkimpy_verify(dns, data, 0) and dkimpy_verify(dns, data, 1)
        # an altered message fails: the key really comes from DNS and is really checked
        assert not dkimpy_verify(dns, data.replace(b"Hello,", b"Hallo,"), 0)


def test_a_retry_reuses_the_kept_signature(tmp_path, keys):
    dns = keys["dns"]
    script = SinkScript(rcpt={"z@d2.test": ["451 4.3.0 Try later", "250 2.1.5 Ok"]})
    with ThreadedSink("127.0.0.1", script=script) as sink, RunningEngine(
            engine_home(tmp_path, keys), {
                **FAST, "queue.save_done": True, "basic.nameservers": [dns.address],
                "basic.dns_servers": pin(sink, "d1.test", "d2.test"),
                "dkim.signing_table": keys["entries"][:1]}) as eng:
        send(eng, ["x@d1.test", "z@d2.test"])
        sink.wait_messages(2, timeout=30)
        wait(lambda: len(infs(eng, "done")) == 1, what="done")
        msg, = infs(eng, "done")
        # the move to done/ takes ID.inf, ID.dat and ID.dkim one after another
        wait(lambda: (eng.mailq / "done" / f"{msg.id}.dkim").exists(), what="ID.dkim in done/")
        kept = (eng.mailq / "done" / f"{msg.id}.dkim").read_bytes()
        dat = (eng.mailq / "done" / f"{msg.id}.dat").read_bytes()
    assert msg.send_tries == 2
    first, second = sink.messages  # x@d1.test at the first attempt, z@d2.test at the second
    assert first.rcpts == ["x@d1.test"] and second.rcpts == ["z@d2.test"]
    # the second attempt, at least 1.2 s later, sent the signature made at the first (same t=)
    assert signatures(first.data) == signatures(second.data) == [kept[:-2]]
    assert dat == MESSAGE  # ID.dat stays as received; the signature lives beside it
    assert dkimpy_verify(dns, second.data)


def test_missing_key_unsigned_sends_unsigned_and_warns_at_start(tmp_path, keys):
    with ThreadedSink("127.0.0.1") as sink, RunningEngine(tmp_path / "home", {
            **FAST, "basic.nameservers": [keys["dns"].address],
            "basic.dns_servers": pin(sink, "d1.test"),
            "dkim.signing_table": [f"{SRC},s1,dkim/absent.key,rsa"],
            "dkim.missing_key": "unsigned"}) as eng:
        send(eng, ["x@d1.test"])
        sink.wait_messages(1, timeout=20)
        start = eng.read_output()
    assert "DKIM src.test selector s1: key file" in start and "not found; mail from " \
        "src.test will be sent unsigned" in start
    assert re.search(r"\n[0-9/: ]+DKIM src\.test selector s1: key file \S*/home/dkim/absent\.key "
                     r"not found; mail from src\.test will be sent unsigned\n", start)
    assert "DKIM: signing mail of" not in start  # no usable key at all
    assert "DKIM: mail from src.test sent unsigned" in start  # and per message (rate-limited)
    data = sink.messages[0].data
    assert signatures(data) == [] and data.startswith(b"Received: ") and data.endswith(MESSAGE)


def test_missing_key_hold_keeps_the_message_in_retry(tmp_path, keys):
    with ThreadedSink("127.0.0.1") as sink, RunningEngine(tmp_path / "home", {
            **FAST, "basic.nameservers": [keys["dns"].address],
            "basic.dns_servers": pin(sink, "d1.test", "d2.test"),
            "dkim.signing_table": [f"{SRC},s1,dkim/absent.key"],
            "dkim.missing_key": "hold"}) as eng:
        send(eng, ["x@d1.test", "z@d2.test"])
        wait(lambda: "held in retry/, not sent" in eng.read_output(), what="the hold line")
        time.sleep(1.5)  # longer than a retry interval: it is not tried again meanwhile
        out = eng.read_output()
        msg, = infs(eng, "retry")
        assert not infs(eng, "working") and not infs(eng, "done")
    assert sink.messages == [] and sink.sessions == []  # nothing sent, no connection needed
    assert "mail from src.test will be held" in out  # at start
    assert re.search(rf"\n[0-9/: ]+{re.escape(msg.id)}: held in retry/, not sent: DKIM key for "
                     r"src\.test unusable, message held: key file .*absent\.key not found "
                     r"\(dkim\.missing_key = hold\); looked at again in 30 s", out), out
    assert out.count("held in retry/, not sent") == 1
    assert msg.send_tries == 0  # not counted as an attempt
    assert sorted(msg.rcpt_to_send) == ["x@d1.test", "z@d2.test"]
    assert msg.retry_time is not None and msg.retry_time.timestamp() > time.time() + 20


def test_admin_dkim_page_shows_records_and_problems(tmp_path, keys):
    home = make_home(tmp_path)
    for f in (keys["home"] / "dkim").iterdir():
        (home / "dkim").mkdir(mode=0o700, exist_ok=True)
        (home / "dkim" / f.name).write_bytes(f.read_bytes())
        (home / "dkim" / f.name).chmod(0o600)
    port = free_port()
    entries = keys["entries"] + ["other.test,s9,dkim/absent.key,rsa"]
    with RunningEngine(home, {"network.web_port": port, "network.web_ip": "127.0.0.1",
                              "dkim.signing_table": entries}) as eng:
        eng.web_port = port
        wait_web(eng)
        c = Client(port)
        r = c.get("/gui/admin/dkim")
        assert r.status == 302 and "/gui/login" in r.headers["Location"]
        assert c.get("/gui/admin/dkim.json").status == 401
        assert c.login().status == 303
        r = c.get("/gui/admin")
        assert 'href="/gui/admin/dkim"' in r.text  # in the navigation
        r = c.get("/gui/admin/dkim")
        assert r.status == 200 and "DKIM signing" in r.text
        for name in ("src.test.s1.rsa.txt", "src.test.e1.ed25519.txt"):
            record = (home / "dkim" / name).read_text().strip()  # what genkey printed
            assert record.replace('"', "&#34;") in r.text or record in r.text
        assert "s1._domainkey.src.test" in r.text and "e1._domainkey.src.test" in r.text
        assert "DKIM other.test selector s9: key file" in r.text
        assert "No record to publish" in r.text
        j = c.get("/gui/admin/dkim.json")
        state = json.loads(j.body)
        assert state["enabled"] and len(state["records"]) == 3
        by_sel = {x["selector"]: x for x in state["records"]}
        assert by_sel["s1"]["algorithm"] == "rsa-sha256" and by_sel["s1"]["problem"] is None
        assert "".join(by_sel["e1"]["txt"]).startswith("v=DKIM1; k=ed25519; p=")
        assert by_sel["s9"]["record"] is None and "not found" in by_sel["s9"]["problem"]
        assert any("other.test" in p for p in state["problems"])
        # the missing key appears; reading the key files again clears the problem
        (home / "dkim" / "absent.key").write_bytes(
            (home / "dkim" / "src.test.s1.rsa.key").read_bytes())
        (home / "dkim" / "absent.key").chmod(0o600)
        r = c.post("/gui/admin/dkim/reload", form={"csrf": c.csrf("/gui/admin/dkim")})
        assert r.status == 303
        r = c.get("/gui/admin/dkim")
        assert "every key is usable" in r.text and "No record to publish" not in r.text
        assert c.post("/gui/admin/dkim/reload", form={"csrf": "wrong"}).status == 403


def test_admin_dkim_page_when_signing_is_off(tmp_path):
    port = free_port()
    with RunningEngine(make_home(tmp_path), {"network.web_port": port,
                                             "network.web_ip": "127.0.0.1"}) as eng:
        eng.web_port = port
        wait_web(eng)
        c = Client(port)
        c.login()
        r = c.get("/gui/admin/dkim")
        assert r.status == 200 and "DKIM signing is off" in r.text
        assert "mailengine dkim genkey" in r.text
        assert json.loads(c.get("/gui/admin/dkim.json").body)["enabled"] is False


def test_8bit_mail_to_a_server_without_8bitmime_is_converted_and_signed_as_sent(tmp_path, keys):
    """Issue 15.3 (RFC 6152 3): the 8-bit MIME text goes out quoted-printable to a server that
    does not offer 8BITMIME, signed as sent (dkimpy verifies it); only mail that cannot be
    converted (8-bit without MIME) is still refused with 554 5.6.3."""
    import email
    import email.policy
    dns = keys["dns"]
    plain = (b"From: sender@src.test\r\nTo: n@d1.test\r\nSubject: no MIME\r\n\r\n"
             b"Gr\xc3\xbc\xc3\x9fe\r\n")
    with ThreadedSink("127.0.0.157", script=SinkScript(eightbitmime=False)) as sink, \
            RunningEngine(engine_home(tmp_path, keys), {
                **FAST, "queue.save_done": True, "basic.nameservers": [dns.address],
                "basic.dns_servers": [f"d1.test,mx.d1.test,MX,127.0.0.157:{sink.port}"],
                "dkim.signing_table": keys["entries"][:1]}) as eng:
        send(eng, ["x@d1.test"])
        send(eng, ["n@d1.test"], body=plain)
        wait(lambda: len(infs(eng, "done")) == 2, what="both finished")
        done = {m.rcpt_sent[0] if m.rcpt_sent else m.rcpt_failed[0]: m for m in infs(eng, "done")}
    assert done["n@d1.test"].rcpt_failed == ["n@d1.test"]  # no MIME: not convertible
    got, = sink.messages
    assert got.rcpts == ["x@d1.test"] and got.data.isascii()
    assert "BODY=8BITMIME" not in got.mail_params
    assert dkimpy_verify(dns, got.data, 0)  # signed as sent
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in got.data
    assert b"Gr=C3=BC=C3=9Fe\r\n" in got.data
    assert b"\r\n.a line that starts with a dot\r\n" in got.data
    parsed = email.message_from_bytes(got.data, policy=email.policy.default)
    assert parsed.get_content().replace("\r\n", "\n") == \
        "Hello,\n.a line that starts with a dot\nGrüße\n"
    assert b"Subject: signed  at\r\n\tsend time\r\n" in got.data  # headers as written
