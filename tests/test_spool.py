"""The spool: store (durable, group commit, memory mode), moves, recovery per docs/QUEUE.md
state, drop-in scans, expiry and ids."""
from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import re
import time
from pathlib import Path

import pytest

from mailengine import spool as spool_mod
from mailengine.envelope import InfError, Message, format_inf, parse_inf
from mailengine.group_commit import STRATEGIES, _syncfs
from mailengine.queue_dirs import DIRS
from mailengine.spool import Spool

AVAILABLE = [s for s in STRATEGIES if s != "syncfs" or _syncfs is not None]


def aio(fn):
    """Run an async test in a fresh event loop (the project does not use pytest-asyncio)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))
    return wrapper


def msg(mid: str = "", rcpts=("rcpt@example.net",)) -> Message:
    return Message(id=mid, mail_from="sender@example.com", rcpt_to_send=list(rcpts))


def files(root: Path) -> dict[str, list[str]]:
    return {d: sorted(os.listdir(root / d)) for d in DIRS}


def put(root: Path, where: str, mid: str, *kinds: str, age: float = 0, data: bytes = b"x\r\n"):
    """Lay down a message's files by hand, as a crash or another program would leave them."""
    for kind in kinds:
        p = root / where / f"{mid}.{kind}"
        if kind == "dat":
            p.write_bytes(data)
        else:
            p.write_bytes(format_inf(msg(mid)))
        if age:
            t = time.time() - age
            os.utime(p, (t, t))


# ------------------------------------------------------------------ ids

def test_ids_look_like_the_manuals():
    s = Spool("/nonexistent", hostname="tom.lyris.com")
    ids = [s.new_id() for _ in range(1000)]
    assert all(re.fullmatch(rf"P{os.getpid()}T\d+C\d+@tom\.lyris\.com", i) for i in ids)
    assert len(set(ids)) == 1000


def test_hostname_is_made_safe_for_file_names():
    assert Spool("/x", hostname="a/b c,d").new_id().endswith("@a-b-c-d")


