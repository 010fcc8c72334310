"""Webhooks: delivery and reputation events posted as signed JSON to the operator's URLs.

Three parts, all in this module because they share one file format:

- **The outbox**, `HOME/webhooks.db` (SQLite, WAL): every event waits there until each
  configured URL has acknowledged it. `WebhookOutbox.put(events)` is durable when it returns
  and may be called from any process of the engine (the engine, intake workers, the CLI): SQLite
  serialises the writers, and an event's `seq` (AUTOINCREMENT, never reused) grows in commit
  order, so each URL's progress is one number, the last `seq` it acknowledged (`cursors`).
  A URL added later receives the events still held. A row holds up to ROW_EVENTS events of
  one put (at most `batch_size`), never split between two POSTs: a row per event made a large
  commit slow. Events every URL has acknowledged, and
  events older than `webhooks.max_age_hours`, are deleted (the latter with a warning).
- **Capture** in the engine process (`Webhooks.attempt`): the attempt records of events.py
  become `delivered` / `deferred` / `bounced` events. They are collected while one commit runs
  (and for at least COMMIT_SPACING after it started) and written together by the next one, in
  the outbox's thread: a commit (an fsync) per recipient would cost more than the delivery. The
  attempt's end waits for its commit, so the message's files are removed only once its events
  are on disk: a crash loses none (it may send an event twice). The delivery slot is free by
  then, so the wait holds up no other mail.
- **The sender** (`Webhooks.run`, a housekeeping loop of app.Engine): one asyncio task per URL,
  each with its own progress, POSTs `{"events": [...]}` (up to `batch_size` events, or what came
  within `batch_wait` seconds), signed (`sign`), with `timeout`. A 2xx acknowledges the batch;
  anything else (another status, a timeout, a refused connection) is retried after 1 s, 2 s,
  4 s ... at most `retry_max_seconds`. A stalled receiver holds only its own task.

Other parts report events of their own with `emit(cfg, [event("suppressed", addr, ...)])`.
Delivery is at least once: a receiver deduplicates on `event_id`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import urlsplit

from . import NAME, __version__
from .events import iso_time
from .secret_values import mask_text

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger("mailengine.webhooks")

FILE = "webhooks.db"
TYPES = ("delivered", "deferred", "bounced", "complained", "unsubscribed", "suppressed")
SIGNATURE_HEADER = "X-MailEngine-Signature"
TIMESTAMP_HEADER = "X-MailEngine-Timestamp"
FIRST_RETRY = 1.0  # s after the first failure; doubles up to webhooks.retry_max_seconds
IDLE_POLL = 1.0  # s between looks at the outbox when idle (other processes put events too)
PRUNE_SECONDS = 60.0  # s between deletions of acknowledged and expired events
PENDING_SECONDS = 2.0  # s between counts of each URL's pending events (status, /metrics)
BUSY_TIMEOUT = 30.0  # s a writer waits for another process's transaction
# Events stored per row: a row per event made the commit of a 100,000-recipient message's
# events take 0.4 s more (bench/fanout.py)
ROW_EVENTS = 50
# s at least between two commits of captured events: each is an fsync, and back-to-back fsyncs
# compete with the spool's own (a 250 at intake waits for those)
COMMIT_SPACING = 0.02


# --- events ---------------------------------------------------------------------------------------

def _new_prefix() -> str:
    return os.urandom(8).hex() + "-"


_id_prefix = _new_prefix()
_id_counter = itertools.count(1)


def _after_fork() -> None:  # a forked child must not repeat its parent's ids
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = _new_prefix(), itertools.count(1)


os.register_at_fork(after_in_child=_after_fork)


def new_event_id() -> str:
    """Unique across processes and restarts: 64 random bits per process, then a counter (a
    uuid4 per delivered recipient costs the delivery loop more)."""
    return f"{_id_prefix}{next(_id_counter):x}"


def event(type: str, address: str, **fields: Any) -> dict:
    """One event: {"event_id", "type", "time", "address", **fields}. `type` is one of TYPES;
    fields must be JSON values (a `time` given replaces the current one)."""
    if type not in TYPES:
        raise ValueError(f"{type!r} is not a webhook event type ({', '.join(TYPES)})")
    ev = {"event_id": new_event_id(), "type": type, "time": iso_time(), "address": address}
    ev.update(fields)
    return ev


def attempt_type(rec: dict) -> str | None:
    """The event type of one events.py attempt record: sent -> delivered, hard (or soft given
    up after the last retry) -> bounced, soft -> deferred; None for test mode's `tested`."""
    result = rec.get("result")
    if result == "sent":
        return "delivered"
    if result == "hard" or (result == "soft" and rec.get("final")):
        return "bounced"
    if result == "soft":
        return "deferred"
    return None


