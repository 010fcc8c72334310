"""scheduler.py: timers, per-destination queues, priority, round-robin fairness, caps, pause."""
import random

import pytest

from mailengine.scheduler import Scheduler


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def drain(s, n=10**6):
    out = []
    while len(out) < n:
        u = s.next_unit()
        if u is None:
            break
        out.append(u)
    return out


def test_timer_releases_in_time_order_without_rescans():
    c = Clock()
    s = Scheduler(c)
    s.add("late", ["a@x.test"], due=c.t + 60)
    s.add("now", ["a@y.test"])
    s.add("soon", ["a@z.test"], due=c.t + 5)
    assert s.next_due() == c.t
    assert s.release_due() == 1
    assert [u.msg_id for u in drain(s)] == ["now"]
    assert s.next_due() == c.t + 5
    c.t += 5
    assert s.release_due() == 1 and s.next_due() == 995 + 65
    c.t += 100
    assert s.release_due() == 1
    assert [u.msg_id for u in drain(s)] == ["soon", "late"]


def test_reschedule_makes_old_timer_stale():
    c = Clock()
    s = Scheduler(c)
    s.add("m", ["a@x.test"], due=c.t + 10)
    s.add("m", ["a@x.test"], due=c.t + 100)
    c.t += 50
    assert s.release_due() == 0 and s.next_due() == 1100
    assert s.withdraw(["m"]) == {"m"}
    c.t += 100
    assert s.release_due() == 0 and s.next_due() is None and len(s) == 0


def test_split_by_domain_and_batch_size():
    c = Clock()
    s = Scheduler(c, max_rcpts=2)
    s.add("m", ["a@x.test", "b@y.test", "c@X.TEST", "d@x.test"])
    s.release_due()
    units = drain(s)
    assert sorted((u.dest, tuple(u.rcpts)) for u in units) == [
        ("x.test", ("a@x.test", "c@X.TEST")), ("x.test", ("d@x.test",)), ("y.test", ("b@y.test",))]
    assert [s.unit_done(u) for u in units] == [False, False, True]
    assert "m" not in s


def test_new_mail_before_retries_in_one_destination():
    c = Clock()
    s = Scheduler(c, limit=lambda d: 1)
    s.add("retry3", ["a@x.test"], priority=3, due=c.t - 10)
    s.add("retry1", ["a@x.test"], priority=1, due=c.t - 5)
    s.add("new", ["a@x.test"], priority=0)
    s.release_due()
    order = []
    while (u := s.next_unit()) is not None:
        order.append(u.msg_id)
        s.unit_done(u)
    assert order == ["new", "retry1", "retry3"]


def test_round_robin_one_huge_domain_cannot_starve_the_rest():
    c = Clock()
    s = Scheduler(c, limit=lambda d: 1000)
    for i in range(1000):
        s.add(f"big{i}", [f"u{i}@huge.test"])
    for d in range(5):
        s.add(f"small{d}", [f"u@small{d}.test"])
    s.release_due()
    first = drain(s, 10)
    assert {u.dest for u in first} >= {f"small{d}.test" for d in range(5)}


def test_destination_limit_and_global_cap():
    c = Clock()
    limits = {"x.test": 2}
    s = Scheduler(c, limit=lambda d: limits.get(d, 10), max_active=5)
    for i in range(10):
        s.add(f"x{i}", ["a@x.test"])
        s.add(f"y{i}", ["a@y.test"])
    s.release_due()
    running = drain(s)
    assert len(running) == 5 and s.active == 5
    assert sum(u.dest == "x.test" for u in running) == 2
    assert s.next_unit() is None
    # one x unit ends: the global cap frees one slot; x is at 1 of 2, so round-robin may pick it
    x = next(u for u in running if u.dest == "x.test")
    s.unit_done(x)
    u = s.next_unit()
    assert u is not None and s.next_unit() is None
    # limits can be lowered while running (throttle): x stays below the new limit
    limits["x.test"] = 1
    for u2 in list(running):
        if u2 is not x:
            s.unit_done(u2)
    s.unit_done(u)
    more = drain(s)
    assert sum(v.dest == "x.test" for v in more) <= 1 and len(more) == 5


def test_pause_keeps_timers_and_releases_everything_when_lifted():
    c = Clock()
    s = Scheduler(c)
    s.paused = True
    for i in range(20):
        s.add(f"m{i}", [f"a@d{i}.test"])
    s.release_due()
    assert s.next_unit() is None and s.ready == 20
    s.paused = False
    assert len(drain(s)) == 20
    assert s.ready == 0


def test_message_being_delivered_cannot_be_added_again():
    c = Clock()
    s = Scheduler(c)
    s.add("m", ["a@x.test"])
    s.release_due()
    u = s.next_unit()
    with pytest.raises(ValueError):
        s.add("m", ["a@x.test"])
    assert s.unit_done(u)
    s.add("m", ["a@x.test"], due=c.t + 1)  # the retry
    with pytest.raises(ValueError):
        s.add("e", [])


def test_take_ready_at_shutdown():
    c = Clock()
    s = Scheduler(c, limit=lambda d: 1)
    s.add("m", ["a@x.test", "b@y.test"])
    s.add("n", ["c@x.test"])
    s.release_due()
    running = drain(s)
    left = s.take_ready()
    assert len(running) + len(left) == 3 and s.ready == 0
    finished = [s.unit_done(u) for u in running] + [s.unit_done(u, ran=False) for u in left]
    assert finished.count(True) == 2 and len(s) == 0 and s.active == 0


