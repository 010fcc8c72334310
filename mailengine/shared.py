"""Several engines, one set of limits: sharing through Redis (SPEC 9).

When one machine is not enough, several engines send the same mail stream. Each alone would
allow every remote server `max_connections_per_host` connections and send `max_send_rate`
messages an hour, so N engines would together hit a server N times as hard as configured.
With `shared.redis_url` set, engines naming the same Redis and `shared.key_prefix` share (give
them the same limits: each checks the shared count against its own):

- **the hourly cap** (`limits.max_send_rate`): one token bucket in Redis, updated by a Lua script
  (atomic, on the Redis server's clock), so all engines together send at most the cap. A token
  is taken only when it may be used at once (no debt: a sender that stops holds nobody back);
- **the per-server cap** (`limits.max_connections_per_host`): every open connection holds a
  lease in a sorted set per server address (`ip:port`), renewed while it lives; renewals put
  back leases Redis lost (a restart) or never saw (opened while it was down); the leases of an
  engine that died expire after LEASE_MS. A unit that finds the server full waits for a place
  at most FULL_WAIT seconds, then gets a temporary failure and its retry;
- **cuts in a destination's concurrency**: when a server's 421s (or a run of 4xx) make one
  engine halve its concurrency for that destination (throttle.Window), it posts the new limit
  on a board in Redis; every other engine lowers its own window to it once, within CUT_POLL
  seconds, and then climbs back on its own successes, as after a cut of its own;
- **the bounce and undeliverable lists**: every line an engine appends to its four list files
  is also pushed onto a Redis list of the same name (`PREFIX` `list:hard-bounces`, ...), so one
  reader sees every engine's bounces (it takes them with LPOP/LMPOP; each list keeps its newest
  LIST_MAX lines). The files stay as they are;
- **traffic shaping**: suspensions, throttles and each provider's rates (shared_shaping.py, over
  this Redis connection), and the sending sources' warm-up counts (sources_link.py).

When Redis cannot be reached, an engine goes on alone with its own limits (a warning, and a line
when Redis is back; meanwhile one call at a time tries it again): mail is never held up because
the shared store is down.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections import deque

from .secret_values import mask_text
from .setting import Setting

log = logging.getLogger("mailengine.shared")

LEASE_MS = 30_000  # a connection's lease in Redis; renewed every third of it while it lives
OFFLINE_RETRY = 5.0  # s: after Redis failed, local limits only for this long, then try again
FULL_POLL = (0.05, 0.5)  # s between tries while other engines fill a server's cap (doubling)
FULL_WAIT = 60.0  # s a unit waits for a place at a server other engines fill; then 451, retry
POOL_SIZE = 16  # connections to Redis (calls beyond wait for one)
LIST_MAX = 1_000_000  # lines kept per Redis list (the oldest go); readers pop them (LPOP/LMPOP)
CUT_NOTICE_MS = 120_000  # a destination's cut stays on the board this long for other engines
CUT_POLL = 2.0  # s between looks at the board
LIST_BACKLOG = 100_000  # list lines kept while Redis is down; older ones are dropped
TIMEOUT = 1.0  # s for a Redis reply or connection


def _check_url(value: str) -> str | None:
    if not value:
        return None
    if not value.startswith(("redis://", "rediss://", "unix://")):
        return "must be empty or a redis://, rediss:// or unix:// URL"
    from redis.connection import parse_url
    try:
        parse_url(value)
    except ValueError as e:
        return f"not a valid Redis URL: {e}"
    return None


SHARED_SECTION_TITLE = ("shared", "Several engines, one set of limits (Redis)")
SHARED_SETTINGS = [
    Setting("shared", "redis_url", "", "str",
            "Redis that engines share their hourly cap, per-server connection cap, traffic "
            "shaping and bounce lists through, e.g. 'redis://127.0.0.1:6379/0'. Empty: this "
            "engine shares nothing.",
            check=_check_url, restart=True),
    Setting("shared", "key_prefix", "mailengine:", "str",
            "Start of every key used in that Redis: engines with the same prefix share.",
            restart=True),
]

# KEYS[1]: the bucket (hash tokens, stamp). ARGV: tokens per ms, burst, tokens wanted.
# Takes them when there are enough and returns '0'; else takes nothing (no debt: a waiter that
# gives up, e.g. at a stop, holds nobody back) and returns the ms until there will be, as a
# string (Lua numbers become integers).
_TAKE_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local speed, burst, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(b[1]) or burst, tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * speed)
local wait = '0'
if tokens >= n then tokens = tokens - n else wait = tostring((n - tokens) / speed) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], 7200000)
return wait
"""

