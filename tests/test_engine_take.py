"""app.Engine.take: hand-offs between intake, the memory limit and delivery (in process)."""
import asyncio
import datetime
import os
import time

import pytest

from mailengine.app import Engine
from mailengine.config import from_dict
from mailengine.envelope import Message


def _engine(home, limits=None):
    cfg = from_dict(home, {"limits": {"messages_in_memory": 1, **(limits or {})},
                           "network": {"smtp_port": 1, "web_port": 0},
                           "queue": {"relay_via_disk": False}})
    eng = Engine(cfg)
    eng.spool.ensure_dirs()
    return eng


def _msg(rcpt):
    now = datetime.datetime.now().replace(microsecond=0)
    return Message(id="", mail_from="a@src.test", rcpt_to_send=[rcpt], time_created=now,
                   retry_time=now)


def test_mail_stored_into_working_then_put_in_the_backlog_is_taken_in_again(tmp_path):
    async def main():
        eng = _engine(tmp_path)
        assert eng.relay_dir() == "working"  # room: intake stores both into working/
        first, second = _msg("b@dest.test"), _msg("c@dest.test")
        await eng.spool.store(first, b"Subject: 1\r\n\r\nx\r\n", "working")
        await eng.spool.store(second, b"Subject: 2\r\n\r\nx\r\n", "working")
        eng.stored(first, False, "working", b"x")
        eng.stored(second, False, "working", b"x")  # memory is full by now: the backlog
        assert second.id in eng.ledger.backlog and second.id not in eng.ledger.entries
        # it waits where intake put it: no rename out of working/ and back in
        assert (tmp_path / "mailq" / "working" / f"{second.id}.inf").exists()
        assert eng.ledger.disk_where(second.id) == "working"
        assert eng.scan_dropins() == 0  # the drop-in scan leaves backlog mail alone
        assert not await eng._load_backlog_batch()  # due, but no room and nothing to evict
        eng.ledger.finish(first.id)  # room again: the backlog loads it, from working/
        assert await eng._load_backlog_batch()
        assert second.id in eng.ledger.entries and not eng.ledger.backlog
        assert eng.ledger.get(second.id).where == "working"  # its first unit moves nothing
        eng.spool.close()
    asyncio.run(main())


def test_a_worker_message_that_cannot_be_read_in_working_waits_in_retry(tmp_path):
    async def main():
        eng = _engine(tmp_path)
        m = _msg("b@dest.test")
        await eng.spool.store(m, b"Subject: 1\r\n\r\nx\r\n", "working")
        inf = tmp_path / "mailq" / "working" / f"{m.id}.inf"
        inf.write_bytes(b"this is not an inf file\n")  # as if damaged between store and notice
        eng.worker_stored(f"W {m.id}")
        assert m.id not in eng.ledger.entries
        assert (tmp_path / "mailq" / "retry" / f"{m.id}.inf").exists()  # scanned, reported there
        assert not inf.exists()
        eng.spool.close()
    asyncio.run(main())


def test_housekeeping_loops_survive_file_system_errors(tmp_path, monkeypatch):
    """The scan and expiry loops run in the engine's TaskGroup: an OSError there (EMFILE under
    load, an odd entry in done/) must be logged, not end the whole engine."""
    real_sleep = asyncio.sleep

    async def fast_sleep(seconds, *a, **kw):
        await real_sleep(0.01)

    async def main():
        eng = _engine(tmp_path, {})
        eng.cfg.set("queue.save_done", True)
        eng.cfg.set("queue.done_retention_minutes", 1)
        # the scan's wait re-reads its interval every second at most (a change applies at
        # once): a short one, so that the fast sleeps below make several scans
        eng.cfg.set("queue.queue_check_interval", 0.5)
        calls = []

        def no_fds(known):
            calls.append(1)
            raise OSError(24, "Too many open files")
        monkeypatch.setattr(eng.spool, "scan_dropins", no_fds)
        odd = tmp_path / "mailq" / "done" / "odd.inf"  # a directory: unlink() fails on it
        odd.mkdir()
        os.utime(odd, (1, 1))
        monkeypatch.setattr(asyncio, "sleep", fast_sleep)
        tasks = [asyncio.ensure_future(c()) for c in (eng._scan_dropins, eng._expire)]
        await real_sleep(0.3)
        assert len(calls) > 1
        for t in tasks:
            assert not t.done(), t.exception()
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        eng.spool.close()
    asyncio.run(main())


