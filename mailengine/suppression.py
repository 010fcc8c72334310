"""The suppression list: addresses the engine must not send to (issue 18), kept in the home.

An entry says which address (lower-cased), for which sender domain ("" = every sender), why,
where it came from (manual, bounce, complaint, unsubscribe, import), when, and until when (None =
for good). Intake refuses or drops mail to a suppressed recipient at RCPT; the CLI, the API and
the web admin add, remove, list, import and export entries.

Where it lives:

- `HOME/suppression.db`, SQLite in WAL mode, used at once by the engine, every intake worker
  process and the CLI (a writer never blocks the readers; writes are short transactions).
- With `shared.redis_url` set, every change also goes to Redis (a hash of all entries and a
  stream of the changes), and a thread in each process pulls the other engines' changes into
  the local file once a second. A change made while Redis is down waits in the file's outbox
  and is sent when Redis answers again; if Redis lost its data (a restart without persistence)
  the local entries are put back into it. Lookups never wait for Redis.

Why a lookup is cheap (intake asks for every RCPT): each process keeps the keys and expiry times
of all entries in memory (about 100 bytes an entry), so a miss is two dict lookups (under 1 µs).
At most every REFRESH_EVERY s it asks SQLite `PRAGMA data_version` (has another connection
committed?; about 10 µs, too much for every RCPT); when it has, only the rows changed since (a
sequence number on every row, and a table of removals) are read again. So another process's
addition counts within REFRESH_EVERY s; a removal at once, since a hit reads its row from the
file (hits are rare) and a row that is gone is no hit.

Every `add` writes an event line {"event": "suppressed", ...} to `HOME/log/events.jsonl`.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Iterable

from .categories import CATEGORIES, PERMANENT
from . import webhooks
from .events import EventLog, iso_time
from .setting import INTAKE, Setting

log = logging.getLogger("mailengine.suppression")

FILE = "suppression.db"
SOURCES = ("manual", "bounce", "complaint", "unsubscribe", "import")
CSV_FIELDS = ("address", "sender_domain", "reason", "source", "created", "expires")
SYNC_EVERY = 1.0  # s between pulls of other engines' changes from Redis
REFRESH_EVERY = 0.1  # s between a process's looks for other processes' changes to the file
STREAM_MAX = 100_000  # changes kept in the Redis stream; a reader further behind reloads all
REMOVED_KEPT = 7 * 86400  # s a removal is remembered for the other processes' caches
MAX_FIELD = 1000  # characters of a reason (longer ones are cut)
NEVER = float("inf")
ACTIONS = ("reject", "drop")


def _check_action(value: str) -> str | None:
    return None if value in ACTIONS else f"must be one of {', '.join(ACTIONS)}"


def _check_categories(value: list[str]) -> str | None:
    unknown = [c for c in value if c not in CATEGORIES]
    return (f"no such bounce category: {', '.join(unknown)} (one of: {', '.join(CATEGORIES)})"
            if unknown else None)


SUPPRESSION_SECTION_TITLE = ("suppression", "Suppression list (addresses not to send to)")
SUPPRESSION_SETTINGS = [
    Setting("suppression", "enabled", True, "bool",
            "Check every relayed recipient against the suppression list (HOME/suppression.db, "
            "shared through shared.redis_url when set) at RCPT.", scope=INTAKE),
    Setting("suppression", "action", "reject", "str",
            "What happens to a suppressed recipient: 'reject' answers RCPT with 550 5.7.1 "
            "naming the suppression; 'drop' accepts it, delivers nothing to it and writes a "
            "'dropped' line to log/events.jsonl.", check=_check_action, scope=INTAKE),
    # bounce_suppression.py: the engine after each attempt, the intake processes per bounce
    Setting("suppression", "bounce_categories", sorted(PERMANENT), "list[str]",
            "Bounce categories (categories.py) whose hard failures, at RCPT or DATA or in a "
            "bounce report, put the address on the list for every sender; [] = none.",
            check=_check_categories),
    Setting("suppression", "trust_unsigned_bounces", False, "bool",
            "Also suppress after bounce reports that do not quote this engine's signed "
            "List-Unsubscribe token for the address. A VERP address is not signed: anyone could "
            "then suppress any address with a forged bounce. Failures in our own SMTP sessions "
            "always count."),
    Setting("suppression", "bounce_days", 0, "float",
            "Days an address suppressed after a hard bounce stays on the list; 0 = for good.",
            minimum=0, zero_ok=True),
]



@dataclass(frozen=True)
class Entry:
    address: str  # lower-cased
    sender_domain: str  # "" = suppressed for every sender
    reason: str  # human text, e.g. "550 5.1.1 user unknown", "complaint via ARF"
    source: str  # "manual" | "bounce" | "complaint" | "unsubscribe" | "import"
    created: float  # epoch seconds
    expires: float | None  # epoch seconds, None = never

    def active(self, now: float | None = None) -> bool:
        return self.expires is None or self.expires > (time.time() if now is None else now)

    def as_json(self) -> dict:
        return asdict(self)


def dropped_records(msg_id: str, mail_from: str, dropped: dict) -> list[dict]:
    """The event lines of recipients accepted and dropped (suppression.action = drop):
    `dropped` maps each address to its Entry."""
    stamp = iso_time()
    return [{"time": stamp, "event": "dropped", "id": msg_id, "from": mail_from, "rcpt": rcpt,
             "suppression": {"reason": e.reason, "source": e.source,
                             "sender_domain": e.sender_domain}}
            for rcpt, e in dropped.items()]


def normal_address(address: str) -> str:
    """`address` lower-cased and stripped of <> and spaces; ValueError when it is no address."""
    a = str(address).strip().strip("<>").strip().lower()
    if not a or "@" not in a or a.startswith("@") or a.endswith("@") or any(
            c.isspace() or c in ",;<>\"" or ord(c) < 32 for c in a) or len(a) > 320:
        raise ValueError(f"not an e-mail address: {address!r}")
    return a


def normal_domain(domain: str | None) -> str:
    """A sender domain lower-cased ("" = every sender); ValueError when it is no domain."""
    d = str(domain or "").strip().lower().lstrip("@").rstrip(".")
    if d and (any(c.isspace() or c in "@,;<>\"/" or ord(c) < 32 for c in d) or len(d) > 255):
        raise ValueError(f"not a domain: {domain!r}")
    return d


def _time_value(value, what: str) -> float | None:
    """Epoch seconds from a number or an ISO 8601 time ('2026-12-04', '...T10:00:00Z');
    None from ''."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite(float(value), what, value)
    s = str(value).strip()
    if not s:
        return None
    try:
        return _finite(float(s), what, value)
    except ValueError as e:
        if "finite" in str(e):
            raise
    from datetime import datetime, timezone
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{what}: {value!r} is neither epoch seconds nor an ISO 8601 time") \
            from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


