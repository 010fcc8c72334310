"""Webhooks (issue 18 item 5): the outbox, the signature, the sender against a real HTTP receiver
that fails, stalls, refuses and recovers, and a real engine killed with events pending."""
from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from mailengine import control
from mailengine.config import ConfigError, Config, from_dict
from mailengine.testing.engine import RunningEngine, free_port, wait_until
from mailengine.testing.sink import SinkScript, ThreadedSink
from mailengine.testing.webhook_receiver import WebhookReceiver
from mailengine.webhooks import (FILE, SIGNATURE_HEADER, TIMESTAMP_HEADER, WebhookOutbox,
                                 Webhooks, emit, event, from_attempts, sign, verify)


# --- events and signatures ------------------------------------------------------------------------

def test_event_has_id_type_time_address_and_fields():
    a = event("suppressed", "x@dest.test", reason="hard bounce", sender_domain="src.test")
    b = event("complained", "y@dest.test")
    assert a["type"] == "suppressed" and a["address"] == "x@dest.test"
    assert a["reason"] == "hard bounce" and a["sender_domain"] == "src.test"
    assert a["event_id"] != b["event_id"] and len({event("bounced", "z")["event_id"]
                                                   for _ in range(1000)}) == 1000
    assert a["time"][:2] == "20" and a["time"][10] == "T"
    with pytest.raises(ValueError, match="not a webhook event type"):
        event("opened", "x@dest.test")


def test_attempt_records_become_delivered_deferred_bounced():
    base = {"time": "2026-03-03T10:12:31.402+0000", "event": "attempt", "id": "M1@h",
            "from": "s@src.test", "attempt": 1, "mx": "mx.d.test", "ip": "127.0.0.9",
            "code": 250, "enhanced": "2.0.0", "text": "ok", "stage": "body"}
    records = [dict(base, rcpt="a@d.test", result="sent", final=True),
               dict(base, rcpt="b@d.test", result="hard", final=True, code=550,
                    category="bad-mailbox"),
               dict(base, rcpt="c@d.test", result="soft", final=False, code=451),
               dict(base, rcpt="d@d.test", result="soft", final=True, code=451),  # gave up
               dict(base, rcpt="e@d.test", result="tested", final=True)]  # test mode: none
    evs = [json.loads(t) for t in from_attempts((r, json.dumps(r)) for r in records)]
    assert [(e["type"], e["address"]) for e in evs] == [
        ("delivered", "a@d.test"), ("bounced", "b@d.test"), ("deferred", "c@d.test"),
        ("bounced", "d@d.test")]
    assert evs[1]["category"] == "bad-mailbox" and "category" not in evs[0]
    assert evs[0]["id"] == "M1@h" and evs[0]["time"] == base["time"]  # the line's fields
    assert evs[1]["code"] == 550 and evs[3]["result"] == "soft" and evs[3]["final"] is True
    assert len({e["event_id"] for e in evs}) == 4
    assert [json.loads(t)["type"] for t in from_attempts(
        [(r, json.dumps(r)) for r in records], ["bounced"])] == ["bounced", "bounced"]


def test_signature_covers_timestamp_and_body():
    body, ts = b'{"events":[]}', str(int(time.time()))
    sig = sign("k", ts, body)
    assert sig.startswith("sha256=") and verify("k", ts, sig, body)
    assert not verify("other", ts, sig, body)
    assert not verify("k", ts, sig, body + b" ")
    assert not verify("k", str(int(ts) - 1), sig, body)  # the timestamp is signed
    old = str(int(time.time()) - 3600)
    assert not verify("k", old, sign("k", old, body), body)  # a replay an hour later
    assert not verify("k", "soon", sig, body)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="webhooks.urls.*not an http"):
        from_dict(None, {"webhooks": {"urls": ["ftp://x.test/"]}})
    with pytest.raises(ConfigError, match="unknown event types"):
        from_dict(None, {"webhooks": {"events": ["delivered", "opened"]}})
    cfg = from_dict(None, {"webhooks": {"urls": ["https://hooks.test/in"], "batch_size": 5}})
    assert cfg.webhooks.urls == ["https://hooks.test/in"] and cfg.webhooks.batch_size == 5


