"""Sending addresses ("sources"), their pools and each source's warm-up (issue 17, item 3).

Pure logic with an injected clock; its only I/O is reading HOME/shaping.toml and keeping the
day's warm-up counts in HOME/warmup.json (so a restart does not reset them). delivery.py asks
it which source a unit goes out from and carries out the answer.

- **Sources** (`[sources.NAME]`: `ip`, `helo`): a local address to connect from and the EHLO
  name said from it. No sources: every connection goes out as before (`network.smtp_source_ip`,
  `network.helo_text`).
- **Pools** (`[pools.NAME] sources = {a = 3, b = 1}`): sources with weights; a unit picks one by
  smooth weighted round robin (nginx's: exact shares, evenly interleaved, no randomness).
- **Which pool** a message uses: its own choice (the `X-MailEngine-Pool` header, removed at
  intake, or the HTTP API's `pool` field; both kept as the `.inf` key `pool`), else its sender
  domain's (`[sender_pools]`), else `default_pool`, else every source at weight 1.
- **Limits per source.** Providers count connections and messages per client IP, so a
  provider's `max_connections`, `max_messages_per_minute/hour` and `max_connections_per_minute`
  (shaping.py) hold for each source on its own; the destination as a whole may use them times
  the number of sources (shaping.Shaping.per_source).
- **Warm-up** (`warmup_start`, `warmup = [day 1, day 2, ...]`, `warmup_provider`): a source new
  to the providers may send each provider (the shaping destination: a provider, or a domain of
  none) only that many recipients on day N of its warm-up; after the list it is warmed (no
  cap). A unit over a source's budget goes out from another source of its pool that is warmed
  or still has budget, instead of waiting; only when none has, it waits (WarmupHold) until the
  next day or a rules change.
- **Shared warm-up** (with `shared.redis_url`; sources_link.py does the I/O): `shared` holds
  today's counts of every engine, kept by the link; choices then decide with them (plus this
  engine's takes since the link last looked), and `used` stays this engine's own.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import re
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .file_stamp import file_stamp
from .atomic_file import write_atomically
from .shaping import RULES_FILE, ShapingError, burst
from .throttle import TokenBucket

log = logging.getLogger("mailengine.sources")

COUNTS_FILE = "warmup.json"
HOLD_RECHECK = 600.0  # s: mail held by the warm-up is looked at again this often (rules edited)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HOST = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}$")
_SOURCE_KEYS = {"ip", "helo", "warmup_start", "warmup", "warmup_provider"}


class WarmupHold(Exception):
    """No source of the pool has warm-up budget left today for this provider: the unit waits
    (not a send try) until `until` (clock time)."""

    def __init__(self, text: str, until: float) -> None:
        super().__init__(text)
        self.until = until


@dataclass(frozen=True)
class Source:
    name: str
    ip: str
    helo: str
    warmup_start: dt.date | None = None
    warmup: tuple[int, ...] = ()  # recipients per provider on day 1, 2, ... of the warm-up
    warmup_provider: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def daily_limit(self, provider: str, day: dt.date) -> int | None:
        """Recipients this source may send `provider` on `day`; None: no cap (warmed)."""
        plan = self.warmup_provider.get(provider, self.warmup)
        if not plan or self.warmup_start is None:
            return None
        n = max(0, (day - self.warmup_start).days)  # before its start: day 1's volume
        return plan[n] if n < len(plan) else None


@dataclass(frozen=True)
class SourcePool:
    name: str
    weights: tuple[tuple[str, int], ...]  # (source, weight)


@dataclass
class SourceRules:
    sources: dict[str, Source] = field(default_factory=dict)
    pools: dict[str, SourcePool] = field(default_factory=dict)
    sender_pools: dict[str, str] = field(default_factory=dict)  # sender domain -> pool
    default_pool: str = ""


# ---------------------------------------------------------------- reading the rules

def _plan(value, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
        raise ShapingError(f"{where}: a list of daily volumes (whole numbers, 0 or more), one "
                           f"per day of the warm-up, not {value!r}")
    return tuple(value)


def _source(name: str, table, where: str) -> Source:
    if not isinstance(table, dict):
        raise ShapingError(f"{where}: must be a table")
    if not _NAME.match(name):
        raise ShapingError(f"{where}: a source name is lower-case letters, digits, - and _")
    for k in table:
        if k not in _SOURCE_KEYS:
            raise ShapingError(f"{where}: unknown key {k!r} (known: "
                               f"{', '.join(sorted(_SOURCE_KEYS))})")
    try:
        ip = str(ipaddress.ip_address(str(table.get("ip", "")).strip()))
    except ValueError:
        raise ShapingError(f"{where} ip: the local address to send from, not "
                           f"{table.get('ip')!r}") from None
    helo = str(table.get("helo", "")).strip().lower().rstrip(".")
    if not _HOST.match(helo):
        raise ShapingError(f"{where} helo: the fully qualified name to say in EHLO from this "
                           f"address (its reverse DNS name), not {table.get('helo')!r}")
    start = table.get("warmup_start")
    if isinstance(start, str):
        try:
            start = dt.date.fromisoformat(start.strip())
        except ValueError:
            start = False
    if isinstance(start, dt.datetime):
        start = start.date()
    if start is not None and not isinstance(start, dt.date):
        raise ShapingError(f"{where} warmup_start: a date like 2026-12-01, not "
                           f"{table.get('warmup_start')!r}")
    plan = _plan(table["warmup"], f"{where} warmup") if "warmup" in table else ()
    per = table.get("warmup_provider", {})
    if not isinstance(per, dict):
        raise ShapingError(f"{where} warmup_provider: a table provider = [daily volumes]")
    per_plan = {str(p).lower(): _plan(v, f"{where} warmup_provider.{p}") for p, v in per.items()}
    if (plan or per_plan) and start is None:
        raise ShapingError(f"{where}: a warm-up needs warmup_start (its day 1)")
    return Source(name, ip, helo, start, plan, per_plan)


def parse_sources(data: dict, where: str) -> SourceRules:
    """The sources, pools and pool choices of a parsed shaping.toml. Raises ShapingError."""
    stables = data.get("sources", {})
    if not isinstance(stables, dict):
        raise ShapingError(f"{where} sources: must be tables [sources.NAME]")
    sources = {n: _source(n, t, f"{where} [sources.{n}]") for n, t in stables.items()}
    ips = [s.ip for s in sources.values()]
    if len(set(ips)) != len(ips):
        raise ShapingError(f"{where} sources: two sources have the same ip")
    pools = {}
    ptables = data.get("pools", {})
    if not isinstance(ptables, dict):
        raise ShapingError(f"{where} pools: must be tables [pools.NAME]")
    for name, table in ptables.items():
        at = f"{where} [pools.{name}]"
        if not _NAME.match(name):
            raise ShapingError(f"{at}: a pool name is lower-case letters, digits, - and _")
        members = table.get("sources") if isinstance(table, dict) else None
        if isinstance(members, list):  # ["a", "b"]: equal weights
            members = {m: 1 for m in members}
        if not isinstance(members, dict) or not members or set(table) != {"sources"}:
            raise ShapingError(f"{at}: sources = {{name = weight, ...}} (or a list of names)")
        for m, w in members.items():
            if m not in sources:
                raise ShapingError(f"{at} sources: no source {m!r} is defined (known: "
                                   f"{', '.join(sorted(sources)) or 'none'})")
            if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 1000:
                raise ShapingError(f"{at} sources.{m}: a weight from 1 to 1000, not {w!r}")
        pools[name] = SourcePool(name, tuple(members.items()))
    default = data.get("default_pool", "")
    if default and default not in pools:
        raise ShapingError(f"{where} default_pool: no pool {default!r} is defined")
    sp = data.get("sender_pools", {})
    if not isinstance(sp, dict):
        raise ShapingError(f"{where} sender_pools: a table \"sender.domain\" = \"pool\"")
    sender_pools = {}
    for d, p in sp.items():
        if p not in pools:
            raise ShapingError(f"{where} sender_pools.{d}: no pool {p!r} is defined")
        sender_pools[d.strip().lower().strip(".")] = p
    if (pools or default) and not sources:
        raise ShapingError(f"{where} pools: define [sources.NAME] first")
    return SourceRules(sources, pools, sender_pools, default)


# ---------------------------------------------------------------- the live state

class Sources:
    """The sources in force, their weighted picks, per-source limits and warm-up counts."""

    def __init__(self, rules: SourceRules | None = None, clock: Callable[[], float] = time.time,
                 path: Path | None = None, counts_path: Path | None = None) -> None:
        self.clock = clock
        self.path = path  # HOME/shaping.toml
        self.counts_path = counts_path  # HOME/warmup.json
        self._stamp: tuple | None = None
        self._loaded = False
        self._current: dict[str, dict[str, int]] = {}  # pool -> source -> SWRR current weight
        self.running: dict[tuple[str, str], int] = {}  # (source, dest) -> units sending
        self._buckets: dict[tuple[str, str], tuple] = {}
        self._warned: set[str] = set()  # unknown pool names already logged
        self._held: dict[tuple[str, str], float] = {}  # (pool, dest) -> next hold line
        self.day = self._today()
        self.used: dict[str, dict[str, int]] = {}  # source -> dest -> recipients today
        # every engine's counts today (sources_link.py keeps it); None: this engine's own
        self.shared: dict[str, dict[str, int]] | None = None
        self._dirty = False
        # source -> its reverse DNS problem (rdns_problem), None when it names the EHLO name;
        # absent: not checked yet (delivery checks at start and when the file changes)
        self.rdns: dict[str, str | None] = {}
        self._load_counts()
        self.use(rules or SourceRules())

    @classmethod
    def from_home(cls, home: Path | str, clock: Callable[[], float] = time.time) -> "Sources":
        s = cls(None, clock, Path(home) / RULES_FILE, Path(home) / COUNTS_FILE)
        s.reload_if_changed()
        return s

    def use(self, rules: SourceRules) -> None:
        before = getattr(self, "rules", SourceRules()).sources
        self.rdns = {n: p for n, p in self.rdns.items()  # a source changed: not checked yet
                     if n in rules.sources and before.get(n) == rules.sources[n]}
        self.rules = rules
        self._current = {}
        self._buckets.clear()

    @property
    def enabled(self) -> bool:
        return bool(self.rules.sources)

    def reload_if_changed(self) -> str | None:
        """Read the sources of HOME/shaping.toml again when the file changed. A file that
        cannot be used leaves the sources as they were (shaping.py logs a TOML error)."""
        if self.path is None:
            return None
        stamp = file_stamp(self.path)
        if stamp == self._stamp and self._loaded:
            return None
        self._stamp, self._loaded = stamp, True
        if stamp is None:
            self.use(SourceRules())
            return None
        try:
            data = tomllib.loads(self.path.read_text())
            rules = parse_sources(data, str(self.path))
        except tomllib.TOMLDecodeError:
            return None  # said by shaping.py, which reads the same file
        except (ShapingError, OSError, UnicodeDecodeError) as e:
            line = f"{e}; the sending sources stay as they were"
            log.error("%s", line)
            return line
        self.use(rules)
        if not rules.sources:
            return None
        line = (f"sending sources read from {self.path}: {len(rules.sources)} sources, "
                f"{len(rules.pools)} pools")
        log.info("%s", line)
        return line

    def note_rdns(self, source: Source, names: list[str], error: str = "") -> str | None:
        """rdns_problem(), kept for the web admin and /metrics (`rdns`)."""
        line = rdns_problem(source, names, error)
        if self.rules.sources.get(source.name) == source:
            self.rdns[source.name] = line
        return line

    def pools_of(self, name: str) -> list[tuple[str, int]]:
        """(pool, weight) of each pool the source is in, in the file's order."""
        return [(p.name, w) for p in self.rules.pools.values() for n, w in p.weights
                if n == name]

    # -- which pool, which source ----------------------------------------------------------------

    def pool_for(self, chosen: str, sender_domain: str) -> str:
        """The message's pool: its own choice (.inf `pool`), its sender domain's, the default;
        "" = every source. A choice naming no pool is logged once and ignored."""
        r = self.rules
        if chosen:
            if chosen in r.pools:
                return chosen
            if chosen not in self._warned:
                self._warned.add(chosen)
                log.warning("mail asks for the sending pool %r, which shaping.toml does not "
                            "define; it uses its sender domain's or the default pool", chosen)
        return r.sender_pools.get(sender_domain.lower(), r.default_pool)

    def members(self, pool: str) -> list[tuple[Source, int]]:
        p = self.rules.pools.get(pool)
        if p is None:
            return [(s, 1) for s in self.rules.sources.values()]
        return [(self.rules.sources[n], w) for n, w in p.weights]

    def _order(self, pool: str) -> list[Source]:
        """The pool's sources, the smooth weighted round robin's pick first, the others after
        it in the order that pick would take them next."""
        members = self.members(pool)
        cur = self._current.setdefault(pool, {})
        total = sum(w for _, w in members)
        for s, w in members:
            cur[s.name] = cur.get(s.name, 0) + w
        ranked = sorted(members, key=lambda m: -cur[m[0].name])
        cur[ranked[0][0].name] -= total
        return [s for s, _ in ranked]

    def choose(self, pool: str, dest: str, n: int, cap: int | None) -> Source | None:
        """The source a unit of `n` recipients to `dest` goes out from, its warm-up budget taken
        (give back what is not sent: `done`). `cap`: the destination's max_connections, held per
        source. None: every source with budget is at that cap (wait for one to end a unit).
        Raises WarmupHold when no source of the pool has budget left today."""
        self._roll()
        order = self._order(pool)
        budget = [s for s in order if self._room(s, dest, n)]
        if not budget:
            names = ", ".join(s.name for s in order)
            hold = WarmupHold(f"the warm-up volume for {dest} of every source of the pool "
                              f"({names}) is used today", self._hold_until())
            now = self.clock()
            if self._held.get((pool, dest), 0) <= now:  # said once in a while, not per unit
                self._held[(pool, dest)] = now + HOLD_RECHECK
                log.info("%s: its mail waits in retry/ for tomorrow's budget", hold)
            raise hold
        if budget[0] is not order[0]:  # over its warm-up: warmed sources first
            budget.sort(key=lambda s: s.daily_limit(dest, self.day) is not None)
        for s in budget:
            if cap is None or self.running.get((s.name, dest), 0) < cap:
                self.running[(s.name, dest)] = self.running.get((s.name, dest), 0) + 1
                if s.daily_limit(dest, self.day) is not None:
                    self._count(s.name, dest, n)
                return s
        return None

    def done(self, source: Source, dest: str, n: int, unsent: int) -> None:
        """A unit chosen by `choose` ended; `unsent` of its `n` recipients were not sent (their
        budget comes back)."""
        key = (source.name, dest)
        left = self.running.get(key, 1) - 1
        if left > 0:
            self.running[key] = left
        else:
            self.running.pop(key, None)
        if unsent and source.daily_limit(dest, self.day) is not None:
            self._count(source.name, dest, -min(unsent, n))

    def _room(self, s: Source, dest: str, n: int) -> bool:
        limit = s.daily_limit(dest, self.day)
        if limit is None:
            return True
        used = self.used_today(s.name, dest)
        return used + n <= limit or (used == 0 and limit > 0)  # a unit bigger than a day: alone

    # -- rates per source --------------------------------------------------------------------

    def rate_delay(self, source: Source, dest: str, rule) -> float:
        """Take one message from the source's own message rates to `dest` (shaping.Rule)."""
        return self._take(source, dest, rule, 0, 1)

    def connect_delay(self, source: Source, dest: str, rule) -> float:
        return self._take(source, dest, rule, 2, 2)

    def _take(self, source: Source, dest: str, rule, first: int, last: int) -> float:
        b = self._buckets.get((source.name, dest))
        if b is None:
            b = self._buckets[(source.name, dest)] = (
                _bucket(rule.max_messages_per_minute, 60.0, self.clock),
                _bucket(rule.max_messages_per_hour, 3600.0, self.clock),
                _bucket(rule.max_connections_per_minute, 60.0, self.clock))
            if len(self._buckets) > 100_000:
                self._buckets.clear()
        return max([x.wait(1) for x in b[first:last + 1] if x is not None], default=0.0)

    # -- warm-up counts ------------------------------------------------------------------------

    def _today(self) -> dt.date:
        return dt.date.fromtimestamp(self.clock())

    def _hold_until(self) -> float:
        tomorrow = dt.datetime.combine(self.day + dt.timedelta(days=1), dt.time())
        return min(tomorrow.timestamp(), self.clock() + HOLD_RECHECK)

    def _roll(self) -> None:
        today = self._today()
        if today != self.day:  # a new day: every budget is whole again
            self.day, self.used, self._dirty = today, {}, True
            self._held.clear()
            if self.shared is not None:
                self.shared = {}

    def _count(self, source: str, dest: str, n: int) -> None:
        for counts in (self.used, self.shared):
            if counts is not None:
                per = counts.setdefault(source, {})
                per[dest] = max(0, per.get(dest, 0) + n)
        self._dirty = True

    def used_today(self, source: str, dest: str) -> int:
        """Recipients `source` sent `dest` today: every engine's when shared, else ours."""
        counts = self.used if self.shared is None else self.shared
        return counts.get(source, {}).get(dest, 0)

    def roll(self) -> dt.date:
        """Today (a new day starts every budget afresh)."""
        self._roll()
        return self.day

    def take_shared(self, counts: dict[str, dict[str, int]], day: dt.date) -> None:
        """Every engine's counts of `day` (sources_link.py, read from Redis)."""
        if day == self.roll():
            self.shared = counts

    def saw_shared(self, source: str, dest: str, total: int, day: dt.date) -> None:
        """Redis counted `total` for one source and provider when it answered a reservation:
        the copy is at least that (it may also hold this engine's takes still on their way)."""
        if self.shared is not None and day == self.roll():
            per = self.shared.setdefault(source, {})
            per[dest] = max(per.get(dest, 0), total)

    def _load_counts(self) -> None:
        if self.counts_path is None:
            return
        try:
            data = json.loads(self.counts_path.read_text())
            if data.get("day") == self.day.isoformat():
                self.used = {s: {d: int(n) for d, n in per.items()}
                             for s, per in data.get("used", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("%s cannot be read (%s): today's warm-up counts start at 0",
                        self.counts_path, e)

    def save(self) -> None:
        """Write the day's counts when they changed (delivery calls it every second)."""
        if not self._dirty or self.counts_path is None:
            return
        self._dirty = False
        try:  # a crash leaves the old counts or the new, never none (an IP still warming up)
            write_atomically(self.counts_path,
                             json.dumps({"day": self.day.isoformat(), "used": self.used}))
        except OSError as e:
            self._dirty = True
            log.warning("cannot write %s: %s", self.counts_path, e)

    def usage(self) -> list[dict]:
        """Each source and today's warm-up use per provider, for `status` and `shaping list`."""
        self._roll()
        out = []
        for s in self.rules.sources.values():
            counts = self.used if self.shared is None else self.shared
            dests = set(counts.get(s.name, {})) | set(s.warmup_provider)
            day = None if s.warmup_start is None else (self.day - s.warmup_start).days + 1
            out.append({"source": s.name, "ip": s.ip, "helo": s.helo, "warmup_day": day,
                        "warmed": s.daily_limit("", self.day) is None and not any(
                            s.daily_limit(d, self.day) is not None for d in dests),
                        "today": {d: {"used": self.used_today(s.name, d),
                                      "limit": s.daily_limit(d, self.day)}
                                  for d in sorted(dests)},
                        "limit": s.daily_limit("", self.day)})
        return out


def _bucket(rate: int | None, per: float, clock) -> TokenBucket | None:
    if not rate:
        return None
    return TokenBucket(rate, per, burst(rate, per), clock=clock)


def describe(usage: list[dict]) -> list[str]:
    """Lines for `mailengine status` and `shaping list`: each source, its warm-up today."""
    lines = []
    for u in usage:
        head = f"{u['source']} {u['ip']} ({u['helo']})"
        if u["warmed"]:
            lines.append(f"{head}: warmed up")
            continue
        parts = [f"{d} {t['used']}/{t['limit'] if t['limit'] is not None else 'no cap'}"
                 for d, t in u["today"].items()]
        cap = f"{u['limit']} a provider" if u["limit"] is not None else "no cap"
        lines.append(f"{head}: warm-up day {u['warmup_day']}, {cap} today"
                     + (f"; used {', '.join(parts)}" if parts else ""))
    return lines


def rdns_problem(source: Source, names: list[str], error: str = "") -> str | None:
    """A warning when the source's reverse DNS does not name its EHLO name, else None."""
    names = [n.lower().rstrip(".") for n in names]
    if source.helo in names:
        return None
    said = (f"its reverse DNS says {', '.join(names)}" if names else
            f"its address has no reverse DNS name{' (' + error + ')' if error else ''}")
    return (f"sending source {source.name} ({source.ip}): {said}, not its EHLO name "
            f"{source.helo}; receivers may distrust or refuse its mail")