LAST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z: later times cannot be written as dates


def _finite(t: float, what: str, value) -> float:
    if not math.isfinite(t) or not 0 <= t <= LAST_TIME:
        raise ValueError(f"{what}: {value!r} is not a time between 1970 and 9999")
    return t


def utc_text(t: float | None) -> str:
    """'2026-12-04T23:10:00Z' (CSV export), '' for None."""
    if t is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def make_entry(address: str, *, reason: str, source: str = "manual", sender_domain: str = "",
               expires=None, created=None) -> Entry:
    """A checked Entry (ValueError with a clear message for bad values)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, not {source!r}")
    reason = " ".join(str(reason or "").split())[:MAX_FIELD]
    created_t = _time_value(created, "created")
    return Entry(normal_address(address), normal_domain(sender_domain), reason, source,
                 time.time() if created_t is None else created_t, _time_value(expires, "expires"))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (address TEXT NOT NULL, sender_domain TEXT NOT NULL,
  reason TEXT NOT NULL, source TEXT NOT NULL, created REAL NOT NULL, expires REAL,
  seq INTEGER NOT NULL, PRIMARY KEY (address, sender_domain));
CREATE INDEX IF NOT EXISTS entries_seq ON entries (seq);
CREATE TABLE IF NOT EXISTS removed (address TEXT NOT NULL, sender_domain TEXT NOT NULL,
  seq INTEGER NOT NULL, time REAL NOT NULL, PRIMARY KEY (address, sender_domain));
CREATE INDEX IF NOT EXISTS removed_seq ON removed (seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS outbox (n INTEGER PRIMARY KEY AUTOINCREMENT, address TEXT NOT NULL,
  sender_domain TEXT NOT NULL);
"""
_COLUMNS = "address, sender_domain, reason, source, created, expires"


