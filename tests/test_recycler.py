"""The recycler process (mailengine/recycler.py): delivered mail removed by a process of its
own, with the same outcome as in the engine (spare files, unlinks, side files), errors
reported back, and the engine doing it itself once the process is gone."""
from __future__ import annotations

import asyncio
import os

import pytest

from mailengine.envelope import Message
from mailengine.spool import Spool


def msg() -> Message:
    return Message(id="", mail_from="sender@example.com", rcpt_to_send=["rcpt@example.net"])


def stored(sp: Spool, data: bytes = b"Subject: x\r\n\r\nhi\r\n") -> Message:
    m = msg()
    asyncio.run(sp.store(m, data, "working"))
    return m


def spares(sp: Spool) -> list[str]:
    return sorted(n for n in os.listdir(sp.root / "spare") if not n.startswith("."))


@pytest.fixture
def rsp(sp):
    sp.start_recycler()
    yield sp
    sp.stop_recycler()


def test_the_process_recycles_and_the_engine_does_no_file_work(rsp):
    rsp.side_files = (".dkim",)
    a, b = stored(rsp), stored(rsp)
    (rsp.root / "working" / f"{a.id}.dkim").write_text("DKIM-Signature: x")
    rsp.recycle([a.id, b.id, "gone-already"], "working")
    assert not os.listdir(rsp.root / "working")
    assert len(spares(rsp)) == 4  # .inf and .dat of both, taken once committed
    assert rsp._recycler.batches == 1 and rsp.spare.given == 0  # given by the process's pool
    rsp.spare._next_scan = 0.0  # it listed spare/ (empty) for the stores above
    c = stored(rsp)  # the engine's own pool finds them in spare/
    assert rsp.spare.taken == 2 and len(spares(rsp)) == 2
    rsp.recycle([c.id], "working")
    assert rsp._recycler.batches == 2 and len(spares(rsp)) == 4


def test_its_errors_come_back_as_oserror(rsp):
    (rsp.root / "working" / "odd.inf").mkdir()  # cannot be unlinked
    with pytest.raises(OSError, match="directory"):
        rsp.recycle(["odd"], "working")
    assert rsp._recycler is not None and rsp._recycler.batches == 1  # it only met the error
    m = stored(rsp)
    rsp.recycle([m.id], "working")
    assert rsp._recycler.batches == 2 and not (rsp.root / "working" / f"{m.id}.inf").exists()


def test_a_dead_process_leaves_the_work_to_the_engine(rsp):
    first, second = stored(rsp), stored(rsp)
    proc = rsp._recycler._proc
    proc.kill()
    proc.wait()
    rsp.recycle([first.id], "working")  # this batch too: nothing is left in working/
    assert not (rsp.root / "working" / f"{first.id}.inf").exists()
    assert rsp._recycler is None and rsp.spare.given == 2
    rsp.recycle([second.id], "working")
    assert not os.listdir(rsp.root / "working") and rsp.spare.given == 4


def test_stop_ends_the_process_and_close_stops_it_too(sp):
    sp.start_recycler()
    proc = sp._recycler._proc
    sp.stop_recycler()
    assert proc.returncode == 0 and sp._recycler is None
    m = stored(sp)
    sp.recycle([m.id], "working")  # in the engine again
    assert sp.spare.given == 2
    sp.start_recycler()
    proc = sp._recycler._proc
    sp.close()
    assert proc.returncode == 0
