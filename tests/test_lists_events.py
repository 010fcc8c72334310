"""The append-only lists and the JSON-lines event log: safe for other programs to read, truncate
and rotate while the engine writes; and what the event log says after real deliveries."""
from __future__ import annotations

import json
import os
import smtplib
import threading
import time
from dataclasses import replace
from datetime import datetime

from mailengine.envelope import Message
from mailengine.events import EventLog, attempt_events
from mailengine.lists import AddressLists, AppendFile
from mailengine.outcome import AttemptResult, RcptOutcome
from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import SinkScript, ThreadedSink


def test_append_survives_truncation_rename_and_delete(tmp_path):
    f = AppendFile(tmp_path / "hard-undeliverable.txt")
    f.append_lines(["a@x.test", "b@x.test"])
    # another program empties the file in place (`: > file`): no NUL hole, next line at the start
    with open(tmp_path / "hard-undeliverable.txt", "r+") as other:
        other.truncate(0)
    f.append_lines(["c@x.test"])
    assert (tmp_path / "hard-undeliverable.txt").read_bytes() == b"c@x.test\n"
    # renamed away (rotation): new lines go to a new file under the old name
    os.rename(tmp_path / "hard-undeliverable.txt", tmp_path / "work.txt")
    f.append_lines(["d@x.test"])
    assert (tmp_path / "work.txt").read_text() == "c@x.test\n"
    assert (tmp_path / "hard-undeliverable.txt").read_text() == "d@x.test\n"
    # deleted
    os.unlink(tmp_path / "hard-undeliverable.txt")
    f.append_lines(["e@x.test"])
    assert f.read_lines() == ["e@x.test"]


def test_event_log_notices_a_rotation_within_its_recheck_interval(tmp_path):
    f = AppendFile(tmp_path / "events.jsonl", recheck=0.3)
    f.append_lines(["one"])
    os.rename(tmp_path / "events.jsonl", tmp_path / "rotated.jsonl")
    f.append_lines(["two"])  # within the interval: still the rotated file
    time.sleep(0.35)
    f.append_lines(["three"])
    assert (tmp_path / "rotated.jsonl").read_text() == "one\ntwo\n"
    assert (tmp_path / "events.jsonl").read_text() == "three\n"


def test_a_line_never_breaks(tmp_path):
    f = AppendFile(tmp_path / "l.txt")
    f.append_lines(["evil@x.test\r\nsecond@x.test", "nul\x00@x.test"])
    assert f.read_lines() == ["evil@x.test  second@x.test", "nul @x.test"]