def _entry(row) -> Entry:
    return Entry(*row[:6])


class _Db:
    """One connection to the file (used under a lock: the store may be shared by threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # private: it lists addresses. O_EXCL: never open (and close) a file SQLite
            # may hold in this process already (the unsubscribe listener's store beside the
            # policy's): closing any descriptor of it drops the process's POSIX locks, and
            # another process closing its last connection then deletes the WAL under ours
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        self.conn = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
        self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable but for a power cut
        self.conn.execute("PRAGMA busy_timeout=10000")
        self.conn.executescript(_SCHEMA)  # IF NOT EXISTS: any process may be first
        # The RCPT lookup's own connection and lock: in WAL mode a reader never waits for a
        # writer, so intake's check (on the event loop) never waits behind an add, an import or
        # another process's write lock, as it did sharing `conn` (2.8 s measured).
        self.reader_lock = threading.Lock()
        self.reader = sqlite3.connect(path, timeout=10.0, isolation_level=None,
                                      check_same_thread=False)

    def write(self):
        return _Write(self)

    def next_seq(self) -> int:
        """The next change number (inside a write)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        n = (row[0] if row else 0) + 1
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('seq', ?)", (n,))
        return n

    def meta(self, key: str, default=None):
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def upsert(self, e: Entry, seq: int) -> None:
        self.conn.execute(f"INSERT OR REPLACE INTO entries ({_COLUMNS}, seq) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?)",
                          (e.address, e.sender_domain, e.reason, e.source, e.created, e.expires,
                           seq))
        self.conn.execute("DELETE FROM removed WHERE address = ? AND sender_domain = ?",
                          (e.address, e.sender_domain))

    def upsert_many(self, entries: list[Entry]) -> None:
        """upsert for many at once (an import: one change number each, taken together)."""
        first = self.next_seq()
        self.set_meta("seq", first + len(entries) - 1)
        self.conn.executemany(f"INSERT OR REPLACE INTO entries ({_COLUMNS}, seq) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?)",
                              [(e.address, e.sender_domain, e.reason, e.source, e.created,
                                e.expires, first + i) for i, e in enumerate(entries)])
        if self.conn.execute("SELECT 1 FROM removed LIMIT 1").fetchone():
            self.conn.executemany("DELETE FROM removed WHERE address = ? AND sender_domain = ?",
                                  [(e.address, e.sender_domain) for e in entries])

    def delete(self, address: str, domain: str, seq: int,
               expired_by: float | None = None) -> bool:
        """`expired_by`: only an entry expired by then (not one added again since a look)."""
        if expired_by is None:
            gone = self.conn.execute("DELETE FROM entries WHERE address = ? AND "
                                     "sender_domain = ?", (address, domain)).rowcount > 0
        else:
            gone = self.conn.execute("DELETE FROM entries WHERE address = ? AND sender_domain = ? "
                                     "AND expires IS NOT NULL AND expires <= ?",
                                     (address, domain, expired_by)).rowcount > 0
        if gone:
            self.conn.execute("INSERT OR REPLACE INTO removed VALUES (?, ?, ?, ?)",
                              (address, domain, seq, time.time()))
        return gone

    def close(self) -> None:
        with self.reader_lock:
            self.reader.close()
        with self.lock:
            self.conn.close()


class _Write:
    """`with db.write():` one IMMEDIATE transaction under the lock."""

    def __init__(self, db: _Db) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.lock.acquire()
        try:
            self.db.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.db.lock.release()
            raise
        return self.db.conn

    def __exit__(self, kind, value, tb) -> None:
        try:
            self.db.conn.execute("COMMIT" if kind is None else "ROLLBACK")
        finally:
            self.db.lock.release()


class _Cache:
    """Keys and expiry times of every entry, brought up to date from the changes since `seq`."""

    def __init__(self) -> None:
        self.all: dict[str, float] = {}  # address -> expiry (NEVER for none), every sender
        self.per_domain: dict[tuple[str, str], float] = {}  # (address, sender domain) -> expiry
        self.seq = -1  # -1: never loaded
        self.version = None  # PRAGMA data_version when last brought up to date

    def refresh(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version == self.version and self.seq >= 0:
            return
        # One snapshot: a commit between the reads of rows and of removals could otherwise
        # carry the sequence past changes never read.
        conn.execute("BEGIN")
        try:
            self._refresh(conn, version)
        finally:
            conn.execute("COMMIT")

    def _refresh(self, conn: sqlite3.Connection, version: int) -> None:
        pruned = conn.execute("SELECT value FROM meta WHERE key = 'pruned'").fetchone()
        if self.seq < 0 or (pruned and pruned[0] > self.seq):  # removals we never saw: reload
            self._load(conn)
            self.version = version
            return
        top = self.seq
        for address, domain, expires, seq in conn.execute(
                "SELECT address, sender_domain, expires, seq FROM entries WHERE seq > ?",
                (self.seq,)):
            self._put(address, domain, NEVER if expires is None else expires)
            top = max(top, seq)
        for address, domain, seq in conn.execute(
                "SELECT address, sender_domain, seq FROM removed WHERE seq > ?", (self.seq,)):
            self._drop(address, domain)
            top = max(top, seq)
        self.seq, self.version = top, version

    def _load(self, conn: sqlite3.Connection) -> None:
        """Everything, in one read (about 0.3 s for 100,000 entries)."""
        top = conn.execute("SELECT value FROM meta WHERE key = 'seq'").fetchone()
        rows = conn.execute("SELECT address, sender_domain, expires FROM entries").fetchall()
        self.all = {a: NEVER if t is None else t for a, d, t in rows if not d}
        self.per_domain = {(a, d): NEVER if t is None else t for a, d, t in rows if d}
        self.seq = top[0] if top else 0

    def _put(self, address: str, domain: str, expires: float) -> None:
        if domain:
            self.per_domain[(address, domain)] = expires
        else:
            self.all[address] = expires

    def _drop(self, address: str, domain: str) -> None:
        if domain:
            self.per_domain.pop((address, domain), None)
        else:
            self.all.pop(address, None)

    def hit(self, address: str, domain: str, now: float) -> str | None:
        """The sender domain of an active entry for (address, domain) ("" first), else None."""
        t = self.all.get(address)
        if t is not None and t > now:
            return ""
        if domain and self.per_domain:
            t = self.per_domain.get((address, domain))
            if t is not None and t > now:
                return domain
        return None

    def __len__(self) -> int:
        return len(self.all) + len(self.per_domain)


class SuppressionStore:
    """The suppression list of one home. Every method blocks (SQLite, short): from an event
    loop, `lookup` is fine as is (an in-memory check); bulk calls belong in a thread."""

    def __init__(self, home, redis_url: str = "", key_prefix: str = "mailengine:",
                 *, sync: bool = True) -> None:
        self.home = Path(home)
        self.db = _Db(self.home / FILE)
        self.cache = _Cache()
        self._next_check = 0.0  # monotonic time of the next look at PRAGMA data_version
        self.events = EventLog(self.home / "log")
        self.cfg = None  # set by for_config: additions are then posted to webhooks too
        self.redis: _RedisLink | None = None
        if redis_url:
            self.redis = _RedisLink(self.home / FILE, redis_url, key_prefix)
            if sync:
                self.redis.start()

    @classmethod
    def for_config(cls, cfg) -> "SuppressionStore":
        store = cls(cfg.home, cfg.shared.redis_url, cfg.shared.key_prefix)
        store.cfg = cfg
        return store

    # --- changes ---

    def add(self, address, *, reason, source="manual", sender_domain="", expires=None) -> Entry:
        """Suppress `address` (for `sender_domain`'s mail, or all when ""); an entry for the same
        address and sender domain is replaced. ValueError for bad values."""
        e = make_entry(address, reason=reason, source=source, sender_domain=sender_domain,
                       expires=expires)
        self._store([e])
        self._event(e)
        return e

    def remove(self, address, sender_domain="", *, expired_by: float | None = None) -> bool:
        """Take the entry for (address, sender_domain) away; False when there was none.
        `expired_by`: only if it had expired by then (purge_expired)."""
        a, d = normal_address(address), normal_domain(sender_domain)
        with self.db.write() as conn:
            gone = self.db.delete(a, d, self.db.next_seq(), expired_by)
            if gone and self.redis:
                conn.execute("INSERT INTO outbox (address, sender_domain) VALUES (?, ?)", (a, d))
        self.cache.version = None  # our own commits leave data_version as it was
        if gone and self.redis:
            self.redis.wake()
        return gone

    def _store(self, entries: list[Entry]) -> None:
        with self.db.write() as conn:
            self.db.upsert_many(entries)
            if self.redis:
                conn.executemany("INSERT INTO outbox (address, sender_domain) VALUES (?, ?)",
                                 [(e.address, e.sender_domain) for e in entries])
        self.cache.version = None  # our own commits leave data_version as it was
        if self.redis:
            self.redis.wake()

    def _event(self, e: Entry) -> None:
        self.events.write([{"time": iso_time(), "event": "suppressed", "address": e.address,
                            "sender_domain": e.sender_domain, "reason": e.reason,
                            "source": e.source, "expires": e.expires}])
        webhooks.emit_quietly(self.cfg, [webhooks.event(
            "suppressed", e.address, sender_domain=e.sender_domain, reason=e.reason,
            source=e.source, expires=e.expires)])

    def purge_expired(self, now: float | None = None) -> int:
        """Remove the entries that have expired; how many."""
        now = time.time() if now is None else now
        with self.db.lock:
            rows = self.db.conn.execute(
                "SELECT address, sender_domain FROM entries WHERE expires IS NOT NULL "
                "AND expires <= ?", (now,)).fetchall()
        # each delete checks the expiry again: one added anew since the select stays
        n = sum(self.remove(a, d, expired_by=now) for a, d in rows)
        with self.db.write() as conn:  # forget old removals; caches older than them reload
            top = conn.execute("SELECT max(seq) FROM removed WHERE time < ?",
                               (now - REMOVED_KEPT,)).fetchone()[0]
            if top is not None:
                conn.execute("DELETE FROM removed WHERE seq <= ?", (top,))
                self.db.set_meta("pruned", max(top, self.db.meta("pruned", 0)))
        return n

    # --- questions ---

    def lookup(self, address, sender_domain="") -> Entry | None:
        """The active entry that suppresses `address` for mail from `sender_domain` (one for all
        senders first, else one for that domain), or None. A change by another process is seen
        within REFRESH_EVERY s, one by this store at once."""
        # As normal_address/normal_domain, without their checks (a few µs a call): an address
        # that could not be added is simply not found.
        a = str(address).strip().strip("<>").strip().lower()
        d = str(sender_domain or "").strip().lower().lstrip("@").rstrip(".")
        cache = self.cache
        if cache.version is None or time.monotonic() >= self._next_check:
            with self.db.reader_lock:  # asking SQLite costs more than the rest: not always
                cache.refresh(self.db.reader)
            self._next_check = time.monotonic() + REFRESH_EVERY
        hit = cache.hit(a, d, time.time())
        if hit is None:
            return None
        with self.db.reader_lock:
            row = self.db.reader.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE address = ? AND sender_domain = ?",
                (a, hit)).fetchone()
        return _entry(row) if row else None

    def suppressed(self, recipients: Iterable[str], sender_domain: str = "") -> list[str]:
        """Those of `recipients` that are suppressed for `sender_domain`, in their order."""
        return [r for r in recipients if self.lookup(r, sender_domain) is not None]

    def _where(self, search: str, sender_domain: str | None, source: str | None,
               include_expired: bool) -> tuple[str, list]:
        parts, args = [], []
        if search:
            parts.append("address LIKE ? ESCAPE '\\'")
            s = search.strip().lower().replace("\\", "\\\\").replace("%", "\\%")
            args.append("%" + s.replace("_", "\\_") + "%")
        if sender_domain is not None:
            parts.append("sender_domain = ?")
            args.append(normal_domain(sender_domain))
        if source:
            parts.append("source = ?")
            args.append(source)
        if not include_expired:
            parts.append("(expires IS NULL OR expires > ?)")
            args.append(time.time())
        return (" WHERE " + " AND ".join(parts)) if parts else "", args

    def entries(self, search: str = "", *, sender_domain: str | None = None,
                source: str | None = None, include_expired: bool = False, limit: int | None = 100,
                offset: int = 0) -> list[Entry]:
        """Entries by address, filtered: `search` is a part of the address, `sender_domain`
        one sender domain ("" = the entries for all senders), `source` one source."""
        where, args = self._where(search, sender_domain, source, include_expired)
        sql = f"SELECT {_COLUMNS} FROM entries{where} ORDER BY address, sender_domain"
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            args += [int(limit), int(offset)]
        with self.db.lock:
            return [_entry(r) for r in self.db.conn.execute(sql, args)]

    def count(self, search: str = "", *, sender_domain: str | None = None,
              source: str | None = None, include_expired: bool = False) -> int:
        where, args = self._where(search, sender_domain, source, include_expired)
        with self.db.lock:
            return self.db.conn.execute(f"SELECT count(*) FROM entries{where}", args).fetchone()[0]

    # --- CSV ---

    def export_csv(self, fileobj: IO[str]) -> int:
        """Every entry (expired ones too) as CSV with a header line (CSV_FIELDS; times in UTC,
        ISO 8601). Returns how many."""
        w = csv.writer(fileobj, lineterminator="\n")
        w.writerow(CSV_FIELDS)
        n = 0
        with self.db.lock:
            rows = self.db.conn.execute(
                f"SELECT {_COLUMNS} FROM entries ORDER BY address, sender_domain").fetchall()
        for r in rows:
            e = _entry(r)
            w.writerow([e.address, e.sender_domain, e.reason, e.source, utc_text(e.created),
                        utc_text(e.expires)])
            n += 1
        return n

    def import_csv(self, fileobj: IO[str]) -> int:
        """Add the entries of a CSV file: with a header line naming its columns (`address` and
        any of CSV_FIELDS), or without one, an address per line in the first column (the rest
        ignored). A missing source is "import", a missing reason "imported". Nothing is added
        when a line is bad (ValueError naming the line). Returns how many were added."""
        text = fileobj.read()
        if isinstance(text, bytes):
            text = text.decode("utf-8-sig", "replace")
        text = text.lstrip("\ufeff")
        rows = list(csv.reader(io.StringIO(text)))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        if "address" in header:
            unknown = [h for h in header if h and h not in CSV_FIELDS]
            if unknown:
                raise ValueError(f"line 1: unknown column(s) {', '.join(unknown)}; the columns "
                                 f"are {', '.join(CSV_FIELDS)}")
            body, first = rows[1:], 2
        else:
            header, body, first = ["address"], rows, 1
        out: dict[tuple[str, str], Entry] = {}
        for n, row in enumerate(body, first):
            if not any(c.strip() for c in row):
                continue
            if row[0].lstrip().startswith("#"):
                continue
            v = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
            try:
                e = make_entry(v["address"], reason=v.get("reason") or "imported",
                               source=v.get("source") or "import",
                               sender_domain=v.get("sender_domain", ""),
                               expires=v.get("expires") or None,
                               created=v.get("created") or None)
            except ValueError as ex:
                raise ValueError(f"line {n}: {ex}") from None
            out[(e.address, e.sender_domain)] = e
        entries = list(out.values())
        if entries:
            self._store(entries)
            self.events.write([{"time": iso_time(), "event": "suppressions-imported",
                                "count": len(entries)}])
        return len(entries)

    # --- Redis ---

    def sync(self) -> bool:
        """Exchange changes with Redis now (the thread does it every SYNC_EVERY s); False when
        Redis could not be reached or is not configured."""
        return self.redis.sync_once() if self.redis else False

    def close(self) -> None:
        if self.redis:
            self.redis.close()
        self.events.close()
        self.db.close()


