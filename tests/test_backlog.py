"""backlog.py: the queue beyond limits.messages_in_memory, kept on disk by due time, and the
index a clean stop leaves so the next start reads no .inf before it delivers."""
import random
import smtplib
import subprocess
import sys
import time

from mailengine.backlog import HELD, INDEX_NAME, Backlog
from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.testing.sink import SinkScript, ThreadedSink


def test_pop_due_gives_the_earliest_first_and_skips_moved_and_discarded_ids():
    b = Backlog()
    rng = random.Random(7)
    dues = {f"m{i}": rng.uniform(0, 100) for i in range(300)}
    for mid, due in dues.items():
        b.add(mid, due)
    for mid in list(dues)[:50]:  # moved later: its old heap entry must not count
        dues[mid] += 1000
        b.add(mid, dues[mid])
    for mid in list(dues)[50:80]:
        b.discard(mid)
        del dues[mid]
    b.add("held", HELD)
    more = {f"n{i}": rng.uniform(0, 100) for i in range(300)}  # a start's bulk, then a push
    b.add_many(list(more.items()) + [("held2", HELD)])
    b.add("late", 1.0)
    dues.update(more, late=1.0)
    assert len(b) == len(dues) + 2 and "held" in b and b.held() == 2
    got = b.pop_due(50.0, 10_000)
    assert got == sorted((m for m, d in dues.items() if d <= 50), key=dues.get)
    assert b.next_due() == min(d for m, d in dues.items() if d > 50)
    rest = b.pop_due(10_000.0, 10_000)
    assert set(rest) | set(got) == set(dues) and "held" in b  # held: never due
    assert b.next_due() is None and len(b) == 2


def test_the_index_counts_only_while_retry_is_unchanged(tmp_path):
    (tmp_path / "retry").mkdir()
    Backlog.save(tmp_path, [("a@x", 5.0), ("b@x", HELD)])
    lines = Backlog.take_index(tmp_path)
    assert dict(Backlog.parse_index(lines + ["garbage", "x y@z"])) == {"a@x": 5.0, "b@x": HELD}
    assert not (tmp_path / INDEX_NAME).exists()  # read once: it describes that stop only
    assert Backlog.take_index(tmp_path) is None
    Backlog.save(tmp_path, [("a@x", 5.0)])
    time.sleep(0.01)
    (tmp_path / "retry" / "c@x.inf").write_text("dropped in while stopped\n")
    assert Backlog.take_index(tmp_path) is None  # retry/ changed since: not trusted


def _send(port, rcpt, subject="t"):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.sendmail("a@src.test", [rcpt], f"Subject: {subject}\r\n\r\nx\r\n")


def _status(home):
    return subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(home),
                           "status"], capture_output=True, text=True).stdout


def test_a_restart_reads_the_index_and_delivers_the_whole_queue(tmp_path):
    sink = ThreadedSink().start()
    try:
        settings = {"limits.messages_in_memory": 3,
                    "basic.dns_servers": [f"dest.test,mx.dest.test,MX,127.0.0.1:{sink.port}"]}
        with RunningEngine(tmp_path, settings) as eng:  # sending paused
            for i in range(8):
                _send(eng.smtp_port, f"r{i}@dest.test")
        index = (tmp_path / "mailq" / INDEX_NAME).read_text().splitlines()
        assert index[0].startswith("retry-mtime ") and len(index) == 9
        with RunningEngine(tmp_path, settings) as eng:
            assert not (tmp_path / "mailq" / INDEX_NAME).exists()
            wait_until(lambda: "queue     8 messages (3 in memory" in _status(tmp_path),
                       10, "3 of 8 in memory")
            out = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home",
                                  str(tmp_path), "queue", "list", "--messages"],
                                 capture_output=True, text=True).stdout
            assert sum(f"r{i}@dest.test" in out for i in range(8)) == 8, out  # all listed
            subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(tmp_path),
                            "config", "set", "queue.pause_sending", "false"], check=True,
                           capture_output=True)
            wait_until(lambda: len(sink.messages) == 8, 30, "all 8 at the sink")
    finally:
        sink.stop()


