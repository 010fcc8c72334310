"""Traffic shaping per provider (shaping.py): pure tests with an injected clock, then a real
engine delivering to scripted sinks whose MX host names roll up to a provider."""
from __future__ import annotations

import json
import logging
import os
import smtplib
import time
import urllib.request

import pytest

from mailengine.outcome import RcptOutcome
from mailengine.scheduler import Scheduler
from mailengine.shaping import Shaping, ShapingError, parse_rules, shipped_rules
from mailengine.testing.engine import RunningEngine, free_port, wait_until as wait
from mailengine.testing.sink import SinkScript

from test_cli_queue import run_cli
from test_delivery import FAST, infs, sinks  # noqa: F401  (sinks: the fixture)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def shaping(text: str = "", builtin: bool = True, clock=None) -> Shaping:
    base = shipped_rules() if builtin else None
    return Shaping(parse_rules(text, "shaping.toml", base), clock or Clock())


def reply(address: str, text: str) -> RcptOutcome:
    code, rest = text.split(" ", 1)
    enhanced, _, words = rest.partition(" ")
    if not enhanced[:1].isdigit():
        enhanced, words = "", rest
    return RcptOutcome.from_reply(address, int(code), enhanced, words, "rcpt")


# ---------------------------------------------------------------- providers and rules

def test_mx_rollup_puts_a_workspace_domain_under_gmail_and_test_domains_nowhere():
    s = shaping()
    assert s.dest("gmail.com") == "gmail"  # known by name before any lookup
    assert s.dest("example.org") == "example.org"
    assert s.learn("example.org", ["aspmx.l.google.com", "alt1.aspmx.l.google.com"]) == "gmail"
    assert s.dest("example.org") == "gmail"
    assert s.learn("example.org", ["aspmx.l.google.com", "alt1.aspmx.l.google.com"]) is None
    assert s.learn("corp.example", ["corp-example.mail.protection.outlook.com"]) == "microsoft365"
    assert s.learn("me.example", ["hotmail-com.olc.protection.outlook.com"]) == "microsoft"
    assert s.learn("aol.example", ["mx-aol.mail.gm0.yahoodns.net"]) == "yahoo"
    # a name that merely contains a suffix is not the provider's
    assert s.learn("evil.example", ["mx.notgoogle.com"]) is None
    for domain in ("dest.test", "x.test"):
        assert s.learn(domain, [f"mx.{domain}"]) is None
        assert s.dest(domain) == domain
    # a domain whose MX moved away leaves the provider
    assert s.learn("example.org", ["mx.example.org"]) is None
    assert s.dest("example.org") == "example.org"
    # its own server first and a Google backup: its mail goes to its own server, not Gmail's
    assert s.learn("own.example", ["mx.own.example", "alt1.aspmx.l.google.com"]) is None
    assert s.dest("own.example") == "own.example"
    assert s.match_mx(["alt1.aspmx.l.google.com", "mx1.mail.protection.outlook.com"]) is None


def test_our_own_dns_and_internal_failures_are_not_the_providers_replies():
    s = shaping("[[reaction]]\ncode = 451\naction = \"suspend\"\nduration = \"1h\"\n")
    dns = RcptOutcome.from_reply("a@gmail.com", 451, "4.4.3", "DNS lookup failed", "dns")
    local = RcptOutcome.from_reply("b@gmail.com", 451, "4.3.0", "Internal error", "local")
    s.react("gmail", [dns, local])
    assert s.active() == []
    s.react("gmail", [reply("c@gmail.com", "451 4.3.0 try later")])  # the provider said it
    assert [a["dest"] for a in s.active()] == ["gmail"]


