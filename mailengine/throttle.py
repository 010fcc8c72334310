"""How fast to send: per-destination concurrency windows, the hourly message cap, bandwidth.

Pure logic with an injected clock; delivery.py asks and waits.

**Concurrency window** (one per destination, in the spirit of Postfix's scheduler feedback):
starts at `initial` parallel connections (slow start), grows by 1/window per success (so by one
after a window's worth of deliveries) up to `maximum` (`limits.max_connections_per_host`). A 421,
or a run of `run` temporary failures in a row, halves it (never below 1) — at most once per
`cooldown` seconds, since the replies of connections already running report the same trouble.
Then it climbs back step by step as deliveries succeed.

**Token buckets** for `limits.max_send_rate` (messages per hour; a bucket of one minute's worth)
and `limits.max_bandwidth` (bytes per minute; a bucket of one second's worth, at least one large
message): `wait(n)` takes n tokens and says how long the caller must sleep first (0 = go now).
"""
from __future__ import annotations

import time
from typing import Callable


class Window:
    __slots__ = ("value", "maximum", "run", "cooldown", "clock", "_fails", "_last_cut",
                 "cuts")

    def __init__(self, initial: float, maximum: int, *, run: int = 3, cooldown: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maximum = max(1, maximum)
        self.value = float(min(max(1.0, initial), self.maximum))
        self.run = run
        self.cooldown = cooldown
        self.clock = clock
        self._fails = 0
        self._last_cut = float("-inf")
        self.cuts = 0

    @property
    def limit(self) -> int:
        return max(1, int(self.value))

    def success(self) -> bool:
        """A delivery went through; True when the limit grew."""
        self._fails = 0
        before = self.limit
        if self.value < self.maximum:
            self.value = min(float(self.maximum), round(self.value + 1.0 / before, 9))
        return self.limit > before

    def failure(self, site: bool) -> bool:
        """A temporary failure (`site`: a 421 or a dead connection). True when the limit fell."""
        self._fails += 1
        if not site and self._fails < self.run:
            return False
        now = self.clock()
        if now - self._last_cut < self.cooldown:
            return False
        self._last_cut = now
        self._fails = 0
        before = self.limit
        self.value = max(1.0, self.value / 2)
        self.cuts += 1
        return self.limit < before


    def lower_to(self, limit: int) -> bool:
        """Another engine cut this destination to `limit` (shared.py): do the same, as for a
        cut of our own. True when the limit fell."""
        if self.limit <= limit:
            return False
        self.value = float(max(1, limit))
        self._last_cut = self.clock()
        self._fails = 0
        self.cuts += 1
        return True


class Windows:
    """The windows of every destination, made on first use."""

    def __init__(self, maximum: int, initial: int = 5, *, clock: Callable[[], float] = time.monotonic,
                 **kwargs) -> None:
        self.maximum = maximum
        self.initial = initial
        self.clock = clock
        self.kwargs = kwargs
        self._w: dict[str, Window] = {}
        self._own: dict[str, int] = {}  # dest -> its own maximum (a provider's max_connections)

    def get(self, dest: str) -> Window:
        w = self._w.get(dest)
        if w is None:
            w = self._w[dest] = Window(self.initial, self._own.get(dest, self.maximum),
                                       clock=self.clock, **self.kwargs)
        return w

    def set_maximum(self, maximum: int) -> None:
        """A new `max_connections_per_host` while running: every window keeps within it (but
        those with a maximum of their own)."""
        self.maximum = maximum
        for dest, w in self._w.items():
            if dest not in self._own:
                w.maximum = max(1, maximum)
                w.value = min(w.value, float(w.maximum))

    def own_maximum(self, dest: str, maximum: int | None) -> None:
        """`dest`'s window grows up to `maximum` instead of max_connections_per_host (a
        provider's max_connections spread over its many servers); None: back to the common."""
        if self._own.get(dest) == maximum:
            return
        if maximum is None:
            del self._own[dest]
        else:
            self._own[dest] = maximum
        w = self._w.get(dest)
        if w is not None:
            w.maximum = max(1, self._own.get(dest, self.maximum))
            w.value = min(w.value, float(w.maximum))

    def limit(self, dest: str) -> int:
        w = self._w.get(dest)
        if w is None:
            return min(self.initial, self._own.get(dest, self.maximum))
        return w.limit

    def forget_idle(self, keep: set[str], remember: float = 600.0) -> None:
        """Drop the windows of destinations not in `keep` (nothing queued or running), except
        those cut back in the last `remember` seconds: a troubled server is not hit at full
        speed again just because its mail paused for a moment."""
        now = self.clock()
        for d in [d for d, w in self._w.items()
                  if d not in keep and (w.cuts == 0 or now - w._last_cut > remember)]:
            del self._w[d]
            self._own.pop(d, None)  # set again by the next unit's limit


class TokenBucket:
    """`rate` tokens per `per` seconds, at most `burst` saved up. rate 0 = unlimited."""

    def __init__(self, rate: float, per: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.per = per
        self.burst = burst if burst is not None else max(1.0, rate / 60)
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def wait(self, n: float = 1.0) -> float:
        """Take `n` tokens (going into debt if need be); seconds to wait before using them."""
        if self.rate <= 0:
            return 0.0
        now = self.clock()
        speed = self.rate / self.per  # tokens per second
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * speed)
        self.stamp = now
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / speed


def send_rate_bucket(per_hour: int, clock: Callable[[], float] = time.monotonic) -> TokenBucket:
    """`limits.max_send_rate`: messages per hour, a minute's worth may go at once."""
    return TokenBucket(per_hour, 3600.0, max(1.0, per_hour / 60), clock=clock)


def bandwidth_bucket(per_minute: int, clock: Callable[[], float] = time.monotonic) -> TokenBucket:
    """`limits.max_bandwidth`: bytes per minute, a second's worth (at least 64 KiB) at once."""
    return TokenBucket(per_minute, 60.0, max(65536.0, per_minute / 60), clock=clock)


class HourlyNotice:
    """The once-an-hour log line when the send-rate cap holds mail back (SPEC 3)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.last = float("-inf")

    def due(self) -> bool:
        now = self.clock()
        if now - self.last >= 3600:
            self.last = now
            return True
        return False
