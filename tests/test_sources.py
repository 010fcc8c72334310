"""Sending sources, pools and warm-up (sources.py), the pool header (pool_header.py) and the
API's `pool` field (web/inject.py): pure logic with an injected clock. Against a real engine and
the fakenet servers: test_sources_fakenet.py."""
from __future__ import annotations

import datetime as dt
import json
import tomllib
from collections import Counter

import pytest

from mailengine import pool_header
from mailengine.shaping import ShapingError, parse_rules, shipped_rules
from mailengine.sources import Source, Sources, WarmupHold, parse_sources, rdns_problem
from mailengine.web.inject import InjectError, prepare

DAY = dt.date(2026, 12, 5)
NOON = dt.datetime.combine(DAY, dt.time(12)).timestamp()

RULES = """
default_pool = "main"
[sources.a]
ip = "127.0.0.11"
helo = "a.example.com"
[sources.b]
ip = "127.0.0.12"
helo = "b.example.com"
[sources.new]
ip = "127.0.0.13"
helo = "new.example.com"
warmup_start = 2026-12-04
warmup = [2, 5, 10]
warmup_provider = { gmail = [1, 3] }
[pools.main]
sources = { a = 3, b = 1 }
[pools.fresh]
sources = { new = 5, a = 1 }
[pools.only-new]
sources = ["new"]
[sender_pools]
"news.example.org" = "fresh"
"""


class Clock:
    def __init__(self, t: float = NOON) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def sources(text: str = RULES, clock=None, counts=None) -> Sources:
    return Sources(parse_sources(tomllib.loads(text), "shaping.toml"), clock or Clock(),
                   counts_path=counts)


def pick(s: Sources, pool: str, dest: str = "gmail", n: int = 1, cap=None) -> str:
    src = s.choose(pool, dest, n, cap)
    assert src is not None
    s.done(src, dest, n, 0)  # sent: its budget stays taken
    return src.name


def test_the_file_is_read_and_checked():
    rules = parse_sources(tomllib.loads(RULES), "f")
    assert rules.sources["new"].warmup_start == dt.date(2026, 12, 4)
    assert rules.pools["main"].weights == (("a", 3), ("b", 1))
    assert rules.sender_pools == {"news.example.org": "fresh"} and rules.default_pool == "main"
    parse_rules(RULES, "shaping.toml", shipped_rules())  # the shaping rules accept the keys
    for bad, says in [
            ('[sources.a]\nip = "nope"\nhelo = "a.example.com"\n', "ip"),
            ('[sources.a]\nip = "127.0.0.1"\nhelo = "a"\n', "helo"),
            ('[sources.a]\nip = "127.0.0.1"\nhelo = "a.b.cc"\nwarmup = [1]\n', "warmup_start"),
            ('[sources.a]\nip = "127.0.0.1"\nhelo = "a.b.cc"\n[pools.p]\nsources = {x = 1}\n',
             "no source 'x'"),
            ('[sources.a]\nip = "127.0.0.1"\nhelo = "a.b.cc"\n[pools.p]\nsources = {a = 0}\n',
             "weight"),
            ('default_pool = "x"\n[sources.a]\nip = "127.0.0.1"\nhelo = "a.b.cc"\n', "'x'"),
            ('default_pool = "x"\n', "default_pool")]:
        with pytest.raises(ShapingError, match=says):
            parse_sources(tomllib.loads(bad), "f")


def test_weighted_pick_gives_each_source_its_share_interleaved():
    s = sources()
    picks = [pick(s, "main") for _ in range(8)]
    assert Counter(picks) == {"a": 6, "b": 2}
    assert picks[:4].count("b") == 1  # spread, not a run of a's then b's


def test_the_pool_is_chosen_by_the_message_then_its_sender_domain_then_the_default(caplog):
    s = sources()
    assert s.pool_for("only-new", "news.example.org") == "only-new"  # header or API field
    assert s.pool_for("", "NEWS.example.org") == "fresh"             # sender domain
    assert s.pool_for("", "other.example") == "main"                 # default_pool
    assert s.pool_for("nosuch", "other.example") == "main"           # unknown: logged once
    assert "nosuch" in caplog.text
    plain = sources(RULES.replace('default_pool = "main"', ""))
    assert plain.pool_for("", "other.example") == ""
    assert {src.name for src, _ in plain.members("")} == {"a", "b", "new"}  # every source