def test_backlog_mail_that_cannot_be_read_for_now_stays_in_the_backlog(tmp_path, monkeypatch):
    async def main():
        eng = _engine(tmp_path)
        msgs = [_msg(f"r{i}@dest.test") for i in range(3)]
        for m in msgs:
            await eng.spool.store(m, b"Subject: x\r\n\r\nx\r\n", "retry")
            eng.take(m, "retry")  # one in memory, two in the backlog
        assert len(eng.ledger.backlog) == 2
        eng.ledger.finish(msgs[0].id)  # room
        real_load = eng.spool.load

        def no_fds(*a, **kw):
            raise OSError(24, "Too many open files")
        monkeypatch.setattr(eng.spool, "load", no_fds)
        try:
            await eng._load_backlog_batch()
        except OSError:
            pass
        else:
            raise AssertionError("the loop must see the error (it logs it)")
        assert len(eng.ledger.backlog) == 2  # kept, looked at again later, not dropped
        failed = next(m.id for m in msgs[1:] if eng.ledger.backlog.due(m.id) > time.time())
        monkeypatch.setattr(eng.spool, "load", real_load)
        assert await eng._load_backlog_batch()  # the other one, still due, is loaded
        assert failed in eng.ledger.backlog and failed not in eng.ledger.entries
        eng.spool.close()
    asyncio.run(main())


def test_mail_taken_during_a_stop_waits_in_the_backlog_and_the_index(tmp_path):
    """While delivery stops it takes nothing; what intake or the loader hands over meanwhile
    must be in the index the stop writes, or the next start would not see it."""
    from mailengine.backlog import Backlog

    async def main():
        eng = _engine(tmp_path, {"messages_in_memory": 10})
        m = _msg("b@dest.test")
        await eng.spool.store(m, b"Subject: x\r\n\r\nx\r\n", "retry")
        eng.stopping.set()
        assert not eng.take(m, "retry") and m.id in eng.ledger.backlog and m.id not in eng.ledger.entries
        assert not await eng._load_backlog_batch()  # the loader stands still
        eng.save_backlog_index()
        assert m.id in dict(Backlog.parse_index(Backlog.take_index(tmp_path / "mailq")))
        eng.spool.close()
    asyncio.run(main())


def test_a_held_message_in_the_index_is_read_again_at_start(tmp_path):
    """An index cannot see an .inf released in place while the engine was stopped: a held
    entry is read once (due now) instead of waiting on disk until some later start."""
    async def main():
        eng = _engine(tmp_path)
        await eng._read_index(["held P1T1C1@a", "1700000000.0 P2T2C2@a"])
        assert eng.ledger.backlog.due("P1T1C1@a") == 0.0 and eng.ledger.backlog.due("P2T2C2@a") == 1.7e9
        eng.spool.close()
    asyncio.run(main())


def test_a_worker_line_carries_the_envelope_so_the_inf_is_not_read_back(tmp_path):
    from mailengine.workers import envelope_line

    async def main():
        eng = _engine(tmp_path, {"messages_in_memory": 10})
        m = _msg("c@dest.test")
        await eng.spool.store(m, b"Subject: 1\r\n\r\nx\r\n", "working")
        inf = tmp_path / "mailq" / "working" / f"{m.id}.inf"
        inf.rename(inf.with_suffix(".aside"))  # only the line can say what the message is
        eng.worker_stored(envelope_line(m, "working").rstrip("\n"))
        inf.with_suffix(".aside").rename(inf)
        e = eng.ledger.get(m.id)
        assert e is not None and e.where == "working"
        assert e.msg.rcpt_to_send == ["c@dest.test"] and e.msg.size == m.size
        # a garbled envelope: the .inf is read as before
        m2 = _msg("d@dest.test")
        await eng.spool.store(m2, b"Subject: 2\r\n\r\ny\r\n", "working")
        eng.worker_stored(f"W {m2.id} not-base64!")
        assert eng.ledger.get(m2.id).msg.rcpt_to_send == ["d@dest.test"]
        eng.spool.close()
    asyncio.run(main())


def test_a_huge_envelope_is_not_sent_on_the_line_the_inf_is_read_instead(tmp_path):
    from mailengine.workers import ENVELOPE_MAX, envelope_line

    async def main():
        eng = _engine(tmp_path, {"messages_in_memory": 10})
        m = _msg("r0@dest.test")
        m.rcpt_to_send = [f"r{i}@dest.test" for i in range(1000)]
        m.dsn_rcpt = {a: {"orcpt": "rfc822;" + "o" * 1800 + a} for a in m.rcpt_to_send}
        await eng.spool.store(m, b"Subject: 1\r\n\r\nx\r\n", "working")
        line = envelope_line(m, "working")
        assert line == f"W {m.id}\n" and len(line) < ENVELOPE_MAX
        eng.worker_stored(line.rstrip("\n"))
        assert len(eng.ledger.get(m.id).msg.rcpt_to_send) == 1000
        eng.spool.close()
    asyncio.run(main())


def test_the_notification_pipe_has_room_for_a_thousand_envelopes():
    import fcntl
    import os

    from mailengine.workers import PIPE_SIZE, notification_pipe
    r, w = notification_pipe()
    try:
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) >= PIPE_SIZE
    finally:
        os.close(r)
        os.close(w)


