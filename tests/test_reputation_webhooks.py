"""Reputation events reach the webhooks (issue 18 item 5 with items 2-4): an address suppressed
after a hard bounce, a complaint and an unsubscribe are each posted to the operator's URL as
`suppressed`, `complained` and `unsubscribed` events, signed, beside the delivery events."""
from __future__ import annotations

import smtplib

from mailengine import recipient_token, webhooks
from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import SinkScript, ThreadedSink
from mailengine.testing.webhook_receiver import WebhookReceiver

ARF = (b"From: fbl@dest.test\r\nTo: fbl@news.test\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: multipart/report; report-type=feedback-report; boundary=B\r\n\r\n"
       b"--B\r\nContent-Type: text/plain\r\n\r\nA spam complaint.\r\n\r\n"
       b"--B\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\n"
       b"User-Agent: DestFBL/1\r\nVersion: 1\r\nOriginal-Mail-From: <letters@news.test>\r\n"
       b"Original-Rcpt-To: <carol@dest.test>\r\n\r\n"
       b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: letters@news.test\r\n"
       b"To: carol@dest.test\r\nSubject: Hi\r\nMessage-ID: <hi.carol@news.test>\r\n\r\n--B--\r\n")


def test_suppressed_complained_and_unsubscribed_events_are_posted(tmp_path):
    rx = WebhookReceiver(secret="k3y").start()
    sink = ThreadedSink("127.0.0.173", 0, SinkScript(rcpt={
        "gone@dest.test": "550 5.1.1 No such user"})).start()
    try:
        with RunningEngine(tmp_path, {
                "queue.pause_sending": False, "network.helo_text": "out.news.test",
                "webhooks.urls": [rx.url], "webhooks.secret": "k3y", "webhooks.batch_wait": 0.05,
                "complaints.addresses": ["fbl@news.test"],
                "complaints.trust_unsigned": True,  # the report names carol unsigned
                "unsubscribe.mailto_domain": "unsub.news.test",
                "basic.dns_servers": [f"dest.test,mx.dest.test,MX,127.0.0.173:{sink.port}"]}) as eng:
            token = recipient_token.make(recipient_token.load_secret(tmp_path), "dave@dest.test",
                                         "news.test")
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("letters@news.test", ["ok@dest.test", "gone@dest.test"],
                           b"Subject: t\r\n\r\nhi\r\n")
                s.sendmail("abuse-desk@dest.test", ["fbl@news.test"], ARF)
                s.sendmail("dave@dest.test", [f"unsubscribe+{token}@unsub.news.test"],
                           b"Subject: unsubscribe\r\n\r\n")
            wait_until(lambda: {"delivered", "bounced", "complained", "unsubscribed"}
                       <= {e["type"] for e in rx.events}
                       and sum(e["type"] == "suppressed" for e in rx.events) >= 3, 30,
                       "the reputation events at the receiver")
    finally:
        sink.stop()
        rx.stop()
    by_type: dict[str, list[dict]] = {}
    for e in rx.events:
        by_type.setdefault(e["type"], []).append(e)
    assert {(e["address"], e["source"]) for e in by_type["suppressed"]} == {
        ("gone@dest.test", "bounce"), ("carol@dest.test", "complaint"),
        ("dave@dest.test", "unsubscribe")}
    complained, = by_type["complained"]
    assert complained["address"] == "carol@dest.test"
    assert complained["sender_domain"] == "news.test" and complained["feedback_type"] == "abuse"
    unsubscribed, = by_type["unsubscribed"]
    assert (unsubscribed["address"], unsubscribed["sender_domain"], unsubscribed["via"]) == (
        "dave@dest.test", "news.test", "mailto")
    assert rx.bad_signatures == 0
    assert len({e["event_id"] for e in rx.events}) == len(rx.events)  # each once, by its id
    assert set(by_type) <= set(webhooks.TYPES)