def _make_ids(n: int, q) -> None:
    s = Spool("/nonexistent", hostname="h.example")
    q.put([s.new_id() for _ in range(n)])


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_ids_unique_across_processes(method):
    ctx = multiprocessing.get_context(method)
    q = ctx.Queue()
    procs = [ctx.Process(target=_make_ids, args=(5000, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    mine = [Spool("/x", hostname="h.example").new_id() for _ in range(5000)]
    all_ids = got[0] + got[1] + mine
    assert len(set(all_ids)) == 15000


# ------------------------------------------------------------------ store

@pytest.mark.parametrize("strategy", AVAILABLE)
@aio
async def test_durable_store_writes_exact_bytes_and_inf(tmp_path, strategy):
    s = Spool(tmp_path / "mailq", strategy=strategy, hostname="h")
    s.ensure_dirs()
    data = b"Subject: x\r\n\r\nbody \x00\xff bytes\r\n"
    m = msg(s.new_id())
    await s.store(m, data, "working")
    assert (tmp_path / "mailq/working" / f"{m.id}.dat").read_bytes() == data
    assert s.load(m.id, "working") == Message(**{**m.__dict__, "size": len(data)})
    assert files(tmp_path / "mailq")["working"] == [f"{m.id}.dat", f"{m.id}.inf"]  # no .tmp
    assert s.flushes >= 1 and s.stores == 1
    s.close()


@aio
async def test_memory_mode_store_never_syncs(tmp_path):
    s = Spool(tmp_path / "mailq", durable=False)
    s.ensure_dirs()
    m = msg()
    await s.store(m, b"data\r\n")
    assert m.id and s.read_data(m.id, "retry") == b"data\r\n"
    assert s.load(m.id, "retry").rcpt_to_send == ["rcpt@example.net"]
    assert s.flushes == 0 and s._commit._thread is None
    s.close()


@pytest.mark.parametrize("strategy", AVAILABLE)
@aio
async def test_concurrent_stores_share_flushes(tmp_path, strategy):
    s = Spool(tmp_path / "mailq", strategy=strategy, hostname="h")
    s.ensure_dirs()
    n = 200
    bodies = {i: os.urandom(4096) for i in range(n)}
    msgs = {i: msg(s.new_id(), [f"r{i}@example.net"]) for i in range(n)}
    await asyncio.gather(*(s.store(msgs[i], bodies[i], "retry") for i in range(n)))
    for i in range(n):
        assert s.read_data(msgs[i].id, "retry") == bodies[i]
        assert s.load(msgs[i].id, "retry").rcpt_to_send == [f"r{i}@example.net"]
    assert s.stores == n
    assert 1 <= s.flushes <= n // 4, f"{s.flushes} flushes for {n} stores: no group commit"
    assert not [f for f in os.listdir(tmp_path / "mailq/retry") if f.endswith(".tmp")]
    s.close()


@aio
async def test_store_takes_a_new_id_when_the_id_is_taken(sp, tmp_path):
    taken = sp.new_id()
    put(sp.root, "retry", taken, "dat", data=b"older message")
    m = msg(taken)
    await sp.store(m, b"new message")
    assert m.id != taken
    assert sp.read_data(taken, "retry") == b"older message"  # never overwritten
    assert sp.read_data(m.id, "retry") == b"new message"
    assert parse_inf((sp.root / "retry" / f"{m.id}.inf").read_bytes()).id == m.id


@aio
async def test_the_id_given_up_after_a_collision_can_still_be_a_dropin(sp):
    taken = sp.new_id()
    put(sp.root, "retry", taken, "dat")  # a program dropping mail in: .dat first ...
    m = msg(taken)
    await sp.store(m, b"new message")
    assert m.id != taken
    put(sp.root, "retry", taken, "inf")  # ... then its .inf: the scan must see it
    found, _ = sp.scan_dropins({m.id})
    assert [f.id for f in found] == [taken]
    assert not sp._inflight


@aio
async def test_store_of_an_unwritable_record_leaves_nothing(sp):
    with pytest.raises(InfError):
        await sp.store(msg(sp.new_id(), ["not-an-address"]), b"data")
    assert files(sp.root)["retry"] == []


@aio
async def test_store_failing_its_flush_leaves_nothing(sp, monkeypatch):
    def broken_sync(batch, renamed):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(sp._commit, "_sync", broken_sync)
    with pytest.raises(OSError, match="Input/output"):
        await sp.store(msg(sp.new_id()), b"data")
    assert files(sp.root)["retry"] == []  # no 250, and nothing left to deliver


@aio
async def test_a_store_in_flight_is_not_a_dropin(sp):
    m = msg(sp.new_id())
    task = asyncio.ensure_future(sp.store(m, b"data"))
    await asyncio.sleep(0)  # the files are written, the flush is pending
    assert m.id in sp._inflight
    for _ in range(200):
        found, _ = sp.scan_dropins(set())
        assert m.id not in [f.id for f in found] or task.done()
        if task.done():
            break
        await asyncio.sleep(0.001)
    await task
    assert m.id not in sp._inflight


# ------------------------------------------------------------------ update, move, remove

@pytest.mark.parametrize("flush", [False, True])
@aio
async def test_update_inf_replaces_atomically(sp, flush):
    m = msg(sp.new_id())
    await sp.store(m, b"data", "working")
    m.rcpt_sent, m.rcpt_to_send, m.send_tries, m.status = m.rcpt_to_send, [], 1, "done"
    before = sp.flushes
    await sp.update_inf(m, "working", flush=flush)
    got = sp.load(m.id, "working")
    assert (got.rcpt_sent, got.rcpt_to_send, got.status) == (["rcpt@example.net"], [], "done")
    assert files(sp.root)["working"] == [f"{m.id}.dat", f"{m.id}.inf"]
    assert (sp.flushes > before) == flush


@aio
async def test_move_and_remove(sp):
    m = msg(sp.new_id())
    await sp.store(m, b"data", "working")
    sp.move(m.id, "working", "done")
    assert files(sp.root)["working"] == [] and len(files(sp.root)["done"]) == 2
    sp.remove(m.id, "done")
    assert files(sp.root)["done"] == []
    sp.remove(m.id, "done")  # removing twice is harmless


@aio
async def test_move_finishes_a_half_done_move(sp):
    m = msg(sp.new_id())
    await sp.store(m, b"data", "working")
    os.rename(sp.dat_path(m.id, "working"), sp.dat_path(m.id, "retry"))  # crashed after step 1
    sp.move(m.id, "working", "retry")
    assert files(sp.root)["retry"] == [f"{m.id}.dat", f"{m.id}.inf"]
    with pytest.raises(FileNotFoundError):
        sp.move("P0T0C0@nothing", "retry", "working")


@aio
async def test_sync_barrier_flushes(sp):
    await sp.sync()
    assert sp.flushes == 1


def test_load_without_dat_is_an_inferror(sp):
    put(sp.root, "retry", "A@h", "inf")
    with pytest.raises(InfError, match="missing"):
        sp.load("A@h", "retry")


# ------------------------------------------------------------------ recovery (docs/QUEUE.md)

OLD = 3 * 3600  # seconds: older than every age threshold in recovery


@pytest.mark.parametrize("where", ["working", "done", "incoming"])
def test_state2_lone_dat_outside_retry_is_removed(sp, where):
    put(sp.root, where, "A@h", "dat")
    rep = sp.recover()
    assert files(sp.root)[where] == [] and rep.removed_uncommitted == 1


def test_state3_lone_dat_in_retry_is_kept_and_warned_about_only_when_old(sp):
    put(sp.root, "retry", "Young@h", "dat")
    put(sp.root, "retry", "Old@h", "dat", age=OLD)
    rep = sp.recover()
    assert files(sp.root)["retry"] == ["Old@h.dat", "Young@h.dat"]
    assert len(rep.warnings) == 1 and "Old@h.dat has no .inf" in rep.warnings[0]


@pytest.mark.parametrize("where", DIRS)
def test_state4_uncommitted_store_is_removed(sp, where):
    put(sp.root, where, "A@h", "dat", "inf.tmp")
    rep = sp.recover()
    assert files(sp.root)[where] == [] and rep.messages == []
    assert rep.removed_uncommitted == 1


def test_state5_stale_update_tmp_is_removed_and_old_inf_stands(sp):
    put(sp.root, "retry", "A@h", "dat", "inf")
    (sp.root / "retry/A@h.inf.tmp").write_bytes(b"mailfrom=half writ")
    rep = sp.recover()
    assert files(sp.root)["retry"] == ["A@h.dat", "A@h.inf"]
    assert [m.id for m in rep.messages] == ["A@h"] and rep.removed_stale_tmp == 1


def test_state6_lone_tmp_is_removed(sp):
    put(sp.root, "working", "A@h", "inf.tmp")
    sp.recover()
    assert files(sp.root)["working"] == []


def test_state7_valid_pairs_in_retry_are_returned_broken_ones_warned_and_kept(sp):
    put(sp.root, "retry", "Good@h", "dat", "inf")
    put(sp.root, "retry", "Bad@h", "dat")
    (sp.root / "retry/Bad@h.inf").write_bytes(b"this is not an inf file\n")
    rep = sp.recover()
    assert [m.id for m in rep.messages] == ["Good@h"]
    assert rep.messages[0].size == 3
    assert len(rep.warnings) == 1 and "Bad@h.inf" in rep.warnings[0]
    assert "no '='" in rep.warnings[0]
    assert files(sp.root)["retry"] == ["Bad@h.dat", "Bad@h.inf", "Good@h.dat", "Good@h.inf"]


def test_state8_working_goes_back_to_retry(sp):
    put(sp.root, "working", "A@h", "dat", "inf")
    rep = sp.recover()
    assert files(sp.root)["working"] == [] and files(sp.root)["retry"] == ["A@h.dat", "A@h.inf"]
    assert [m.id for m in rep.messages] == ["A@h"] and rep.moved_from_working == 1


def test_state8_working_never_overwrites_retry(sp):
    put(sp.root, "working", "A@h", "dat", "inf", data=b"working copy")
    put(sp.root, "retry", "A@h", "dat", "inf", data=b"retry copy")
    rep = sp.recover()
    assert sp.read_data("A@h", "retry") == b"retry copy"
    assert files(sp.root)["working"] == ["A@h.dat", "A@h.inf"]
    assert any("both working/ and retry/" in w for w in rep.warnings)


def test_state9_done_and_incoming_are_left_alone(sp):
    put(sp.root, "done", "A@h", "dat", "inf")
    put(sp.root, "incoming", "A@h", "dat", "inf")  # the same id in two places is normal
    put(sp.root, "retry", "A@h", "dat", "inf")
    rep = sp.recover()
    assert files(sp.root)["done"] == files(sp.root)["incoming"] == ["A@h.dat", "A@h.inf"]
    assert [m.id for m in rep.messages] == ["A@h"] and rep.warnings == []


@pytest.mark.parametrize("src, dst, final", [
    ("working", "done", "done"),
    ("working", "retry", "retry"),
    ("retry", "working", "retry"),  # finished to working/, which then goes back to retry/
    ("incoming", "done", "done"),
])
def test_state10_half_done_move_is_finished(sp, src, dst, final):
    put(sp.root, src, "A@h", "inf")
    put(sp.root, dst, "A@h", "dat")
    rep = sp.recover()
    assert files(sp.root)[final] == ["A@h.dat", "A@h.inf"]
    assert sum(len(v) for v in files(sp.root).values()) == 2
    assert rep.finished_moves == 1 and rep.warnings == []


def test_state11_inf_without_dat_in_retry_is_warned_and_kept(sp):
    put(sp.root, "retry", "A@h", "inf")
    rep = sp.recover()
    assert files(sp.root)["retry"] == ["A@h.inf"] and rep.messages == []
    assert len(rep.warnings) == 1 and "A@h.dat is missing" in rep.warnings[0]


def test_state12_inf_without_dat_in_working_moves_to_retry_and_is_warned(sp):
    put(sp.root, "working", "A@h", "inf")
    rep = sp.recover()
    assert files(sp.root)["retry"] == ["A@h.inf"] and files(sp.root)["working"] == []
    assert len(rep.warnings) == 1


def test_state13_inf_without_dat_in_done_is_warned_and_kept(sp):
    put(sp.root, "done", "A@h", "inf")
    rep = sp.recover()
    assert files(sp.root)["done"] == ["A@h.inf"] and len(rep.warnings) == 1


def test_state14_abandoned_private_dirs_are_removed(sp):
    old = sp.root / ".tmp-old"
    young = sp.root / ".tmp-young"
    for d in (old, young):
        d.mkdir()
        (d / "X@h.dat").write_bytes(b"x")
    t = time.time() - OLD
    os.utime(old, (t, t))
    rep = sp.recover()
    assert not old.exists() and young.exists() and rep.removed_tmpdirs == 1


def test_state15_other_files_are_never_touched(sp):
    for name in ("shutdown.txt", ".hidden.inf", "README", "notes.inf.bak"):
        (sp.root / "retry" / name).write_bytes(b"x")
        (sp.root / "working" / name).write_bytes(b"x")
    rep = sp.recover()
    assert rep.warnings == [] and rep.messages == []
    assert files(sp.root)["retry"] == files(sp.root)["working"] == sorted(
        [".hidden.inf", "README", "notes.inf.bak", "shutdown.txt"])


def test_recovery_creates_missing_directories(tmp_path):
    s = Spool(tmp_path / "new" / "mailq")
    rep = s.recover()
    assert rep.messages == [] and all((tmp_path / "new/mailq" / d).is_dir() for d in DIRS)


@aio
async def test_recovery_after_stores_and_moves_finds_every_acknowledged_message(sp):
    # a "crash" after a realistic mix: acknowledged messages in retry/ and working/, an
    # unacknowledged store, a half-done move
    acked = []
    for where in ("retry", "working", "working"):
        m = msg(sp.new_id())
        await sp.store(m, b"data " + m.id.encode(), where)
        acked.append(m.id)
    sp.move(acked[2], "working", "done")
    put(sp.root, "working", "Unacked@h", "dat", "inf.tmp")
    m = msg(sp.new_id())
    await sp.store(m, b"half moved", "working")
    os.rename(sp.dat_path(m.id, "working"), sp.dat_path(m.id, "retry"))
    sp.close()
    rep = Spool(sp.root).recover()
    assert sorted(x.id for x in rep.messages) == sorted([acked[0], acked[1], m.id])
    assert rep.warnings == []
    assert files(sp.root)["working"] == []


# ------------------------------------------------------------------ drop-ins

def test_scan_finds_unknown_dropins_only(sp):
    put(sp.root, "retry", "Known@h", "dat", "inf")
    put(sp.root, "retry", "New@h", "dat", "inf")
    found, warnings = sp.scan_dropins({"Known@h"})
    assert [m.id for m in found] == ["New@h"] and warnings == []


def test_scan_reports_broken_dropins_once_and_leaves_them(sp):
    put(sp.root, "retry", "NoDat@h", "inf", age=OLD)
    (sp.root / "retry/Garbage@h.inf").write_bytes(b"\x00\x01garbage")
    (sp.root / "retry/Garbage@h.dat").write_bytes(b"x")
    t = time.time() - OLD  # old enough not to be a file still being written
    os.utime(sp.root / "retry/Garbage@h.inf", (t, t))
    found, warnings = sp.scan_dropins(set())
    assert found == [] and len(warnings) == 2
    assert any("NoDat@h.inf" in w and "missing" in w for w in warnings)
    assert any("Garbage@h.inf" in w and "NUL" in w for w in warnings)
    assert sp.scan_dropins(set()) == ([], [])  # not again
    assert sorted(files(sp.root)["retry"]) == ["Garbage@h.dat", "Garbage@h.inf", "NoDat@h.inf"]
    # the late .dat arrives: picked up without any action on the warning
    (sp.root / "retry/NoDat@h.dat").write_bytes(b"late")
    found, warnings = sp.scan_dropins(set())
    assert [m.id for m in found] == ["NoDat@h"] and warnings == []
    # the garbage is fixed by hand: looked at afresh
    put(sp.root, "retry", "Garbage@h", "inf")
    found, _ = sp.scan_dropins({"NoDat@h"})
    assert [m.id for m in found] == ["Garbage@h"]


def test_recovery_warnings_are_not_repeated_by_scans(sp):
    (sp.root / "retry/Bad@h.inf").write_bytes(b"garbage\n")
    (sp.root / "retry/Bad@h.dat").write_bytes(b"x")
    assert len(sp.recover().warnings) == 1
    assert sp.scan_dropins(set()) == ([], [])


def test_scan_ignores_tmp_hidden_and_shutdown_files(sp):
    for name in ("A@h.inf.tmp", ".B@h.inf", "shutdown.txt", "C@h.dat"):
        (sp.root / "retry" / name).write_bytes(b"whatever")
    assert sp.scan_dropins(set()) == ([], [])


def test_scan_waits_for_an_inf_that_is_still_being_written(sp):
    put(sp.root, "retry", "A@h", "dat")
    (sp.root / "retry/A@h.inf").write_bytes(b"mailfrom=a@b.example\nrcpttosend=c@d.exa")
    assert sp.scan_dropins(set()) == ([], [])  # young, no final newline: not yet
    put(sp.root, "retry", "A@h", "inf")
    assert [m.id for m in sp.scan_dropins(set())[0]] == ["A@h"]


# ------------------------------------------------------------------ expiry and usage

@pytest.mark.parametrize("where", ["done", "incoming"])
def test_expire_removes_only_old_messages(sp, where):
    put(sp.root, where, "Old@h", "dat", "inf", age=2 * 3600)
    put(sp.root, where, "New@h", "dat", "inf")
    assert sp.expire(where, 0) == 0 and len(files(sp.root)[where]) == 4  # 0 = forever
    assert sp.expire(where, 60) == 1
    assert files(sp.root)[where] == ["New@h.dat", "New@h.inf"]


def test_expire_refuses_live_directories(sp):
    with pytest.raises(ValueError):
        sp.expire("retry", 60)


def test_usage_counts_messages_and_bytes(sp):
    put(sp.root, "retry", "A@h", "dat", "inf", data=b"12345")
    put(sp.root, "done", "B@h", "dat", "inf", data=b"123")
    u = sp.usage()
    assert u["retry"] == (1, 5) and u["done"] == (1, 3) and u["working"] == (0, 0)


def test_a_store_whose_hand_over_to_the_flusher_fails_is_answered_and_leaves_nothing(
        tmp_path, monkeypatch):
    sp = spool_mod.Spool(tmp_path / "mailq")
    sp.ensure_dirs()

    def no_fds():
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(sp._commit, "_start", no_fds)
    msg = Message(id="", mail_from="a@b.test", rcpt_to_send=["c@d.test"])

    async def main():
        with pytest.raises(OSError, match="Too many open files"):
            await asyncio.wait_for(sp.store(msg, b"Subject: x\r\n\r\nhi\r\n"), 5)
    asyncio.run(main())
    sp.close()
    assert not list((tmp_path / "mailq" / "retry").iterdir())


def test_load_reads_an_inf_of_any_length(sp):
    """Spool.load reads with os.read (spool._read_file), in pieces when it is long."""
    m = Message(id="", mail_from="a@example.com", rcpt_to_send=["b@example.net"],
                extra={"note": "x" * 200_000})
    asyncio.run(sp.store(m, b"Subject: x\r\n\r\nhi\r\n", "retry"))
    got = sp.load(m.id, "retry")
    assert got.extra["note"] == "x" * 200_000 and got.rcpt_to_send == ["b@example.net"]


@pytest.mark.parametrize("size", [0, 10, 65535, 65536, 65537, 3_000_000])
def test_files_are_read_whole_whatever_their_size(tmp_path, size):
    from mailengine.spool import _read_file
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    assert _read_file(str(tmp_path / "f")) == data