def from_attempts(pairs: Iterable[tuple[dict, str]], wanted: Iterable[str] = TYPES) -> list[str]:
    """The events (JSON texts) of events.py's attempt records, each given with its event log
    line: {"event_id", "type", "address"} followed by every field of the line (`time`, `id`,
    `rcpt`, `code`, `category` when the record has one ...). The line is reused as it is:
    encoding each event again cost more than the rest of the capture (bench/webhooks.py)."""
    wanted = set(wanted)
    dumps = json.dumps
    out = []
    for rec, line in pairs:
        kind = attempt_type(rec)
        if kind is None or kind not in wanted or not line.startswith("{"):
            continue
        out.append(f'{{"event_id":"{new_event_id()}","type":"{kind}",'
                   f'"address":{dumps(rec.get("rcpt", ""), ensure_ascii=False)},{line[1:]}')
    return out


def encode(events: list[dict]) -> list[str]:
    return [json.dumps(e, ensure_ascii=False, separators=(",", ":")) for e in events]


# --- signatures -----------------------------------------------------------------------------------

def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-MailEngine-Signature value: HMAC-SHA256 of b"<timestamp>." + body, in hex."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, signature: str, body: bytes,
           tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a receiver checks: the signature matches and the timestamp is recent (a replayed
    request carries an old one, which it cannot change without the secret)."""
    try:
        age = abs((time.time() if now is None else now) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(sign(secret, timestamp, body), signature)


# --- the outbox -----------------------------------------------------------------------------------

class WebhookOutbox:
    """HOME/webhooks.db. Blocking calls, safe from several threads (one connection, a lock) and
    several processes (SQLite's locks); a forked child opens its own connection."""

    def __init__(self, home: Path | str):
        self.path = Path(home) / FILE
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        if self._db is None or self._pid != os.getpid():
            # Private: it holds recipients' addresses.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")  # readers (the sender) never wait for writers
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when put() returns
            # A row holds up to ROW_EVENTS events of one put(), their JSON joined by commas
            db.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                       " created REAL NOT NULL, n INTEGER NOT NULL, body TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS cursors (url TEXT PRIMARY KEY,"
                       " acked INTEGER NOT NULL)")
            db.execute("CREATE INDEX IF NOT EXISTS events_created ON events (created)")
            self._db, self._pid = db, os.getpid()
        return self._db

    def put(self, events: list[dict], per_row: int = ROW_EVENTS) -> None:
        """Add events (JSON objects), durably when it returns; raises sqlite3.Error or OSError.
        `per_row`: events stored together, never split between two POSTs (at most
        webhooks.batch_size)."""
        self.put_json(encode(events), per_row)

    def put_json(self, texts: list[str], per_row: int = ROW_EVENTS) -> None:
        """put() of events already encoded, each a JSON object's text."""
        if not texts:
            return
        now = time.time()
        k = max(1, min(per_row, ROW_EVENTS))
        rows = [(now, len(texts[i:i + k]), ",".join(texts[i:i + k]))
                for i in range(0, len(texts), k)]
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")  # the seqs of one commit are above every earlier one
            try:
                db.executemany("INSERT INTO events (created, n, body) VALUES (?, ?, ?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def cursor(self, url: str) -> int:
        with self._lock:
            row = self._conn().execute("SELECT acked FROM cursors WHERE url = ?",
                                       (url,)).fetchone()
        return row[0] if row else 0

    def take(self, url: str, limit: int) -> list[tuple[int, float, int, str]]:
        """The next rows `url` has not acknowledged, `limit` events at most (but at least one
        row): (seq, created, number of events, their JSON objects joined by commas)."""
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT acked FROM cursors WHERE url = ?", (url,)).fetchone()
            rows = db.execute("SELECT seq, created, n, body FROM events WHERE seq > ? "
                              "ORDER BY seq LIMIT ?", (row[0] if row else 0, limit))
            out, total = [], 0
            for r in rows:  # read one at a time: the rows beyond the limit are never built
                if out and total + r[2] > limit:
                    break
                out.append(r)
                total += r[2]
            rows.close()
            return out

    def ack(self, url: str, seq: int) -> None:
        """`url` has every event up to `seq`."""
        with self._lock:
            self._conn().execute(
                "INSERT INTO cursors (url, acked) VALUES (?, ?) ON CONFLICT (url) DO UPDATE "
                "SET acked = max(acked, excluded.acked)", (url, seq))

    def pending(self, url: str) -> int:
        with self._lock:
            db = self._conn()
            row = db.execute("SELECT acked FROM cursors WHERE url = ?", (url,)).fetchone()
            return db.execute("SELECT coalesce(sum(n), 0) FROM events WHERE seq > ?",
                              (row[0] if row else 0,)).fetchone()[0]

    def prune(self, urls: list[str], max_age: float, now: float | None = None) -> tuple[int, int]:
        """Delete the events every one of `urls` acknowledged, and those older than `max_age`
        seconds (0: none); returns (acknowledged, expired) counts."""
        now = time.time() if now is None else now
        with self._lock:
            db = self._conn()
            acked = expired = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                if urls:
                    mark = min(self._cursor_of(db, u) for u in urls)
                    acked = db.execute("SELECT coalesce(sum(n), 0) FROM events WHERE seq <= ?",
                                       (mark,)).fetchone()[0]
                    db.execute("DELETE FROM events WHERE seq <= ?", (mark,))
                if max_age > 0:
                    expired = db.execute("SELECT coalesce(sum(n), 0) FROM events WHERE "
                                         "created < ?", (now - max_age,)).fetchone()[0]
                    db.execute("DELETE FROM events WHERE created < ?", (now - max_age,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return acked, expired

    @staticmethod
    def _cursor_of(db: sqlite3.Connection, url: str) -> int:
        row = db.execute("SELECT acked FROM cursors WHERE url = ?", (url,)).fetchone()
        return row[0] if row else 0

    def close(self) -> None:
        with self._lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None


_outboxes: dict[Path, WebhookOutbox] = {}
_outboxes_lock = threading.Lock()


def outbox_for(home: Path | str) -> WebhookOutbox:
    """This process's outbox of `home` (one connection per process)."""
    key = Path(home).absolute()
    with _outboxes_lock:
        box = _outboxes.get(key)
        if box is None:
            box = _outboxes[key] = WebhookOutbox(key)
        return box


def emit(cfg: "Config", events: list[dict]) -> int:
    """For other parts (suppression, complaints, unsubscribes, intake): put `events` into the
    outbox of cfg.home when webhooks are configured (and only the types `webhooks.events`
    wants); durable when it returns; returns how many were kept. Blocking (one commit): call it
    off the event loop where that matters. Raises sqlite3.Error or OSError."""
    w = cfg.webhooks
    if not w.urls:
        return 0
    wanted = set(w.events)
    kept = [e for e in events if e.get("type") in wanted]
    outbox_for(cfg.home).put(kept, w.batch_size)
    return len(kept)


def emit_quietly(cfg: "Config | None", events: list[dict]) -> None:
    """`emit` for the parts whose own record is kept elsewhere (the suppression list,
    events.jsonl): a webhook outbox that cannot be written is logged, never raised."""
    if cfg is None or not cfg.webhooks.urls:
        return
    try:
        emit(cfg, events)
    except (sqlite3.Error, OSError) as e:
        log.error("webhooks: cannot keep %d %s event(s) for posting: %s", len(events),
                  events[0].get("type") if events else "", e)


# --- the engine's part: capture and sender --------------------------------------------------------

class UrlState:
    """What `mailengine status` and /metrics show about one URL."""

    def __init__(self, url: str):
        self.url = url
        self.pending = 0
        self.sent = 0  # events acknowledged since the start
        self.dropped = 0  # events given up for their age
        self.failures = 0  # in a row
        self.last_error = ""
        self.last_ok: float | None = None

    def as_dict(self) -> dict:
        return {"url": mask_text(self.url), "pending": self.pending, "sent": self.sent,
                "dropped": self.dropped, "failures": self.failures,
                "last_error": mask_text(self.last_error), "last_ok": self.last_ok}


class Webhooks:
    """The engine process's webhooks: `attempt(records)` after each send attempt, `run()` as a
    housekeeping loop, `stop()` once delivery has stopped. Every setting is read when used."""

    def __init__(self, cfg: "Config", test_mode: bool = False):
        self.cfg = cfg
        self.test_mode = test_mode  # test mode delivers nothing: nothing to report
        self.outbox = outbox_for(cfg.home)
        self._db_thread: ThreadPoolExecutor | None = None
        self._pending: list[str] = []  # captured events' JSON, waiting for the next commit
        self._next: asyncio.Future | None = None  # resolved when they are committed
        self._flushing = False
        self._last_commit = 0.0  # loop time the last commit started
        self._retry: asyncio.TimerHandle | None = None  # the next commit, when it must wait
        self._wake: set[asyncio.Event] = set()  # the URL tasks idling
        self.urls: dict[str, UrlState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._session = None
        self._stopped = False  # stop() was called: run() starts nothing more

    @property
    def enabled(self) -> bool:
        return not self.test_mode and bool(self.cfg.webhooks.urls)

    async def _db(self, fn, *args):
        if self._db_thread is None:
            self._db_thread = ThreadPoolExecutor(1, "webhooks-db")
        return await asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    # -- capture --------------------------------------------------------------------------------

    def attempt(self, pairs: list[tuple[dict, str]]) -> asyncio.Future | None:
        """Queue the events of one attempt's records (EventLog.attempt: each record with its
        line) for the next commit; returns a future that is done (True, or False when the commit
        failed and is retried) once they are on disk, or None when nothing was queued."""
        if not pairs or not self.enabled:
            return None
        texts = from_attempts(pairs, self.cfg.webhooks.events)
        return self._submit(texts) if texts else None

    def submit(self, events: list[dict]) -> asyncio.Future:
        """Events made in the engine process, committed with the next group."""
        return self._submit(encode(events))

    def _submit(self, texts: list[str]) -> asyncio.Future:
        self._pending.extend(texts)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        fut = self._next
        if not self._flushing and self._retry is None:
            self._schedule()
        return fut

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._last_commit + COMMIT_SPACING - loop.time()
        if wait > 0:
            self._retry = loop.call_later(wait, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        self._retry = None
        batch, fut = self._pending, self._next
        self._pending, self._next = [], None
        if not batch:
            if fut is not None and not fut.done():
                fut.set_result(True)
            return
        self._flushing = True
        self._last_commit = asyncio.get_running_loop().time()
        if self._db_thread is None:
            self._db_thread = ThreadPoolExecutor(1, "webhooks-db")
        done = asyncio.get_running_loop().run_in_executor(
            self._db_thread, self.outbox.put_json, batch, self.cfg.webhooks.batch_size)
        done.add_done_callback(lambda d: self._flushed(d, batch, fut))

    def _flushed(self, done: asyncio.Future, batch: list[str],
                 fut: asyncio.Future | None) -> None:
        self._flushing = False
        err = RuntimeError("the commit was cancelled") if done.cancelled() else done.exception()
        if err is not None:
            # Kept in memory and tried again: delivery goes on (a disk problem must not stop
            # mail), and the events reach the outbox once it can be written.
            log.error("cannot write %d webhook events to %s: %s; trying again in 1 s",
                      len(batch), self.outbox.path, err)
            self._pending[:0] = batch
            self._retry = asyncio.get_running_loop().call_later(1.0, self._flush)
            if fut is not None and not fut.done():
                fut.set_result(False)
            return
        if fut is not None and not fut.done():
            fut.set_result(True)
        for wake in self._wake:
            wake.set()
        if self._pending:
            self._schedule()

    # -- the sender -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep one sender task per configured URL (the list is read each second), count what
        each has pending, and delete what no URL needs any more."""
        import aiohttp  # the engine has it (the web admin); only the sender needs it here
        next_prune = next_count = 0.0
        unsigned_noted = False
        loop = asyncio.get_running_loop()
        try:
            while not self._stopped:
                urls = list(dict.fromkeys(self.cfg.webhooks.urls)) if not self.test_mode else []
                if urls and not self.cfg.webhooks.secret and not unsigned_noted:
                    log.warning("webhooks: webhooks.secret is empty: events are posted "
                                "unsigned, and receivers cannot tell them from forgeries")
                unsigned_noted = bool(urls) and not self.cfg.webhooks.secret
                if urls and self._session is None:
                    self._session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0),
                        headers={"User-Agent": f"{NAME}/{__version__}"})
                for url in urls:
                    if url not in self._tasks:
                        self.urls[url] = UrlState(url)
                        self._tasks[url] = loop.create_task(self._serve(url))
                        log.info("webhooks: posting events to %s", mask_text(url))
                for url in [u for u in self._tasks if u not in urls]:
                    self._tasks.pop(url).cancel()
                    self.urls.pop(url, None)
                    log.info("webhooks: no longer posting to %s", mask_text(url))
                now = loop.time()
                try:
                    if urls and now >= next_count:
                        next_count = now + PENDING_SECONDS
                        for url in urls:
                            if url in self.urls:
                                self.urls[url].pending = await self._db(self.outbox.pending, url)
                    if now >= next_prune:  # (no file is made in a home that never used it)
                        next_prune = now + PRUNE_SECONDS
                        if urls or self.outbox.path.exists():
                            await self.prune(urls)
                except (sqlite3.Error, OSError) as e:
                    log.error("webhooks: cannot read %s: %s", self.outbox.path, e)
                await asyncio.sleep(1.0)
        finally:
            await self._stop_senders()

    async def prune(self, urls: list[str]) -> None:
        hours = self.cfg.webhooks.max_age_hours
        _, expired = await self._db(self.outbox.prune, urls, hours * 3600)
        if expired:
            log.warning("webhooks: dropped %d events older than %g hours that not every URL "
                        "acknowledged (webhooks.max_age_hours)", expired, hours)

    async def _serve(self, url: str) -> None:
        state = self.urls[url]
        wake = asyncio.Event()
        self._wake.add(wake)
        try:
            while True:
                w = self.cfg.webhooks
                try:
                    rows = await self._db(self.outbox.take, url, w.batch_size)
                except (sqlite3.Error, OSError) as e:
                    state.last_error = f"cannot read the outbox: {e}"
                    await asyncio.sleep(IDLE_POLL)
                    continue
                if not rows:
                    wake.clear()
                    try:
                        async with asyncio.timeout(IDLE_POLL):
                            await wake.wait()
                    except TimeoutError:
                        pass
                    continue
                now = time.time()
                if sum(r[2] for r in rows) < w.batch_size and now - rows[0][1] < w.batch_wait:
                    await asyncio.sleep(rows[0][1] + w.batch_wait - now)  # let the batch fill
                    continue
                if not await self._deliver(url, state, rows, now):
                    delay = min(w.retry_max_seconds,
                                FIRST_RETRY * 2 ** min(state.failures - 1, 30))
                    await asyncio.sleep(delay)
        finally:
            self._wake.discard(wake)

    async def _deliver(self, url: str, state: UrlState, rows: list, now: float) -> bool:
        """Post one batch; True when it is acknowledged (or was all too old to send)."""
        w = self.cfg.webhooks
        max_age = w.max_age_hours * 3600
        fresh = [r for r in rows if not max_age or now - r[1] <= max_age]
        taken, sending = sum(r[2] for r in rows), sum(r[2] for r in fresh)
        if sending < taken:
            state.dropped += taken - sending
            log.warning("webhooks: %s: dropped %d events older than %g hours "
                        "(webhooks.max_age_hours)", url, taken - sending, w.max_age_hours)
        if fresh:
            body = b'{"events":[' + ",".join(r[3] for r in fresh).encode() + b"]}"
            error = await self._post(url, body, w)
            if error:
                state.failures += 1
                state.last_error = error
                log.warning("webhooks: %s: %s (failure %d in a row; %d events wait)",
                            mask_text(url),
                            error, state.failures, state.pending or taken)
                return False
            if state.failures:
                log.info("webhooks: %s accepts events again after %d failures", mask_text(url),
                         state.failures)
            state.failures = 0
            state.sent += sending
            state.last_ok = time.time()
        try:
            await self._db(self.outbox.ack, url, rows[-1][0])
        except (sqlite3.Error, OSError) as e:  # sent again later: at least once
            log.error("webhooks: cannot record what %s acknowledged: %s", mask_text(url), e)
            return False
        state.pending = max(0, state.pending - taken)
        return True

    async def _post(self, url: str, body: bytes, w) -> str:
        """POST one batch; '' when the receiver answered 2xx, else why not."""
        import aiohttp
        ts = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: ts}
        if w.secret:
            headers[SIGNATURE_HEADER] = sign(w.secret, ts, body)
        try:
            async with self._session.post(url, data=body, headers=headers,
                                          allow_redirects=False,
                                          timeout=aiohttp.ClientTimeout(total=w.timeout)) as r:
                await r.read()
                if 200 <= r.status < 300:
                    return ""
                return f"HTTP {r.status} {r.reason or ''}".strip()
        except (TimeoutError, asyncio.TimeoutError):
            return f"no answer within {w.timeout:g} s (webhooks.timeout)"
        except (aiohttp.ClientError, OSError, ValueError) as e:
            return f"{type(e).__name__}: {e}"

    async def _stop_senders(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def stop(self) -> None:
        """After delivery stopped: stop posting (a batch in flight is sent again at the next
        start) and commit what was captured."""
        self._stopped = True
        await self._stop_senders()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        while self._flushing:
            await asyncio.sleep(0.01)
        if self._pending:
            batch, self._pending = self._pending, []
            try:
                await self._db(self.outbox.put_json, batch, self.cfg.webhooks.batch_size)
            except (sqlite3.Error, OSError) as e:
                log.error("webhooks: %d events lost, %s cannot be written: %s", len(batch),
                          self.outbox.path, e)
        if self._next is not None and not self._next.done():
            self._next.set_result(True)
        if self._db_thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._db_thread.shutdown)
            self._db_thread = None

    def status(self) -> dict | None:
        """For `mailengine status` and /metrics: each URL's numbers; None when off."""
        if not self.enabled and not self.urls:
            return None
        return {"urls": [s.as_dict() for s in self.urls.values()],
                "pending": sum(s.pending for s in self.urls.values())}


def check_urls(values: list[str]) -> str | None:
    """The check of webhooks.urls."""
    for v in values:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"{v!r} is not an http:// or https:// URL"
    return None


def check_types(values: list[str]) -> str | None:
    """The check of webhooks.events."""
    bad = [v for v in values if v not in TYPES]
    return f"unknown event types {bad}; known: {', '.join(TYPES)}" if bad else None