def test_rule_precedence_domain_over_provider_over_default():
    s = shaping("""
[default]
max_recipients_per_transaction = 10
max_deliveries_per_connection = 7
retry_intervals = [1, 2]

[provider.gmail]
max_recipients_per_transaction = 20

[domain."special.example"]
max_recipients_per_transaction = 30
""")
    s.learn("special.example", ["aspmx.l.google.com"])
    s.learn("plain.example", ["aspmx.l.google.com"])
    assert s.rule_for_domain("special.example").max_recipients_per_transaction == 30
    assert s.rule_for_domain("plain.example").max_recipients_per_transaction == 20
    assert s.rule_for_domain("other.test").max_recipients_per_transaction == 10
    # unset keys fall through: the provider's from the shipped file, the default's
    assert s.rule_for_domain("special.example").max_connections == 20
    assert s.rule_for_domain("special.example").max_deliveries_per_connection == 100
    assert s.rule_for_domain("other.test").max_deliveries_per_connection == 7
    # the domain stays in gmail: its rule has no limits of its own
    assert s.dest("special.example") == "gmail"


def test_a_domain_with_its_own_connection_limit_is_its_own_destination():
    s = shaping('[domain."big.example"]\nmax_connections = 3\n')
    assert s.learn("big.example", ["aspmx.l.google.com"]) is None
    assert s.dest("big.example") == "big.example"
    assert s.limit("big.example", 10) == 3
    assert s.limit("gmail", 50) == 20
    assert s.limit("gmail", 4) == 4  # the window is lower still
    assert s.limit("other.test", 10) == 10  # no rule: the window alone


def test_message_and_connection_rates_per_destination():
    clock = Clock()
    s = shaping("""
[provider.gmail]
max_messages_per_minute = 60
max_connections_per_minute = 6
""", clock=clock)
    waits = [s.rate_delay("gmail") for _ in range(10)]
    assert waits[:3] == [0, 0, 0]  # a few seconds' worth at once (60/20 = 3)
    assert waits[3] == pytest.approx(1.0) and waits[9] == pytest.approx(7.0)  # then 1 a second
    clock.t += 60
    assert s.rate_delay("gmail") == 0
    assert s.rate_delay("other.test") == 0  # no rule, no limit
    conn = [s.connect_delay("gmail") for _ in range(3)]
    assert conn[0] == 0 and conn[1] == pytest.approx(10.0) and conn[2] == pytest.approx(20.0)


def test_retry_intervals_and_max_age_per_provider():
    s = shaping("""
[provider.yahoo]
retry_intervals = [10, 30, 60, 120]
max_age = "1h"
""")
    assert s.retry_plan(["yahoo.com", "aol.com"], [5, 5]) == [10, 30]  # cut at an hour
    assert s.retry_plan(["gmail.com"], [5, 5]) == [5, 5]  # no rule: queue.retry_intervals
    assert s.retry_plan(["yahoo.com", "gmail.com"], [5, 5]) == [5, 5]  # they disagree


@pytest.mark.parametrize("text, words", [
    ("[provider.gmail]\nmax_conections = 3\n", "unknown key 'max_conections'"),
    ("[provider.gmail]\nmax_connections = 0\n", "max_connections: a whole number 1 or more"),
    ("[provider.gmail]\nmax_connections = \"lots\"\n", "not 'lots'"),
    ("[provider.new]\nmax_connections = 3\n", "say which mail it is"),
    ("[domain.\"a.example\"]\nmax_age = \"soon\"\n", "a duration like"),
    ("[[reaction]]\ncode = 421\naction = \"explode\"\n", "one of suspend, throttle, bounce"),
    ("[[reaction]]\nmatch = \"(\"\naction = \"bounce\"\n", "not a regular expression"),
    ("[[reaction]]\nprovider = \"nobody\"\ncode = 421\naction = \"bounce\"\n",
     "no provider 'nobody'"),
    ("[[reaction]]\ncode = 421\naction = \"suspend\"\n", "duration: required"),
    ("[[reaction]]\naction = \"bounce\"\n", "say which replies"),
    ("[[reaction]]\ncode = 421\naction = \"throttle\"\nduration = \"1m\"\nfactor = 2\n",
     "between 0 and 1"),
    ("max_connections = 3\n", "unknown key 'max_connections'"),
    ("[[reaction]]\nprovider = [\"gmail\"]\ncode = 421\naction = \"bounce\"\n",
     "the name of one provider"),  # a list crashed the engine at reload
    ("[[reaction]]\ncode = 421\naction = \"suspend\"\nduration = 1e300\n", "at most 365 days"),
    ("[provider.gmail]\nretry_intervals = [10, inf]\n", "a list of minutes"),
    ("[provider.gmail\n", "not valid TOML"),
])
def test_bad_rules_are_refused_with_a_clear_line(text, words):
    with pytest.raises(ShapingError) as e:
        parse_rules(text, "shaping.toml", shipped_rules())
    assert words in str(e.value) and str(e.value).startswith("shaping.toml")
    assert "\n" not in str(e.value)