# KEYS[1]: a server's leases (sorted set, score = expiry ms). ARGV: cap, member, lease ms.
# 1: granted; 0: the cap is full.
_TAKE_LEASE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""

# KEYS: servers' lease sets; ARGV: lease ms, then one member per key. Pushes their expiry on,
# and puts back leases Redis lost (a restart, an outage) or never had (opened while it was down).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', key, 2 * lease)
end
return #KEYS
"""


# KEYS[1]: this batch's marker. ARGV: list name, line, list name, line, ... Pushes the batch
# once, however often it is sent (a reply lost to a timeout), and keeps each list bounded.
_PUSH_LINES = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 3600) then return 0 end
local touched = {}
for i = 1, #ARGV, 2 do
  redis.call('RPUSH', ARGV[i], ARGV[i + 1])
  touched[ARGV[i]] = true
end
for name in pairs(touched) do redis.call('LTRIM', name, -%d, -1) end
return 1
""" % LIST_MAX


class _Health:
    """Whether Redis answered lately; says so in the log when that changes."""

    def __init__(self, url: str, what: str) -> None:
        self.url, self.what = mask_text(url), what  # for the log: no password
        self.down_until = 0.0
        self.down = False
        self.probing = False  # down, and one call is trying it again: the others do not

    def usable(self) -> bool:
        return time.monotonic() >= self.down_until and not (self.down and self.probing)

    def failed(self, e: BaseException) -> None:
        self.down_until = time.monotonic() + OFFLINE_RETRY
        if not self.down:
            self.down = True
            log.warning("shared %s: Redis at %s cannot be reached (%s); this engine goes on "
                        "with its own limits and tries again every %g s",
                        self.what, self.url, str(e) or type(e).__name__, OFFLINE_RETRY)

    def worked(self) -> None:
        if self.down:
            self.down = False
            log.info("shared %s: Redis at %s answers again", self.what, self.url)