# --- the outbox -----------------------------------------------------------------------------------

def _events(rows) -> list[dict]:
    return [e for r in rows for e in json.loads("[" + r[3] + "]")]


def test_outbox_keeps_events_across_reopen_until_each_url_acknowledges(tmp_path):
    box = WebhookOutbox(tmp_path)
    for i in range(3):
        box.put([event("delivered", f"r{i}@d.test")])
    box.put([event("delivered", f"r{i}@d.test") for i in (3, 4)])  # one row
    box.close()
    box = WebhookOutbox(tmp_path)  # a restart
    rows = box.take("http://a/", 3)
    assert [e["address"] for e in _events(rows)] == ["r0@d.test", "r1@d.test", "r2@d.test"]
    box.ack("http://a/", rows[-1][0])
    box.close()
    box = WebhookOutbox(tmp_path)
    assert [e["address"] for e in _events(box.take("http://a/", 10))] == [
        "r3@d.test", "r4@d.test"]
    assert len(_events(box.take("http://a/", 1))) == 2  # a row is never split
    assert box.pending("http://a/") == 2 and box.pending("http://b/") == 5
    assert box.prune(["http://a/", "http://b/"], 0) == (0, 0)  # b has none acknowledged
    assert box.prune(["http://a/"], 0) == (3, 0)
    assert box.prune([], 3600, now=time.time() + 7200) == (0, 2)  # too old: gone
    assert box.pending("http://b/") == 0
    assert (tmp_path / FILE).stat().st_mode & 0o077 == 0
    box.close()


WRITER = """
import sys
from mailengine.webhooks import WebhookOutbox, event
box = WebhookOutbox(sys.argv[1])
for i in range(int(sys.argv[3])):
    box.put([event("suppressed", f"{sys.argv[2]}{i}.{j}@d.test") for j in range(5)])
"""


def test_two_processes_put_at_once_and_a_reader_following_misses_none(tmp_path):
    """Seqs grow in commit order, so a URL's progress (the last seq acknowledged) never skips
    an event another process commits meanwhile."""
    box = WebhookOutbox(tmp_path)
    assert box.pending("http://r/") == 0  # the file and its tables made
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), name, "150"])
             for name in ("p", "q")]
    seen: list[dict] = []
    while True:
        running = any(p.poll() is None for p in procs)
        rows = box.take("http://r/", 37)
        if rows:
            seen += _events(rows)
            box.ack("http://r/", rows[-1][0])
        elif not running:
            break
    assert [p.wait() for p in procs] == [0, 0]
    addrs = [e["address"] for e in seen]
    assert len(addrs) == 1500 and len(set(addrs)) == 1500
    assert len({e["event_id"] for e in seen}) == 1500
    for name in ("p", "q"):  # each writer's events in its own order
        mine = [a for a in addrs if a.startswith(name)]
        assert mine == sorted(mine, key=lambda a: tuple(map(int, a[1:].split("@")[0].split("."))))


def test_emit_puts_only_when_configured_and_wanted(tmp_path):
    off = Config(home=tmp_path)
    assert emit(off, [event("suppressed", "a@d.test")]) == 0

    async def idle_engine_part():  # webhooks off: the engine's loop makes no file either
        hooks = Webhooks(off)
        runner = asyncio.create_task(hooks.run())
        await asyncio.sleep(0.2)
        await hooks.stop()
        await asyncio.wait_for(runner, 5)

    asyncio.run(idle_engine_part())
    assert not (tmp_path / FILE).exists()
    on = Config(home=tmp_path, values={"webhooks.urls": ["http://127.0.0.1:9/"],
                                       "webhooks.events": ["suppressed"]})
    assert emit(on, [event("suppressed", "a@d.test"), event("complained", "b@d.test")]) == 1
    assert WebhookOutbox(tmp_path).pending("http://127.0.0.1:9/") == 1


