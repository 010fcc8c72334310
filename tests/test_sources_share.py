"""The sending sources' warm-up counts shared by several engines through a real Redis
(sources_link.py over sources.py; issue 17 item 4): one budget per source, provider and day for
every engine naming the same Redis and key prefix; Redis down: each engine on its local count."""
from __future__ import annotations

import asyncio
import logging
import shutil
import tomllib

import pytest

from mailengine import shared
from mailengine.shared import SharedLimits
from mailengine.sources import Sources, WarmupHold, parse_sources
from mailengine.sources_link import SourcesLink
from mailengine.testing.redis_server import RedisServer

from test_sources import DAY, Clock

needs_redis = pytest.mark.skipif(not shutil.which("redis-server"),
                                 reason="redis-server is installed by .ci/run")

# "new" may send gmail 4 recipients today (its day 1); "warm" has no cap. The pool picks "new"
# first whenever it has budget (weight 1000 to 1).
RULES = """
[sources.warm]
ip = "127.0.0.11"
helo = "warm.example.com"
[sources.new]
ip = "127.0.0.13"
helo = "new.example.com"
warmup_start = 2026-12-05
warmup = [4]
[pools.p]
sources = { new = 1000, warm = 1 }
[pools.only-new]
sources = ["new"]
"""
KEY = f"t:warmup:{DAY.isoformat()}"


@pytest.fixture
def redis_server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


def engine(url: str) -> tuple[Sources, SourcesLink, SharedLimits]:
    s = Sources(parse_sources(tomllib.loads(RULES), "shaping.toml"), Clock())
    limits = SharedLimits(url, "t:")
    return s, SourcesLink(s, limits), limits


async def take(link: SourcesLink, n: int = 1, pool: str = "p") -> str:
    src = await link.choose(pool, "gmail", n, None)
    assert src is not None
    return src.name


def test_without_redis_the_link_is_the_sources_own_counts():
    async def main():
        s = Sources(parse_sources(tomllib.loads(RULES), "shaping.toml"), Clock())
        link = SourcesLink(s)
        names = [await take(link, 2), await take(link, 2), await take(link, 1)]
        await link.poll()  # nothing to read
        return s, names

    s, names = asyncio.run(main())
    assert names == ["new", "new", "warm"] and s.shared is None
    assert s.used_today("new", "gmail") == 4


@needs_redis
def test_two_engines_share_a_sources_warm_up_budget_and_give_back_what_was_not_sent(
        redis_server):
    async def main():
        a, la, ra = engine(redis_server.url)
        b, lb, rb = engine(redis_server.url)
        r = redis_server.client()
        # A takes 3 of new's 4 for gmail today (a unit of 2, then one of 1 still sending)
        assert await take(la, 2) == "new"
        la.done(a.rules.sources["new"], "gmail", 2, 0)
        assert await take(la, 1) == "new"
        assert r.hget(KEY, "new gmail") == "3" and 0 < r.ttl(KEY) <= 2 * 86400
        # B, having read the counts (its ~2 s poll), has 1 left there: a unit of 2 overflows
        # to the warmed source, one of 1 takes the last
        await lb.poll()
        assert b.used_today("new", "gmail") == 3 and b.used == {}
        assert await take(lb, 2) == "warm"
        assert await take(lb, 1) == "new"
        assert r.hget(KEY, "new gmail") == "4"
        with pytest.raises(WarmupHold):  # a pool of new alone waits for tomorrow
            await lb.choose("only-new", "gmail", 1, None)
        # A has not read B's take yet: its copy says 3, but Redis refuses the 4th+1 and the
        # unit goes out from the warmed source; A's copy learns the count from the refusal
        assert a.used_today("new", "gmail") == 3
        assert await take(la, 1) == "warm"
        assert a.used_today("new", "gmail") == 4 and a.used["new"]["gmail"] == 3
        assert r.hget(KEY, "new gmail") == "4"
        # A's unit of 1 still sending fails: its budget comes back, for every engine
        la.done(a.rules.sources["new"], "gmail", 1, 1)
        assert a.used["new"]["gmail"] == 2
        for _ in range(50):
            if r.hget(KEY, "new gmail") == "3":
                break
            await asyncio.sleep(0.02)
        assert r.hget(KEY, "new gmail") == "3"
        await lb.poll()
        assert await take(lb, 1) == "new"
        assert r.hget(KEY, "new gmail") == "4"
        # status shows every engine's use today
        today = {u["source"]: u["today"] for u in b.usage()}
        assert today["new"]["gmail"] == {"used": 4, "limit": 4}
        # another prefix is another set of engines: a whole budget
        c = Sources(parse_sources(tomllib.loads(RULES), "shaping.toml"), Clock())
        rc = SharedLimits(redis_server.url, "other:")
        assert await take(SourcesLink(c, rc), 4) == "new"
        for limits in (ra, rb, rc):
            await limits.close()
        r.close()

    asyncio.run(main())