def test_concurrent_writers_and_a_truncating_reader_lose_no_line_halves(tmp_path):
    """Four threads append while a reader takes the file's lines and truncates it, as a cleaning
    script would: every line read is whole, none is read twice, none lost."""
    path = tmp_path / "soft-undeliverable.txt"
    f = AppendFile(path)
    n, threads = 2000, 4
    seen: list[str] = []
    stop = threading.Event()

    def write(k: int) -> None:
        for i in range(n):
            f.append_lines([f"user{k}-{i}@example.test"])

    def reader() -> None:
        while not stop.is_set():
            os.rename(path, tmp_path / "taken.txt") if path.exists() else None
            taken = tmp_path / "taken.txt"
            if taken.exists():
                time.sleep(0.02)  # a writer that opened the old file may still finish its line
                seen.extend(taken.read_text().splitlines())
                taken.unlink()
            time.sleep(0.002)

    r = threading.Thread(target=reader)
    r.start()
    ws = [threading.Thread(target=write, args=(k,)) for k in range(threads)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    stop.set()
    r.join()
    if path.exists():
        seen.extend(path.read_text().splitlines())
    assert len(seen) == n * threads == len(set(seen))
    assert all(s.startswith("user") and s.endswith("@example.test") for s in seen)


def test_address_lists(tmp_path):
    lists = AddressLists(tmp_path)
    lists.undeliverable(["h1@x.test", "h2@x.test"], ["s1@x.test"])
    lists.bounce("b@x.test", hard=True)
    lists.bounce("c@x.test", hard=False)
    assert (tmp_path / "hard-undeliverable.txt").read_text() == "h1@x.test\nh2@x.test\n"
    assert (tmp_path / "soft-undeliverable.txt").read_text() == "s1@x.test\n"
    assert (tmp_path / "hard-bounces.txt").read_text() == "b@x.test\n"
    assert (tmp_path / "soft-bounces.txt").read_text() == "c@x.test\n"


def test_event_records(tmp_path):
    msg = Message(id="P1@h", mail_from="s@src.test", time_created=datetime.now())
    msg.send_tries = 2
    where = dict(ip="127.0.0.9", port=25, duration=0.1234)
    ok = replace(RcptOutcome.from_reply("a@d.test", 250, "2.0.0", "Ok", "body", "mx.d.test"),
                 **where)
    bad = replace(RcptOutcome.from_reply("b@d.test", 550, "5.1.1", "No such user", "rcpt",
                                         "mx.d.test"), **where)
    later = RcptOutcome.from_reply("c@d.test", 451, "4.4.3", "DNS failed", "dns")
    res = AttemptResult(sent=["a@d.test"], failed=["b@d.test"], deferred=["c@d.test"])
    ev = EventLog(tmp_path)
    ev.attempt(msg, [ok, bad, later], res)
    lines = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [(x["rcpt"], x["result"], x["final"]) for x in lines] == [
        ("a@d.test", "sent", True), ("b@d.test", "hard", True), ("c@d.test", "soft", False)]
    b = lines[1]
    assert b["id"] == "P1@h" and b["from"] == "s@src.test" and b["attempt"] == 2
    assert (b["mx"], b["ip"], b["port"]) == ("mx.d.test", "127.0.0.9", 25)
    assert (b["code"], b["enhanced"], b["text"], b["stage"]) == (550, "5.1.1", "No such user",
                                                                 "rcpt")
    assert b["class"] == "address" and b["duration"] == 0.123
    assert lines[0]["class"] == "" and lines[2]["mx"] == "" and lines[2]["ip"] == ""
    assert datetime.strptime(b["time"], "%Y-%m-%dT%H:%M:%S.%f%z")
    assert attempt_events(msg, [], res) == []


def wait(pred, timeout=30.0, what="condition"):
    wait_until(pred, timeout, what)


def attempts(path):
    """The attempt lines of an event log (other events share the file)."""
    if not path.exists():
        return []
    return [x for x in map(json.loads, path.read_text().splitlines()) if x["event"] == "attempt"]


def test_event_log_end_to_end(tmp_path):
    """A real engine delivers to a sink that takes one recipient, refuses one and defers one
    (then takes it): one line per recipient per attempt, with MX host, IP, codes, duration."""
    sink = ThreadedSink("127.0.0.51", 25, SinkScript(rcpt={
        "bad@ev.test": "550 5.1.1 No such user",
        "later@ev.test": ["451 4.3.0 Try again later", "250 2.1.5 Ok"]})).start()
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": False, "queue.retry_intervals": [0.02],
                "queue.queue_check_interval": 0.5, "network.helo_text": "engine.test",
                "basic.dns_servers": ["ev.test,mx.ev.test,MX,127.0.0.51:25"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("s@src.test", ["ok@ev.test", "bad@ev.test", "later@ev.test"],
                           b"Subject: t\r\n\r\nhi\r\n")
            path = tmp_path / "log" / "events.jsonl"
            wait(lambda: len(attempts(path)) >= 4, what="4 events")
        lines = attempts(path)
    finally:
        sink.stop()
    # bad@ev.test does not exist: it is also put on the suppression list (bounce_suppression)
    assert [(x["event"], x["address"], x["source"]) for x in map(json.loads, path.read_text()
            .splitlines()) if x["event"] != "attempt"] == [("suppressed", "bad@ev.test", "bounce")]
    got = [(x["rcpt"], x["attempt"], x["result"], x["final"], x["code"]) for x in lines]
    assert sorted(got[:3]) == [("bad@ev.test", 1, "hard", True, 550),
                               ("later@ev.test", 1, "soft", False, 451),
                               ("ok@ev.test", 1, "sent", True, 250)]
    assert got[3] == ("later@ev.test", 2, "sent", True, 250)
    for x in lines:
        assert x["mx"] == "mx.ev.test" and x["ip"] == "127.0.0.51" and x["port"] == 25
        assert 0 < x["duration"] < 10 and x["stage"] in ("rcpt", "body")
        assert x["id"].endswith("@engine.test") and x["from"] == "s@src.test"
    assert [x["enhanced"] for x in lines if x["rcpt"] == "bad@ev.test"] == ["5.1.1"]
    assert (tmp_path / "hard-undeliverable.txt").read_text() == "bad@ev.test\n"
    assert not (tmp_path / "soft-undeliverable.txt").exists()


def test_iso_time_makes_each_second_once_and_reads_the_same(monkeypatch):
    """events.iso_time keeps the current second's text (an attempt's lines need the time)."""
    from mailengine.events import iso_time
    base = 1_772_532_751.0  # 2026-03-03
    calls = []
    strftime = time.strftime
    monkeypatch.setattr(time, "strftime", lambda *a: calls.append(a) or strftime(*a))
    got = [iso_time(base + k / 8) for k in range(24)]  # three seconds
    assert len(calls) == 6  # date and time, offset: once a second
    for k, text in enumerate(got):
        t = base + k / 8
        lt = time.localtime(t)
        assert text == strftime("%Y-%m-%dT%H:%M:%S", lt) + f".{int(t % 1 * 1000):03d}" + \
            strftime("%z", lt)
    assert iso_time(base - 1.5)[:19] == strftime("%Y-%m-%dT%H:%M:%S", time.localtime(base - 1.5))