def test_builtin_false_drops_the_shipped_rules():
    s = shaping("builtin = false\n")
    assert s.rules.providers == {} and s.rules.reactions == []
    assert s.dest("gmail.com") == "gmail.com"


def test_the_file_is_reloaded_when_it_changes_and_a_bad_one_keeps_the_rules(tmp_path, caplog):
    path = tmp_path / "shaping.toml"
    s = Shaping.from_home(tmp_path)  # no file: the shipped rules
    assert s.limit("gmail", 100) == 20
    path.write_text("[provider.gmail]\nmax_connections = 4\n")
    assert "rules read from" in s.reload_if_changed()
    assert s.limit("gmail", 100) == 4
    assert s.reload_if_changed() is None  # unchanged: not read again
    path.write_text("[provider.gmail]\nmax_connections = -1\n")
    os.utime(path, ns=(1, 1))  # a different stamp even within the same clock tick
    with caplog.at_level(logging.ERROR, "mailengine.shaping"):
        line = s.reload_if_changed()
    assert "max_connections" in line and "stay as they were" in line
    assert "stay as they were" in caplog.text
    assert s.limit("gmail", 100) == 4
    path.unlink()
    assert "removed" in s.reload_if_changed()
    assert s.limit("gmail", 100) == 20


def test_a_bad_file_at_start_leaves_the_shipped_rules(tmp_path):
    (tmp_path / "shaping.toml").write_text("[provider.gmail]\nmax_connections = []\n")
    s = Shaping.from_home(tmp_path)
    assert s.limit("gmail", 100) == 20


# ---------------------------------------------------------------- reactions

def test_gmail_4_7_28_suspends_gmail_until_it_expires_or_is_lifted(caplog):
    clock = Clock()
    s = shaping(clock=clock)
    text = "421 4.7.28 Our system has detected an unusual rate of unsolicited mail"
    with caplog.at_level(logging.INFO, "mailengine.shaping"):
        assert s.react("gmail", [reply("a@gmail.com", text)]) == set()
    assert "gmail suspended until" in caplog.text
    assert s.limit("gmail", 10) == 0
    a, = s.active()
    assert a["dest"] == "gmail" and a["action"] == "suspend" and a["cause"].startswith("421 4.7.28")
    assert a["until"] == clock.t + 3600
    clock.t += 3599
    assert s.tick() == [] and s.limit("gmail", 10) == 0
    clock.t += 1
    assert s.tick() == ["gmail"] and s.limit("gmail", 10) == 10 and s.active() == []
    s.react("gmail", [reply("a@gmail.com", text)])
    state, why = s.explain("gmail.com")  # the web admin's line for a domain of gmail
    assert state == "suspended" and "gmail: SUSPENDED for 60m 0s more" in why
    assert s.explain("other.test") is None
    assert s.lift("gmail").action == "suspend" and s.limit("gmail", 10) == 10
    assert s.lift("gmail") is None


def test_reactions_act_for_providers_only_and_per_provider():
    s = shaping()
    text = "421 4.7.28 unusual rate of unsolicited mail"
    s.react("dest.test", [reply("a@dest.test", text)])  # no provider: as without shaping
    s.react("yahoo", [reply("a@yahoo.com", text)])      # gmail's rule, not yahoo's
    assert s.active() == []