def test_held_mail_on_disk_only_is_listed_and_released(tmp_path):
    sink = ThreadedSink().start()
    try:
        settings = {"limits.messages_in_memory": 2,
                    "basic.dns_servers": [f"dest.test,mx.dest.test,MX,127.0.0.1:{sink.port}"]}
        with RunningEngine(tmp_path, settings) as eng:
            for i in range(5):
                _send(eng.smtp_port, f"r{i}@dest.test")
            cli = [sys.executable, "-m", "mailengine.cli", "--home", str(tmp_path), "queue"]
            out = subprocess.run(cli + ["hold", "all"], capture_output=True, text=True).stdout
            assert "5 messages held" in out, out
            assert "5 held" in _status(tmp_path)
            subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(tmp_path),
                            "config", "set", "queue.pause_sending", "false"], check=True,
                           capture_output=True)
            time.sleep(1.5)
            assert sink.messages == []  # held, in memory or on disk only
            out = subprocess.run(cli + ["release", "all"], capture_output=True, text=True).stdout
            assert "5 messages released" in out, out
            wait_until(lambda: len(sink.messages) == 5, 30, "all 5 at the sink")
    finally:
        sink.stop()


def test_mail_due_now_is_not_kept_waiting_by_deferred_mail_filling_memory(tmp_path):
    """Memory holds 2 messages; 4 were deferred for an hour by one destination. New mail to
    another destination is delivered at once: deferred messages give up their places."""
    slow = ThreadedSink(script=SinkScript(rcpt={"@slow.test": "450 4.2.0 Try again later"})).start()
    fast = ThreadedSink().start()
    try:
        settings = {"limits.messages_in_memory": 2, "queue.pause_sending": False,
                    "queue.retry_intervals": [60],
                    "basic.dns_servers": [f"slow.test,mx.slow.test,MX,127.0.0.1:{slow.port}",
                                          f"fast.test,mx.fast.test,MX,127.0.0.1:{fast.port}"]}
        with RunningEngine(tmp_path, settings) as eng:
            for i in range(4):
                _send(eng.smtp_port, f"s{i}@slow.test")
            wait_until(lambda: eng.read_output().count("deferred:") >= 4, 20, "4 deferrals")
            for i in range(3):
                _send(eng.smtp_port, f"f{i}@fast.test")
            wait_until(lambda: len(fast.messages) == 3, 15, "the new mail at its sink")
            assert "queue     4 messages" in _status(tmp_path)
    finally:
        slow.stop()
        fast.stop()


def test_recovery_with_the_index_lists_every_directory_but_retry(sp):
    """retry/ known from the index: not listed, only probed for ids found elsewhere; a message
    left in working/ still goes back to retry/ and is counted, a dead store's files go."""
    from mailengine.envelope import Message, format_inf
    import asyncio

    async def store(where):
        m = Message(id="", mail_from="a@src.test", rcpt_to_send=["b@dest.test"])
        await sp.store(m, b"Subject: x\r\n\r\nx\r\n", where)
        return m.id
    a, b = asyncio.run(store("retry")), asyncio.run(store("working"))
    dead = sp.root / "retry" / "P9T9C9@dead.inf.tmp"  # a store that never committed...
    dead.write_bytes(format_inf(Message(id="P9T9C9@dead", mail_from="x@y")))
    (sp.root / "working" / "P9T9C9@dead.dat").write_bytes(b"x")  # ...with its .dat elsewhere
    rep = sp.recover(load=False, retry_known=True)  # a: known from the index
    assert rep.ids == [b] and rep.moved_from_working == 1
    assert (sp.root / "retry" / f"{b}.inf").exists() and not dead.exists()
    full = sp.recover(load=False)  # the same answer from a full listing
    assert sorted(full.ids) == sorted([a, b])