def test_a_failed_commit_keeps_the_events_and_tries_again(tmp_path, caplog):
    """A disk problem must not lose events nor stop delivery: the attempt goes on (its future
    says False), and the events reach the outbox with the next commit."""
    cfg = Config(home=tmp_path, values={"webhooks.urls": ["http://127.0.0.1:9/"]})
    hooks = Webhooks(cfg)
    real_put, calls = hooks.outbox.put_json, []

    def flaky_put(events, per_row):
        calls.append(len(events))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        real_put(events, per_row)

    hooks.outbox.put_json = flaky_put

    async def scenario():
        rec = {"result": "sent", "final": True, "rcpt": "a@d.test", "id": "M@h", "time": "t"}
        first = hooks.attempt([(rec, json.dumps(rec))])
        assert await first is False
        assert await hooks.submit([event("complained", "b@d.test")]) is True
        await hooks.stop()

    with caplog.at_level(logging.ERROR, "mailengine.webhooks"):
        asyncio.run(scenario())
    assert "cannot write 1 webhook events" in caplog.text and calls == [1, 2]
    rows = WebhookOutbox(tmp_path).take("http://127.0.0.1:9/", 10)
    assert [e["type"] for e in _events(rows)] == ["delivered", "complained"]


def test_the_readme_verification_snippet_works():
    from pathlib import Path
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## Webhooks", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(code, scope)
    body, ts = b'{"events":[]}', str(int(time.time()))
    headers = {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: sign("k", ts, body)}
    assert scope["verified"]("k", headers, body)
    assert not scope["verified"]("k", headers, body + b"x")
    assert not scope["verified"]("j", headers, body)


# --- the sender against a real receiver -----------------------------------------------------------

def _hooks_cfg(tmp_path, urls, **extra) -> Config:
    values = {"webhooks.urls": urls, "webhooks.secret": "s3cret", "webhooks.batch_size": 7,
              "webhooks.batch_wait": 0.05, "webhooks.timeout": 0.5,
              "webhooks.retry_max_seconds": 0.4}
    values.update({f"webhooks.{k}": v for k, v in extra.items()})
    return Config(home=tmp_path, values=values)


