"""The queue ledger (ledger.py) on its own: its moves, the table that allows them, the bytes it
keeps from intake, and a randomised run against a plain model of where each message is."""
from __future__ import annotations

import random
from datetime import datetime

import pytest

from mailengine.attempt import Attempt
from mailengine.envelope import Message
from mailengine.ledger import (CHANGING, HELD, SENDING, TRANSITIONS, WAITING, Ledger,
                               LedgerError)
from mailengine.queue_dirs import RETRY, WORKING


def msg(mid: str, held: bool = False) -> Message:
    m = Message(id=mid, mail_from="a@src.test", rcpt_to_send=["x@dst.test"],
                retry_time=datetime.now())
    m.held = held
    return m


def test_a_message_is_in_memory_on_disk_or_unknown():
    led = Ledger()
    led.admit(msg("m1"))
    led.keep_on_disk("m2", 5.0)
    assert "m1" in led and "m2" in led and "m3" not in led
    assert led.in_memory == 1 and len(led.backlog) == 1 and led.total == 2
    led.admit(msg("m2"))  # loaded from the backlog: off it
    assert "m2" not in led.backlog and led.in_memory == 2
    led.keep_on_disk("m1", 7.0)  # evicted
    assert "m1" not in led.entries and led.backlog.due("m1") == 7.0
    led.finish("m2")
    assert "m2" not in led and led.total == 1


def test_an_attempt_owns_its_message_until_it_is_over():
    led = Ledger()
    e = led.admit(msg("m1"))
    assert e.state == WAITING and e.where == RETRY
    att = Attempt(e.msg)
    led.claim(e, att)
    led.moved(e, WORKING)
    assert e.state == SENDING and led.sending == 1 and e.where == WORKING
    for change in (lambda: led.admit(msg("m1")), lambda: led.keep_on_disk("m1", 1.0),
                   lambda: led.claim(e, Attempt(e.msg))):
        with pytest.raises(LedgerError):
            change()
    assert e.attempt is att  # nothing changed by the refused moves
    led.moved(e, RETRY)
    led.attempt_over(e)
    assert e.state == WAITING and led.sending == 0
    with pytest.raises(LedgerError):
        led.attempt_over(e)


def test_held_messages_are_never_claimed_and_relayed_mail_keeps_its_place():
    led = Ledger()
    e = led.admit(msg("h", held=True))
    assert e.state == HELD
    with pytest.raises(LedgerError):
        led.claim(e, Attempt(e.msg))
    w = led.admit(msg("w"), WORKING)  # intake stored it straight into working/
    led.admit(msg("w"))  # a queue command's new envelope: the files have not moved
    assert w.where == WORKING and led.get("w") is w
    assert led.held() == 1


def test_a_message_that_cannot_be_recorded_stays_known_out_of_memory():
    led = Ledger()
    e = led.admit(msg("s"))
    led.claim(e, Attempt(e.msg))
    led.stuck("s")
    assert "s" in led and "s" not in led.entries and led.sending == 0


def test_bytes_from_intake_are_kept_within_the_limit_and_handed_over_once():
    led = Ledger(cache_limit=10)
    a, b = led.admit(msg("a")), led.admit(msg("b"))
    led.keep_data(a, b"123456")
    led.keep_data(b, b"123456")  # over the limit: the file is read instead
    assert a.data == b"123456" and b.data is None and led.cached_bytes == 6
    assert led.take_data(a) == b"123456" and led.take_data(a) is None
    assert led.cached_bytes == 0
    led.keep_data(b, b"12")
    led.finish("b")  # forgetting a message forgets its bytes
    assert led.cached_bytes == 0


def test_admit_refuses_a_directory_queued_mail_never_waits_in():
    with pytest.raises(LedgerError):
        Ledger().admit(msg("d"), "done")


def test_the_table_names_only_the_ledgers_methods():
    moves = set().union(*TRANSITIONS.values())
    assert all(callable(getattr(Ledger, m, None)) for m in moves)


@pytest.mark.parametrize("seed", range(20))
def test_random_moves_keep_the_ledger_and_a_plain_model_agreed(seed):
    """Any sequence of allowed moves: each message is in exactly one place, the counts add up,
    and a refused move changes nothing."""
    rnd = random.Random(seed)
    led = Ledger(cache_limit=50)
    model: dict[str, str] = {}  # id -> "memory" | "changing" | "sending" | "disk" | "stuck"
    ids = [f"m{i}" for i in range(8)]
    for _ in range(400):
        mid = rnd.choice(ids)
        where = model.get(mid)
        move = rnd.choice(["admit", "keep_on_disk", "claim", "attempt_over", "finish", "stuck",
                           "data", "take_out"])
        e = led.get(mid)
        try:
            if move == "admit":
                led.admit(msg(mid))
                assert where != "sending"
                model[mid] = "memory"
            elif move == "keep_on_disk":
                led.keep_on_disk(mid, rnd.random())
                assert where != "sending"
                model[mid] = "disk"
            elif move == "claim" and e is not None:
                led.claim(e, Attempt(e.msg))
                assert where == "memory"
                model[mid] = "sending"
            elif move == "take_out" and e is not None:
                led.take_out(e)
                assert where == "memory"
                model[mid] = "changing"
            elif move == "attempt_over" and e is not None:
                led.attempt_over(e)
                assert where == "sending"
                model[mid] = "memory"
            elif move == "finish":
                led.finish(mid)
                if where in ("memory", "changing", "sending", "disk"):
                    del model[mid]
            elif move == "stuck":
                led.stuck(mid)
                model[mid] = "stuck"
            elif move == "data" and e is not None:
                led.keep_data(e, b"x" * rnd.randint(1, 30))
        except LedgerError:
            pass  # refused: the model did not change either
        for i in ids:
            place = model.get(i)
            assert (i in led.entries) == (place in ("memory", "changing", "sending"))
            assert (i in led.backlog) == (place == "disk")
            assert (i in led) == (place is not None)
            if place in ("memory", "changing", "sending"):
                assert led.entries[i].state == {"sending": SENDING, "changing": CHANGING,
                                                "memory": WAITING}[place]
        assert led.sending == sum(1 for p in model.values() if p == "sending")
        assert led.cached_bytes == sum(len(x.data or b"") for x in led.entries.values()) <= 50


def test_mail_on_disk_only_remembers_whether_its_files_are_in_working():
    led = Ledger()
    led.keep_on_disk("w", 1.0, WORKING)  # relayed while memory was full: left in working/
    led.keep_on_disk("r", 1.0)
    assert led.disk_where("w") == WORKING and led.disk_where("r") == RETRY
    assert led.on_disk_in_working() == ["w"]
    led.moved_on_disk("w", RETRY)  # a stop moved it
    assert led.disk_where("w") == RETRY and not led.on_disk_in_working()
    led.keep_on_disk("w", 1.0, WORKING)
    e = led.admit(msg("w"), WORKING)  # loaded: in memory, files where they were
    assert e.where == WORKING and not led.on_disk_in_working()
    led.keep_on_disk("x", 1.0, WORKING)
    led.finish("x")  # deleted from disk: forgotten everywhere
    assert "x" not in led and not led.on_disk_in_working()
