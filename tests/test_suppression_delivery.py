"""Mail already queued is not sent to an address suppressed since (issue 18: an unsubscribe
honoured within two days whatever waits in the queue): delivery checks each recipient against
the list before its transaction, and fails it for good with the reason."""
from __future__ import annotations

import json
import smtplib
import time

from mailengine import control
from mailengine.suppression import REFRESH_EVERY, SuppressionStore
from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import ThreadedSink


def test_a_recipient_suppressed_while_queued_is_not_sent_to(tmp_path):
    sink = ThreadedSink("127.0.0.174", 0).start()
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": True, "network.helo_text": "engine.test",
                "basic.dns_servers": [f"q.test,mx.q.test,MX,127.0.0.174:{sink.port}"]}) as eng:
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("news@sender.test", ["stay@q.test", "left@q.test", "other@q.test"],
                           b"Subject: t\r\n\r\nhi\r\n")
            store = SuppressionStore(tmp_path)
            store.add("left@q.test", reason="unsubscribed via https", source="unsubscribe",
                      sender_domain="sender.test")
            store.add("other@q.test", reason="for another sender", sender_domain="else.test")
            time.sleep(3 * REFRESH_EVERY)  # other processes' additions count within that
            control.request(tmp_path / "mailengine.sock", "config.set",
                            name="queue.pause_sending", value=False)
            path = tmp_path / "log" / "events.jsonl"
            wait_until(lambda: path.exists() and sum(json.loads(x)["event"] == "attempt"
                                                     for x in path.read_text().splitlines()) >= 3,
                       20, "3 attempt lines")
            store.close()
    finally:
        sink.stop()
    got = sorted(r for m in sink.messages for r in m.rcpts)
    assert got == ["other@q.test", "stay@q.test"]
    events = {x["rcpt"]: x for x in map(json.loads, path.read_text().splitlines())
              if x["event"] == "attempt"}
    left = events["left@q.test"]
    assert (left["result"], left["final"], left["code"], left["enhanced"]) == ("hard", True, 550,
                                                                                "5.7.1")
    assert "suppression list" in left["text"] and "unsubscribe" in left["text"]
    assert events["stay@q.test"]["result"] == "sent"
