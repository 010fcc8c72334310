"""Counters and the manual's console statistics lines (SPEC 6).

    2001/01/24 14:40:49 401 recv [401 inbound, 0 relay] (206228/h avg, 4971 total)
    2000/12/21 13:40:31 445 sent (267000/h avg, 7960 total)

N is what moved since the last line; `N/h avg` is the rate over that interval, as in the manual
(401 in 7 s = 206228/h; its other sample: 773 sent in 7 s = 397542/h). `Direction.per_hour` is
the average since the first message (for status and metrics). `lines()` gives the text after the
time stamp: the engine logs them, so they reach the console and the daily log file, stamped by
the log format (logs.FORMAT).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Direction:
    total: int = 0
    reported: int = 0  # total when the last line was printed
    first: float | None = None

    def add(self, now: float, n: int = 1) -> None:
        if self.first is None:
            self.first = now
        self.total += n

    def per_hour(self, now: float) -> int:
        if self.first is None:
            return 0
        return int(self.total * 3600 / max(now - self.first, 1.0))


@dataclass
class Stats:
    clock: callable = time.time
    recv: Direction = field(default_factory=Direction)
    inbound: Direction = field(default_factory=Direction)  # local mail (incoming)
    relay: Direction = field(default_factory=Direction)
    sent: Direction = field(default_factory=Direction)
    _inbound_reported: int = 0
    _relay_reported: int = 0
    _last_lines: float | None = None  # when lines() was last called (None: since the start)

    def __post_init__(self) -> None:
        self._last_lines = self.clock()

    def received(self, local: bool) -> None:
        now = self.clock()
        self.recv.add(now)
        (self.inbound if local else self.relay).add(now)

    def delivered(self, n: int = 1) -> None:
        """`n` recipients delivered (the `sent` line)."""
        self.sent.add(self.clock(), n)

    def lines(self) -> list[str]:
        """The lines due now (without their time stamp): one per direction in which mail moved
        since the last call, its rate over the time since that call."""
        now = self.clock()
        elapsed = max(now - self._last_lines, 1.0)
        self._last_lines = now
        out = []
        n = self.recv.total - self.recv.reported
        if n:
            ni = self.inbound.total - self._inbound_reported
            nr = self.relay.total - self._relay_reported
            out.append(f"{n} recv [{ni} inbound, {nr} relay] "
                       f"({int(n * 3600 / elapsed)}/h avg, {self.recv.total} total)")
            self.recv.reported = self.recv.total
            self._inbound_reported, self._relay_reported = self.inbound.total, self.relay.total
        n = self.sent.total - self.sent.reported
        if n:
            out.append(f"{n} sent ({int(n * 3600 / elapsed)}/h avg, {self.sent.total} total)")
            self.sent.reported = self.sent.total
        return out