def test_an_overlong_notification_line_is_dropped_and_the_next_ones_are_read():
    from mailengine.workers import LINE_LIMIT, WorkerPool

    async def main():
        got: list[str] = []
        pool = WorkerPool.__new__(WorkerPool)  # only what _read_lines uses
        pool.on_line, pool._up, pool._conns = got.append, {}, {}
        pool._slot_of, pool._ended_totals, pool.session_slots = {}, [0, 0], None
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        reader.feed_data(b"R " + b"x" * (LINE_LIMIT + 10) + b"\nR after\n")
        reader.feed_eof()
        await pool._read_lines(reader, 1)
        assert got == ["R after"]
    asyncio.run(main())


def test_queue_commands_run_one_at_a_time_and_never_share_a_message(tmp_path):
    from mailengine import queueops

    async def main():
        eng = _engine(tmp_path, {"messages_in_memory": 10})
        m = _msg("e@dest.test")
        await eng.spool.store(m, b"Subject: 1\r\n\r\nx\r\n", "retry")
        eng.take(m, "retry")
        write = eng.spool.update_inf

        async def slow_write(msg, where):  # a slow disk: the first command holds m a while
            await asyncio.sleep(0.2)
            await write(msg, where)
        eng.spool.update_inf = slow_write
        hold, release = await asyncio.gather(queueops.engine_apply(eng, "hold", [m.id]),
                                             queueops.engine_apply(eng, "release", [m.id]))
        assert hold["done"] == [m.id] and release["done"] == [m.id]  # one after the other
        assert not hold["skipped"] and not release["skipped"]
        e = eng.ledger.get(m.id)
        assert e.state == "waiting" and m.id in eng.delivery.sched  # the last word: release
        eng.spool.close()
    asyncio.run(main())


def test_a_message_taken_out_by_a_queue_command_is_not_taken_sent_or_evicted(tmp_path):
    from mailengine.ledger import LedgerError

    async def main():
        eng = _engine(tmp_path, {"messages_in_memory": 10})
        d, ledger = eng.delivery, eng.ledger
        m = _msg("f@dest.test")
        m.held = True
        await eng.spool.store(m, b"Subject: 1\r\n\r\nx\r\n", "retry")
        eng.take(m, "retry")
        taken, _ = d.take_for_change([m.id])
        again, skipped = d.take_for_change([m.id])  # a second command meanwhile
        assert taken == [m] and not again and "another queue command" in skipped[m.id]
        assert d.evict(10, 0.0) == 0 and m.id in ledger.entries  # held, but being changed
        with pytest.raises(LedgerError):
            ledger.claim(ledger.get(m.id), object())
        m.held = False
        d.put_back(m)
        assert ledger.get(m.id).state == "waiting" and m.id in d.sched
        # a backlog message deleted by a command is gone from the backlog too
        ledger.keep_on_disk("gone@x", 5.0)
        eng.withdraw_from_backlog(Message(id="gone@x", mail_from="", rcpt_to_send=["a@b"]))
        d.forget_message("gone@x")
        assert "gone@x" not in ledger and ledger.total == 1
        eng.spool.close()
    asyncio.run(main())


def test_eviction_walks_memory_only_when_held_or_later_mail_came_in(tmp_path):
    async def main():
        eng = _engine(tmp_path, {"messages_in_memory": 100})
        d = eng.delivery
        for i in range(5):
            m = _msg(f"n{i}@dest.test")  # all due now
            await eng.spool.store(m, b"Subject: x\r\n\r\nx\r\n", "retry")
            eng.take(m, "retry")
        walked: list[str] = []
        due = d.sched.due
        d.sched.due = lambda mid: (walked.append(mid), due(mid))[1]
        assert d.evict(10, time.time() + 60) == 0 and len(walked) == 5  # a fruitless walk
        assert d.evict(10, time.time() + 60) == 0 and len(walked) == 5  # not again
        later = _msg("later@dest.test")
        later.retry_time = later.retry_time + datetime.timedelta(hours=1)  # deferred mail
        await eng.spool.store(later, b"Subject: x\r\n\r\nx\r\n", "retry")
        eng.take(later, "retry")
        assert d.evict(10, time.time() + 60) == 1 and later.id in eng.ledger.backlog
        eng.spool.close()
    asyncio.run(main())


def test_a_stop_moves_backlog_mail_kept_in_working_to_retry_for_the_index(tmp_path):
    from mailengine.backlog import Backlog

    async def main():
        eng = _engine(tmp_path)  # room for one message
        msgs = [_msg(f"s{i}@dest.test") for i in range(3)]
        for m in msgs:
            await eng.spool.store(m, b"Subject: 1\r\n\r\nx\r\n", "working")
            eng.stored(m, False, "working", b"x")
        assert len(eng.ledger.backlog) == 2 and eng.ledger.on_disk_in_working()
        await eng.delivery.stop()
        assert not list((tmp_path / "mailq" / "working").glob("*.inf"))  # all in retry/
        assert len(list((tmp_path / "mailq" / "retry").glob("*.inf"))) == 3
        assert not eng.ledger.on_disk_in_working()
        eng.save_backlog_index()
        assert {m.id for m in msgs} == set(dict(Backlog.parse_index(
            Backlog.take_index(tmp_path / "mailq"))))
        eng.spool.close()
    asyncio.run(main())
