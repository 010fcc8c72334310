"""Several engines sharing limits and lists through a real Redis server (SPEC 9, shared.py).

Each test starts its own `redis-server` on a free loopback port (no disk persistence) and stops
it; two engines, or two SharedLimits standing for two engines, talk to it."""
from __future__ import annotations

import asyncio
import logging
import shutil
import smtplib
import time
import urllib.request
from pathlib import Path

import pytest

from mailengine import control, shared
from mailengine.cli import format_status
from mailengine.shared import ListMirror, SharedLimits
from mailengine.testing.engine import RunningEngine, free_port, wait_until as wait
from mailengine.testing.redis_server import RedisServer
from mailengine.testing.sink import SinkScript, ThreadedSink

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"),
                                reason="redis-server is installed by .ci/run")


@pytest.fixture
def redis_server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


def test_engines_share_one_servers_connection_cap(redis_server):
    async def main():
        a = SharedLimits(redis_server.url, "t:")
        b = SharedLimits(redis_server.url, "t:")
        la = await a.host_lease("127.0.0.9", 25, 2)
        shared_a = not a.health.down
        lb = await b.host_lease("127.0.0.9", 25, 2)
        third = asyncio.create_task(a.host_lease("127.0.0.9", 25, 2))
        await asyncio.sleep(0.3)
        waited = not third.done()  # both places taken, one by each engine
        other = await asyncio.wait_for(b.host_lease("127.0.0.10", 25, 2), 2)  # another one
        b.host_release(lb)
        lc = await asyncio.wait_for(third, 3)
        held = redis_server.client().zrange("t:conns:127.0.0.9:25", 0, -1)
        await a.close()
        await b.close()
        left = redis_server.client().keys("t:conns:*")
        return la, lb, lc, other, waited, held, left, shared_a

    la, lb, lc, other, waited, held, left, shared_a = asyncio.run(main())
    assert waited and all((la, lb, lc, other)) and shared_a
    assert sorted(held) == sorted([la, lc])
    assert left == []  # closing an engine gives its places back


def test_a_dead_engines_places_expire_a_live_ones_are_renewed(redis_server):
    async def main():
        live = SharedLimits(redis_server.url, "t:", lease_ms=1500)  # renewed every 0.5 s
        dead = SharedLimits(redis_server.url, "t:", lease_ms=1500)
        await live.host_lease("127.0.0.9", 25, 2)
        await dead.host_lease("127.0.0.9", 25, 2)
        dead._renewer.cancel()  # it "dies": no renewal, no release
        other = SharedLimits(redis_server.url, "t:", lease_ms=1500)
        t0 = time.monotonic()
        got = await asyncio.wait_for(other.host_lease("127.0.0.9", 25, 2), 10)
        took = time.monotonic() - t0
        # the live engine's place survived well past its lease time: renewed
        await asyncio.sleep(2.0)
        third = asyncio.create_task(other.host_lease("127.0.0.9", 25, 2))
        await asyncio.sleep(1.0)
        still_full = not third.done()
        third.cancel()
        for s in (live, other):
            await s.close()
        return got, took, still_full

    got, took, still_full = asyncio.run(main())
    assert got and 1.0 < took < 5.0
    assert still_full


def test_places_held_survive_a_redis_restart(monkeypatch):
    """Redis restarted (or lost its data): the renewals put the leases back, so a second engine
    still finds the server full."""
    monkeypatch.setattr(shared, "OFFLINE_RETRY", 0.2)
    srv = RedisServer().start()

    async def main():
        a = SharedLimits(srv.url, "t:", lease_ms=1500)
        await a.host_lease("127.0.0.9", 25, 2)
        await a.host_lease("127.0.0.9", 25, 2)
        srv.stop()
        srv.start()  # same port, empty
        wait_back = time.monotonic() + 10
        while srv.client().zcard("t:conns:127.0.0.9:25") < 2:
            assert time.monotonic() < wait_back, "leases not put back"
            await asyncio.sleep(0.1)
        b = SharedLimits(srv.url, "t:", lease_ms=1500)
        third = asyncio.create_task(b.host_lease("127.0.0.9", 25, 2))
        await asyncio.sleep(0.8)
        full = not third.done()
        third.cancel()
        await a.close()
        await b.close()
        return full

    try:
        assert asyncio.run(main())
    finally:
        srv.stop()


