"""Counters and the manual's console statistics lines (SPEC 6).

    2001/01/24 14:40:49 401 recv [401 inbound, 0 relay] (206228/h avg, 4971 total)
    2000/12/21 13:40:31 445 sent (267000/h avg, 7960 total)

N is what moved since the last line; the average is the total over the time since the first
message moved in that direction.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field


def stamp(t: float | None = None) -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(t))


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

    def received(self, local: bool) -> None:
        now = self.clock()
        self.recv.add(now)
        (self.inbound if local else self.relay).add(now)

    def delivered(self, n: int = 1) -> None:
        """`n` recipients delivered (the `sent` line)."""
        self.sent.add(self.clock(), n)

    def lines(self) -> list[str]:
        """The lines due now: one per direction in which mail moved since the last call."""
        now = self.clock()
        out = []
        n = self.recv.total - self.recv.reported
        if n:
            ni = self.inbound.total - self._inbound_reported
            nr = self.relay.total - self._relay_reported
            out.append(f"{stamp(now)} {n} recv [{ni} inbound, {nr} relay] "
                       f"({self.recv.per_hour(now)}/h avg, {self.recv.total} total)")
            self.recv.reported = self.recv.total
            self._inbound_reported, self._relay_reported = self.inbound.total, self.relay.total
        n = self.sent.total - self.sent.reported
        if n:
            out.append(f"{stamp(now)} {n} sent ({self.sent.per_hour(now)}/h avg, "
                       f"{self.sent.total} total)")
            self.sent.reported = self.sent.total
        return out
