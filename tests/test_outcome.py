"""outcome.py: reply classification and what one attempt writes into the message (SPEC 4)."""
from datetime import datetime, timedelta

import pytest

from mailengine.envelope import Message, format_inf, parse_inf
from mailengine.outcome import (Kind, RcptOutcome, bounce_class, classify, next_retry,
                                record_attempt, retries_allowed)

NOW = datetime(2000, 12, 22, 16, 29, 0)


@pytest.mark.parametrize("code,enhanced,kind", [
    (250, "2.0.0", Kind.SENT), (251, "", Kind.SENT),
    (550, "5.1.1", Kind.HARD), (554, "", Kind.HARD), (553, "5.1.3", Kind.HARD),
    (450, "4.2.0", Kind.SOFT), (451, "4.4.2", Kind.SOFT), (421, "4.7.0", Kind.SOFT),
    (452, "4.5.3", Kind.SOFT),
    (552, "5.2.2", Kind.SOFT),   # mailbox full: passes with time
    (550, "5.4.5", Kind.SOFT),   # congestion
    (552, "5.3.4", Kind.HARD),   # message too big stays too big
    (354, "", Kind.SOFT),        # a positive intermediate reply where a final one was due
])
def test_classify(code, enhanced, kind):
    assert classify(code, enhanced) is kind


def test_bounce_class():  # site failures: tests/test_verdict.py (test_site_trouble)
    assert bounce_class(550, "5.1.1") == "address"
    assert bounce_class(552, "5.2.2") == "mailbox"
    assert bounce_class(550, "5.7.1") == "policy"
    assert bounce_class(421, "") == "network"


def test_retry_schedule():
    assert retries_allowed([]) == []
    assert retries_allowed([0]) == []
    assert retries_allowed([0.5, 2]) == [0.5, 2.0]
    assert next_retry(1, [30, 120], NOW) == NOW + timedelta(minutes=30)
    assert next_retry(2, [30, 120], NOW) == NOW + timedelta(minutes=120)
    assert next_retry(3, [30, 120], NOW) is None
    assert next_retry(1, [0], NOW) is None
    assert next_retry(1, [0.02], NOW) == NOW + timedelta(seconds=1.2)


def sent(a):
    return RcptOutcome.from_reply(a, 250, "2.0.0", "Ok", "body")


def hard(a):
    return RcptOutcome.from_reply(a, 550, "5.1.1", "No such user", "rcpt")


def soft(a):
    return RcptOutcome.from_reply(a, 451, "4.3.0", "Try later", "rcpt")


def test_manual_sample_one_recipient_done():
    msg = Message(id="P1576T1800C3@tom.lyris.com", mail_from="tmiddleton@lyris.com",
                  rcpt_to_send=["dwebster@lyris.com"], time_created=NOW, priority=0,
                  retry_time=NOW)
    res = record_attempt(msg, [sent("dwebster@lyris.com")], [30, 120], NOW)
    assert res.done and res.sent == ["dwebster@lyris.com"]
    assert msg.log[-1] == ("2000/12/22 16:29:00: Finished send attempt 1, sent to 1 of 1 "
                           "recipients, now done sending")
    assert msg.status == "done" and msg.send_tries == 1 and msg.time_finished == NOW
    assert msg.rcpt_sent == ["dwebster@lyris.com"] and msg.rcpt_to_send == []
    text = format_inf(msg).decode()
    assert "rcptsent=dwebster@lyris.com\n" in text and "status=done\n" in text
    assert parse_inf(format_inf(msg)).rcpt_sent == msg.rcpt_sent


def test_mixed_attempt_then_retries_then_give_up():
    msg = Message(id="m1@h", mail_from="a@b.test", rcpt_to_send=["s@x", "h@x", "t@y"],
                  time_created=NOW, priority=3)
    intervals = [0.5, 1]
    r1 = record_attempt(msg, [sent("s@x"), hard("h@x"), soft("t@y")], intervals, NOW)
    assert not r1.done
    assert (r1.sent, r1.failed, r1.deferred) == (["s@x"], ["h@x"], ["t@y"])
    assert msg.rcpt_to_send == ["t@y"] and msg.rcpt_transient == ["t@y"]
    assert msg.rcpt_failed == ["h@x"] and msg.rcpt_sent == ["s@x"]
    assert msg.retry_time == NOW + timedelta(seconds=30) == r1.retry_at
    assert msg.priority == 4 and msg.send_tries == 1 and msg.status == "retry"
    assert "Finished send attempt 1, sent to 1 of 3 recipients, 1 failed permanently, " \
           "1 failed temporarily, next try at 2000/12/22 16:29:30" in msg.log[-1]

    t2 = NOW + timedelta(seconds=30)
    r2 = record_attempt(msg, [soft("t@y")], intervals, t2)
    assert not r2.done and msg.retry_time == t2 + timedelta(minutes=1) and msg.priority == 5

    t3 = t2 + timedelta(minutes=1)
    r3 = record_attempt(msg, [soft("t@y")], intervals, t3)
    assert r3.done and r3.gave_up == ["t@y"]
    assert msg.rcpt_to_send == [] and msg.rcpt_transient == []
    assert msg.rcpt_failed == ["h@x", "t@y"] and msg.send_tries == 3 and msg.status == "done"
    assert msg.log[-1].endswith("sent to 1 of 3 recipients, 1 still failing after the last "
                                "retry, given up, now done sending")