def test_a_throttle_halves_the_limits_then_learns_back_up_step_by_step():
    clock = Clock()
    s = shaping("""
[provider.gmail]
max_messages_per_minute = 60

[[reaction]]
provider = "gmail"
match = "slow down"
action = "throttle"
factor = 0.25
duration = "10m"
recover = "5m"
""", clock=clock)
    s.react("gmail", [reply("a@gmail.com", "451 4.7.1 slow down please")])
    assert s.limit("gmail", 20) == 5
    s.rate_delay("gmail")
    assert s._buckets["gmail"][0].rate == 15  # 60 per minute x 0.25
    clock.t += 600  # the 10 minutes are over: up one step
    assert s.tick() == ["gmail"] and s.limit("gmail", 20) == 10
    assert s.active()[0]["recovering"]
    clock.t += 299
    assert s.tick() == [] and s.limit("gmail", 20) == 10
    clock.t += 1  # another step: whole again, and gone
    assert s.tick() == ["gmail"] and s.limit("gmail", 20) == 20 and s.active() == []
    s.rate_delay("gmail")
    assert s._buckets["gmail"][0].rate == 60


def test_a_second_reply_does_not_compound_the_throttle_and_a_suspension_wins():
    clock = Clock()
    s = shaping(clock=clock)
    r = reply("a@gmail.com", "421 4.7.0 Try again later, closing connection.")
    s.react("gmail", [r, r])
    clock.t += 60
    s.react("gmail", [r])
    assert s.limit("gmail", 20) == 10
    assert s.active()[0]["until"] == clock.t + 1200  # it lasts longer, not lower
    s.react("gmail", [reply("b@gmail.com", "421 4.7.28 unusual rate")])
    assert s.limit("gmail", 20) == 0
    s.react("gmail", [r])  # a throttle does not end a suspension
    assert s.active()[0]["action"] == "suspend"


def test_bounce_fails_the_recipient_for_good():
    s = shaping()
    out = s.react("yahoo", [
        reply("a@yahoo.com", "421 4.7.0 [TS03] All messages from 192.0.2.1 will be "
                             "permanently deferred"),
        reply("b@yahoo.com", "250 2.1.5 ok")])
    assert out == {"a@yahoo.com"}


# ---------------------------------------------------------------- the scheduler

def test_provider_units_share_one_limit_and_wait_while_suspended():
    clock = Clock()
    s = shaping("[provider.gmail]\nmax_connections = 2\n", clock=clock)
    s.learn("a.example", ["aspmx.l.google.com"])
    sched = Scheduler(clock, limit=lambda d: s.limit(d, 10), dest_of=s.dest)
    for i in range(4):
        sched.add(f"m{i}", [f"x@{'a.example' if i % 2 else 'gmail.com'}"])
    sched.release_due()
    units = [sched.next_unit(), sched.next_unit()]
    assert sched.next_unit() is None  # two of the provider's units run: its cap
    assert {u.dest for u in units} == {"gmail"}
    assert {u.domain for u in units} <= {"a.example", "gmail.com"}
    s.react("gmail", [reply("x@gmail.com", "421 4.7.28 unusual rate")])
    sched.unit_done(units[0])
    assert sched.next_unit() is None  # suspended: it waits, nothing fails
    s.lift("gmail")
    sched.recheck("gmail")
    assert sched.next_unit() is not None


def test_regroup_moves_a_domains_waiting_units_under_its_provider():
    clock = Clock()
    s = shaping("[provider.gmail]\nmax_connections = 1\n", clock=clock)
    sched = Scheduler(clock, limit=lambda d: s.limit(d, 10), dest_of=s.dest)
    for i in range(3):
        sched.add(f"m{i}", ["x@new.example"])
    sched.release_due()
    first = sched.next_unit()
    assert first.dest == "new.example"  # not known yet: its own destination
    assert s.learn("new.example", ["aspmx.l.google.com"]) == "gmail"
    sched.regroup("new.example", "gmail")
    assert sched.destinations()["gmail"] == (2, 0)
    second = sched.next_unit()
    assert second.dest == "gmail" and second.domain == "new.example"
    assert sched.next_unit() is None  # gmail's one connection is in use
    sched.unit_done(first)
    sched.unit_done(second)
    assert sched.next_unit().dest == "gmail"


