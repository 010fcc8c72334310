"""pool.Pool on its own: connection caps and who wakes when a connection frees.

The sessions are stand-ins (no network): what is under test is the pool's bookkeeping."""
import asyncio

from mailengine.pool import Pool
from mailengine.dns import Target


class FakeSession:
    def __init__(self, target: Target):
        self.ip, self.port = target.ip, target.port
        self.is_reusable = True
        self.last_used = 0.0

    async def connect(self) -> None:
        await asyncio.sleep(0)

    async def close(self) -> None:
        self.is_reusable = False

    def abort(self) -> None:
        self.is_reusable = False


def counting_pool(max_total: int, max_per_host: int) -> tuple[Pool, list[int]]:
    """A pool whose waits are counted: every await of a freed slot, including the re-waits of
    units that woke for nothing."""
    pool = Pool(max_total, max_per_host, FakeSession)
    waits = [0]
    real_wait = pool._wait

    async def wait(*args, **kw):
        waits[0] += 1
        await real_wait(*args, **kw)
    pool._wait = wait
    return pool, waits


def test_a_freed_connection_wakes_one_waiting_unit_not_all_of_them():
    """200 units for one MX (many domains share it) at a per-host cap of 2: each message done
    frees one connection, and one unit takes it. Waking every waiter each time made ~n²/2 waits
    (20,000 here), all but one for nothing."""
    async def main():
        pool, waits = counting_pool(max_total=500, max_per_host=2)
        mx = Target("mx.shared.test", "127.0.0.9")
        most = 0

        async def unit():
            nonlocal most
            s = await pool.acquire(mx)
            most = max(most, pool.per_host[(mx.ip, mx.port)])
            await asyncio.sleep(0)
            s.is_reusable = False  # a new connection for each: every release frees a slot
            pool.release(s)

        await asyncio.wait_for(asyncio.gather(*(unit() for _ in range(200))), 10)
        return waits[0], most, pool.total

    waits, most, total = asyncio.run(main())
    assert most == 2 and total == 0
    assert waits <= 2 * 200, waits  # about one wait per unit


def test_an_idle_connection_goes_to_one_waiter_and_all_are_served():
    async def main():
        pool, waits = counting_pool(max_total=500, max_per_host=1)
        mx = Target("mx.shared.test", "127.0.0.9")
        served = []

        async def unit(i):
            s = await pool.acquire(mx)
            served.append(i)
            await asyncio.sleep(0)
            pool.release(s)  # reusable: kept idle for the next unit

        await asyncio.wait_for(asyncio.gather(*(unit(i) for i in range(100))), 10)
        return waits[0], served, pool.total

    waits, served, total = asyncio.run(main())
    assert sorted(served) == list(range(100)) and total == 1  # one connection, reused
    assert waits <= 2 * 100, waits


def test_a_woken_unit_cancelled_before_it_ran_passes_the_slot_on():
    async def main():
        pool = Pool(10, 1, FakeSession)
        mx = Target("mx.shared.test", "127.0.0.9")
        first = await pool.acquire(mx)
        w1 = asyncio.create_task(pool.acquire(mx))
        w2 = asyncio.create_task(pool.acquire(mx))
        await asyncio.sleep(0.01)  # both wait for the server
        first.is_reusable = False
        pool.release(first)  # frees the slot: w1 is woken ...
        w1.cancel()  # ... and cancelled before it could take it
        s2 = await asyncio.wait_for(w2, 2)  # w2 must not wait for ever
        return s2, w1

    s2, w1 = asyncio.run(main())
    assert s2.ip == "127.0.0.9" and w1.cancelled()