def test_a_unit_gives_up_waiting_for_a_server_other_engines_fill(redis_server, monkeypatch):
    monkeypatch.setattr(shared, "FULL_WAIT", 0.5)

    async def main():
        a = SharedLimits(redis_server.url, "t:")
        b = SharedLimits(redis_server.url, "t:")
        await a.host_lease("127.0.0.9", 25, 1)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(b.host_lease("127.0.0.9", 25, 1), 5)
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_the_hourly_cap_is_one_bucket_for_all_engines(redis_server):
    async def main():
        a = SharedLimits(redis_server.url, "t:")
        b = SharedLimits(redis_server.url, "t:")
        # 3,600 an hour: a minute's worth (60) at once, then one a second, for both together
        first = [await a.send_delay(3600) for _ in range(40)]
        second = [await b.send_delay(3600) for _ in range(20)]
        over = await b.send_delay(3600)
        await a.close()
        await b.close()
        return first, second, over

    first, second, over = asyncio.run(main())
    assert first == [0.0] * 40 and second == [0.0] * 20
    assert 0.5 < over <= 1.5  # alone, b would still have had 40 of its own


def test_a_cut_in_a_destinations_concurrency_reaches_the_other_engines_once(redis_server):
    async def main():
        a = SharedLimits(redis_server.url, "t:")
        b = SharedLimits(redis_server.url, "t:")
        a.publish_cut("busy.test", 2)
        await asyncio.sleep(0.2)
        seen = [await b.poll_cuts(), await b.poll_cuts(), await a.poll_cuts()]
        await asyncio.sleep(0.01)
        a.publish_cut("busy.test", 1)  # cut again later: news again
        await asyncio.sleep(0.2)
        seen.append(await b.poll_cuts())
        await a.close()
        await b.close()
        return seen

    first, again, own, later = asyncio.run(main())
    assert first == [("busy.test", 2)] and again == [] and own == [] and later == [("busy.test", 1)]


def test_a_window_lowered_by_another_engine_climbs_back_on_its_own():
    from mailengine.throttle import Window
    w = Window(5, 10)
    assert w.lower_to(2) and w.limit == 2 and w.cuts == 1
    assert not w.lower_to(3) and w.limit == 2
    for _ in range(4):
        w.success()
    assert w.limit > 2


def test_without_redis_an_engine_goes_on_alone(caplog):
    async def main():
        s = SharedLimits(f"redis://127.0.0.1:{free_port()}/0", "t:")
        t0 = time.monotonic()
        await s.host_lease("127.0.0.9", 25, 2)
        shared_ok = not s.health.down
        out = [await s.send_delay(3600), shared_ok, await s.send_delay(3600)]
        took = time.monotonic() - t0
        await s.close()
        return out, took

    with caplog.at_level(logging.WARNING, logger="mailengine.shared"):
        out, took = asyncio.run(main())
    assert out == [None, False, None] and took < 3.0  # local limits, at once
    warnings = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert len(warnings) == 1


def test_a_list_batch_sent_twice_goes_in_once(redis_server):
    mirror = ListMirror(redis_server.url, "t:")
    try:
        batch = [("t:list:hard-bounces", "a@x.test"), ("t:list:hard-bounces", "b@x.test")]
        assert mirror._send("b1", batch) and mirror._send("b1", batch)  # reply lost, sent again
        assert redis_server.client().lrange("t:list:hard-bounces", 0, -1) == ["a@x.test",
                                                                             "b@x.test"]
    finally:
        mirror.close()


def test_a_malformed_redis_url_is_refused_with_the_reason(tmp_path):
    from mailengine.config import Config, ConfigError
    cfg = Config(home=tmp_path)
    with pytest.raises(ConfigError, match="redis_url"):
        cfg.set("shared.redis_url", "redis://host:abc/0")
    with pytest.raises(ConfigError, match="redis_url"):
        cfg.set("shared.redis_url", "http://host:6379")
    cfg.set("shared.redis_url", "redis://:pw@127.0.0.1:6379/2")


