"""Spare files (mailengine/spare.py): delivered messages' files are reused by later stores, never
over an existing file, within bounds, across processes, and invisible to recovery."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from mailengine.envelope import Message, parse_inf
from mailengine.spare import SparePool, rename_noreplace
from mailengine.spool import Spool


def msg(mid: str = "") -> Message:
    return Message(id=mid, mail_from="sender@example.com", rcpt_to_send=["rcpt@example.net"])


def spares(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if not p.name.startswith(".")]  # not .new/


def inodes(d: Path) -> set[int]:
    return {p.stat().st_ino for p in spares(d)}


def store(sp: Spool, m: Message, data: bytes, where: str = "working") -> None:
    asyncio.run(sp.store(m, data, where))


def test_rename_noreplace_never_replaces(tmp_path):
    (tmp_path / "a").write_bytes(b"spare")
    (tmp_path / "b").write_bytes(b"a message")
    with pytest.raises(FileExistsError):
        rename_noreplace(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"a message"
    rename_noreplace(str(tmp_path / "a"), str(tmp_path / "c"))
    assert (tmp_path / "c").read_bytes() == b"spare" and not (tmp_path / "a").exists()


def test_delivered_files_are_reused_by_the_next_store_and_cut_to_size(sp):
    spare = sp.root / "spare"
    big = msg()
    store(sp, big, b"X" * 9000 + b"\r\n")
    old_dat = (sp.root / "working" / f"{big.id}.dat").stat().st_ino
    old_inf = (sp.root / "working" / f"{big.id}.inf").stat().st_ino
    sp.recycle([big.id], "working")
    assert not list((sp.root / "working").iterdir())
    assert len(spares(spare)) == 2
    kept = inodes(spare)

    small = msg()
    data = b"Subject: short\r\n\r\nhi\r\n"
    store(sp, small, data)
    assert not spares(spare)  # both files taken: no inode was allocated
    dat, inf = sp.root / "working" / f"{small.id}.dat", sp.root / "working" / f"{small.id}.inf"
    assert {dat.stat().st_ino, inf.stat().st_ino} == kept
    # each kind reused as its kind: a .dat cut down to an .inf would free a block and wait
    assert (dat.stat().st_ino, inf.stat().st_ino) == (old_dat, old_inf)
    assert dat.read_bytes() == data  # the longer old content is gone
    got = parse_inf(inf.read_bytes(), small.id)
    assert got.id == small.id and got.rcpt_to_send == ["rcpt@example.net"]
    assert sp.spare.taken == 2 and sp.spare.given == 2


def test_plain_remove_unlinks(sp):
    m = msg()
    store(sp, m, b"x\r\n")
    sp.remove(m.id, "working")  # an operator's delete, an expiry: gone for good
    assert not spares(sp.root / "spare")
    assert not list((sp.root / "working").iterdir())


def make_pool(tmp_path, **kw) -> SparePool:
    (tmp_path / "spare" / ".new").mkdir(parents=True)
    return SparePool(str(tmp_path / "spare"), rescan=0, **kw)


def test_pool_is_bounded_in_files_and_size(tmp_path):
    pool = make_pool(tmp_path, max_files=1, max_bytes=100)
    for name, size in (("a", 10), ("b", 10), ("big", 101)):
        (tmp_path / name).write_bytes(b"x" * size)
    assert pool.give(str(tmp_path / "a"))
    pool.commit([str(tmp_path)])
    assert not pool.give(str(tmp_path / "b"))  # full
    assert (tmp_path / "b").exists()
    pool.take(str(tmp_path / "a2"))
    assert not pool.give(str(tmp_path / "big"))  # room, but too big to keep
    assert (tmp_path / "big").exists()


def test_a_given_file_is_taken_only_after_commit(tmp_path):
    """Reused before its removal is on disk, a power cut could bring the old message's name
    back over the new message's bytes."""
    pool = make_pool(tmp_path)
    (tmp_path / "old.dat").write_bytes(b"delivered")
    assert pool.give(str(tmp_path / "old.dat"))
    assert not pool.take(str(tmp_path / "new.dat"))  # in .new/, not durable yet
    assert len(list((tmp_path / "spare" / ".new").iterdir())) == 1
    pool.commit([str(tmp_path)])
    assert not list((tmp_path / "spare" / ".new").iterdir())
    assert pool.take(str(tmp_path / "new.dat"))


def test_files_left_in_new_are_adopted_at_start(sp):
    m = msg()
    store(sp, m, b"x\r\n")
    sp.spare.give(str(sp.root / "working" / f"{m.id}.dat"), "dat")  # then the engine stopped
    later = Spool(sp.root, hostname="mx.example")
    later.recover()
    assert spares(sp.root / "spare")
    assert not list((sp.root / "spare" / ".new").iterdir())
    assert later.spare.take(str(sp.root / "working" / "again.dat"))