@needs_redis
def test_redis_stopped_midway_each_engine_goes_on_its_local_count_and_posts_it_when_back(
        monkeypatch, caplog):
    monkeypatch.setattr(shared, "OFFLINE_RETRY", 0.2)
    srv = RedisServer().start()

    async def main():
        a, la, ra = engine(srv.url)
        b, lb, rb = engine(srv.url)
        assert await take(la, 2) == "new"
        await lb.poll()
        srv.stop()
        # B decides on its copy (A's 2) plus its own takes: no exception on the way
        names = [await take(lb, 1), await take(lb, 1), await take(lb, 1)]
        lb.done(b.rules.sources["new"], "gmail", 1, 1)  # one not sent: given back here
        await lb.poll()  # Redis down: nothing read, nothing lost
        assert b.used_today("new", "gmail") == 3
        srv.start()  # same port, empty (it kept nothing)
        await asyncio.sleep(0.3)
        await lb.poll()  # posts what it took meanwhile, reads the counts back
        r = srv.client()
        got = r.hget(KEY, "new gmail")
        r.close()
        await ra.close()
        await rb.close()
        return names, got, b.used_today("new", "gmail")

    try:
        with caplog.at_level(logging.WARNING, "mailengine.shared"):
            names, got, b_today = asyncio.run(main())
    finally:
        srv.stop()
    assert names == ["new", "new", "warm"]
    assert got == "1"  # B's takes while Redis was down, less the one given back
    assert b_today == 1  # A's 2 were lost with Redis's data; B's own count is the floor
    down = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(down) == 1  # once, not per call


@needs_redis
def test_two_engines_through_the_simulated_internet_send_a_new_source_its_budget_once(
        tmp_path, redis_server):
    """Engine A, then engine B, send 10 each to a provider through a pool whose new source
    may send it 4 today: the provider sees 4 from the new source's address in all, the rest
    from the warmed one's (without sharing, each engine would send up to 4 from it)."""
    import datetime as dt
    import smtplib

    from mailengine import control
    from mailengine.testing.engine import RunningEngine, wait_until as wait
    from mailengine.testing.fakenet import FakeNet, Provider
    from test_delivery import FAST, infs
    from test_sources_fakenet import DOMAINS, NO_DNS, PROVIDER, A, B, to

    rules = f"""builtin = false
{PROVIDER}
[sources.new]
ip = "{A}"
helo = "one.sender.test"
warmup_start = {dt.date.today().isoformat()}
warmup = [4, 40]
[sources.old]
ip = "{B}"
helo = "two.sender.test"
[pools.main]
sources = {{ new = 10, old = 1 }}
"""
    p = Provider("bigmail", ["127.0.2.51"], port=0, latency=(0.01, 0.03))
    seen = []
    with FakeNet([p], {d: "bigmail" for d in DOMAINS}) as net:
        settings = {**FAST, **NO_DNS, "limits.max_connections_per_host": 20,
                    "queue.pause_sending": True, "queue.retry_intervals": [1],
                    "shared.redis_url": redis_server.url, "shared.key_prefix": "e2e:",
                    "basic.dns_servers": [f"{d},mx1.bigmail.fake,MX,{p.ips[0]}:{p.port}"
                                          for d in DOMAINS]}
        for name in ("a", "b"):
            home = tmp_path / name
            home.mkdir()
            (home / "shaping.toml").write_text(rules)
            with RunningEngine(home, settings) as eng:
                with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                    for i, (sender, rcpt, head) in enumerate(to(10)):
                        s.sendmail(sender, [rcpt], f"Subject: {i}\r\n\r\nhi\r\n")
                control.request(eng.home / "mailengine.sock", "config.set",
                                name="queue.pause_sending", value=False)
                wait(lambda: len(infs(eng, "done")) == 10, timeout=30, what="delivery")
                listed = control.request(eng.home / "mailengine.sock", "shaping.list")
                seen.append(next(u for u in listed["sources"] if u["source"] == "new"))
        st = net.stats()["bigmail"]
    assert st.per_ip[A] == 4 and st.per_ip[B] == 16 and st.deliveries == 20
    assert seen[1]["today"] == {"bigmail": {"used": 4, "limit": 4}}  # every engine's use
