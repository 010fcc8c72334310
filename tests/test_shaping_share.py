"""Traffic shaping's state kept across a restart and shared by several engines through a real
Redis (shaping_link.py, shaping_state.py, shared_shaping.py; issue 17 item 4)."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
import time

import pytest

from mailengine import shared
from mailengine.shaping import Override, Shaping, parse_rules, shipped_rules
from mailengine.shaping_link import ShapingLink
from mailengine.shared import SharedLimits
from mailengine.testing.engine import RunningEngine, wait_until as wait
from mailengine.testing.redis_server import RedisServer
from mailengine.testing.sink import SinkScript

from test_cli_queue import run_cli
from test_delivery import FAST, infs, sinks  # noqa: F401  (sinks: the fixture)
from test_shaping import Clock, reply, send_each

needs_redis = pytest.mark.skipif(not shutil.which("redis-server"),
                                 reason="redis-server is installed by .ci/run")

SUSPEND = "421 4.7.28 Our system has detected an unusual rate of unsolicited mail"
THROTTLE = "421 4.7.0 Try again later, closing connection."


def shaping(text: str = "", clock=time.time) -> Shaping:
    return Shaping(parse_rules(text, "shaping.toml", shipped_rules()), clock)


@pytest.fixture
def redis_server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


# ---------------------------------------------------------------- taken from elsewhere

def test_news_from_elsewhere_never_weakens_a_suspension_and_an_older_lift_spares_new_trouble():
    clock = Clock()
    a, b = shaping(clock=clock), shaping(clock=clock)
    a.react("gmail", [reply("a@gmail.com", SUSPEND)])
    b.react("gmail", [reply("a@gmail.com", THROTTLE)])
    suspension, throttle = a.overrides["gmail"], b.overrides["gmail"]
    assert not a.adopt(throttle, "by another engine") and a.limit("gmail", 20) == 0
    assert b.adopt(suspension, "by another engine") and b.limit("gmail", 20) == 0
    clock.t += 10
    assert a.lifted_elsewhere("gmail", clock.t - 20) is None  # lifted before it began
    assert a.lifted_elsewhere("gmail", clock.t) is not None and a.limit("gmail", 20) == 20
    # a throttle to 0.25 recovering every 5 min is over two steps after its time
    o = Override("x", "throttle", "r", 0, 600, 0.25, 300)
    assert o.end() == 900 and not o.over(899) and o.over(900)
    assert not a.adopt(o, "by another engine")  # over already at the clock's 1010: not taken


# ---------------------------------------------------------------- kept across a restart

def test_suspensions_and_throttles_are_kept_in_the_home_until_they_are_over(tmp_path):
    clock = Clock(time.time())
    s = shaping(clock=clock)
    ShapingLink(s, tmp_path)
    s.react("gmail", [reply("a@gmail.com", SUSPEND)])
    s.react("yahoo", [reply("a@yahoo.com", "421 4.7.0 [TS02] Messages from 192.0.2.1 "
                                           "temporarily deferred")])
    kept = json.loads((tmp_path / "shaping-state.json").read_text())["overrides"]
    assert [(o["dest"], o["action"]) for o in kept] == [("gmail", "suspend"),
                                                        ("yahoo", "throttle")]
    # a restart: a new Shaping reads them back, cause and expiry included
    again = shaping(clock=clock)
    ShapingLink(again, tmp_path)
    assert again.active() == s.active() and again.limit("gmail", 10) == 0
    # lifted by hand: gone from the file too
    again.lift("yahoo")
    third = shaping(clock=clock)
    ShapingLink(third, tmp_path)
    assert [a["dest"] for a in third.active()] == ["gmail"]
    # past its expiry it is dropped at load
    clock.t += 3601
    fourth = shaping(clock=clock)
    ShapingLink(fourth, tmp_path)
    assert fourth.active() == [] and fourth.limit("gmail", 10) == 10


def test_a_state_file_that_cannot_be_read_is_logged_and_ignored(tmp_path, caplog):
    (tmp_path / "shaping-state.json").write_text("{not json")
    s = shaping()
    with caplog.at_level(logging.ERROR, "mailengine.shaping"):
        ShapingLink(s, tmp_path)
    assert s.active() == [] and "shaping-state.json cannot be read" in caplog.text
    s.react("gmail", [reply("a@gmail.com", SUSPEND)])  # and it is written anew
    assert "gmail" in (tmp_path / "shaping-state.json").read_text()


def test_an_engine_restart_keeps_a_suspension(tmp_path, sinks):
    tries = {"n": 0}

    def mail(sess, verb, arg):
        tries["n"] += 1
        return ("421 4.7.28 Our system has detected an unusual rate of unsolicited mail"
                if tries["n"] == 1 else "250 2.1.0 Ok")
    sinks.add("127.0.0.171", script=SinkScript(replies={"MAIL": mail}))
    settings = {**FAST, "limits.max_connections_per_host": 5, "basic.dns_servers": [
        "workspace.test,aspmx.l.google.com,MX,127.0.0.171:25"]}
    tmp_path.mkdir(exist_ok=True)
    with RunningEngine(tmp_path, settings) as eng:
        send_each(eng, ["a@workspace.test"])
        wait(lambda: "SUSPENDED" in run_cli(tmp_path, "shaping", "list")[1],
             what="the suspension")
    with RunningEngine(tmp_path, settings) as eng:
        code, out = run_cli(tmp_path, "shaping", "list")
        assert code == 0 and "gmail: SUSPENDED for 59m" in out and "cause: 421 4.7.28" in out
        time.sleep(2.5)  # its retries (1.2 s) came and went: the message still waits, untried
        assert tries["n"] == 1 and not infs(eng, "done")
        assert run_cli(tmp_path, "shaping", "lift", "gmail")[0] == 0
        wait(lambda: len(infs(eng, "done")) == 1, what="delivery after the lift")
    assert tries["n"] == 2
    assert "kept from before the restart" in eng.read_output()


# ---------------------------------------------------------------- shared through Redis

def _home() -> str:
    return tempfile.mkdtemp(prefix="shaping-share-")


def two_engines(url: str, text: str = ""):
    """[(Shaping, ShapingLink, SharedLimits)] for two engines sharing `url`."""
    out = []
    for _ in range(2):
        s = shaping(text)
        limits = SharedLimits(url, "t:")
        out.append((s, ShapingLink(s, _home(), limits), limits))
    return out


@needs_redis
def test_a_suspension_reaches_the_other_engine_and_a_lift_on_either_lifts_it_everywhere(
        redis_server):
    async def main():
        (a, la, ra), (b, lb, rb) = two_engines(redis_server.url)
        assert await lb.poll() == []  # nothing on the board yet
        a.react("gmail", [reply("a@gmail.com", SUSPEND)])
        await la.flush()
        assert await lb.poll() == ["gmail"]
        got = b.active()
        assert got == a.active() and got[0]["cause"] == SUSPEND and b.limit("gmail", 10) == 0
        assert await lb.poll() == [] and await la.poll() == []  # each news once; ours is not
        # a throttle from an engine that had not heard of the suspension yet never replaces it
        c, rc = shaping(), SharedLimits(redis_server.url, "t:")
        lc = ShapingLink(c, _home(), rc)
        c.react("gmail", [reply("a@gmail.com", THROTTLE)])
        await lc.flush()
        await lb.poll()
        assert b.active()[0]["action"] == "suspend"
        # lifted by hand on the engine that only adopted it: every engine lifts it
        assert b.lift("gmail") is not None
        await lb.flush()
        assert await la.poll() == ["gmail"] and a.active() == [] and a.limit("gmail", 10) == 10
        # a throttle goes around the same way, with its factor
        b.react("gmail", [reply("a@gmail.com", THROTTLE)])
        await lb.flush()
        assert await la.poll() == ["gmail"]
        assert a.limit("gmail", 20) == 10 and a.active()[0]["action"] == "throttle"
        # an engine started later finds what is in force on the board
        d, rd = shaping(), SharedLimits(redis_server.url, "t:")
        ld = ShapingLink(d, _home(), rd)
        assert await ld.poll() == ["gmail"] and d.limit("gmail", 20) == 10
        for limits in (ra, rb, rc, rd):
            await limits.close()

    asyncio.run(main())


RATES = """
[provider.gmail]
max_messages_per_minute = 60
max_connections_per_minute = 30
"""


async def took(coro) -> float:
    t0 = time.monotonic()
    await coro
    return time.monotonic() - t0


@needs_redis
def test_a_providers_message_and_connection_rates_are_one_budget_for_all_engines(redis_server):
    """60 messages a minute: 3 may go at once, then one a second, for both engines together
    (alone, each would have its own 3 at once). 30 connections a minute: 1.5 at once, so the
    second engine's first one waits for the missing half, a second."""
    async def main():
        (a, la, ra), (b, lb, rb) = two_engines(redis_server.url, RATES)
        first = [await took(la.wait_message("gmail")) for _ in range(3)]
        then = await took(lb.wait_message("gmail"))
        conn_a = await took(la.wait_connection("gmail"))
        conn_b = await took(lb.wait_connection("gmail"))
        other = await took(lb.wait_message("elsewhere.test"))  # no rate there: no wait
        await ra.close()
        await rb.close()
        return first, then, conn_a, conn_b, other

    first, then, conn_a, conn_b, other = asyncio.run(main())
    assert max(first) < 0.3 and 0.6 < then < 2.0
    assert conn_a < 0.3 and 0.6 < conn_b < 2.0
    assert other < 0.3