def test_warm_up_ramps_by_day_per_provider():
    new = parse_sources(tomllib.loads(RULES), "f").sources["new"]
    assert [new.daily_limit("yahoo", DAY + dt.timedelta(d)) for d in range(-2, 4)] == \
        [2, 2, 5, 10, None, None]  # before day 1: day 1's; after the list: warmed
    assert [new.daily_limit("gmail", DAY + dt.timedelta(d)) for d in range(-1, 2)] == \
        [1, 3, None]


def test_over_its_warm_up_a_unit_moves_to_a_warmed_source_instead_of_waiting():
    s = sources()
    # day 2 of "new": 3 to gmail, 5 to any other provider; it has most of the pool's weight
    picks = [pick(s, "fresh", "gmail") for _ in range(10)]
    assert picks.count("new") == 3 and picks.count("a") == 7
    assert [pick(s, "fresh", "yahoo") for _ in range(7)].count("new") == 5  # per provider
    assert s.used == {"new": {"gmail": 3, "yahoo": 5}}


def test_only_when_no_source_has_budget_does_the_unit_wait_until_tomorrow(caplog):
    caplog.set_level("INFO", "mailengine.sources")
    clock = Clock()
    s = sources(clock=clock)
    assert [pick(s, "only-new", "gmail") for _ in range(3)] == ["new"] * 3
    for _ in range(2):
        with pytest.raises(WarmupHold) as e:
            s.choose("only-new", "gmail", 1, None)
    assert NOON < e.value.until <= NOON + 600  # looked at again soon (a rule may change)
    assert caplog.text.count("waits in retry/") == 1  # said once in a while, not per unit
    clock.t += 86400  # day 3: gmail is warmed for it
    assert pick(s, "only-new", "gmail") == "new"


def test_unsent_recipients_give_their_budget_back():
    s = sources()
    src = s.choose("only-new", "gmail", 2, None)
    s.done(src, "gmail", 2, unsent=2)  # deferred, refused...: not sent today
    assert s.used["new"]["gmail"] == 0


def test_the_connection_cap_holds_per_source():
    s = sources()
    got = [s.choose("main", "gmail", 1, cap=2) for _ in range(5)]
    assert Counter(x.name for x in got if x) == {"a": 2, "b": 2} and got[4] is None
    s.done(got[0], "gmail", 1, 0)
    assert s.choose("main", "gmail", 1, cap=2) is not None  # a place freed


def test_the_days_counts_survive_a_restart_and_reset_the_next_day(tmp_path):
    path = tmp_path / "warmup.json"
    clock = Clock()
    s = sources(clock=clock, counts=path)
    for _ in range(2):
        pick(s, "only-new", "gmail")
    s.save()
    assert json.loads(path.read_text()) == {"day": "2026-12-05", "used": {"new": {"gmail": 2}}}
    again = sources(clock=clock, counts=path)
    assert pick(again, "only-new", "gmail") == "new"
    with pytest.raises(WarmupHold):
        again.choose("only-new", "gmail", 1, None)  # 3 a day: 2 before the restart, 1 after
    clock.t += 86400
    assert sources(clock=clock, counts=path).used == {}  # yesterday's counts


def test_usage_shows_each_sources_warm_up_today():
    s = sources()
    pick(s, "only-new", "gmail")
    use = {u["source"]: u for u in s.usage()}
    assert use["a"]["warmed"] and not use["new"]["warmed"]
    assert use["new"]["warmup_day"] == 2 and use["new"]["today"]["gmail"] == \
        {"used": 1, "limit": 3}
    from mailengine.sources import describe
    assert any("new 127.0.0.13" in line and "gmail 1/3" in line for line in describe(s.usage()))


def test_rdns_mismatch_is_a_warning():
    src = Source("a", "127.0.0.11", "a.example.com")
    assert rdns_problem(src, ["A.example.com."]) is None
    assert "says other.example.com, not its EHLO name a.example.com" in \
        rdns_problem(src, ["other.example.com"])
    assert "no reverse DNS" in rdns_problem(src, [], "nxdomain")


