"""Message ids (message_ids.py): never repeated by a restarted process with the same pid."""
from mailengine.message_ids import _IdClock


def test_a_restart_with_the_same_pid_in_the_same_second_makes_new_ids():
    # a container restarts as the same pid; even a burst of ids just before the "crash" must
    # not be repeated by the next run (a fresh clock is what a new process starts with)
    def ids(clock, n):
        return [(us // 1_000_000, us % 1_000_000) for us in (clock.next() for _ in range(n))]
    earlier = ids(_IdClock(), 20000)
    later = ids(_IdClock(), 20000)
    assert len(set(earlier)) == len(set(later)) == 20000
    assert not set(earlier) & set(later)