async def _until(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


def test_failing_stalling_refusing_receiver_gets_every_event_and_holds_up_no_other(tmp_path):
    bad = WebhookReceiver(secret="s3cret").start()
    good = WebhookReceiver(secret="s3cret").start()
    try:
        cfg = _hooks_cfg(tmp_path, [bad.url, good.url])
        sent: list[dict] = []

        async def scenario():
            hooks = Webhooks(cfg)
            runner = asyncio.create_task(hooks.run())
            bad.mode = "fail"
            for i in range(30):  # captured in the engine process, committed in groups
                evs = [event("delivered", f"a{i}.{j}@d.test") for j in range(3)]
                sent.extend(evs)
                hooks.submit(evs)
                await asyncio.sleep(0.005)
            await _until(lambda: len(good.events) == 90, what="the good receiver has all")
            await _until(lambda: sum(r["status"] == 500 for r in bad.requests) >= 2,
                         what="two failures")
            bad.mode = "stall"
            bad.stall_seconds = 2.0
            await _until(lambda: "no answer within" in hooks.urls[bad.url].last_error,
                         what="a timeout")
            bad.close_port()
            await _until(lambda: "Connect" in hooks.urls[bad.url].last_error,
                         what="a refused connection")
            # meanwhile the good URL goes on: new events reach it at once
            more = [event("bounced", "late@d.test", code=550)]
            sent.extend(more)
            await hooks.submit(more)
            await _until(lambda: len(good.events) == 91, what="the late event")
            assert hooks.urls[bad.url].failures >= 4 and hooks.status()["pending"] > 0
            bad.mode = "ok"
            bad.open_port()
            await _until(lambda: len({e["event_id"] for e in bad.events}) == 91, 20,
                         what="the bad receiver recovered")
            await _until(lambda: hooks.urls[bad.url].failures == 0, what="failures reset")
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await hooks.stop()
            return hooks

        asyncio.run(scenario())
    finally:
        bad.stop()
        good.stop()
    ids = {e["event_id"] for e in sent}
    for rx in (bad, good):
        assert {e["event_id"] for e in rx.events} == ids  # at least once, each
        assert rx.bad_signatures == 0
        for r in rx.requests:
            assert verify("s3cret", r["headers"][TIMESTAMP_HEADER],
                          r["headers"][SIGNATURE_HEADER], r["body"])
            assert len(json.loads(r["body"])["events"]) <= 7  # batch_size
    assert len(good.events) == 91  # it never failed: nothing twice
    modes = [r["mode"] for r in bad.requests]
    assert "fail" in modes and "stall" in modes and modes[-1] == "ok"
    # the backoff is capped (0.4 s): the failing URL was tried again and again meanwhile
    assert sum(m == "fail" for m in modes) >= 2
    assert WebhookOutbox(tmp_path).pending(bad.url) == 0


def test_events_older_than_max_age_are_dropped_with_a_warning(tmp_path, caplog):
    rx = WebhookReceiver(secret="s3cret").start()
    try:
        cfg = _hooks_cfg(tmp_path, [rx.url], max_age_hours=0.0003)  # about a second
        rx.close_port()

        async def scenario():
            hooks = Webhooks(cfg)
            runner = asyncio.create_task(hooks.run())
            await hooks.submit([event("deferred", "old@d.test")])
            await asyncio.sleep(1.4)
            rx.open_port()
            await hooks.submit([event("delivered", "new@d.test")])
            await _until(lambda: rx.events, what="the fresh event")
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await hooks.stop()

        with caplog.at_level(logging.WARNING, "mailengine.webhooks"):
            asyncio.run(scenario())
    finally:
        rx.stop()
    assert [e["address"] for e in rx.events] == ["new@d.test"]
    assert "older than 0.0003 hours" in caplog.text


# --- a real engine --------------------------------------------------------------------------------

def test_engine_posts_delivery_events_and_a_sigkill_loses_none(tmp_path):
    """A real engine delivers to a sink that takes one recipient, refuses one and defers one;
    the receiver refuses connections, so the events wait in webhooks.db; the engine is killed
    (SIGKILL) and started again, the receiver comes back: every event arrives, signed."""
    sink = ThreadedSink("127.0.0.52", 25, SinkScript(rcpt={
        "bad@wh.test": "550 5.1.1 No such user",
        "later@wh.test": ["451 4.3.0 Try again later", "250 2.1.5 Ok"]})).start()
    rx = WebhookReceiver(secret="k3y").start()
    rx.close_port()
    settings = {"queue.pause_sending": False, "queue.retry_intervals": [0.02],
                "queue.queue_check_interval": 0.5, "network.helo_text": "engine.test",
                "basic.dns_servers": ["wh.test,mx.wh.test,MX,127.0.0.52:25"],
                "webhooks.urls": [rx.url], "webhooks.secret": "k3y",
                "webhooks.retry_max_seconds": 0.3, "webhooks.batch_wait": 0.05,
                "network.web_port": free_port()}
    db = tmp_path / FILE

    def stored() -> list[dict]:
        if not db.exists():
            return []
        with sqlite3.connect(db) as c:
            return [e for (b,) in c.execute("SELECT body FROM events ORDER BY seq")
                    for e in json.loads("[" + b + "]")]

    try:
        eng = RunningEngine(tmp_path, settings).start()
        try:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("s@src.test", ["ok@wh.test", "bad@wh.test", "later@wh.test"],
                           b"Subject: t\r\n\r\nhi\r\n")
            # 4 delivery events, and bad@wh.test put on the suppression list (bounce_suppression)
            wait_until(lambda: len(stored()) >= 5, 30, "5 events in webhooks.db")
            status = control.request(tmp_path / "mailengine.sock", "status")
            wait_until(lambda: control.request(tmp_path / "mailengine.sock", "status")
                       ["webhooks"]["urls"][0]["failures"] > 0, 10, "a failure in the status")
            wait_until(lambda: control.request(tmp_path / "mailengine.sock", "status")
                       ["webhooks"]["pending"] >= 5, 10, "the pending count")
            metrics = urllib.request.urlopen(
                f"http://127.0.0.1:{settings['network.web_port']}/metrics", timeout=10).read()
            assert f'mailengine_webhook_pending{{url="{rx.url}"}} 5' in metrics.decode()
            out = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home",
                                  str(tmp_path), "status"], capture_output=True, text=True)
            assert f"webhooks  {rx.url}:" in out.stdout and "failures in a row" in out.stdout
        finally:
            eng.kill()
        before = stored()
        assert "webhooks" in status
        rx.open_port()
        eng = RunningEngine(tmp_path, settings).start()
        try:
            wait_until(lambda: len({e["event_id"] for e in rx.events}) >= 5, 30,
                       "the events after the restart")
            wait_until(lambda: control.request(tmp_path / "mailengine.sock", "status")
                       ["webhooks"]["pending"] == 0, 10, "nothing pending")
        finally:
            assert eng.stop() == 0
            assert "Traceback" not in eng.read_output()
    finally:
        rx.stop()
        sink.stop()
    got = {(e["type"], e["address"]) for e in rx.events}
    assert got == {("delivered", "ok@wh.test"), ("bounced", "bad@wh.test"),
                   ("deferred", "later@wh.test"), ("delivered", "later@wh.test"),
                   ("suppressed", "bad@wh.test")}
    assert {e["event_id"] for e in before} <= {e["event_id"] for e in rx.events}
    bounced = next(e for e in rx.events if e["type"] == "bounced")
    assert bounced["code"] == 550 and bounced["enhanced"] == "5.1.1"
    assert bounced["id"].endswith("@engine.test") and bounced["from"] == "s@src.test"
    assert bounced["rcpt"] == bounced["address"] and bounced["event"] == "attempt"
    assert rx.bad_signatures == 0 and rx.requests


