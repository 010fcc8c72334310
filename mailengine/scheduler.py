"""The queue manager: which recipients go out next. Pure logic: no I/O, an injected clock.

The policy, in one comment (in the spirit of Postfix's qmgr):

- **Timers.** Every message the engine knows waits in one heap ordered by its `retrytime`
  (`add`). Nothing rescans a directory to learn what memory knows; `release_due` moves the
  messages whose time has come, in time order, into the ready queues. `next_due` says when to
  look again, so the delivery loop sleeps exactly until then.
- **Per-destination queues.** A released message is split by recipient domain into units (at most
  `max_rcpts` recipients of one domain per unit: one SMTP transaction). Each destination has its
  own ready queue, ordered by priority (0 first; it grows by one per retry) then arrival: new
  mail goes before retries of the same destination.
- **Fairness.** `next_unit` takes destinations round-robin: one huge domain gets one turn per
  round like every other, so it cannot starve the rest. A destination already running its
  concurrency limit (`limit(dest)`, from throttle.py) is set aside until one of its units ends.
- **Providers.** `dest_of` (shaping.py) names a domain's destination: its provider when its MX
  hosts roll up to one, so all the provider's domains share one queue and one `limit`; a unit
  keeps its `domain` for the MX lookup. `regroup` moves a domain's waiting units under its
  provider once that is learnt; `recheck` gives a destination a turn when its limit grew
  without a unit ending (a suspension lifted: `limit` is 0 while one lasts).
- **Caps.** At most `max_active` units run at once (`limits.max_outbound_connections`: one
  connection per running unit). `paused` (`queue.pause_sending`) stops `next_unit` giving out
  anything; timers keep running, so turning it off releases everything due at once.
- **Attempts.** A message is one attempt until the last of its units ends: `unit_done` says when
  (then the caller records the attempt with outcome.py and, if recipients remain, `add`s the
  message again with its new retry time).
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

MAX_RCPTS_PER_UNIT = 100  # RFC 5321 4.5.3.1.8: servers must take at least 100 recipients


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@dataclass(eq=False)
class Unit:
    """Recipients of one message at one destination: one SMTP transaction."""
    msg_id: str
    dest: str
    rcpts: list[str]
    priority: int = 0
    seq: int = 0
    domain: str = ""  # the recipients' domain; `dest` may be their provider (shaping.py)

    def __post_init__(self) -> None:
        if not self.domain:
            self.domain = self.dest

    def __repr__(self) -> str:
        return f"Unit({self.msg_id}, {self.dest}, {len(self.rcpts)} rcpts, prio {self.priority})"


HOST_WAITING_FACTOR = 4


@dataclass
class _Entry:
    rcpts: list[str]
    priority: int
    due: float
    units_left: int = 0  # > 0 while the message is being delivered
    active: bool = False


@dataclass
class _Dest:
    queue: list = field(default_factory=list)  # heap of (priority, seq, Unit)
    active: int = 0
    in_rr: bool = False


class Scheduler:
    def __init__(self, clock: Callable[[], float] = time.time, *,
                 limit: Callable[[str], int] = lambda dest: 10, max_active: int = 500,
                 max_rcpts: int = MAX_RCPTS_PER_UNIT,
                 dest_of: Callable[[str], str] | None = None) -> None:
        self.clock = clock
        self.limit = limit
        self.dest_of = dest_of  # domain -> destination (its provider: shaping.py); None: itself
        self.max_active = max_active
        self.max_rcpts = max_rcpts
        self.paused = False
        self.active = 0  # units handed out and not done (not counting those host_waiting)
        self.host_waiting = 0  # units waiting for a busy shared server (set_waiting)
        self._seq = 0
        self._timers: list[tuple[float, int, str]] = []  # (due, seq, msg_id); stale ones skipped
        self._msgs: dict[str, _Entry] = {}
        self._dests: dict[str, _Dest] = {}
        self._rr: deque[str] = deque()  # destinations with ready units and room to run
        self._ready_units = 0

    # -- what the engine knows ---------------------------------------------------------------------

    def add(self, msg_id: str, rcpts: Iterable[str], priority: int = 0,
            due: float | None = None) -> None:
        """Remember a message, due at `due` (clock time; None or the past = now). A message
        already known is rescheduled, unless it is being delivered (then ValueError)."""
        e = self._msgs.get(msg_id)
        if e is not None and e.active:
            raise ValueError(f"{msg_id} is being delivered")
        rcpts = list(rcpts)
        if not rcpts:
            raise ValueError(f"{msg_id} has no recipients to send to")
        now = self.clock()
        due = now if due is None else due
        self._seq += 1
        self._msgs[msg_id] = _Entry(rcpts, priority, due)
        heapq.heappush(self._timers, (due, self._seq, msg_id))

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._msgs

    def __len__(self) -> int:
        return len(self._msgs)

    @property
    def waiting(self) -> int:
        """Messages waiting for their time (not yet released)."""
        return sum(1 for e in self._msgs.values() if not e.active)

    @property
    def ready(self) -> int:
        """Units released and not yet handed out."""
        return self._ready_units

    # -- time -----------------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """The clock time of the earliest waiting message, or None."""
        timers = self._timers
        while timers:
            due, seq, mid = timers[0]
            e = self._msgs.get(mid)
            if e is None or e.active or e.due != due:
                heapq.heappop(timers)  # stale
                continue
            return due
        return None

    def release_due(self, now: float | None = None) -> int:
        """Move every message due by `now` into the ready queues; returns how many."""
        now = self.clock() if now is None else now
        timers = self._timers
        n = 0
        while timers and timers[0][0] <= now:
            due, seq, mid = heapq.heappop(timers)
            e = self._msgs.get(mid)
            if e is None or e.active or e.due != due:
                continue
            self._release(mid, e)
            n += 1
        return n

    def _release(self, mid: str, e: _Entry) -> None:
        by_dest: dict[str, list[str]] = {}
        for a in e.rcpts:
            by_dest.setdefault(domain_of(a), []).append(a)
        e.active = True
        e.units_left = 0
        for domain, rcpts in by_dest.items():
            dest = domain if self.dest_of is None else self.dest_of(domain)
            d = self._dests.get(dest)
            if d is None:
                d = self._dests[dest] = _Dest()
            for i in range(0, len(rcpts), self.max_rcpts):
                self._seq += 1
                u = Unit(mid, dest, rcpts[i:i + self.max_rcpts], e.priority, self._seq, domain)
                heapq.heappush(d.queue, (e.priority, self._seq, u))
                e.units_left += 1
                self._ready_units += 1
            self._wake(dest, d)

    def _wake(self, dest: str, d: _Dest) -> None:
        if not d.in_rr and d.queue and d.active < self.limit(dest):
            d.in_rr = True
            self._rr.append(dest)

    # -- handing out work -----------------------------------------------------------------------------

    def next_unit(self) -> Unit | None:
        """The next unit to deliver (round-robin over destinations), or None: nothing ready,
        paused, at `max_active`, or every ready destination at its concurrency limit."""
        if self.paused or self.active >= self.max_active:
            return None
        rr = self._rr
        while rr:
            dest = rr.popleft()
            d = self._dests[dest]
            if not d.queue or d.active >= self.limit(dest):
                d.in_rr = False  # set aside: unit_done of this destination brings it back
                if not d.queue and d.active == 0:
                    del self._dests[dest]
                continue
            _, _, u = heapq.heappop(d.queue)
            d.active += 1
            self.active += 1
            self._ready_units -= 1
            if d.queue and d.active < self.limit(dest):
                rr.append(dest)  # to the back of the round
            else:
                d.in_rr = False
            return u
        return None

    def unit_done(self, u: Unit, ran: bool = True) -> bool:
        """A unit ended (`ran=False`: one from `take_ready`, never handed out). True when it was
        its message's last: the attempt is over; the caller records it and `add`s the message
        again if recipients remain."""
        if ran:
            d = self._dests.get(u.dest)
            if d is not None:
                d.active -= 1
                self._wake(u.dest, d)
                if not d.queue and d.active == 0:
                    if d.in_rr:
                        self._rr.remove(u.dest)
                    del self._dests[u.dest]
            self.active -= 1
        e = self._msgs.get(u.msg_id)
        if e is None:
            return False
        e.units_left -= 1
        if e.units_left > 0:
            return False
        e.active = False
        del self._msgs[u.msg_id]
        return True

    def set_waiting(self, waiting: bool) -> bool:
        """A running unit waits for a connection to a server busy at its per-host cap (one that
        other destinations share): it stops counting against `max_active` while it waits, so
        other destinations go on; its destination still counts it. At most HOST_WAITING_FACTOR
        × `max_active` units wait so at once (each has resolved its MX and holds its message):
        beyond, False, and the unit keeps its place. `set_waiting(False)` ends a wait that
        returned True."""
        if waiting:
            if self.host_waiting >= HOST_WAITING_FACTOR * self.max_active:
                return False
            self.host_waiting += 1
            self.active -= 1
        else:
            self.host_waiting -= 1
            self.active += 1
        return True

    def recheck(self, dest: str) -> None:
        """`dest`'s limit may have grown without a unit of it ending (a suspension lifted or
        over, a throttle easing): give it a turn again if it has ready units."""
        d = self._dests.get(dest)
        if d is not None:
            self._wake(dest, d)

    def regroup(self, domain: str, dest: str) -> None:
        """`domain` turned out to belong to destination `dest` (its provider): its ready units
        move to `dest`'s queue, under `dest`'s limit. Its running units end where they began."""
        d = self._dests.get(domain)
        if d is None or not d.queue or domain == dest:
            return
        to = self._dests.get(dest)
        if to is None:
            to = self._dests[dest] = _Dest()
        for item in d.queue:
            item[2].dest = dest
            heapq.heappush(to.queue, item)
        d.queue = []
        if d.active == 0 and not d.in_rr:
            del self._dests[domain]
        self._wake(dest, to)

    def take_ready(self) -> list[Unit]:
        """Remove every unit not handed out yet (at shutdown); their messages stay active so the
        caller can settle them."""
        out = []
        for d in self._dests.values():
            out += [u for _, _, u in d.queue]
            d.queue.clear()
            d.in_rr = False
        self._rr.clear()
        self._ready_units = 0
        return out

    def destinations(self) -> dict[str, tuple[int, int]]:
        """dest -> (ready units, running units), for stats and tests."""
        return {k: (len(d.queue), d.active) for k, d in self._dests.items()}

    # -- queue control (`mailengine queue`, through delivery.py) ----------------------------------
    # Kept apart from the scheduling policy above: the administrator taking messages back.

    def due(self, msg_id: str) -> float | None:
        """When a waiting message is due (clock time); None when unknown or released."""
        e = self._msgs.get(msg_id)
        return None if e is None or e.active else e.due

    def withdraw(self, msg_ids: Iterable[str]) -> set[str]:
        """Take messages back (hold, delete, reschedule): waiting ones, and released ones none of
        whose units has been handed out yet. Returns the ids taken back; a message with a unit
        running stays (its attempt must end first). One pass over the ready queues for all."""
        wanted = {m for m in msg_ids if m in self._msgs}
        released = {m for m in wanted if self._msgs[m].active}
        if released:
            found: dict[str, int] = {}
            for d in self._dests.values():
                for _, _, u in d.queue:
                    if u.msg_id in released:
                        found[u.msg_id] = found.get(u.msg_id, 0) + 1
            running = {m for m in released if found.get(m, 0) != self._msgs[m].units_left}
            take = released - running
            wanted -= running
            if take:
                for dest, d in list(self._dests.items()):
                    before = len(d.queue)
                    d.queue = [item for item in d.queue if item[2].msg_id not in take]
                    if len(d.queue) != before:
                        heapq.heapify(d.queue)
                        self._ready_units -= before - len(d.queue)
                    if not d.queue and d.active == 0 and not d.in_rr:
                        del self._dests[dest]
        for m in wanted:
            del self._msgs[m]  # its timer entry, if any, becomes stale
        return wanted
