"""The backlog: queued messages the engine keeps on disk only, found again by their next retry
time without reading their files.

Memory holds at most `limits.messages_in_memory` messages (Postfix's active queue is the model:
`qmgr_message_active_limit`). Every other message in `mailq/retry/` is here as its id and the
time it is due, about 200 bytes each, in a heap ordered by that time; the engine loads a
message's `.inf` only when it is due and there is room (app.Engine._load_backlog). A message in
the backlog has only its files in retry/; nothing else in the engine knows it, so queue
commands and the drop-in scan ask the backlog too.

At a clean stop the backlog and the messages in memory are written to `mailq/backlog.index`
(one `DUE ID` line each), so the next start needs no `.inf` of them before it delivers. The file
is read once at start and removed, and only while retry/ has not changed since it was written;
a start without it (after a crash, or a change to the queue while stopped) reads the `.inf`
files as their turn comes, in the background, while the engine already takes SMTP and delivers.
The index only says when to look at a message: its `.inf`, read when it is loaded, says what to
do with it.
"""
from __future__ import annotations

import heapq
import math
import os
from pathlib import Path
from typing import Iterable, Iterator

from .queue_dirs import RETRY

INDEX_NAME = "backlog.index"
HELD = math.inf  # the due time of a held message: never loaded until released


def due_time(msg) -> float:
    """When a queued message (envelope.Message) is next due, as the backlog keeps it: epoch
    seconds, 0 for now, HELD for never."""
    if msg.held:
        return HELD
    return msg.retry_time.timestamp() if msg.retry_time is not None else 0.0


class Backlog:
    def __init__(self) -> None:
        self._due: dict[str, float] = {}  # id -> due time (epoch seconds; HELD; 0 = unknown)
        self._heap: list[tuple[float, str]] = []  # (due, id); stale entries are skipped
        self._unordered = False  # add_many() appended to _heap: heapify before use
        self._held = 0  # how many of _due are HELD

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._due

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._due))

    def held(self) -> int:
        return self._held

    def due(self, msg_id: str) -> float | None:
        return self._due.get(msg_id)

    def add(self, msg_id: str, due: float) -> None:
        """Keep `msg_id` on disk only, to be loaded when `due` comes (again: its new time)."""
        old = self._due.get(msg_id)
        if old == due:
            return
        self._due[msg_id] = due
        self._held += (due == HELD) - (old == HELD)
        if due != HELD:
            heapq.heappush(self._heap, (due, msg_id))
        if len(self._heap) > 2 * len(self._due) + 1024:
            self._compact()

    def add_many(self, items: Iterable[tuple[str, float]]) -> None:
        """add() for many at once (a start): their heap entries are put in order once, when the
        backlog is next asked what is due, instead of one push each."""
        due, heap = self._due, self._heap
        for mid, d in items:
            old = due.get(mid)
            due[mid] = d
            if d != HELD:
                heap.append((d, mid))
            self._held += (d == HELD) - (old == HELD)
        self._unordered = True

    def discard(self, msg_id: str) -> None:
        if self._due.pop(msg_id, None) == HELD:  # (a heap entry is skipped when it comes up)
            self._held -= 1

    def _ordered(self) -> list[tuple[float, str]]:
        if self._unordered:
            heapq.heapify(self._heap)
            self._unordered = False
        return self._heap

    def next_due(self) -> float | None:
        """The earliest due time (None: nothing but held messages, or empty)."""
        heap = self._ordered()
        while heap and self._due.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float, limit: int) -> list[str]:
        """Up to `limit` ids due at `now` or before, earliest first, taken out of the backlog."""
        out: list[str] = []
        heap = self._ordered()
        while heap and len(out) < limit and heap[0][0] <= now:
            due, mid = heapq.heappop(heap)
            if self._due.get(mid) == due:
                del self._due[mid]
                out.append(mid)
        return out

    def _compact(self) -> None:
        self._heap = [(d, m) for m, d in self._due.items() if d != HELD]
        heapq.heapify(self._heap)
        self._unordered = False

    # -- the index kept across a clean stop ----------------------------------------------------

    @staticmethod
    def save(mailq: Path, entries: Iterable[tuple[str, float]]) -> int:
        """Write mailq/backlog.index: a first line `retry-mtime NS` (retry/'s modification time
        now), then `DUE ID` lines (HELD as `held`), through a temporary file; returns how many."""
        path = Path(mailq) / INDEX_NAME
        tmp = path.with_name(INDEX_NAME + ".tmp")
        n = 0
        with open(tmp, "w") as f:
            f.write(f"retry-mtime {os.stat(Path(mailq) / 'retry').st_mtime_ns}\n")
            for mid, due in entries:
                f.write(f"{'held' if due == HELD else repr(float(due))} {mid}\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return n

    @staticmethod
    def take_index(mailq: Path) -> list[str] | None:
        """The lines of the index a clean stop left, removed as it is read (it describes the
        queue at that stop only); parse them with parse_index(). It counts only while nothing
        was stored, removed, renamed or rewritten in retry/ since (its modification time is
        unchanged: a queue command on the files, a drop-in, a restore from backup all change
        it). Call it before recovery touches retry/. None when there is none, it is stale, or
        it cannot be read: retry/ must then be listed."""
        path = Path(mailq) / INDEX_NAME
        try:
            now = os.stat(Path(mailq) / RETRY).st_mtime_ns
            with open(path) as f:
                head = f.readline().split()
                if head != ["retry-mtime", str(now)]:
                    return None
                return f.read().splitlines()
        except (OSError, UnicodeDecodeError):
            return None
        finally:
            for p in (path, path.with_name(INDEX_NAME + ".tmp")):
                try:
                    p.unlink()
                except OSError:
                    pass

    @staticmethod
    def parse_index(lines: Iterable[str]) -> Iterator[tuple[str, float]]:
        """(id, due) of `DUE ID` index lines; malformed ones are skipped."""
        for line in lines:
            due, _, mid = line.partition(" ")
            if not mid:
                continue
            try:
                yield mid, HELD if due == "held" else float(due)
            except ValueError:
                continue
