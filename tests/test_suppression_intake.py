"""The suppression list at work: SMTP intake over real sockets (reject and drop, in the engine
and in intake worker processes), the HTTP API (inject's answer, /api/v1/suppressions),
client.enqueue and mailengine-sendmail."""
from __future__ import annotations

import json
import time

import pytest

from mailengine import config
from mailengine.client import AllSuppressed, enqueue
from mailengine.envelope import parse_inf
from mailengine.suppression import SuppressionStore
from mailengine.testing.engine import RunningEngine

from test_cli_sendmail import queued, sendmail
from test_intake import queued_id, send
from test_web_api import Client, engine, make_home, wait_web


def fill(home, *entries):
    s = SuppressionStore(home)
    for address, kw in entries:
        s.add(address, **{"reason": "550 5.1.1 user unknown", "source": "bounce", **kw})
    s.close()


def events(home) -> list[dict]:
    p = home / "log" / "events.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def test_reject_at_rcpt_for_all_senders_or_one_sender_domain(tmp_path):
    fill(tmp_path, ("gone@dest.test", {}),
         ("unsub@dest.test", {"sender_domain": "news.test", "source": "unsubscribe",
                              "reason": "one-click"}))
    with RunningEngine(tmp_path, {"basic.local_domains": ["here.test"]}) as eng:
        result, refused = send(eng.smtp_port, ["gone@dest.test", "unsub@dest.test",
                                               "ok@dest.test", "GONE@Dest.Test"])
        assert set(refused) == {"gone@dest.test", "GONE@Dest.Test"}
        code, text = refused["gone@dest.test"]
        assert code == 550 and text.startswith(b"5.7.1 <gone@dest.test> is on the suppression "
                                               b"list (bounce: 550 5.1.1 user unknown)")
        inf = parse_inf((eng.mailq / "retry" / f"{queued_id(result[1])}.inf").read_bytes())
        assert inf.rcpt_to_send == ["unsub@dest.test", "ok@dest.test"]  # other sender domain
        _, refused = send(eng.smtp_port, ["unsub@dest.test"], sender="list@news.test")
        assert b"for mail from news.test (unsubscribe: one-click)" in refused[
            "unsub@dest.test"][1]
        # Added while the engine runs, by another process: refused at the next RCPT.
        fill(tmp_path, ("late@dest.test", {"source": "complaint", "reason": "ARF"}))
        time.sleep(0.15)  # intake looks for other processes' changes every 0.1 s
        _, refused = send(eng.smtp_port, ["late@dest.test"], sender="")
        assert refused["late@dest.test"][0] == 550  # the null sender too (an all-senders entry)
        # Local mail is never suppressed.
        fill(tmp_path, ("me@here.test", {}))
        (code, _), refused = send(eng.smtp_port, ["me@here.test"])
        assert code == 250 and not refused


def test_drop_accepts_and_delivers_nothing_in_intake_workers(tmp_path):
    fill(tmp_path, ("gone@dest.test", {}))
    with RunningEngine(tmp_path, {"suppression.action": "drop",
                                  "network.intake_workers": 2}) as eng:
        before = set((eng.mailq / "retry").glob("*.inf"))
        (code, text), refused = send(eng.smtp_port, ["gone@dest.test"])
        assert code == 250 and b"every recipient is suppressed" in text and not refused
        # Several sessions, to reach both intake processes.
        ids = []
        for _ in range(4):
            (code, text), refused = send(eng.smtp_port, ["gone@dest.test", "ok@dest.test"])
            assert code == 250 and not refused
            ids.append(queued_id(text))
        for i in ids:
            inf = parse_inf((eng.mailq / "retry" / f"{i}.inf").read_bytes())
            assert inf.rcpt_to_send == ["ok@dest.test"]
        assert set((eng.mailq / "retry").glob("*.inf")) - before == {
            eng.mailq / "retry" / f"{i}.inf" for i in ids}
    dropped = [e for e in events(tmp_path) if e["event"] == "dropped"]
    assert len(dropped) == 5 and {e["id"] for e in dropped} == {"", *ids}
    assert dropped[0]["rcpt"] == "gone@dest.test" and dropped[0]["from"] == "a@example.org"
    assert dropped[0]["suppression"]["source"] == "bounce"