def test_a_unit_woken_for_the_total_cap_whose_server_is_now_busy_passes_the_slot_on():
    """Total cap 2, hosts at 1 each. Units for C and D wait for the total cap. A slot frees;
    C's unit is woken, but meanwhile another unit took C's only place: D's unit must get the
    free slot rather than sleep beside it."""
    async def main():
        pool = Pool(2, 1, FakeSession)
        a, b = Target("a", "127.0.0.1"), Target("b", "127.0.0.2")
        c, d = Target("c", "127.0.0.3"), Target("d", "127.0.0.4")
        sa, sb = await pool.acquire(a), await pool.acquire(b)
        wc = asyncio.create_task(pool.acquire(c))
        await asyncio.sleep(0.01)
        wd = asyncio.create_task(pool.acquire(d))
        await asyncio.sleep(0.01)  # both wait for a free place overall
        pool.max_total = 3  # a third place, taken for C before C's waiter runs
        sc = await pool.acquire(c)
        sa.is_reusable = False
        pool.release(sa)  # a place frees: C's waiter wakes first, finds C busy
        s_d = await asyncio.wait_for(wd, 2)
        wc.cancel()
        return s_d, sc, sb

    s_d, sc, sb = asyncio.run(main())
    assert s_d.ip == "127.0.0.4"


class GatedSession(FakeSession):
    """Its QUIT ends only when the test opens the gate."""
    gate: asyncio.Event

    async def close(self) -> None:
        await GatedSession.gate.wait()
        self.is_reusable = False


async def three_places_two_per_server():
    GatedSession.gate = asyncio.Event()
    pool = Pool(3, 2, GatedSession)
    a, b, c, d, x = (Target(h, f"10.0.0.{i}") for i, h in enumerate("abcdx", 1))
    sa, sb, sd = [await pool.acquire(t) for t in (a, b, d)]
    pool.release(sd)  # idle: the first unit waiting for a place will close it
    return pool, sa, (a, b, c, d, x)


def test_an_idle_session_goes_to_a_unit_for_its_server_even_behind_others():
    """A's session goes idle while A's unit waits for a place overall behind C's and X's: A's
    unit takes it (waking the head of the queue left it beside an idle session)."""
    async def main():
        pool, sa, (a, b, c, d, x) = await three_places_two_per_server()
        wc = asyncio.create_task(pool.acquire(c))
        await asyncio.sleep(0)  # closes D's idle session to make room
        wx = asyncio.create_task(pool.acquire(x))
        await asyncio.sleep(0)
        wa = asyncio.create_task(pool.acquire(a))
        await asyncio.sleep(0)
        pool.release(sa)
        await asyncio.sleep(0.05)
        served = wa.done()
        GatedSession.gate.set()
        await asyncio.sleep(0.05)
        for t in (wc, wx):  # C's unit took the place D's QUIT freed; X's waits for another
            t.cancel()
        return served

    assert asyncio.run(main())


def test_a_unit_woken_for_a_place_that_takes_an_idle_session_passes_the_place_on():
    async def main():
        pool, sa, (a, b, c, d, x) = await three_places_two_per_server()
        wc = asyncio.create_task(pool.acquire(c))
        await asyncio.sleep(0)  # closes D's idle session; its QUIT waits for the gate
        wa = asyncio.create_task(pool.acquire(a))
        await asyncio.sleep(0)
        pool.release(sa)  # A's unit takes it
        await asyncio.sleep(0)
        GatedSession.gate.set()  # D's place is free: C's unit must get it
        await asyncio.wait_for(wc, 2)
        return wa.done(), pool.total

    a_done, total = asyncio.run(main())
    assert a_done and total == 3


def test_units_woken_for_nothing_keep_their_turn():
    """Ten units wait for a place overall; sessions of another server going idle wake them
    for nothing: they are served in the order they came."""
    async def main():
        pool = Pool(2, 2, FakeSession)
        busy = Target("busy", "10.0.0.1")
        s1, s2 = await pool.acquire(busy), await pool.acquire(busy)
        order = []

        async def unit(i):
            s = await pool.acquire(Target(f"u{i}", f"10.0.1.{i}"))
            order.append(i)
            s.is_reusable = False
            pool.release(s)
        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(unit(i)))
            await asyncio.sleep(0)
        pool.release(s1)  # idle: wakes the first, which closes it to make room
        await asyncio.sleep(0.01)
        s2.is_reusable = False
        pool.release(s2)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        return order

    assert asyncio.run(main()) == list(range(10))