def test_a_file_linked_elsewhere_is_never_taken_in(tmp_path):
    pool = make_pool(tmp_path)
    (tmp_path / "dropin.dat").write_bytes(b"mail")
    os.link(tmp_path / "dropin.dat", tmp_path / "elsewhere.dat")
    assert not pool.give(str(tmp_path / "dropin.dat"))


def test_pool_turns_itself_off_where_noreplace_is_refused(tmp_path, monkeypatch):
    import errno
    from mailengine import spare

    def refuse(src, dst):
        raise OSError(errno.EINVAL, "Invalid argument")
    pool = make_pool(tmp_path)
    (tmp_path / "a.dat").write_bytes(b"x")
    monkeypatch.setattr(spare, "rename_noreplace", refuse)
    assert not pool.give(str(tmp_path / "a.dat")) and not pool.enabled
    assert (tmp_path / "a.dat").exists()  # left for the caller to unlink


def test_spool_unlinks_what_the_pool_will_not_keep(sp):
    m = msg()
    store(sp, m, b"X" * 5000)
    inf = sp.root / "working" / f"{m.id}.inf"
    kept = inf.stat().st_ino
    sp.spare.max_bytes = inf.stat().st_size  # the .inf fits, the 5000-byte .dat does not
    sp.recycle([m.id], "working")
    assert inodes(sp.root / "spare") == {kept}
    assert not list((sp.root / "working").iterdir())


def test_take_refuses_an_existing_name_and_keeps_the_spare(tmp_path):
    pool = make_pool(tmp_path)
    (tmp_path / "old").write_bytes(b"old")
    assert pool.give(str(tmp_path / "old"))
    pool.commit([str(tmp_path)])
    (tmp_path / "taken.dat").write_bytes(b"queued mail")
    with pytest.raises(FileExistsError):
        pool.take(str(tmp_path / "taken.dat"))
    assert (tmp_path / "taken.dat").read_bytes() == b"queued mail"
    assert len(pool) == 1 and pool.take(str(tmp_path / "new.dat"))


def test_store_on_a_taken_id_gets_a_new_id_not_the_old_file(sp):
    first, filler = msg(), msg()
    store(sp, first, b"first\r\n", "retry")
    store(sp, filler, b"filler\r\n")
    sp.recycle([filler.id], "working")  # two spares ready
    second = msg(first.id)  # the same id: must not replace retry/ID.dat
    store(sp, second, b"second\r\n", "retry")
    assert second.id != first.id
    assert (sp.root / "retry" / f"{first.id}.dat").read_bytes() == b"first\r\n"
    assert (sp.root / "retry" / f"{second.id}.dat").read_bytes() == b"second\r\n"


def test_other_processes_find_spares_and_skip_names_taken_meanwhile(tmp_path):
    engine = make_pool(tmp_path)
    worker = SparePool(str(tmp_path / "spare"), rescan=0)  # an intake worker: starts empty
    for i in range(2):
        (tmp_path / f"f{i}").write_bytes(b"x")
        assert engine.give(str(tmp_path / f"f{i}"))
    engine.commit([str(tmp_path)])
    assert worker.take(str(tmp_path / "w1")) and worker.take(str(tmp_path / "w2"))
    assert not worker.take(str(tmp_path / "w3"))  # none left
    # the engine still lists both names; the worker took them: skipped, nothing overwritten
    assert not engine.take(str(tmp_path / "e1"))
    assert not (tmp_path / "e1").exists()


def test_recovery_leaves_spare_files_alone(sp):
    m = msg()
    store(sp, m, b"x\r\n")
    sp.recycle([m.id], "working")
    rep = sp.recover()
    assert rep.messages == [] and rep.warnings == []
    assert len(spares(sp.root / "spare")) == 2


def test_switched_off_with_zero_files(tmp_path, monkeypatch):
    monkeypatch.setattr("mailengine.spool.SPARE_FILES", 0)
    sp = Spool(tmp_path / "mailq", hostname="mx.example")
    sp.ensure_dirs()
    m = msg()
    store(sp, m, b"x\r\n")
    sp.recycle([m.id], "working")
    sp.close()
    assert not spares(tmp_path / "mailq" / "spare")
    assert not list((tmp_path / "mailq" / "working").iterdir())


def test_memory_mode_reuses_spares_too(tmp_path):
    sp = Spool(tmp_path / "mailq", durable=False, hostname="mx.example")
    sp.ensure_dirs()
    a = msg()
    store(sp, a, b"a" * 100)
    sp.recycle([a.id], "working")
    b = msg()
    store(sp, b, b"b\r\n")
    assert (tmp_path / "mailq" / "working" / f"{b.id}.dat").read_bytes() == b"b\r\n"
    assert not spares(tmp_path / "mailq" / "spare")
    assert os.path.exists(tmp_path / "mailq" / "working" / f"{b.id}.inf")