def test_api_inject_lists_suppressed_and_manages_the_list(tmp_path):
    home = make_home(tmp_path)
    with engine(home) as eng:
        wait_web(eng)
        c = Client(eng.web_port)
        r = c.api("POST", "/api/v1/suppressions", js={
            "address": "Gone@Dest.test", "reason": "complaint via ARF", "source": "complaint"})
        assert r.status == 201 and r.json["entries"][0]["address"] == "gone@dest.test"
        r = c.api("POST", "/api/v1/suppressions", js={"entries": [
            {"address": "a@dest.test", "reason": "x"}, {"address": "nope", "reason": "x"}]})
        assert r.status == 400 and "entries[1]: not an e-mail address" in r.json["error"]
        assert c.api("GET", "/api/v1/suppressions/a@dest.test").status == 404  # all or none
        # Inject: the suppressed recipient is left out and listed; the rest is queued.
        doc = {"from": "news@src.test", "to": ["gone@dest.test", "ok@dest.test"],
               "headers": {"Subject": "hi"}, "body": "hello\n"}
        r = c.api("POST", "/api/v1/messages", js=doc)
        assert r.status == 202, r.json
        assert r.json["suppressed"] == [{"address": "gone@dest.test",
                                         "reason": "complaint via ARF", "source": "complaint",
                                         "sender_domain": ""}]
        [m] = r.json["messages"]
        assert m["to"] == ["ok@dest.test"]
        assert parse_inf((eng.mailq / "retry" / f"{m['id']}.inf").read_bytes()
                         ).rcpt_to_send == ["ok@dest.test"]
        r = c.api("POST", "/api/v1/messages", js={**doc, "to": ["gone@dest.test"]})
        assert r.status == 200 and r.json["ids"] == [] and len(r.json["suppressed"]) == 1
        # List, search, one address, delete, CSV export and import.
        r = c.api("GET", "/api/v1/suppressions?search=gone&source=complaint")
        assert r.json["total"] == 1 and r.json["entries"][0]["reason"] == "complaint via ARF"
        r = c.api("GET", "/api/v1/suppressions/gone@dest.test")
        assert r.status == 200 and r.json["suppressed"] is True
        r = c.request("POST", "/api/v1/suppressions/import", body="address,reason\n"
                      "x@dest.test,old list\ny@dest.test,old list\n",
                      headers={"Authorization": "Bearer s3cret-token-for-tests",
                               "Content-Type": "text/csv"})
        assert r.status == 200 and json.loads(r.body) == {"imported": 2}
        r = c.request("GET", "/api/v1/suppressions/export",
                      headers={"Authorization": "Bearer s3cret-token-for-tests"})
        assert r.status == 200 and r.text.count("\n") == 4 and "x@dest.test" in r.text
        r = c.api("DELETE", "/api/v1/suppressions/gone@dest.test")
        assert r.status == 200 and r.json["removed"] is True
        assert c.api("DELETE", "/api/v1/suppressions/gone@dest.test").status == 404
        r = c.api("POST", "/api/v1/messages", js=doc)
        assert r.status == 202 and r.json["suppressed"] == []
        assert c.api("GET", "/api/v1/suppressions", token="wrong").status == 401


def test_client_enqueue_and_sendmail_leave_suppressed_recipients_out(tmp_path):
    config.load(tmp_path)
    mailq = tmp_path / "mailq"
    # No list yet: nothing is checked and no file is made (the caller may be another user).
    enqueue(mailq, "a@src.test", "x@dest.test", ["Subject: s"], "b")
    assert not (tmp_path / "suppression.db").exists()
    fill(tmp_path, ("gone@dest.test", {}))
    msg_id = enqueue(mailq, "a@src.test", "gone@dest.test,ok@dest.test", ["Subject: s"], "b")
    inf = parse_inf((mailq / "retry" / f"{msg_id}.inf").read_bytes())
    assert inf.rcpt_to_send == ["ok@dest.test"]
    with pytest.raises(AllSuppressed, match="gone@dest.test"):
        enqueue(mailq, "a@src.test", ["gone@dest.test"], ["Subject: s"], "b")
    assert [e["id"] for e in events(tmp_path) if e["event"] == "dropped"] == [msg_id]
    n = len(queued(tmp_path))
    out = sendmail(tmp_path, "-f", "a@src.test", "gone@dest.test", "ok2@dest.test",
                   stdin=b"Subject: s\n\nbody\n")
    assert out.returncode == 0, out.stderr
    assert b"gone@dest.test is on the suppression list (bounce:" in out.stderr
    assert queued(tmp_path)[-1][0].rcpt_to_send == ["ok2@dest.test"] or any(
        m.rcpt_to_send == ["ok2@dest.test"] for m, _ in queued(tmp_path))
    out = sendmail(tmp_path, "-f", "a@src.test", "gone@dest.test", stdin=b"Subject: s\n\nb\n")
    assert out.returncode == 67 and len(queued(tmp_path)) == n + 1  # EX_NOUSER, nothing queued
    # With action = drop: quietly accepted, nothing queued, a 'dropped' line.
    toml = tmp_path / "mailengine.toml"
    toml.write_text(toml.read_text().replace('action = "reject"', 'action = "drop"'))
    out = sendmail(tmp_path, "-f", "a@src.test", "gone@dest.test", stdin=b"Subject: s\n\nb\n")
    assert out.returncode == 0 and out.stderr == b"" and len(queued(tmp_path)) == n + 1
    assert events(tmp_path)[-1]["event"] == "dropped" and events(tmp_path)[-1]["id"] == ""


def test_policy_switches_and_precedence(tmp_path):
    """Without relay permission the answer is the relay refusal (the list is not revealed);
    enabled = false checks nothing; drop marks the recipient in the transaction."""
    from mailengine.policy import Policy
    from mailengine.smtp.server import Session, Transaction
    fill(tmp_path, ("gone@dest.test", {}))
    values = {s.name: s.default for s in config.SETTINGS}

    def rcpt(peer: str, **settings):
        p = Policy(config.Config(home=tmp_path, values={**values, **settings}))
        txn = Transaction(mail_from="a@src.test")
        reply = p.on_rcpt(Session(peer_ip=peer), txn, "gone@dest.test")
        return reply, txn

    reply, _ = rcpt("10.9.9.9")
    assert (reply.code, reply.text) == (554, "relay not approved")
    reply, _ = rcpt("127.0.0.1")
    assert reply.code == 550 and "suppression list" in reply.text
    reply, txn = rcpt("127.0.0.1", **{"suppression.enabled": False})
    assert reply is None and not txn.dropped
    reply, txn = rcpt("127.0.0.1", **{"suppression.action": "drop"})
    assert reply is None and txn.dropped["gone@dest.test"].source == "bounce"