def test_no_retries_fails_at_once():
    for intervals in ([], [0]):
        msg = Message(id="m@h", mail_from="a@b", rcpt_to_send=["t@y"], time_created=NOW)
        res = record_attempt(msg, [soft("t@y")], intervals, NOW)
        assert res.done and res.gave_up == ["t@y"] and msg.rcpt_failed == ["t@y"]


def test_retry_succeeds():
    msg = Message(id="m@h", mail_from="a@b", rcpt_to_send=["t@y"], time_created=NOW)
    record_attempt(msg, [soft("t@y")], [1], NOW)
    res = record_attempt(msg, [sent("t@y")], [1], NOW + timedelta(minutes=1))
    assert res.done and msg.rcpt_sent == ["t@y"] and msg.rcpt_transient == []
    assert msg.log[-1].endswith("Finished send attempt 2, sent to 1 of 1 recipients, "
                                "now done sending")


def test_interrupted_recipients_stay_without_penalty():
    msg = Message(id="m@h", mail_from="a@b", rcpt_to_send=["s@x", "u@y"], time_created=NOW)
    res = record_attempt(msg, [sent("s@x")], [1], NOW, interrupted=["u@y"])
    assert not res.done and msg.rcpt_to_send == ["u@y"] and msg.retry_time == NOW
    assert msg.rcpt_transient == []
    # nothing attempted at all: no try counted
    msg2 = Message(id="m2@h", mail_from="a@b", rcpt_to_send=["u@y"], time_created=NOW)
    record_attempt(msg2, [], [1], NOW, interrupted=["u@y"])
    assert msg2.send_tries == 0 and msg2.rcpt_to_send == ["u@y"] and msg2.log == []


def test_priority_caps_at_99():
    msg = Message(id="m@h", mail_from="a@b", rcpt_to_send=["t@y"], time_created=NOW, priority=99)
    record_attempt(msg, [soft("t@y")], [1], NOW)
    assert msg.priority == 99


def test_the_retry_plan_is_looked_up_only_for_a_soft_failure(monkeypatch):
    """record_attempt asks next_retry only when a recipient failed softly (once per attempt)."""
    import mailengine.outcome as outcome_mod
    calls = []
    real = outcome_mod.next_retry
    monkeypatch.setattr(outcome_mod, "next_retry", lambda *a: calls.append(a) or real(*a))
    now = datetime(2026, 3, 3, 10, 0, 0)
    m = Message(id="x", mail_from="a@b.test", rcpt_to_send=["s@d.test", "h@d.test"])
    res = outcome_mod.record_attempt(m, [RcptOutcome("s@d.test", Kind.SENT, 250),
                                         RcptOutcome("h@d.test", Kind.HARD, 550)], [5], now)
    assert calls == [] and res.done and res.failed == ["h@d.test"]
    m = Message(id="y", mail_from="a@b.test", rcpt_to_send=["p@d.test", "q@d.test"])
    res = outcome_mod.record_attempt(m, [RcptOutcome("p@d.test", Kind.SOFT, 451),
                                         RcptOutcome("q@d.test", Kind.SOFT, 452)], [5], now)
    assert len(calls) == 1 and res.deferred == ["p@d.test", "q@d.test"]
    assert res.retry_at == now + timedelta(minutes=5) == m.retry_time


def test_the_retry_plan_is_made_only_for_a_soft_failure():
    from datetime import datetime

    from mailengine.envelope import Message
    from mailengine.outcome import Kind, RcptOutcome, record_attempt
    asked: list[int] = []

    def plan() -> list[float]:
        asked.append(1)
        return [10.0]
    now = datetime(2026, 12, 5, 10, 0, 0)
    m = Message(id="P", mail_from="a@b.test", rcpt_to_send=["x@d.test", "y@d.test"])
    res = record_attempt(m, [RcptOutcome("x@d.test", Kind.SENT, 250, "2.0.0", "ok", "data"),
                             RcptOutcome("y@d.test", Kind.HARD, 550, "5.1.1", "no", "rcpt")],
                         plan, now)
    assert not asked and res.done  # sent and failed for good: no retry to plan
    m = Message(id="Q", mail_from="a@b.test", rcpt_to_send=["y@d.test"])
    res = record_attempt(m, [RcptOutcome("y@d.test", Kind.SOFT, 451, "4.3.0", "later",
                                         "rcpt")], plan, now)
    assert asked == [1] and res.deferred == ["y@d.test"]
    assert m.retry_time == datetime(2026, 12, 5, 10, 10, 0)