def test_at_its_cap_a_providers_idle_connection_to_another_server_is_closed_first():
    import asyncio
    from types import SimpleNamespace
    from mailengine.delivery import DeliveryEngine
    from mailengine.pool import Pool
    from mailengine.dns import Target
    from test_connection_pool import FakeSession

    async def main():
        pool = Pool(100, 10, FakeSession)
        eng = SimpleNamespace(shaping=shaping("[provider.gmail]\nmax_connections = 2\n"),
                              pool=pool, _dest_hosts={})
        a, b, c = (Target(f"mx{i}.google.com", f"127.0.0.{i}") for i in (1, 2, 3))
        for t in (a, b):  # two connections, then idle
            DeliveryEngine._within_cap(eng, "gmail", (t.ip, t.port))
            pool.release(await pool.acquire(t))
        DeliveryEngine._within_cap(eng, "other.test", (c.ip, c.port))  # no cap: nothing closed
        assert pool.total == 2
        DeliveryEngine._within_cap(eng, "gmail", (c.ip, c.port))  # a third server of gmail
        assert pool.total == 1
        s = await pool.acquire(c)
        assert pool.total == 2 and s is not None

    asyncio.run(main())


# ---------------------------------------------------------------- end to end

SHAPING_FAST = {**FAST, "limits.max_connections_per_host": 5}


def send_each(eng: RunningEngine, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
        for r in rcpts:
            s.sendmail("sender@src.test", [r], b"Subject: t\r\n\r\nhi\r\n")


def test_a_providers_connection_cap_holds_across_two_domains_from_the_first_message(
        tmp_path, sinks):
    busy = {"now": 0, "peak": 0}

    def mail(sess, verb, arg):  # transactions under way at once, across both sinks
        busy["now"] += 1
        busy["peak"] = max(busy["peak"], busy["now"])
        return "250 2.1.0 Ok"

    def body(sess, verb, arg):
        busy["now"] -= 1
        return "250 2.0.0 queued"
    script = SinkScript(replies={"MAIL": mail, "BODY": body}, delays={"DATA": 0.1})
    sinks.add("127.0.0.93", script=script)
    sinks.add("127.0.0.94", script=script)
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "shaping.toml").write_text(
        "builtin = false\n[provider.bigmail]\nmx = [\"bigmail.example\"]\nmax_connections = 1\n")
    with RunningEngine(tmp_path, {**SHAPING_FAST, "queue.pause_sending": True,
                                  "basic.dns_servers": [
            "one.test,mx1.bigmail.example,MX,127.0.0.93:25",
            "two.test,mx2.bigmail.example,MX,127.0.0.94:25"]}) as eng:
        # queued while paused, then released at once: both domains' MX hosts are looked up
        # before any unit starts, so even their first messages keep to the provider's one
        send_each(eng, [f"u{i}@{'one' if i % 2 else 'two'}.test" for i in range(8)])
        assert run_cli(tmp_path, "config", "set", "queue.pause_sending", "false")[0] == 0
        wait(lambda: len(infs(eng, "done")) == 8, what="delivery")
    assert busy["peak"] == 1
    # each domain alone would have had its own connections
    assert sum(len(s.messages) for s in sinks.sinks) == 8


