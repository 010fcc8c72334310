"""The spool's writer threads (group_commit._Writers): one while it keeps up, more while stores
wait, none left behind. The flusher itself is tested through the Spool (tests/test_spool.py)."""
import threading
import time

import pytest

from mailengine.group_commit import _Writers


def test_one_writer_thread_while_it_keeps_up_more_while_stores_wait():
    """Fast stores one after another need one thread; slow ones (file creation after mass
    deletions, spare.py) that keep stores waiting start more, up to the maximum, which end
    once caught up."""
    w = _Writers(4)
    done = []
    for i in range(50):  # each finishes before the next comes
        ev = threading.Event()
        w.submit(lambda i=i, ev=ev: (done.append(i), ev.set()))
        assert ev.wait(5)
    assert w.most == 1 and len(done) == 50

    for i in range(40):  # stores keep coming while each takes 20 ms
        w.submit(lambda i=i: (time.sleep(0.02), done.append(i)))
        time.sleep(0.002)
    deadline = time.monotonic() + 5
    while len(done) < 90 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(done) == 90 and 1 < w.most <= 4
    deadline = time.monotonic() + 3
    while w._running > 1:  # the extra threads end a moment after the backlog
        assert time.monotonic() < deadline, w._running
        time.sleep(0.05)
    w.shutdown()
    with pytest.raises(RuntimeError):
        w.submit(done.append, 0)


def test_writer_threads_shutdown_runs_what_was_submitted():
    w = _Writers(2)
    got = []
    for i in range(30):
        w.submit(lambda i=i: (time.sleep(0.001), got.append(i)))
    w.shutdown()
    assert sorted(got) == list(range(30))


def test_a_burst_of_slow_stores_gets_more_writer_threads():
    """40 stores arrive at once and each takes 10 ms: the threads that take them call for help
    (no later store is needed to notice the backlog)."""

    w = _Writers(4)
    done = []
    t0 = time.monotonic()
    for i in range(40):
        w.submit(lambda i=i: (time.sleep(0.010), done.append(i)))
    deadline = t0 + 5
    while len(done) < 40:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    took = time.monotonic() - t0
    w.shutdown()
    assert w.most > 1 and took < 0.3, (w.most, took)  # one thread alone: 0.4 s


def test_a_writer_thread_that_cannot_start_refuses_the_store_and_keeps_nothing(monkeypatch):
    def refuse(self):
        raise RuntimeError("can't start new thread")
    monkeypatch.setattr(threading.Thread, "start", refuse)
    w = _Writers(2)
    with pytest.raises(RuntimeError):
        w.submit(print, "never")
    assert not w._jobs and w._running == 0  # not written later behind the caller's back
