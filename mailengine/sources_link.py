"""The sending sources' warm-up counts shared by several engines through Redis (issue 17 item 4;
sources.py stays pure, this is its I/O edge, over shared.py's Redis connection).

With `shared.redis_url`, engines naming the same Redis and `shared.key_prefix` count one warm-up
budget per (source, provider, day): a hash per day, `PREFIX` `warmup:2026-12-05`, one field per
`source provider`, the recipients every engine took; it expires two days after its last change.

- **Taking budget is exact**: the source a unit would take is reserved in Redis by a Lua script
  that adds the unit's recipients only when the day's limit has room (the same rule as
  sources.py: a unit bigger than a whole day may go alone on an untouched budget). A refusal
  gives the local take back and the unit chooses again (another source of its pool, or it
  waits). So all engines together never pass a source's budget while Redis answers.
- **Choosing is on a local copy** (`Sources.shared`), read from Redis every CUT_POLL seconds
  (delivery's poll), raised by each reservation's answer and by this engine's own takes; it is
  never below what this engine alone sent today. It may lag the other engines by one poll: it
  only steers the choice, Redis decides.
- **Unsent recipients** are given back in the background (never below 0).
- **Redis down**: the unit goes on the local count (the last copy read plus this engine's takes
  since; this engine's own counts when none was read yet), with shared.py's one warning; what it
  took or gave back meanwhile is posted when Redis answers again.

Approximate: while Redis is down every engine decides alone, so together they may pass a
budget; a Redis that lost its data (restarted without persistence) forgets the other engines'
counts of the day; a change whose reply was lost (a timeout) may be counted twice, and a unit
chosen before midnight gives its unsent budget back to the new day; days are each engine's
local date (give the engines one time zone).
"""
from __future__ import annotations

import asyncio
import datetime as dt

from .sources import Source, Sources

DAY_TTL = 2 * 86400  # s a day's counts stay in Redis after their last change

# KEYS[1]: the day's counts. ARGV: field, n, limit, ttl (s). Adds n when the limit has room:
# {1, new count}; else nothing: {0, count}.
_RESERVE = """
local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
local n, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
if used + n > limit and not (used == 0 and limit > 0) then return {0, used} end
used = redis.call('HINCRBY', KEYS[1], ARGV[1], n)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, used}
"""

# KEYS[1]: the day's counts. ARGV: ttl (s), then field, change, field, change, ... Adds each
# change, no count going below 0.
_ADD = """
for i = 2, #ARGV, 2 do
  local v = (tonumber(redis.call('HGET', KEYS[1], ARGV[i])) or 0) + tonumber(ARGV[i + 1])
  if v < 0 then v = 0 end
  redis.call('HSET', KEYS[1], ARGV[i], v)
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


class SourcesLink:
    """Sources.choose and Sources.done, with the warm-up counts shared when `shared` (a
    shared.SharedLimits) is given; without it, exactly Sources' own."""

    def __init__(self, sources: Sources, shared=None) -> None:
        self.sources = sources
        self.shared = shared
        self._owed: dict[tuple[dt.date, str], int] = {}  # (day, field) -> change not in Redis
        self._polled = False
        if shared is not None:
            self._reserve = shared.r.register_script(_RESERVE)
            self._add = shared.r.register_script(_ADD)

    def _key(self, day: dt.date) -> str:
        return f"{self.shared.prefix}warmup:{day.isoformat()}"

    async def choose(self, pool: str, dest: str, n: int, cap: int | None) -> Source | None:
        """As Sources.choose (None: wait for a place; raises WarmupHold), the budget reserved
        in Redis when shared."""
        if self.shared is None:
            return self.sources.choose(pool, dest, n, cap)
        if not self._polled:
            await self.poll()  # the first unit after a start: the day's counts so far
        while True:
            src = self.sources.choose(pool, dest, n, cap)
            if src is None:
                return None
            day = self.sources.day
            limit = src.daily_limit(dest, day)
            if limit is None:
                return src  # warmed: nothing counted
            field = f"{src.name} {dest}"
            try:
                got = await self.shared._call(self._reserve, keys=[self._key(day)],
                                              args=[field, n, limit, DAY_TTL])
            except asyncio.CancelledError:  # a stop: not sent (Redis may keep it: counted high)
                self.sources.done(src, dest, n, n)
                raise
            if got is None:  # Redis down: the local count decided; posted when it is back
                self._owe(day, field, n)
                return src
            ok, total = int(got[0]), int(got[1])
            if not ok:  # other engines took it meanwhile: give it back here, choose again
                self.sources.done(src, dest, n, n)
            self.sources.saw_shared(src.name, dest, total, day)
            if ok:
                return src

    def done(self, source: Source, dest: str, n: int, unsent: int) -> None:
        """As Sources.done; the unsent recipients' budget goes back to Redis too (background)."""
        day = self.sources.day
        self.sources.done(source, dest, n, unsent)
        if self.shared is None or not unsent or source.daily_limit(dest, day) is None:
            return
        self._owe(day, f"{source.name} {dest}", -min(unsent, n))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # posted at the next poll
        self.shared._background(self.flush())

    def _owe(self, day: dt.date, field: str, change: int) -> None:
        self._owed[(day, field)] = self._owed.get((day, field), 0) + change

    async def flush(self) -> None:
        """Post the takes and give-backs Redis has not had yet (today's; an older day's no
        longer limits anything)."""
        today = self.sources.roll()
        owed, self._owed = self._owed, {}
        args: list = [DAY_TTL]
        for (day, field), change in owed.items():
            if day == today and change:
                args += [field, change]
        if len(args) == 1:
            return
        if await self.shared._call(self._add, keys=[self._key(today)], args=args) is None:
            for i in range(1, len(args), 2):  # Redis down: kept for the next poll
                self._owe(today, args[i], args[i + 1])

    async def poll(self) -> None:
        """Read every engine's counts of today into the local copy (delivery's ~2 s poll)."""
        if self.shared is None or not self.sources.enabled:
            return
        self._polled = True
        await self.flush()
        day = self.sources.roll()
        got = await self.shared._call(self.shared.r.hgetall, self._key(day))
        if got is None:
            return  # Redis down: the copy goes on with this engine's takes
        counts: dict[str, dict[str, int]] = {}
        for field_b, value_b in got.items():
            try:
                source, _, dest = field_b.decode().partition(" ")
                counts.setdefault(source, {})[dest] = int(value_b)
            except (UnicodeDecodeError, ValueError):
                continue  # not ours
        for (d, field), change in self._owed.items():  # ours, still on their way
            if d == day:
                source, _, dest = field.partition(" ")
                per = counts.setdefault(source, {})
                per[dest] = max(0, per.get(dest, 0) + change)
        for source, per in self.sources.used.items():  # never below what we sent ourselves
            for dest, mine in per.items():
                have = counts.setdefault(source, {})
                have[dest] = max(have.get(dest, 0), mine)
        self.sources.take_shared(counts, day)
