"""The connection pool: open SMTP connections kept for reuse, within the connection caps.

Every connection counts from the moment it is being opened until it is closed, idle ones
included, so the remote side never sees more than `limits.max_outbound_connections` in all and
`limits.max_connections_per_host` per server (per server and source address with sending
sources, sources.py; shared with other engines through shared.py when configured). A unit that
finds its server at the cap waits in that server's queue, one that finds the total cap reached
waits in the total's queue; a connection that closes or goes idle wakes only the units that can
use it. The sessions are SMTPSession (smtp_session.py) or, with delivery processes,
RemoteSession (deliverers.py): the pool counts both alike.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Callable

from .dns import Target
from .smtp.client import local_reply
from .smtp_session import ConnectError, SMTPSession

if TYPE_CHECKING:
    from .sources import Source

IDLE_CLOSE = 5.0  # s: an idle connection kept for reuse longer than this is closed
WAKE_SCAN = 64  # waiters for the total cap looked through for one that wants an idle session


class Pool:
    """Open SMTP connections, kept per (ip, port) for reuse, within the two caps; per
    (ip, port, source) with sending sources (sources.py), so the per-host cap holds per source
    address, as the servers count.

    Every connection counts from the moment it is being opened until it is closed, idle ones
    included, so the remote side never sees more than the caps allow."""

    def __init__(self, max_total: int, max_per_host: int, make, shared=None) -> None:
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.make = make  # (Target) -> SMTPSession
        self.shared = shared  # shared.SharedLimits: the per-host cap held with other engines
        self.total = 0
        self.peak = 0
        self.per_host: dict[tuple[str, int], int] = {}
        self.idle: dict[tuple[str, int], list[SMTPSession]] = {}
        # acquire() calls waiting: per server at its per-host cap, or (None) for the total cap
        # (future, the server the unit wants) per queue
        self._waiters: dict[tuple[str, int] | None, deque[tuple[asyncio.Future, tuple]]] = {}
        self._closing: set[asyncio.Task] = set()
        self.closed = False

    def set_caps(self, max_total: int, max_per_host: int) -> None:
        """New caps while running. Raised: waiting units may go on. Lowered: idle connections
        beyond them are closed now, busy ones when their message is done."""
        self.max_total, self.max_per_host = max_total, max_per_host
        for key, idle in list(self.idle.items()):
            for _ in range(min(len(idle), self.per_host.get(key, 0) - max_per_host)):
                self._close_later(key, idle.pop())
        while self.total - len(self._closing) > max_total and self._evict_one_idle():
            pass
        self._notify()

    def _over_caps(self, key) -> bool:
        return (self.per_host.get(key, 0) > self.max_per_host
                or self.total - len(self._closing) > self.max_total)

    def _notify(self, key: tuple[str, int] | None = None, freed: bool = True) -> None:
        """A connection of server `key` closed (`freed`: a place of that server and one of the
        total) or went idle (a session to reuse). Only the units that can use it wake, not all
        (hundreds may wait for one MX that many domains share): for a place, one waiting for
        that server and one waiting for the total cap; for an idle session, one that wants that
        server (from either queue), else the first waiting for the total cap (it may close the
        idle session to make room). None: the caps changed, so everyone wakes."""
        if key is None:
            groups = list(self._waiters.values())
            self._waiters = {}
            for waiters in groups:
                for w, _ in waiters:
                    if not w.done():
                        w.set_result(None)
            return
        if freed:
            self._wake_one(key)
            self._wake_one(None)
        elif not self._wake_one(key) and not self._wake_one(None, wants=key):
            self._wake_one(None)

    def _wake_one(self, queue: tuple[str, int] | None, wants=None) -> bool:
        """Wake the first live waiter of `queue` (with `wants`: the first, among the first
        WAKE_SCAN, whose unit wants that server). True when one was woken."""
        waiters = self._waiters.get(queue)
        woken = False
        if waiters and wants is not None:
            for i, (w, k) in enumerate(waiters):
                if i >= WAKE_SCAN:
                    break
                if k == wants and not w.done():
                    del waiters[i]
                    w.set_result(None)
                    woken = True
                    break
        else:
            while waiters:
                w, _ = waiters.popleft()
                if not w.done():
                    w.set_result(None)
                    woken = True
                    break
        if not waiters:
            self._waiters.pop(queue, None)
        return woken

    async def _wait(self, queue: tuple[str, int] | None, key: tuple[str, int],
                    front: bool = False) -> None:
        """Wait in `queue` (a server's, or None: the total cap's) for the unit wanting `key`;
        `front`: it was woken for nothing, so it keeps its turn."""
        fut = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(queue, deque())
        (waiters.appendleft if front else waiters.append)((fut, key))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._wake_one(queue)  # woken, then cancelled: the slot goes to the next one
            raise

    def _take_idle(self, key) -> SMTPSession | None:
        idle = self.idle.get(key)
        while idle:
            s = idle.pop()
            if s.is_reusable:
                return s
            self._forget(key, s)
        return None

    def _forget(self, key, s: SMTPSession) -> None:
        s.abort()
        self._count_closed(key, s)

    def _count_closed(self, key, s: SMTPSession | None = None) -> None:
        if s is not None and getattr(s, "lease", None) is not None:
            self.shared.host_release(s.lease)
            s.lease = None
        self.total -= 1
        n = self.per_host.get(key, 1) - 1
        if n:
            self.per_host[key] = n
        else:
            self.per_host.pop(key, None)
        self._notify(key)

    def _take_oldest_idle(self, keys) -> tuple | None:
        """(key, session) of the longest-idle connection to any of `keys`, out of the idle
        lists; None when none is idle."""
        best = None
        for key in keys:
            for s in self.idle.get(key, ()):
                if best is None or s.last_used < best[1].last_used:
                    best = (key, s)
        if best is not None:
            key, s = best
            self.idle[key].remove(s)
            if not self.idle[key]:
                del self.idle[key]
        return best

    def _evict_one_idle(self) -> bool:
        """Close the longest-idle connection of any host to make room; False if none is idle."""
        best = self._take_oldest_idle(list(self.idle))
        if best is None:
            return False
        self._close_later(*best)
        return True

    def _close_later(self, key, s: SMTPSession) -> None:
        """QUIT politely in the background; the connection counts until it is really closed."""
        async def close() -> None:
            try:
                async with asyncio.timeout(2.0):
                    await s.close()
            except BaseException:
                s.abort()
            finally:
                self._closing.discard(asyncio.current_task())  # before the waiters it wakes look
                self._count_closed(key, s)
        t = asyncio.get_running_loop().create_task(close())
        self._closing.add(t)
        t.add_done_callback(self._closing.discard)

    async def acquire(self, target: Target, fresh: bool = False,
                      host_wait: Callable[[bool], bool] | None = None,
                      source: Source | None = None) -> SMTPSession:
        """A connected session to `target`; raises ConnectError when it cannot connect.
        `fresh`: a new connection (the idle ones to that server are closed: one just failed,
        so the server has probably dropped them all). `host_wait(True)` is called when it must
        wait because the server is at `max_per_host` (it answers whether the unit left its place
        among the running units), and then `host_wait(False)` when that wait ends. `source`:
        the sending source to connect from (made by `make(target, source)`)."""
        key = pool_key(target, source)
        if fresh:
            for s in self.idle.pop(key, []):
                self._forget(key, s)
        waiting = False
        woken_for_total = False
        woken = False
        try:
            while True:
                if self.closed:
                    raise ConnectError(local_reply(451, "4.3.2", "Shutting down"), [])
                s = self._take_idle(key)
                if s is not None:
                    if woken_for_total and self.total < self.max_total:
                        self._wake_one(None)  # the free place it was woken for: the next one's
                    return s
                host_busy = self.per_host.get(key, 0) >= self.max_per_host
                if not host_busy:
                    if self.total < self.max_total:
                        break
                    if self.total - len(self._closing) >= self.max_total:
                        self._evict_one_idle()  # its slot frees when its QUIT is done
                elif woken_for_total and self.total < self.max_total:
                    self._wake_one(None)  # the free slot this unit cannot use: the next one's
                if host_wait is not None and host_busy and not waiting:
                    waiting = host_wait(True)  # False: too many wait so already; keep the place
                woken_for_total = not host_busy
                await self._wait(key if host_busy else None, key, front=woken)
                woken = True
        finally:
            if waiting and host_wait is not None:
                host_wait(False)
        self.total += 1
        self.peak = max(self.peak, self.total)
        self.per_host[key] = self.per_host.get(key, 0) + 1
        lease = None
        if self.shared is not None:
            try:  # a place among every engine's connections to this server (waits for one)
                lease = await self.shared.host_lease(target.ip, target.port, self.max_per_host)
            except BaseException as e:
                self._count_closed(key)
                if isinstance(e, TimeoutError):
                    raise ConnectError(local_reply(451, "4.4.5", f"{target.ip}:{target.port} is at "
                                              "its connection limit shared with other engines"),
                                       []) from None
                raise
        try:
            s = self.make(target) if source is None else self.make(target, source)
        except BaseException:
            if lease is not None:
                self.shared.host_release(lease)
            self._count_closed(key)
            raise
        s.lease = lease
        s.pool_key = key
        try:
            await s.connect()
        except BaseException:
            s.abort()
            self._count_closed(key, s)
            raise
        return s

    def per_source(self) -> dict[str, int]:
        """Connections counted now (opening, busy, idle, closing) per sending source's name
        (sources.py); connections without a source are not in it. One pass over the servers."""
        out: dict[str, int] = {}
        for key, n in self.per_host.items():
            if len(key) == 3:
                out[key[2]] = out.get(key[2], 0) + n
        return out

    def release(self, s: SMTPSession) -> None:
        key = getattr(s, "pool_key", None) or (s.ip, s.port)
        if s.is_reusable and not self.closed and not self._over_caps(key) and \
                not getattr(s, "retire", False):
            self.idle.setdefault(key, []).append(s)
            self._notify(key, freed=False)
        elif s.is_reusable:
            self._close_later(key, s)
        else:
            self._forget(key, s)

    def drop_idle(self, keys) -> bool:
        """Close the longest-idle connection to any of these servers now (its place frees at
        once); False when none is idle."""
        best = self._take_oldest_idle(keys)
        if best is None:
            return False
        self._forget(*best)
        return True

    def sweep(self, now: float) -> None:
        """Close connections idle longer than IDLE_CLOSE (loop time)."""
        for key, lst in list(self.idle.items()):
            keep = []
            for s in lst:
                if now - s.last_used > IDLE_CLOSE or not s.is_reusable:
                    self._close_later(key, s) if s.is_reusable else self._forget(key, s)
                else:
                    keep.append(s)
            if keep:
                self.idle[key] = keep
            else:
                del self.idle[key]

    async def close_all(self) -> None:
        self.closed = True
        for key, lst in list(self.idle.items()):
            for s in lst:
                self._close_later(key, s)
        self.idle.clear()
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
        self._notify()


def pool_key(target: Target, source: Source | None = None) -> tuple:
    """The pool's key of a connection: (ip, port), and the source's name when there is one."""
    return (target.ip, target.port) if source is None else (target.ip, target.port, source.name)