@needs_redis
def test_redis_stopped_midway_each_engine_goes_on_alone_and_catches_up_when_it_is_back(
        monkeypatch, caplog):
    monkeypatch.setattr(shared, "OFFLINE_RETRY", 0.2)
    srv = RedisServer().start()

    async def main():
        (a, la, ra), (b, lb, rb) = two_engines(srv.url, RATES)
        await la.wait_message("gmail")
        srv.stop()
        a.react("gmail", [reply("a@gmail.com", SUSPEND)])  # no exception: kept to post later
        assert a.limit("gmail", 10) == 0
        assert await lb.poll() == [] and b.limit("gmail", 10) == 10
        t = [await took(lb.wait_message("gmail")) for _ in range(3)]  # its own bucket
        srv.start()  # same port, empty
        deadline = time.monotonic() + 10
        while True:
            await asyncio.sleep(0.3)
            await la.poll()  # posts what Redis did not take
            if await lb.poll() == ["gmail"]:
                break
            assert time.monotonic() < deadline, "the suspension never reached b"
        assert b.limit("gmail", 10) == 0
        await ra.close()
        await rb.close()
        return t

    try:
        with caplog.at_level(logging.WARNING, "mailengine.shared"):
            t = asyncio.run(main())
    finally:
        srv.stop()
    assert max(t) < 0.5
    down = [r for r in caplog.records if "cannot be reached" in r.getMessage()]
    assert 1 <= len(down) <= 2  # once per engine, not per call


