"""Traffic shaping shared by several engines through Redis (issue 17 item 4; shared.py's Redis).

- **Suspensions and throttles** are posted on a board (a hash, `PREFIX` `shaping`, one field per
  destination, JSON with the cause and expiry, stamped by Redis's clock); every engine reads the
  board every CUT_POLL seconds and adopts what others posted. A lift by hand is posted as a
  `lifted` record, so it reaches every engine. The board keeps each record until its override
  is over (a lift's: until the lifted one would have been), and goes away when none is left.
  A suspension in force on the board is never replaced by a throttle.
- **Message and connection rates** of a destination (`max_messages_per_minute`/`_per_hour`,
  `max_connections_per_minute`) are token buckets in Redis, as the hourly cap is in shared.py:
  one budget for every engine, taken whole or not at all (no debt).

Redis down: the calls answer None and the caller uses the engine's own state (shared.py's
_Health logs it once).
"""
from __future__ import annotations

import json

from .shared import SharedLimits

# KEYS[1]: the board. ARGV: destination, record (JSON), now (ms, the poster's clock, for the
# records' ends). Stores "STAMP|record", STAMP Redis's clock in microseconds (a string: Lua
# numbers lose digits; the record is kept as sent for the same reason), unless a suspension
# still in force there would be replaced by a throttle; drops the records that are over.
# Returns the stamp, or '' when refused.
_POST = """
local function record(value)
  return cjson.decode(string.sub(value, string.find(value, '|', 1, true) + 1))
end
local t = redis.call('TIME')
local stamp = t[1] .. string.rep('0', 6 - #t[2]) .. t[2]
local now = tonumber(ARGV[3])
local new = cjson.decode(ARGV[2])
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local o = record(old)
  if o.action == 'suspend' and new.action == 'throttle' and o['until'] * 1000 > now then
    return ''
  end
end
redis.call('HSET', KEYS[1], ARGV[1], stamp .. '|' .. ARGV[2])
local last = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local e = record(all[i + 1])['end'] * 1000
  if e < now then redis.call('HDEL', KEYS[1], all[i]) elseif e > last then last = e end
end
if last > now then redis.call('PEXPIRE', KEYS[1], math.ceil(last - now) + 60000) end
return stamp
"""

# KEYS: buckets (hash tokens, stamp). ARGV: per bucket its tokens per ms, burst and lifetime
# (ms). Takes one token from each when every one has it and returns '0'; else takes none and
# returns the ms until all will have one (as shared.py's _TAKE_TOKENS, over several buckets).
_TAKE_ALL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tokens, wait = {}, 0
for i, key in ipairs(KEYS) do
  local speed, burst = tonumber(ARGV[3 * i - 2]), tonumber(ARGV[3 * i - 1])
  local b = redis.call('HMGET', key, 'tokens', 'stamp')
  local stamp = tonumber(b[2]) or now
  tokens[i] = math.min(burst, (tonumber(b[1]) or burst) + math.max(0, now - stamp) * speed)
  if tokens[i] < 1 then wait = math.max(wait, (1 - tokens[i]) / speed) end
end
for i, key in ipairs(KEYS) do
  if wait == 0 then tokens[i] = tokens[i] - 1 end
  redis.call('HSET', key, 'tokens', tostring(tokens[i]), 'stamp', tostring(now))
  redis.call('PEXPIRE', key, ARGV[3 * i])
end
return tostring(wait)
"""


class SharedShaping:
    """The board of overrides and the shared rate buckets, over SharedLimits' Redis."""

    def __init__(self, limits: SharedLimits) -> None:
        self.limits = limits
        self.board = f"{limits.prefix}shaping"
        self._post = limits.r.register_script(_POST)
        self._take = limits.r.register_script(_TAKE_ALL)
        self._seen: dict[str, str] = {}  # destination -> the stamp of the last record read

    async def post(self, dest: str, record: dict, now: float) -> bool:
        """Put `record` (an Override's to_dict, or {"action": "lifted", "at", "end"}) on the
        board, with `who` and `end` (clock time it is over). False: Redis is down."""
        rec = {**record, "who": self.limits.me}
        stamp = await self.limits._call(self._post, keys=[self.board],
                                        args=[dest, json.dumps(rec), int(now * 1000)])
        if stamp is None:
            return False
        if stamp:  # our own: not news when we read it back
            self._seen[dest] = stamp.decode() if isinstance(stamp, bytes) else str(stamp)
        return True

    async def poll(self) -> list[dict] | None:
        """The records other engines posted since the last look, each once; None: Redis down."""
        board = await self.limits._call(self.limits.r.hgetall, self.board)
        if board is None:
            return None
        new = []
        for dest_b, value_b in board.items():
            try:
                stamp, _, text = value_b.decode().partition("|")
                dest, rec = dest_b.decode(), json.loads(text)
                if not isinstance(rec, dict):
                    continue
            except (UnicodeDecodeError, ValueError):
                continue  # not ours
            if self._seen.get(dest) == stamp:
                continue
            self._seen[dest] = stamp
            if rec.get("who") != self.limits.me:
                new.append({**rec, "dest": dest})
        return new

    async def take(self, buckets: list[tuple[str, float, float, float]]) -> float | None:
        """One token from each of `buckets` [(name, rate, per seconds, burst)] shared by every
        engine: 0 when taken, else the seconds until they may be (nothing taken: ask again
        then). None: Redis is down."""
        keys, args = [], []
        for name, rate, per, burst in buckets:
            keys.append(f"{self.limits.prefix}shape:{name}")
            args += [repr(rate / (per * 1000)), repr(burst), int(per * 2000)]
        ms = await self.limits._call(self._take, keys=keys, args=args)
        return None if ms is None else float(ms) / 1000
