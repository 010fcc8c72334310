"""bodies.py on its own: the Received field put in front of each message."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta

from mailengine.bodies import received_header
from mailengine.envelope import Message


def _msg(mid: str, created: datetime) -> Message:
    m = Message(id=mid, mail_from="a@src.test", rcpt_to_send=["x@dst.test"],
                time_created=created)
    m.received = {"peertcpip": "192.0.2.1", "helo": "client.test", "protocol": "ESMTPS",
                  "tls": "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384"}
    return m


def test_received_field_names_the_client_protocol_id_and_each_messages_own_time():
    t0 = datetime(2026, 12, 5, 10, 0, 0)
    a = received_header(_msg("A1", t0), "mx.engine.test").decode()
    b = received_header(_msg("B2", t0 + timedelta(seconds=1)), "mx.engine.test").decode()
    again = received_header(_msg("C3", t0), "mx.engine.test").decode()
    assert a.startswith("Received: from client.test (192.0.2.1 [192.0.2.1])\r\n"
                        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
                        "\tby mx.engine.test (MailEngine) with ESMTPS id A1;\r\n\t")
    assert "05 Dec 2026 10:00:00" in a and "05 Dec 2026 10:00:01" in b  # the date is remembered
    assert "10:00:00" in again and "10:00:01" not in again  # ... only for its own second


def test_received_fields_made_in_many_threads_each_carry_their_own_time():
    t0 = datetime(2026, 12, 5, 10, 0, 0)
    bad: list[str] = []

    def make(second: int) -> None:
        for _ in range(2000):
            text = received_header(_msg("X", t0 + timedelta(seconds=second)), "h").decode()
            if f"10:00:{second:02d}" not in text:
                bad.append(text)
    threads = [threading.Thread(target=make, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad
