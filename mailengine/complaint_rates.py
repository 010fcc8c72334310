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
- **complaints**: the lines of `log/complaints.jsonl` (complaints.py; few by nature, at most a
  few per thousand messages), read again only when the file changed.

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
from pathlib import Path

from .complaints import COMPLAINTS_JSONL

log = logging.getLogger("mailengine.complaint_rates")

COUNTS_FILE = "delivered-by-domain.json"
BUCKET = 3600  # s: one bucket per hour
KEEP = 8 * 86400  # s of buckets kept
SAVE_EVERY = 60.0  # s between writes of the counts while mail flows
WINDOWS = {"1d": 86400, "7d": 7 * 86400}
MAX_READ = 32 << 20  # bytes of complaints.jsonl read (its end)


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


class ComplaintLines:
    """The complaints of log/complaints.jsonl as (unix time, sender domain, record), read again
    only when the file changed."""

    def __init__(self, log_dir: Path | str) -> None:
        self.path = Path(log_dir) / COMPLAINTS_JSONL
        self._key: tuple | None = None
        self._items: list[tuple[float, str, dict]] = []

    def items(self) -> list[tuple[float, str, dict]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._key, self._items = None, []
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._key:
            self._items = self._read(st.st_size)
            self._key = key
        return self._items

    def _read(self, size: int) -> list[tuple[float, str, dict]]:
        try:
            with open(self.path, "rb") as f:
                if size > MAX_READ:
                    f.seek(size - MAX_READ)
                    f.readline()  # the first may be cut
                data = f.read()
        except OSError as e:
            log.warning("cannot read %s: %s", self.path, e)
            return []
        out = []
        for line in data.splitlines():
            try:
                rec = json.loads(line)
                if rec.get("is_complaint"):
                    out.append((float(rec["unix"]), str(rec.get("sender_domain") or ""), rec))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a line another program cut or wrote
        return out


def rates(tally: DeliveredTally | None, complaints: ComplaintLines, threshold: float,
          now: float | None = None) -> list[dict]:
    """One row per sender domain with mail delivered or complained about in the last week:
    delivered, complaints and rate (percent; None when nothing was delivered) for each window,
    and `over` when a window's rate is above `threshold` (percent). Worst first."""
    now = time.time() if now is None else now
    items = complaints.items()
    rows: dict[str, dict] = {}
    for name, span in WINDOWS.items():
        delivered = tally.since(now - span) if tally is not None else {}
        counted: dict[str, int] = {}
        for t, dom, _rec in items:
            if now - span <= t <= now + 60:
                counted[dom] = counted.get(dom, 0) + 1
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


def recent(complaints: ComplaintLines, n: int = 50) -> list[dict]:
    """The last `n` complaints, newest first."""
    return [rec for _t, _d, rec in complaints.items()[-n:]][::-1]