def test_random_operations_keep_counts_consistent():
    rng = random.Random(7)
    c = Clock()
    s = Scheduler(c, limit=lambda d: 2, max_active=7, max_rcpts=3)
    running = []
    ids = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.3:
            ids += 1
            rcpts = [f"u{k}@d{rng.randrange(6)}.test" for k in range(rng.randrange(1, 6))]
            s.add(f"m{ids}", rcpts, priority=rng.randrange(3), due=c.t + rng.randrange(5))
        elif op < 0.5:
            c.t += 1
            s.release_due()
        elif op < 0.8:
            u = s.next_unit()
            if u is not None:
                running.append(u)
        elif running:
            u = running.pop(rng.randrange(len(running)))
            s.unit_done(u)
        assert s.active == len(running) <= 7
        per = {}
        for u in running:
            per[u.dest] = per.get(u.dest, 0) + 1
        assert all(v <= 2 for v in per.values())
    for u in running:
        s.unit_done(u)
    c.t += 100
    s.release_due()
    while (u := s.next_unit()) is not None:
        s.unit_done(u)
    assert len(s) == 0 and s.ready == 0 and s.active == 0


# -- throttle.py: concurrency windows and token buckets (used through the scheduler's limit) --------

from mailengine.throttle import HourlyNotice, TokenBucket, Window, Windows, bandwidth_bucket, \
    send_rate_bucket


def test_window_slow_start_growth_and_cap():
    c = Clock(0.0)
    w = Window(5, 10, clock=c)
    assert w.limit == 5
    grown = sum(w.success() for _ in range(5))
    assert grown == 1 and w.limit == 6
    for _ in range(200):
        w.success()
    assert w.limit == 10


def test_window_421_halves_once_per_cooldown_and_climbs_back_step_by_step():
    c = Clock(0.0)
    w = Window(8, 10, cooldown=5, clock=c)
    assert w.failure(site=True) and w.limit == 4
    assert not w.failure(site=True) and w.limit == 4  # the same trouble, reported again
    c.t += 6
    assert w.failure(site=True) and w.limit == 2
    c.t += 6
    w.failure(site=True)
    c.t += 6
    w.failure(site=True)
    assert w.limit == 1  # never below one
    steps = []
    for _ in range(30):
        if w.success():
            steps.append(w.limit)
    assert steps[:4] == [2, 3, 4, 5]  # one at a time


def test_window_run_of_4xx():
    c = Clock(0.0)
    w = Window(6, 10, run=3, clock=c)
    assert not w.failure(site=False) and not w.failure(site=False)
    assert w.failure(site=False) and w.limit == 3
    c.t += 10
    w.failure(site=False)
    w.success()  # a success breaks the run
    assert not w.failure(site=False) and not w.failure(site=False) and w.limit == 3


def test_windows_feed_the_scheduler_limit():
    c = Clock()
    ws = Windows(maximum=4, initial=2, clock=c)
    s = Scheduler(c, limit=ws.limit)
    for i in range(10):
        s.add(f"m{i}", ["a@x.test"])
    s.release_due()
    running = drain(s)
    assert len(running) == 2 and drain(s) == []
    ws.get("x.test").value = 4  # raised after successes: the next unit's end lets more run
    s.unit_done(running[0])
    assert len(drain(s)) == 3 and s.active == 4


def test_token_buckets():
    c = Clock(0.0)
    b = send_rate_bucket(3600, clock=c)  # one a second, a minute's worth at once
    assert all(b.wait() == 0 for _ in range(60))
    assert b.wait() == pytest.approx(1.0)
    c.t += 1
    assert b.wait() == pytest.approx(1.0)  # the debt carries over
    assert TokenBucket(0, 60).wait(10**9) == 0  # 0 = unlimited
    bw = bandwidth_bucket(60 * 100_000, clock=c)  # 100 kB/s, at least 64 KiB at once
    assert bw.wait(100_000) == 0
    assert bw.wait(100_000) == pytest.approx(1.0)
    n = HourlyNotice(clock=c)
    assert n.due() and not n.due()
    c.t += 3600
    assert n.due()


def test_windows_forget_idle_destinations_but_remember_recent_trouble():
    c = Clock(0.0)
    ws = Windows(maximum=10, initial=5, clock=c)
    ws.get("ok.test").success()
    ws.get("bad.test").failure(site=True)
    ws.get("busy.test")
    ws.forget_idle({"busy.test"})
    assert sorted(ws._w) == ["bad.test", "busy.test"] and ws.limit("bad.test") == 2
    c.t += 601
    ws.forget_idle(set())
    assert ws._w == {} and ws.limit("bad.test") == 5


def test_a_destination_with_its_own_maximum_grows_past_the_common_one():
    """A provider's max_connections (shaping) spreads over its many servers: its window may
    grow past max_connections_per_host, which still bounds every other destination."""
    c = Clock()
    ws = Windows(maximum=10, initial=5, clock=c)
    ws.own_maximum("gmail", 20)
    assert ws.limit("gmail") == 5 and ws.limit("x.test") == 5
    for _ in range(200):
        ws.get("gmail").success()
        ws.get("x.test").success()
    assert ws.limit("gmail") == 20 and ws.limit("x.test") == 10
    ws.set_maximum(8)  # max_connections_per_host lowered while running
    assert ws.limit("gmail") == 20 and ws.limit("x.test") == 8
    ws.own_maximum("gmail", 12)  # the rules changed
    assert ws.limit("gmail") == 12
    ws.own_maximum("gmail", None)  # no rule any more: the common maximum again
    assert ws.limit("gmail") == 8
