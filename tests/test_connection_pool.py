"""delivery.Pool on its own: connection caps and who wakes when a connection frees.

The sessions are stand-ins (no network): what is under test is the pool's bookkeeping."""
import asyncio

from mailengine.delivery import Pool
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

    async def wait(key):
        waits[0] += 1
        await real_wait(key)
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
