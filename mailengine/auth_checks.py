"""SMTP AUTH password checks: off the event loop, bounded, and slowed down per client address.

- A password is checked in a small thread pool (a scrypt hash takes tens of milliseconds: on the
  event loop, a few guessers would stall every other session of the process). At most
  `limits.max_auth_checks` checks wait or run at once per intake process; beyond that the client
  is told `454 4.7.0` to try later, and nothing is checked.
- Failures slow their client address down as the web login does (web/auth.py's schedule): after
  the n-th failure in a row the address is refused for 0.5 * 2^(n-1) seconds, at most 30 s,
  answered `454 4.7.0` without looking at the password. A success clears the address.
- The failures are kept in HOME/auth-failures.db (SQLite), so every session and every intake
  process of the engine sees them, and a restart does not forget them. Only failures write; a
  check reads one row. If the file cannot be used, passwords are still checked (and it is logged):
  a broken throttle must not lock every user out.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from .smtp.server import Reply, Session
from .web.auth import FAILURE_MEMORY, MAX_TRACKED, Throttle

log = logging.getLogger("mailengine.auth")

FILE = "auth-failures.db"
CHECK_THREADS = 2  # password checks running at once per process; the rest wait for a thread
PRUNE_EVERY = 64  # failures between sweeps of forgotten addresses out of the file

THROTTLED = Reply(454, "4.7.0", "Too many failed authentications, try later")
BUSY = Reply(454, "4.7.0", "Too many authentications in progress, try later")


class SharedThrottle:
    """web/auth.py's Throttle, kept in a SQLite file that several processes share.

    Times are wall-clock seconds (time.time), as they are compared across processes and restarts.
    Each method opens no transaction unless it writes; all are blocking: call them off the loop.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time):
        self.path = Path(path)
        self.clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used by the pool's threads in turn
        self._writes = 0

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            # Created private: it lists the addresses that guessed passwords.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            db.execute("PRAGMA synchronous=OFF")  # losing the last failures to a crash is fine
            db.execute("CREATE TABLE IF NOT EXISTS failures (ip TEXT PRIMARY KEY, "
                       "count INTEGER NOT NULL, until REAL NOT NULL)")
            self._db = db
        return self._db

    def _row(self, db: sqlite3.Connection, ip: str) -> tuple[int, float] | None:
        row = db.execute("SELECT count, until FROM failures WHERE ip = ?", (ip,)).fetchone()
        if row is None or self.clock() - row[1] > FAILURE_MEMORY:
            return None
        return row

    def wait_left(self, ip: str) -> float:
        """Seconds this address must still wait before it may try again (0 = may try)."""
        with self._lock:
            row = self._row(self._conn(), ip)
        return max(0.0, row[1] - self.clock()) if row else 0.0

    def failures(self, ip: str) -> int:
        with self._lock:
            row = self._row(self._conn(), ip)
        return row[0] if row else 0

    def failed(self, ip: str) -> float:
        """Record a failure; returns the seconds the address is now refused."""
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")  # read and write as one step among the processes
            try:
                row = self._row(db, ip)
                n = (row[0] if row else 0) + 1
                now = self.clock()
                wait = Throttle.delay(n)
                db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?)", (ip, n, now + wait))
                self._writes += 1
                if self._writes % PRUNE_EVERY == 0:
                    db.execute("DELETE FROM failures WHERE until < ?", (now - FAILURE_MEMORY,))
                    db.execute("DELETE FROM failures WHERE ip IN (SELECT ip FROM failures "
                               "ORDER BY until DESC LIMIT -1 OFFSET ?)", (MAX_TRACKED,))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return wait

    def succeeded(self, ip: str) -> None:
        """Forget the address's failures (writes only when it had some)."""
        with self._lock:
            db = self._conn()
            if db.execute("SELECT 1 FROM failures WHERE ip = ?", (ip,)).fetchone():
                db.execute("DELETE FROM failures WHERE ip = ?", (ip,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class PasswordChecks:
    """Runs `verify(session, user, password)` (Policy.on_auth) for SMTP AUTH in threads, bounded
    and throttled per client address."""

    def __init__(self, verify: Callable[[Session, str, str], bool], throttle: SharedThrottle,
                 limit: int = 16):
        self.verify = verify
        self.throttle = throttle
        self.limit = limit  # checks waiting or running at once; more are refused (BUSY)
        self.pending = 0
        self._pool = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="auth-check")
        self._broken_logged = False

    async def check(self, session: Session, user: str, password: str) -> bool | Reply:
        """True or False (the password is right or wrong), or the Reply of a refusal to check."""
        if self.pending >= self.limit:
            return BUSY
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self._check, session, user, password)
        finally:
            self.pending -= 1

    def _check(self, session: Session, user: str, password: str) -> bool | Reply:
        ip = session.peer_ip
        try:
            if self.throttle.wait_left(ip) > 0:
                return THROTTLED
        except (sqlite3.Error, OSError) as e:
            self._broken(e)
        ok = self.verify(session, user, password)
        try:
            if ok:
                self.throttle.succeeded(ip)
            else:
                wait = self.throttle.failed(ip)
                log.info("SMTP AUTH failed for %r from %s; the address waits %g s", user, ip, wait)
        except (sqlite3.Error, OSError) as e:
            self._broken(e)
        return ok

    def _broken(self, e: Exception) -> None:
        if not self._broken_logged:
            self._broken_logged = True
            log.error("the AUTH failure file %s cannot be used (%s): failed SMTP AUTH is not "
                      "slowed down", self.throttle.path, e)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.throttle.close()