SEEDS = int(__import__("os").environ.get("POOL_FUZZ_SEEDS", "400"))


def test_random_loads_never_leave_a_unit_waiting_beside_a_free_place():
    """Hundreds of random runs (caps, servers, reuse, new connections): every unit is served
    within a moment; a lost wake-up shows as a run that does not finish."""
    import random

    class Jittery(FakeSession):
        async def connect(self) -> None:
            for _ in range(random.randint(0, 2)):
                await asyncio.sleep(0)

        async def close(self) -> None:
            for _ in range(random.randint(0, 3)):
                await asyncio.sleep(0)
            self.is_reusable = False

    async def run(seed):
        rnd = random.Random(seed)
        random.seed(seed)
        pool = Pool(rnd.randint(1, 4), rnd.randint(1, 3), Jittery)
        hosts = [Target(f"h{i}", f"10.0.0.{i}") for i in range(rnd.randint(1, 5))]

        async def unit():
            for _ in range(rnd.randint(0, 3)):
                await asyncio.sleep(0)
            s = await pool.acquire(rnd.choice(hosts), fresh=rnd.random() < 0.1)
            for _ in range(rnd.randint(0, 6)):
                await asyncio.sleep(0)
            s.is_reusable = rnd.random() < 0.6
            pool.release(s)
        tasks = [asyncio.create_task(unit()) for _ in range(rnd.randint(2, 30))]
        done, pending = await asyncio.wait(tasks, timeout=2.0)
        for t in pending:
            t.cancel()
        return len(pending)

    stalled = [seed for seed in range(SEEDS) if asyncio.run(run(seed))]
    assert stalled == []


def test_a_place_freed_by_a_quit_is_not_still_counted_as_closing():
    """One place in all. C's unit closes A's idle connection to make room; A's next unit is
    woken by that close, is served, and goes idle again: C's unit must see the place taken by
    an idle connection (and close it), not a QUIT still under way."""
    async def main():
        class Instant(FakeSession):
            async def connect(self) -> None:  # connected without yielding to the loop
                pass
        a, c = Target("a", "10.0.0.1"), Target("c", "10.0.0.3")
        pool = Pool(1, 1, Instant)
        pool.release(await pool.acquire(a))
        wc = asyncio.create_task(pool.acquire(c))

        async def a_unit():
            s = await pool.acquire(a)
            pool.release(s)
        wa = asyncio.create_task(a_unit())
        await asyncio.sleep(0.2)
        served = wc.done()
        wc.cancel()
        wa.cancel()
        return served

    assert asyncio.run(main())


def test_connections_are_counted_per_sending_source():
    """Pool.per_source: what /metrics and the web admin show per source (sources.py), idle
    connections included, none for connections without a source."""
    from mailengine.sources import Source

    class SourcedSession(FakeSession):
        def __init__(self, target: Target, source=None):
            super().__init__(target)

    async def main():
        pool = Pool(10, 5, SourcedSession)
        one, two = Source("one", "127.0.0.31", "one.test"), Source("two", "127.0.0.32", "two.test")
        mx1, mx2 = Target("mx1.test", "127.0.0.9"), Target("mx2.test", "127.0.0.10")
        a = await pool.acquire(mx1, source=one)
        await pool.acquire(mx2, source=one)
        await pool.acquire(mx1, source=two)
        await pool.acquire(mx1)  # no source (network.smtp_source_ip)
        pool.release(a)  # idle: still open, still counted
        counts = pool.per_source()
        await pool.close_all()  # closes the idle ones
        return counts, pool.per_source()

    counts, after = asyncio.run(main())
    assert counts == {"one": 2, "two": 1}
    assert after == {"one": 1, "two": 1}  # the idle one closed; the busy ones stay counted