class SharedLimits:
    """The hourly cap and the per-server connection cap, shared (the engine's event loop)."""

    def __init__(self, url: str, prefix: str, lease_ms: int = LEASE_MS) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError
        self._errors = (RedisError, OSError, asyncio.TimeoutError)
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=TIMEOUT, socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT)
        self.r = aioredis.Redis(connection_pool=pool)
        self.prefix = prefix
        self.lease_ms = lease_ms
        self.health = _Health(url, "limits")
        self.me = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._n = 0
        self.held: dict[str, str] = {}  # lease member -> its server's key
        self._take_tokens = self.r.register_script(_TAKE_TOKENS)
        self._take_lease = self.r.register_script(_TAKE_LEASE)
        self._renew = self.r.register_script(_RENEW)
        self._renewer: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()  # releases, cut notices: in the background
        self._seen_cuts: dict[str, int] = {}  # destination -> time (ms) of the last cut adopted
        self._leases_lock = asyncio.Lock()  # a renewal never puts back a lease being released

    def state(self) -> dict:
        """For `mailengine status` and /metrics."""
        return {"redis": self.health.url, "prefix": self.prefix,
                "reachable": not self.health.down, "connections_held": len(self.held)}

    def host_key(self, ip: str, port: int) -> str:
        return f"{self.prefix}conns:{ip}:{port}"

    async def _call(self, fn, *args, **kw):
        """fn's answer, or None when Redis is down (then for OFFLINE_RETRY s without trying,
        and after that one call tries while the others still get None)."""
        if not self.health.usable():
            return None
        probe = self.health.down
        if probe:
            self.health.probing = True
        try:
            async with asyncio.timeout(TIMEOUT * 2):
                out = await fn(*args, **kw)
        except self._errors as e:
            self.health.failed(e)
            return None
        finally:
            if probe:
                self.health.probing = False
        self.health.worked()
        return out

    async def send_delay(self, per_hour: int, n: int = 1) -> float | None:
        """Take `n` of the hourly cap shared by every engine, when there are (a minute's worth
        may go at once, as with the local bucket): 0. Else nothing is taken and the answer is
        the seconds until there will be: ask again then. None: Redis is down."""
        burst = max(1.0, per_hour / 60)
        ms = await self._call(self._take_tokens, keys=[f"{self.prefix}rate"],
                              args=[repr(per_hour / 3_600_000), repr(burst), n])
        return None if ms is None else float(ms) / 1000

    async def host_lease(self, ip: str, port: int, cap: int) -> str:
        """A place among the `cap` connections all engines may have to one server; waits while
        others hold them all (TimeoutError after FULL_WAIT s). Returns the lease's name. When
        Redis is down this engine goes on alone: the lease is kept all the same, and the
        renewals register it once Redis answers again."""
        key = self.host_key(ip, port)
        self._n += 1
        member = f"{self.me}:{self._n}"
        pause = FULL_POLL[0]
        deadline = time.monotonic() + FULL_WAIT
        try:
            while True:
                got = await self._call(self._take_lease, keys=[key],
                                       args=[cap, member, self.lease_ms])
                if got is None or int(got) == 1:
                    self._hold(member, key)
                    return member
                if time.monotonic() + pause > deadline:
                    raise TimeoutError(f"{ip}:{port} at its shared connection cap")
                await asyncio.sleep(pause)
                pause = min(FULL_POLL[1], pause * 2)
        except asyncio.CancelledError:  # Redis may have granted it as the call was cancelled
            self._background(self._call(self.r.zrem, key, member))
            raise

    def _hold(self, member: str, key: str) -> None:
        self.held[member] = key
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_leases())

    def host_release(self, member: str | None) -> None:
        """The connection holding `member` is closed (in the background; were it lost, the
        lease expires)."""
        key = self.held.pop(member, None) if member else None
        if key is not None:
            self._background(self._release(key, member))

    async def _release(self, key: str, member: str) -> None:
        async with self._leases_lock:
            await self._call(self.r.zrem, key, member)

    def publish_cut(self, dest: str, limit: int) -> None:
        """This engine lowered `dest`'s concurrency to `limit`: tell the others (background)."""
        key = f"{self.prefix}cuts"
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, dest, f"{limit}:{int(time.time() * 1000)}:{self.me}")
        pipe.pexpire(key, 2 * CUT_NOTICE_MS)  # the board goes away when nobody is cut
        self._background(self._call(pipe.execute))

    async def poll_cuts(self) -> list[tuple[str, int]]:
        """Cuts other engines posted since the last look, each once: [(destination, limit)]."""
        board = await self._call(self.r.hgetall, f"{self.prefix}cuts")
        new = []
        now = time.time() * 1000
        for dest_b, value_b in (board or {}).items():
            try:
                limit, stamp, who = value_b.decode().split(":", 2)
                dest, limit, stamp = dest_b.decode(), int(limit), int(stamp)
            except (UnicodeDecodeError, ValueError):
                continue  # not ours
            if who == self.me or now - stamp > CUT_NOTICE_MS or \
                    self._seen_cuts.get(dest, 0) >= stamp:
                continue
            self._seen_cuts[dest] = stamp
            new.append((dest, limit))
        if len(self._seen_cuts) > 10_000:  # only recent ones matter
            self._seen_cuts = {d: t for d, t in self._seen_cuts.items() if now - t < CUT_NOTICE_MS}
        return new

    def _background(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            async with self._leases_lock:
                if self.held:
                    members = list(self.held)
                    await self._call(self._renew, keys=[self.held[m] for m in members],
                                     args=[self.lease_ms, *members])

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.held and self.health.usable():
            pipe = self.r.pipeline(transaction=False)
            for member, key in self.held.items():
                pipe.zrem(key, member)
            await self._call(pipe.execute)
        self.held.clear()
        try:
            await self.r.aclose()
        except self._errors:
            pass


class ListMirror:
    """Pushes the list files' lines onto Redis lists too, from a thread of its own (the lists
    are written from the event loop, worker threads and the intake processes alike). Each batch
    goes in once even when a reply is lost and it is sent again; each list keeps its newest
    LIST_MAX lines (a reader takes them with LPOP or LMPOP)."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis
        from redis.exceptions import RedisError
        self._errors = (RedisError, OSError)
        self.r = redis.Redis.from_url(url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT)
        self._push = self.r.register_script(_PUSH_LINES)
        self.prefix = prefix
        self.health = _Health(url, "lists")
        self._lines: deque[tuple[str, str]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._dropped = 0
        self._thread = threading.Thread(target=self._run, name="redis-lists", daemon=True)
        self._thread.start()

    def push(self, file_name: str, lines: list[str]) -> None:
        """`lines` were appended to `file_name` (e.g. hard-bounces.txt)."""
        name = f"{self.prefix}list:{file_name.removesuffix('.txt')}"
        with self._cv:
            for line in lines:
                if len(self._lines) >= LIST_BACKLOG:  # Redis down for long: drop the oldest
                    self._lines.popleft()
                    self._dropped += 1
                self._lines.append((name, line))
            self._cv.notify()

    def _run(self) -> None:
        batch: list[tuple[str, str]] = []  # sent as one, under one id, until Redis took it
        batch_id = ""
        while True:
            with self._cv:
                while not batch and not self._lines and not self._closed:
                    self._cv.wait()
                if not batch:
                    if not self._lines:
                        return  # closed, nothing left
                    batch = [self._lines.popleft() for _ in range(min(len(self._lines), 1000))]
                    batch_id = os.urandom(8).hex()
            if self._send(batch_id, batch):
                batch = []
                continue
            with self._cv:
                if self._closed:
                    return  # the lines are in the list files all the same
                self._cv.wait(OFFLINE_RETRY)

    def _send(self, batch_id: str, batch: list[tuple[str, str]]) -> bool:
        args = [x for pair in batch for x in pair]
        try:
            self._push(keys=[f"{self.prefix}batch:{batch_id}"], args=args)
        except self._errors as e:
            self.health.failed(e)
            return False
        self.health.worked()
        if self._dropped:
            log.warning("shared lists: %d lines were dropped while Redis was down (they are in "
                        "the list files)", self._dropped)
            self._dropped = 0
        return True

    def close(self, timeout: float = 2.0) -> None:
        """Send what is pending (for at most `timeout` s), then stop."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)
        self.r.close()


_mirrors: dict[tuple[str, str], ListMirror] = {}
_mirrors_lock = threading.Lock()


def list_mirror(cfg) -> ListMirror | None:
    """This process's mirror of the list files into `cfg`'s Redis; None when not shared."""
    url = cfg.shared.redis_url
    if not url:
        return None
    with _mirrors_lock:
        key = (url, cfg.shared.key_prefix)
        if key not in _mirrors:
            _mirrors[key] = ListMirror(url, cfg.shared.key_prefix)
        return _mirrors[key]


def close_list_mirrors() -> None:
    with _mirrors_lock:
        mirrors = list(_mirrors.values())
        _mirrors.clear()
    for m in mirrors:
        m.close()