def test_list_lines_reach_redis_also_when_it_starts_late(monkeypatch):
    monkeypatch.setattr(shared, "OFFLINE_RETRY", 0.2)
    srv = RedisServer()  # not started yet
    mirror = ListMirror(srv.url, "t:")
    try:
        mirror.push("hard-bounces.txt", ["a@x.test", "b@x.test"])
        time.sleep(0.3)  # tried and failed: kept
        srv.start()
        mirror.push("soft-undeliverable.txt", ["c@y.test"])
        r = srv.client()
        wait(lambda: r.llen("t:list:soft-undeliverable") == 1, 10, "the lines in Redis")
        assert r.lrange("t:list:hard-bounces", 0, -1) == ["a@x.test", "b@x.test"]
    finally:
        mirror.close()
        srv.stop()


def relay_settings(redis_url: str, sink_port: int, prefix: str) -> dict:
    return {"queue.pause_sending": False, "queue.save_done": False,
            "queue.queue_check_interval": 0.5, "queue.retry_intervals": [0.05],
            "policy.relay_ips": ["127.0.0.1"],
            "limits.max_connections_per_host": 2,
            "basic.dns_servers": [f"dest.test,mx.dest.test,MX,127.0.0.1:{sink_port}"],
            "shared.redis_url": redis_url, "shared.key_prefix": prefix}


def send_each(engines: list[RunningEngine], n: int, rcpt: str = "user{i}@dest.test") -> None:
    for eng in engines:
        for i in range(n):
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("list@src.test", [rcpt.format(i=i)], b"Subject: t\r\n\r\nhi\r\n")


@pytest.mark.parametrize("shared_on", [False, True])
def test_two_engines_together_keep_one_servers_connection_cap(tmp_path, redis_server, shared_on):
    """Two engines, one slow server, max_connections_per_host = 2: sharing, the server never sees
    more than 2 connections from both; alone, each allows itself 2 (the case that shows the
    test can tell)."""
    sink = ThreadedSink(script=SinkScript(delays={"BODY": 0.3})).start()
    url = redis_server.url if shared_on else ""
    try:
        with RunningEngine(tmp_path / "a", relay_settings(url, sink.port, "e2e:")) as a, \
                RunningEngine(tmp_path / "b", relay_settings(url, sink.port, "e2e:")) as b:
            send_each([a, b], 8)
            wait(lambda: len(sink.messages) == 16, 60, "16 messages at the sink")
            st = control.request(a.home / "mailengine.sock", "status")
    finally:
        sink.stop()
    if shared_on:
        assert sink.peak_connections <= 2
        assert redis_server.client().keys("e2e:conns:*") == []  # places given back at stop
        assert st["shared"]["reachable"] and st["shared"]["prefix"] == "e2e:"
        assert "reachable," in format_status(st)
    else:
        assert sink.peak_connections > 2 and "shared" not in st



def test_hard_failures_reach_the_shared_list_and_the_file(tmp_path, redis_server):
    sink = ThreadedSink(script=SinkScript(rcpt={"gone@dest.test": "550 5.1.1 No such user"})
                        ).start()
    try:
        settings = relay_settings(redis_server.url, sink.port, "lists:")
        with RunningEngine(tmp_path, settings) as eng:
            send_each([eng], 1, rcpt="gone@dest.test")
            r = redis_server.client()
            wait(lambda: r.lrange("lists:list:hard-undeliverable", 0, -1) == ["gone@dest.test"],
                 30, "the address in the shared list")
    finally:
        sink.stop()
    assert (Path(tmp_path) / "hard-undeliverable.txt").read_text() == "gone@dest.test\n"