_shared: dict[tuple, SuppressionStore] = {}
_shared_lock = threading.Lock()


def shared_store(cfg) -> SuppressionStore:
    """This process's one store of `cfg`'s home: intake's RCPT check, complaints, unsubscribes,
    bounces and the web admin use it together, so a process keeps one copy of the list in
    memory and one Redis link. Lives as long as the process (nothing closes it)."""
    key = (str(cfg.home), cfg.shared.redis_url, cfg.shared.key_prefix)
    with _shared_lock:
        store = _shared.get(key)
        if store is None:
            store = _shared[key] = SuppressionStore.for_config(cfg)
        return store


def _field(address: str, domain: str) -> str:
    return f"{address}\t{domain}"


def _entry_json(e: Entry) -> str:
    return json.dumps(asdict(e), separators=(",", ":"))


def _from_json(text) -> Entry | None:
    try:
        d = json.loads(text)
        return Entry(str(d["address"]), str(d["sender_domain"]), str(d["reason"]),
                     str(d["source"]), float(d["created"]),
                     None if d["expires"] is None else float(d["expires"]))
    except (ValueError, KeyError, TypeError):
        return None


class _RedisLink:
    """Carries the changes between the local file and Redis, in a thread of its own with its own
    connection to the file.

    Redis keys (under the prefix): `suppression:entries`, a hash "address<TAB>domain" -> entry
    JSON; `suppression:log`, a stream of changes {field, entry} (entry "" = removed), trimmed to
    about STREAM_MAX; `suppression:epoch`, a random id made when the hash was first written, so
    a file that synced with a Redis that since lost its data can tell."""

    def __init__(self, path: Path, url: str, prefix: str) -> None:
        import redis
        from redis.exceptions import RedisError
        from .shared import TIMEOUT, _Health
        self._errors = (RedisError, OSError)
        self.r = redis.Redis.from_url(url, socket_timeout=TIMEOUT,
                                      socket_connect_timeout=TIMEOUT, decode_responses=True)
        self.path = path
        self.hash, self.stream = f"{prefix}suppression:entries", f"{prefix}suppression:log"
        self.epoch_key = f"{prefix}suppression:epoch"
        self.health = _Health(url, "suppression list")
        self._db: _Db | None = None
        self._lock = threading.Lock()  # one exchange at a time (the thread and sync())
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="suppression-sync", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _run(self) -> None:
        while True:
            self.sync_once()
            with self._cv:
                if self._closed:
                    return
                self._cv.wait(SYNC_EVERY)
                if self._closed:
                    return

    def sync_once(self) -> bool:
        with self._lock:
            if self._db is None:
                self._db = _Db(self.path)
            try:
                self._push()
                self._pull()
            except self._errors as e:
                self.health.failed(e)
                return False
            except sqlite3.Error as e:
                log.warning("suppression list: cannot sync %s with Redis: %s", self.path, e)
                return False
            self.health.worked()
            return True

    def _push(self) -> None:
        """Send the outbox: each changed key's current state in the file."""
        db = self._db
        while True:
            with db.lock:
                batch = db.conn.execute(
                    "SELECT n, address, sender_domain FROM outbox ORDER BY n LIMIT 1000").fetchall()
                if not batch:
                    return
                states = []
                for _, a, d in batch:
                    row = db.conn.execute(f"SELECT {_COLUMNS} FROM entries WHERE address = ? "
                                          "AND sender_domain = ?", (a, d)).fetchone()
                    states.append((a, d, _entry(row) if row else None))
            self._ensure_epoch()
            pipe = self.r.pipeline(transaction=True)
            for a, d, e in states:
                f = _field(a, d)
                if e is None:
                    pipe.hdel(self.hash, f)
                else:
                    pipe.hset(self.hash, f, _entry_json(e))
                pipe.xadd(self.stream, {"field": f, "entry": _entry_json(e) if e else ""},
                          maxlen=STREAM_MAX, approximate=True)
            pipe.execute()
            with db.write():
                db.conn.execute("DELETE FROM outbox WHERE n <= ?", (batch[-1][0],))

    def _ensure_epoch(self) -> None:
        self.r.set(self.epoch_key, os.urandom(8).hex(), nx=True)

    def _pull(self) -> None:
        """Apply the changes in the stream since the last one this file took; everything again
        when this file is new to this Redis, or so far behind that the stream was trimmed."""
        db = self._db
        epoch = self.r.get(self.epoch_key)
        with db.lock:
            my_epoch, last = db.meta("redis_epoch"), db.meta("redis_last", "")
        if epoch is None or epoch != my_epoch:
            # New to this Redis, or Redis lost its data: merge, losing nothing of either side.
            self._reload(lost=True)
            return
        checked = False
        while True:
            changes = self.r.xrange(self.stream, "(" + last, "+", count=1000)
            if not changes:
                return
            if not checked:
                checked = True
                first = self.r.xrange(self.stream, "-", "+", count=1)
                if first and _id_after(first[0][0], last):
                    # The oldest change kept is newer than the last we took: some may have been
                    # trimmed away unseen, so take the whole hash (Redis is right).
                    self._reload(lost=False)
                    return
            with db.write() as conn:
                pending = _pending(conn)
                for _, fields in changes:
                    if fields.get("field", "") in pending:
                        continue  # changed here since: ours is newer, and goes out next
                    a, _, d = fields.get("field", "").partition("\t")
                    e = _from_json(fields["entry"]) if fields.get("entry") else None
                    if e is not None:
                        cur = db.conn.execute("SELECT 1 FROM entries WHERE address = ? AND "
                                              "sender_domain = ? AND reason = ? AND source = ? "
                                              "AND created = ? AND expires IS ?",
                                              (e.address, e.sender_domain, e.reason, e.source,
                                               e.created, e.expires)).fetchone()
                        if cur is None:  # not already so (our own change, another process's)
                            db.upsert(e, db.next_seq())
                    elif a:
                        db.delete(a, d, db.next_seq())
                last = changes[-1][0]
                db.set_meta("redis_last", last)

    def _reload(self, lost: bool) -> None:
        """Make the file match the Redis hash. `lost`: Redis lost its data (or never had ours),
        so entries only in the file go back into Redis rather than out of the file (a removal
        made elsewhere meanwhile may come back: suppressing too much is the safe side)."""
        db = self._db
        self._ensure_epoch()
        epoch = self.r.get(self.epoch_key)
        top = self.r.xrevrange(self.stream, "+", "-", count=1)
        remote: dict[str, Entry] = {}
        for f, v in self.r.hscan_iter(self.hash, count=1000):
            e = _from_json(v)
            if e is not None:
                remote[f] = e
        with db.write() as conn:
            local = {_field(r[0], r[1]): _entry(r) for r in
                     conn.execute(f"SELECT {_COLUMNS} FROM entries").fetchall()}
            pending = _pending(conn)
            for f, e in remote.items():
                if local.get(f) != e and f not in pending:
                    db.upsert(e, db.next_seq())
            only_here = [f for f in local if f not in remote and f not in pending]
            if lost:
                conn.executemany("INSERT INTO outbox (address, sender_domain) VALUES (?, ?)",
                                 [tuple(f.split("\t", 1)) for f in only_here])
            else:
                for f in only_here:
                    a, d = f.split("\t", 1)
                    db.delete(a, d, db.next_seq())
            db.set_meta("redis_epoch", epoch)
            db.set_meta("redis_last", top[0][0] if top else "0-0")
        if lost and only_here:
            self._push()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(5)
            if not self.health.down:  # changes made just now: send them before going
                self.sync_once()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        self.r.close()


def _pending(conn: sqlite3.Connection) -> set[str]:
    """The keys changed in this home and not sent to Redis yet (by any of its processes, since
    this one's push): newer than what Redis has, so Redis's state must not overwrite them."""
    return {_field(a, d) for a, d in conn.execute("SELECT address, sender_domain FROM outbox")}


def _id_after(a: str, b: str) -> bool:
    """Stream id `a` comes after `b`."""
    def key(x: str) -> tuple[int, int]:
        ms, _, n = x.partition("-")
        return int(ms), int(n or 0)
    return key(a) > key(b)