def test_urls_changed_while_running_are_followed(tmp_path):
    """webhooks.urls is live: a URL added gets the events still held, one removed is left."""
    a = WebhookReceiver().start()
    b = WebhookReceiver().start()
    try:
        cfg = _hooks_cfg(tmp_path, [a.url], secret="")

        async def scenario():
            hooks = Webhooks(cfg)
            runner = asyncio.create_task(hooks.run())
            await hooks.submit([event("unsubscribed", "one@d.test")])
            await _until(lambda: len(a.events) == 1, what="a has the first")
            b.close_port()
            cfg.set("webhooks.urls", [a.url, b.url])
            await _until(lambda: b.url in hooks.urls and hooks.urls[b.url].failures, what="b")
            b.open_port()
            await _until(lambda: len(b.events) == 1, what="b has the event still held")
            cfg.set("webhooks.urls", [b.url])
            await _until(lambda: a.url not in hooks.urls, what="a left")
            await hooks.submit([event("complained", "two@d.test")])
            await _until(lambda: len(b.events) == 2, what="b has the second")
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await hooks.stop()

        asyncio.run(scenario())
    finally:
        a.stop()
        b.stop()
    assert [e["address"] for e in a.events] == ["one@d.test"]
    assert [e["address"] for e in b.events] == ["one@d.test", "two@d.test"]
    assert SIGNATURE_HEADER not in a.requests[0]["headers"]  # no secret: unsigned