def test_an_engine_whose_redis_is_down_still_delivers_on_its_own_limits(tmp_path):
    sink = ThreadedSink().start()
    dead = f"redis://:pw@127.0.0.1:{free_port()}/0"
    try:
        web = free_port()
        settings = {**relay_settings(dead, sink.port, "down:"), "limits.max_send_rate": 3600,
                    "network.web_port": web, "network.web_ip": "127.0.0.1"}
        with RunningEngine(tmp_path, settings) as eng:
            send_each([eng], 3)
            wait(lambda: len(sink.messages) == 3, 30, "3 messages at the sink")
            st = control.request(tmp_path / "mailengine.sock", "status")
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            out = eng.read_output()
    finally:
        sink.stop()
    assert st["shared"]["reachable"] is False and "pw" not in st["shared"]["redis"]
    assert "NOT REACHABLE" in format_status(st)
    # once each for the shared limits and the suppression list's copy in Redis, not per use
    assert out.count("shared limits: Redis at") == 1 and ":pw@" not in out
    assert out.count("cannot be reached") <= 2
    assert "\nmailengine_shared_redis_up 0\n" in metrics


@pytest.mark.parametrize("shared_on", [False, True])
def test_an_engine_slows_down_for_a_server_that_troubles_another_engine(tmp_path, redis_server,
                                                                         shared_on):
    """Engine A meets '421' at busy.test and halves its concurrency there (5 -> 2). Sharing,
    engine B does the same before it sends there; alone, B opens its usual 5 at once."""
    refusing = ThreadedSink(script=SinkScript(greeting="421 4.7.0 Too busy, try later")).start()
    slow = ThreadedSink(script=SinkScript(delays={"BODY": 0.4})).start()
    url = redis_server.url if shared_on else ""

    def settings(port):
        return {**relay_settings(url, port, "cuts:"), "limits.max_connections_per_host": 10,
                "basic.dns_servers": [f"busy.test,mx.busy.test,MX,127.0.0.1:{port}"]}
    try:
        with RunningEngine(tmp_path / "a", settings(refusing.port)) as a, \
                RunningEngine(tmp_path / "b", settings(slow.port)) as b:
            send_each([a], 1, rcpt="x@busy.test")
            events = tmp_path / "a" / "log" / "events.jsonl"
            wait(lambda: events.exists() and events.stat().st_size > 0, 20, "A's attempt")
            if shared_on:
                wait(lambda: "concurrency lowered to 2 here too" in b.read_output(), 10,
                     "B to follow A's cut")
            else:
                time.sleep(2.5)
            send_each([b], 8, rcpt="u{i}@busy.test")
            wait(lambda: len(slow.messages) == 8, 60, "B's 8 messages")
    finally:
        refusing.stop()
        slow.stop()
    # B starts at 2 and climbs by one per window's worth of successes: of 8 messages, the last
    # 3 go out at 3 at once; alone it opens 5 at once
    if shared_on:
        assert slow.peak_connections <= 3
    else:
        assert slow.peak_connections >= 4


@pytest.mark.parametrize("shared_on", [False, True])
def test_two_engines_together_keep_the_hourly_cap(tmp_path, redis_server, shared_on):
    """max_send_rate = 3,600 an hour: a minute's worth (60) may go at once. Two engines with 40
    messages each: sharing, about 60 go out at once and the rest one a second; alone, each
    engine's own 60 lets all 80 go."""
    sink = ThreadedSink().start()
    url = redis_server.url if shared_on else ""
    try:
        settings = {**relay_settings(url, sink.port, "rate:"), "limits.max_send_rate": 3600}
        with RunningEngine(tmp_path / "a", settings) as a, \
                RunningEngine(tmp_path / "b", settings) as b:
            t0 = time.monotonic()
            send_each([a, b], 40)
            if shared_on:
                wait(lambda: len(sink.messages) >= 60, 30, "60 messages at the sink")
                time.sleep(1.0)
            else:  # sharing, the last 20 would take 20 s
                wait(lambda: len(sink.messages) == 80, 15, "all 80 at the sink")
            got, took = len(sink.messages), time.monotonic() - t0
    finally:
        sink.stop()
    if shared_on:
        assert got <= 60 + took + 2, (got, took)  # the minute's worth, then one a second