@needs_redis
def test_two_engines_one_suspended_by_a_reply_the_other_follows_and_a_lift_reaches_both(
        tmp_path, sinks, redis_server):
    tries = {"n": 0}

    def mail(sess, verb, arg):
        tries["n"] += 1
        return SUSPEND if tries["n"] == 1 else "250 2.1.0 Ok"
    sinks.add("127.0.0.172", script=SinkScript(replies={"MAIL": mail}))
    settings = {**FAST, "limits.max_connections_per_host": 5,
                "shared.redis_url": redis_server.url, "shared.key_prefix": "e2e:",
                "basic.dns_servers": ["workspace.test,aspmx.l.google.com,MX,127.0.0.172:25"]}
    with RunningEngine(tmp_path / "a", settings) as a, RunningEngine(tmp_path / "b", settings) as b:
        send_each(a, ["x@workspace.test"])
        wait(lambda: "gmail: SUSPENDED" in run_cli(b.home, "shaping", "list")[1], 20,
             "B to adopt A's suspension")
        assert "cause: 421 4.7.28" in run_cli(b.home, "status")[1]
        code, out = run_cli(b.home, "shaping", "lift", "gmail")
        assert code == 0 and "suspend lifted" in out
        wait(lambda: len(infs(a, "done")) == 1, 20, "A to deliver once the lift reached it")
    assert "by another engine" in b.read_output()
    assert "lifted by hand on another engine" in a.read_output() and tries["n"] == 2