def test_the_pool_header_is_taken_out_of_the_header_only():
    msg = (b"Subject: hi\r\nX-MailEngine-Pool: Bulk\r\n  \r\nFrom: a@b.test\r\n"
           b"x-mailengine-pool: other\r\n\r\nX-MailEngine-Pool: body\r\n")
    data, pool = pool_header.take(msg)
    assert pool == "bulk"
    assert data == b"Subject: hi\r\nFrom: a@b.test\r\n\r\nX-MailEngine-Pool: body\r\n"
    plain = b"Subject: x\r\n\r\nbody\r\n"
    assert pool_header.take(plain) == (plain, "")


def test_the_api_pool_field_goes_in_as_the_header():
    doc = {"from": "a@src.test", "to": ["x@d.test"], "headers": {"Subject": "s"}, "body": "b",
           "pool": "bulk"}
    (p,) = prepare(doc, "h.test", 100, 10**6)
    assert p.data.startswith(b"X-MailEngine-Pool: bulk\r\n")
    assert pool_header.take(p.data)[1] == "bulk"
    with pytest.raises(InjectError, match="pool"):
        prepare({**doc, "pool": "Not a name"}, "h.test", 100, 10**6)


def test_a_providers_message_rate_holds_per_source():
    from mailengine.shaping import Rule
    clock = Clock()
    s = sources(clock=clock)
    a, b = s.rules.sources["a"], s.rules.sources["b"]
    rule = Rule(max_messages_per_minute=60)  # 3 at once (a few seconds' worth), then 1 a second
    assert [s.rate_delay(a, "gmail", rule) for _ in range(4)] == [0, 0, 0, 1.0]
    assert s.rate_delay(b, "gmail", rule) == 0  # another address: its own count
    assert s.rate_delay(a, "yahoo", rule) == 0  # another provider


def test_the_whole_provider_may_use_its_limits_times_the_sources():
    from mailengine.shaping import Shaping
    sh = Shaping(parse_rules(RULES + '[provider.gmail]\nmax_connections = 2\n'
                             'max_messages_per_minute = 60\n', "f", shipped_rules()))
    sh.set_per_source(3)
    assert sh.cap("gmail") == 6 and sh.limit("gmail", 100) == 6
    assert [sh.rate_delay("gmail") for _ in range(10)].count(0) == 9  # 9 at once: 3 times 3


def test_a_drop_in_through_client_enqueue_keeps_the_choice_in_the_inf(tmp_path):
    from mailengine.client import enqueue
    from mailengine.envelope import parse_inf
    mid = enqueue(tmp_path / "mailq", "a@src.test", ["x@d.test"],
                  ["Subject: s", "X-MailEngine-Pool: bulk"], "hi\n", durable=False)
    retry = tmp_path / "mailq" / "retry"
    assert parse_inf((retry / f"{mid}.inf").read_bytes(), mid).extra["pool"] == "bulk"
    assert b"x-mailengine-pool" not in (retry / f"{mid}.dat").read_bytes().lower()


def test_the_rdns_check_is_kept_for_the_web_admin_until_the_source_changes():
    s = sources()
    a, b = s.rules.sources["a"], s.rules.sources["b"]
    assert s.rdns == {}  # not checked yet
    assert s.note_rdns(a, ["A.example.com."]) is None
    line = s.note_rdns(b, ["mail.elsewhere.test"])
    assert line == rdns_problem(b, ["mail.elsewhere.test"])
    assert s.rdns == {"a": None, "b": line}
    # the file read again: b's EHLO name changed (to be checked again), a is the same
    s.use(parse_sources(tomllib.loads(RULES.replace('"b.example.com"', '"b2.example.com"')),
                        "shaping.toml"))
    assert s.rdns == {"a": None}
    s.note_rdns(b, ["b.example.com"])  # a check of the old b ended after the change: not kept
    assert "b" not in s.rdns


def test_each_sources_pools_and_weights():
    s = sources()
    assert s.pools_of("a") == [("main", 3), ("fresh", 1)]
    assert s.pools_of("new") == [("fresh", 5), ("only-new", 1)]
    assert s.pools_of("b") == [("main", 1)]
