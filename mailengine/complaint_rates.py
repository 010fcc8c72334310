"""Complaint rate per sender domain: complaints / delivered recipients, last day and last week.

Gmail and Yahoo (2024) want bulk senders' spam-complaint rate under 0.3 %; the web admin, the
API and /metrics show each sender domain's rate against `complaints.rate_threshold_percent`.

Where the numbers come from, chosen to cost delivery nothing measurable:

- **delivered**: `DeliveredTally`, kept by the engine process (notices.py calls `add` once per
  send attempt with the number of recipients it delivered): a dict increment per attempt, in
  hourly buckets per sender domain (the envelope sender's domain, as queued), the last 8 days
  kept. It is written to `HOME/delivered-by-domain.json` at most once a minute while mail flows
  and when the engine stops, so a restart keeps the week (a crash loses at most that minute).
  Reading events.jsonl instead would mean parsing every delivery line again, and the file may be
  rotated away by other programs at any time.
- **complaints**: `ComplaintCounts`, the lines of `log/complaints.jsonl` and its rotated
  `complaints.jsonl.1` (complaints.py, which writes complaints only and rotates the file at
  16 MiB: anyone may mail the complaint address), each sender domain's complaint times held in
  memory, sorted. The intake processes write the file; the engine follows it: each view first
  takes in, in a thread, only the lines appended since the last one, so no view reads the
  whole file, and none reads it on the event loop.

"Last day" is the last 24 hours (the delivered count to the hour: the oldest bucket counted is the
one the window starts in); "last week" the last 7 days. A complaint counts for the sender domain
complaints.py found for it; one whose domain could not be told counts under "" (shown as "?").
Several engines sharing a Redis (shared.py) each count their own deliveries.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from array import array
from bisect import bisect_left, bisect_right, insort
from collections import deque
from pathlib import Path

from .complaints import COMPLAINTS_JSONL

log = logging.getLogger("mailengine.complaint_rates")

COUNTS_FILE = "delivered-by-domain.json"
BUCKET = 3600  # s: one bucket per hour
KEEP = 8 * 86400  # s of buckets kept
SAVE_EVERY = 60.0  # s between writes of the counts while mail flows
WINDOWS = {"1d": 86400, "7d": 7 * 86400}
MAX_READ = 32 << 20  # bytes of complaints.jsonl(.1) read when (re)loaded: their end
MAX_STEP = 4 << 20  # bytes of new lines taken in by one refresh (the rest by the next)
RECENT_KEPT = 100  # newest complaint records held for the page and the API


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].strip().lower().rstrip(".") if "@" in address else ""


class DeliveredTally:
    """Delivered recipients per (hour, sender domain), persisted in HOME/delivered-by-domain.json."""

    def __init__(self, home: Path | str, clock=time.time, save_every: float = SAVE_EVERY) -> None:
        self.path = Path(home) / COUNTS_FILE
        self.clock = clock
        self.save_every = save_every
        self.buckets: dict[int, dict[str, int]] = {}  # hour start (epoch s) -> domain -> count
        self._dirty = False
        self._saved = clock()
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
            self.buckets = {int(h): {str(d): int(n) for d, n in doms.items()}
                            for h, doms in raw.get("hours", {}).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning("%s unreadable (%s): delivered counts start from zero", self.path, e)
        self._prune()

    def _prune(self) -> None:
        oldest = self.clock() - KEEP
        for h in [h for h in self.buckets if h + BUCKET < oldest]:
            del self.buckets[h]

    def add(self, mail_from: str, n: int) -> None:
        """`n` recipients of mail from `mail_from` delivered now."""
        if n <= 0:
            return
        now = self.clock()
        hour = int(now // BUCKET * BUCKET)
        dom = domain_of(mail_from)
        with self._lock:
            bucket = self.buckets.get(hour)
            if bucket is None:
                bucket = self.buckets[hour] = {}
                self._prune()
            bucket[dom] = bucket.get(dom, 0) + n
            self._dirty = True
        if now - self._saved >= self.save_every:
            self.save()

    def since(self, start: float) -> dict[str, int]:
        """Delivered per sender domain in the buckets from the one holding `start` on."""
        first = start // BUCKET * BUCKET
        out: dict[str, int] = {}
        with self._lock:
            for h, doms in self.buckets.items():
                if h >= first:
                    for d, n in doms.items():
                        out[d] = out.get(d, 0) + n
        return out

    def save(self) -> None:
        """Write the counts (small: hours x sender domains); never raises."""
        with self._lock:
            if not self._dirty:
                return
            text = json.dumps({"bucket_seconds": BUCKET, "hours": {
                str(h): d for h, d in sorted(self.buckets.items())}}, separators=(",", ":"))
            self._dirty = False
            self._saved = self.clock()
        tmp = self.path.with_name(f"{COUNTS_FILE}.{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("cannot write %s: %s", self.path, e)
            self._dirty = True


class ComplaintCounts:
    """The complaints of log/complaints.jsonl (and complaints.jsonl.1, its rotated part) held in
    memory: each sender domain's complaint times, sorted, and the newest records.

    `refresh()` brings them up to date and does all the file reading: run it in a thread
    (asyncio.to_thread), never on the event loop. Unchanged files: two stats. Lines appended
    since: only those bytes are read (at most MAX_STEP a call). Rotated, truncated or first
    call: the tail of both files is read again (MAX_READ in all), as the figures must be those
    of the lines the files hold. `counts()`, `recent()` and `rates()` then only look at memory:
    bisections in the sorted times, so a view costs the same with ten complaints or a million.
    Times older than KEEP are dropped; what is held is bounded by the files, which
    complaints.py rotates at complaints.MAX_BYTES."""

    def __init__(self, log_dir: Path | str, clock=time.time) -> None:
        self.path = Path(log_dir) / COMPLAINTS_JSONL
        self.old_path = self.path.with_name(COMPLAINTS_JSONL + ".1")
        self.clock = clock
        self.bytes_read = 0  # all refreshes together (tests, and a sense of the cost)
        self._ino: tuple[int, int] | None = None  # the followed file (dev, inode); None: unread
        self._offset = 0  # bytes of it taken in: whole lines only
        self._old_key: tuple | None = ()  # complaints.jsonl.1 as last read (() = never)
        self._times: dict[str, array] = {}  # sender domain -> unix times, sorted
        self._recent: deque[dict] = deque(maxlen=RECENT_KEPT)
        self._lock = threading.Lock()  # the in-memory state: held for moments only
        self._refreshing = threading.Lock()  # one refresh at a time (views run them in threads)

    # --- reading (in a thread) -------------------------------------------------------------

    def refresh(self) -> None:
        """Take in what changed in the files since the last call. Never raises."""
        with self._refreshing:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as e:
                log.warning("cannot stat %s: %s", self.path, e)
                return
            # .1 changes only at a rotation, or when a writer's line lands in it just after
            # one (as with any log rotation): then both are read again
            old_key = self._stat_old()
            if old_key != self._old_key:
                self._reload(st, old_key)
            elif st is not None and self._ino == (st.st_dev, st.st_ino) and \
                    st.st_size >= self._offset:
                if st.st_size > self._offset:
                    self._take_new(st.st_size)
            elif st is not None or self._ino is not None:  # rotated, truncated or deleted
                self._reload(st, old_key)

    def _stat_old(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.old_path)
            return st.st_ino, st.st_size, st.st_mtime_ns
        except OSError:
            return None

    def _reload(self, st, old_key: tuple | None) -> None:
        """Read the tail of complaints.jsonl.1 and complaints.jsonl afresh (MAX_READ in all)."""
        parts: list[bytes] = []
        budget = MAX_READ
        offset = 0
        ino = None
        if st is not None:
            data, offset = self._read(self.path, st.st_size, budget)
            ino = (st.st_dev, st.st_ino)
            parts.append(data)
            budget -= len(data)
        if budget > 0 and old_key and old_key[1]:
            data, _end = self._read(self.old_path, old_key[1], budget)
            parts.insert(0, data)
        times: dict[str, array] = {}
        recent: deque[dict] = deque(maxlen=RECENT_KEPT)
        self._add(times, recent, parts)
        with self._lock:
            self._times, self._recent = times, recent
            self._ino, self._offset, self._old_key = ino, offset, old_key

    def _take_new(self, size: int) -> None:
        """Read the lines appended since the last call (MAX_STEP at most; the rest next time)."""
        end = min(size, self._offset + MAX_STEP)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read(end - self._offset)
        except OSError as e:
            log.warning("cannot read %s: %s", self.path, e)
            return
        self.bytes_read += len(data)
        whole = data.rfind(b"\n") + 1  # a line still being written waits for the next call
        if not whole:
            if len(data) >= MAX_STEP:  # one line longer than a step: not ours, skip it
                self._offset = end
            return
        with self._lock:
            self._add(self._times, self._recent, [data[:whole]])
            self._offset += whole

    def _read(self, path: Path, size: int, budget: int) -> tuple[bytes, int]:
        """The whole lines of the last `budget` of the first `size` bytes of `path`, and the
        offset they end at."""
        first = max(0, size - budget)
        try:
            with open(path, "rb") as f:
                f.seek(first)
                data = f.read(size - first)
        except OSError as e:
            log.warning("cannot read %s: %s", path, e)
            return b"", 0
        self.bytes_read += len(data)
        if first:  # started inside a line: skip to the next
            cut = data.find(b"\n") + 1 or len(data)
            data, first = data[cut:], first + cut
        whole = data.rfind(b"\n") + 1
        return data[:whole], first + whole

    def _add(self, times: dict[str, array], recent: deque, chunks: list[bytes]) -> None:
        """Count the complaint lines of `chunks` into `times` and `recent`; drop old times."""
        oldest = self.clock() - KEEP
        for chunk in chunks:
            for line in chunk.splitlines():
                try:
                    rec = json.loads(line)
                    if not rec.get("is_complaint"):
                        continue  # lines written before complaints.py kept complaints only
                    t = float(rec["unix"])
                    dom = str(rec.get("sender_domain") or "")
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line another program cut or wrote
                recent.append(rec)
                if t < oldest:
                    continue
                ts = times.get(dom)
                if ts is None:
                    ts = times[dom] = array("d")
                if not ts or t >= ts[-1]:
                    ts.append(t)
                else:  # several intake processes: a line may come a moment out of order
                    insort(ts, t)
        for dom in list(times):
            ts = times[dom]
            cut = bisect_left(ts, oldest)
            if cut:
                del ts[:cut]
            if not ts:
                del times[dom]

    # --- figures (in memory) -----------------------------------------------------------------

    def counts(self, start: float, end: float) -> dict[str, int]:
        """Complaints per sender domain with `start` <= time <= `end`."""
        out = {}
        with self._lock:
            for dom, ts in self._times.items():
                n = bisect_right(ts, end) - bisect_left(ts, start)
                if n:
                    out[dom] = n
        return out

    def recent(self, n: int) -> list[dict]:
        """The last `n` complaint records (n <= RECENT_KEPT), newest first."""
        with self._lock:
            return list(self._recent)[-n:][::-1] if n > 0 else []


def rates(tally: DeliveredTally | None, complaints: ComplaintCounts, threshold: float,
          now: float | None = None) -> list[dict]:
    """One row per sender domain with mail delivered or complained about in the last week:
    delivered, complaints and rate (percent; None when nothing was delivered) for each window,
    and `over` when a window's rate is above `threshold` (percent). Worst first. Reads no file:
    call complaints.refresh() (in a thread) before."""
    now = time.time() if now is None else now
    rows: dict[str, dict] = {}
    for name, span in WINDOWS.items():
        delivered = tally.since(now - span) if tally is not None else {}
        counted = complaints.counts(now - span, now + 60)  # a clock a minute ahead still counts
        for dom in set(delivered) | set(counted):
            row = rows.setdefault(dom, {"domain": dom, "over": False})
            d, c = delivered.get(dom, 0), counted.get(dom, 0)
            rate = round(100.0 * c / d, 4) if d else None
            row[name] = {"delivered": d, "complaints": c, "rate_percent": rate}
            if rate is not None and rate > threshold:
                row["over"] = True
    empty = {"delivered": 0, "complaints": 0, "rate_percent": None}
    out = [{**{w: empty for w in WINDOWS}, **r} for r in rows.values()]
    out.sort(key=lambda r: (not r["over"], -(r["7d"]["rate_percent"] or 0),
                            -r["7d"]["complaints"], r["domain"]))
    return out


def recent(complaints: ComplaintCounts, n: int = 50) -> list[dict]:
    """The last `n` complaints, newest first."""
    return complaints.recent(n)