def test_a_4_7_28_reply_suspends_gmail_shows_in_status_and_lift_ends_it(tmp_path, sinks):
    tries = {"n": 0}

    def mail(sess, verb, arg):
        tries["n"] += 1
        if tries["n"] == 1:
            return ("421-4.7.28 Our system has detected an unusual rate of unsolicited mail\n"
                    "421 4.7.28 originating from your IP address. To protect our users ...")
        return "250 2.1.0 Ok"
    sinks.add("127.0.0.95", script=SinkScript(replies={"MAIL": mail}))
    web_port = free_port()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "api-tokens.txt").write_text("tests:t0ken-for-shaping\n")
    with RunningEngine(tmp_path, {**SHAPING_FAST, "network.web_port": web_port,
                                  "basic.dns_servers": [
            "workspace.test,aspmx.l.google.com,MX,127.0.0.95:25"]}) as eng:
        send_each(eng, ["a@workspace.test"])
        wait(lambda: tries["n"] >= 1, what="the first try")
        wait(lambda: "SUSPENDED" in run_cli(tmp_path, "status")[1], what="the suspension")
        code, out = run_cli(tmp_path, "status")
        assert "gmail: SUSPENDED for 59m" in out and "cause: 421 4.7.28" in out
        code, out = run_cli(tmp_path, "shaping", "list")
        assert code == 0 and "gmail: SUSPENDED" in out
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10)
        assert 'mailengine_shaping_factor{dest="gmail",action="suspend"} 0' in \
            metrics.read().decode()
        stats = json.load(urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{web_port}/api/v1/stats",
            headers={"Authorization": "Bearer t0ken-for-shaping"}), timeout=10))
        assert [a["dest"] for a in stats["shaping"]] == ["gmail"]
        rows = [d for d in stats["destinations"] if d["domain"] in ("gmail", "workspace.test")]
        assert rows and all(d["state"] == "suspended" and "cause: 421 4.7.28" in d["why"]
                            for d in rows)
        time.sleep(2.5)  # its retry (1.2 s) came and went: the message waits, untried
        assert tries["n"] == 1 and not infs(eng, "done")
        assert len(infs(eng, "retry")) + len(infs(eng, "working")) == 1
        code, out = run_cli(tmp_path, "shaping", "lift", "workspace.test")  # one of its domains
        assert code == 0 and "suspend lifted" in out
        wait(lambda: len(infs(eng, "done")) == 1, what="delivery after the lift")
        code, out = run_cli(tmp_path, "shaping", "lift", "gmail")
        assert code == 1 and "nothing to lift" in out
    assert tries["n"] == 2
    msg, = infs(eng, "done")
    assert msg.rcpt_sent == ["a@workspace.test"]
    log = "".join(p.read_text() for p in (tmp_path / "log").glob("*.log")) + eng.read_output()
    assert "gmail suspended until" in log and "lifted by hand" in log


def test_recipients_per_transaction_and_deliveries_per_connection_per_provider(tmp_path, sinks):
    sink = sinks.add("127.0.0.96")
    (tmp_path / "shaping.toml").write_text(
        "[provider.gmail]\nmax_recipients_per_transaction = 2\n"
        "max_deliveries_per_connection = 3\n")
    with RunningEngine(tmp_path, {**SHAPING_FAST, "basic.dns_servers": [
            "ws.test,alt1.aspmx.l.google.com,MX,127.0.0.96:25"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.sendmail("sender@src.test", [f"r{i}@ws.test" for i in range(5)],
                       b"Subject: t\r\n\r\nhi\r\n")
        wait(lambda: len(infs(eng, "done")) == 1, what="delivery")
        send_each(eng, ["later@ws.test"])
        wait(lambda: len(infs(eng, "done")) == 2, what="delivery")
    assert [len(m.rcpts) for m in sink.messages] == [2, 2, 1, 1]
    # three transactions on the first connection, then it was closed: a new one for the next
    assert len(sink.sessions) == 2
    assert sink.sessions[0].verbs.count("MAIL") == 3


def test_a_bounce_reaction_fails_the_recipient_at_once_instead_of_retrying(tmp_path, sinks):
    sinks.add("127.0.0.97", script=SinkScript(rcpt={"@aolish.test": (
        "421 4.7.0 [TS03] All messages from 127.0.0.1 will be permanently deferred; "
        "Retrying will NOT succeed.")}))
    with RunningEngine(tmp_path, {**SHAPING_FAST, "basic.dns_servers": [
            "aolish.test,mx-aol.mail.gm0.yahoodns.net,MX,127.0.0.97:25"]}) as eng:
        send_each(eng, ["gone@aolish.test"])
        wait(lambda: len(infs(eng, "done")) == 1, what="the final failure")
    msg, = infs(eng, "done")
    assert msg.rcpt_failed == ["gone@aolish.test"] and msg.send_tries == 1
    assert "failed for good by a traffic shaping rule" in eng.read_output()
