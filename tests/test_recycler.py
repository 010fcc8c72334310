"""The recycler process (mailengine/recycler.py): delivered mail handed over without waiting
(Spool.recycle_soon), removed as Spool.recycle would (spare files, unlinks, side files), many
requests at once; errors logged; when the process dies, what it did not answer is removed by
the engine, and recycle_soon says False from then on."""
from __future__ import annotations

import asyncio
import logging
import os
import signal

from mailengine.envelope import Message
from mailengine.spool import Spool


def msg() -> Message:
    return Message(id="", mail_from="sender@example.com", rcpt_to_send=["rcpt@example.net"])


async def stored(sp: Spool, data: bytes = b"Subject: x\r\n\r\nhi\r\n") -> Message:
    m = msg()
    await sp.store(m, data, "working")
    return m


def spares(sp: Spool) -> list[str]:
    return sorted(n for n in os.listdir(sp.root / "spare") if not n.startswith("."))


def test_handed_over_without_waiting_and_removed_in_the_process(sp):
    async def go():
        sp.side_files = (".dkim",)
        assert not sp.recycle_soon("none-yet", "working")  # no process: the caller does it
        await sp.start_recycler()
        a, b = await stored(sp), await stored(sp)
        (sp.root / "working" / f"{a.id}.dkim").write_text("DKIM-Signature: x")
        assert sp.recycle_soon(a.id, "working") and sp.recycle_soon(b.id, "working")
        assert sp.recycle_soon("gone-already", "working")
        assert (sp.root / "working" / f"{a.id}.inf").exists()  # not yet: no wait
        await sp.recycled()
        assert not os.listdir(sp.root / "working")
        assert len(spares(sp)) == 4  # .inf and .dat of both, takeable once committed
        assert sp._recycler.batches == 3 and sp.spare.given == 0  # given by the process
        sp.spare._next_scan = 0.0  # it listed spare/ (empty) for the stores above
        c = await stored(sp)  # the engine's own pool finds them in spare/
        assert sp.spare.taken == 2
        sp.recycle_soon(c.id, "working")
        await sp.recycled()
        assert sp._recycler.batches == 4 and len(spares(sp)) == 4
        sp.stop_recycler()
    asyncio.run(go())


def test_its_errors_are_logged_and_it_goes_on(sp, caplog):
    async def go():
        await sp.start_recycler()
        (sp.root / "working" / "odd.inf").mkdir()  # cannot be unlinked
        with caplog.at_level(logging.ERROR, "mailengine.recycler"):
            sp.recycle_soon("odd", "working")
            await sp.recycled()
        assert "cannot be removed from working/ (odd.inf)" in caplog.text
        assert "directory" in caplog.text
        m = await stored(sp)
        assert sp.recycle_soon(m.id, "working")
        await sp.recycled()
        assert not (sp.root / "working" / f"{m.id}.inf").exists()
        sp.stop_recycler()
    asyncio.run(go())


def test_a_dead_process_leaves_the_work_to_the_engine(sp, caplog):
    async def go():
        await sp.start_recycler()
        first = await stored(sp)
        sp._recycler._proc.kill()
        sp.recycle_soon(first.id, "working")  # sent into a dead pipe, or refused
        with caplog.at_level(logging.ERROR, "mailengine.recycler"):
            await asyncio.wait_for(sp.recycled(), 10)
            while sp._recycler.alive:  # its end is seen when the pipe closes
                await asyncio.sleep(0.01)
        await sp.recycled()
        assert not (sp.root / "working" / f"{first.id}.inf").exists()
        assert "recycler process failed" in caplog.text
        second = await stored(sp)
        assert not sp.recycle_soon(second.id, "working")  # the engine does it from now on
        sp.stop_recycler()
    asyncio.run(go())


def test_stop_ends_the_process_and_close_stops_it_too(sp):
    async def go():
        await sp.start_recycler()
        proc = sp._recycler._proc
        sp.stop_recycler()
        assert proc.returncode == 0 and sp._recycler is None
        assert not sp.recycle_soon("x", "working")
        await sp.start_recycler()
        return sp._recycler._proc
    proc = asyncio.run(go())
    sp.close()
    assert proc.returncode == 0


def test_a_stuck_process_does_not_hold_the_engine_stopping(sp, caplog):
    async def go():
        await sp.start_recycler()
        m = await stored(sp)
        proc = sp._recycler._proc
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            sp.recycle_soon(m.id, "working")
            with caplog.at_level(logging.ERROR, "mailengine.recycler"):
                assert not await sp._recycler.drain(timeout=0.3)
            assert "1 delivered messages not removed within 0.3 s" in caplog.text
            assert (sp.root / "working" / f"{m.id}.inf").exists()  # delivered again later
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        await sp.recycled()
        sp.stop_recycler()
    asyncio.run(go())
