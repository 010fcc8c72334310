"""Group commit: how the spool makes a store durable, many stores per sync.

`Spool.store()` hands a message to a writer thread (`_Writers`: more start while stores wait),
which creates `ID.dat` and `ID.inf.tmp` (page cache only; not on the event loop, because
creating a file can take hundreds of µs, see spare.py, and that stalled every session) and
hands the job to the one flusher thread (`GroupCommit`); the store awaits the flusher. The
flusher takes everything queued and makes it durable in two pipelined phases (docs/QUEUE.md
says why two): sync #1 makes the batch's data durable, the batch's `.inf.tmp` files are renamed,
and sync #2 makes the renames durable. Sync #2 of batch N is the same system call as sync #1 of
batch N+1, so under load there is one sync per batch, and while it runs the writers fill the
next one. (`update_inf(flush=True)` and `sync()` hand their jobs over once per event-loop pass,
so one pass's jobs share a sync.)

Strategy: syncfs(2) of the spool's file system, chosen by `bench/spool_commit.py` (figures in
bench/README.md, "bench/spool_commit"). fdatasync costs a journal commit per new file, syncfs one
per batch, so from 10 messages a batch syncfs takes a half to a third of the time; it loses only
for a batch of one (an idle engine, where a millisecond does not matter). syncfs writes back all
dirty data of the file system, not only the spool's: keep large writers off the spool's file
system (the engine's own logs are small). Before Linux 5.8 it did not report writeback errors.
Where syncfs is missing (not Linux) the spool uses fdatasync (every new file, in a thread pool so
the journal can merge them, plus fsync of each directory); either can be chosen with
`Spool(strategy=...)`.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from .envelope import Message
from .spare import fsync_dir

log = logging.getLogger("mailengine.spool")

KICK_BATCH = 64  # jobs waiting in one event-loop pass before the flusher is woken anyway


def _load_syncfs():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()
WRITER_THREADS = int(os.environ.get("MAILENGINE_SPOOL_WRITERS", "4"))  # at most; see _Writers
WRITER_SLOW = 0.010  # s a store waited for a writer thread before another one starts
WRITER_PARK = 0.2  # s an extra writer thread waits for more slow work before it ends
STRATEGIES = ("syncfs", "fdatasync")
DEFAULT_STRATEGY = os.environ.get("MAILENGINE_SPOOL_SYNC") or (
    "syncfs" if _syncfs is not None else "fdatasync")  # the variable: for measuring, see bench/


class _Writers:
    """The threads that create stores' files. One while it keeps up; when the oldest waiting
    store has waited WRITER_SLOW, one more (up to `max_threads`), e.g. while creating a file
    takes hundreds of µs (spare.py). An extra thread helps while stores wait over a quarter of
    that, then parks WRITER_PARK s for more slow work before it ends. Not a fixed pool: threads
    busy at once compete for the interpreter lock, and bench/intake (b) was 14 % faster with one
    writer than with four always there (five interleaved pairs: 2,805, 2,622, 2,780, 2,801,
    2,743 against 2,344, 2,359, 2,419, 2,416, 2,458 msg/s)."""

    def __init__(self, max_threads: int) -> None:
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # the first thread waits here for any store
        self._help = threading.Condition(lock)  # parked extra threads wait here for slow ones
        self._jobs: deque = deque()  # (time queued, function, arguments)
        self._max = max(1, max_threads)
        self._running = 0
        self._parked = 0
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.most = 0  # the most threads at once, for tests

    def submit(self, fn: Callable, *args) -> None:
        now = time.monotonic()
        with self._work:
            if self._closed:
                raise RuntimeError("the spool's writer threads are shut down")
            self._jobs.append((now, fn, args))
            if self._running == 0:
                if not self._start(first=True):
                    self._jobs.pop()  # refused to the caller: it must never be written later
                    raise RuntimeError("cannot start a spool writer thread")
                return
            self._work.notify()
            self._more_help(now)

    def _behind(self, now: float, limit: float) -> bool:
        return bool(self._jobs) and now - self._jobs[0][0] > limit

    def _more_help(self, now: float) -> None:
        """With the lock held: stores wait too long, so a parked thread or a new one helps."""
        if self._behind(now, WRITER_SLOW):
            if self._parked:
                self._help.notify()
            elif self._running < self._max:
                self._start(first=False)

    def _start(self, first: bool) -> bool:
        self._threads = [t for t in self._threads if t.is_alive()]
        t = threading.Thread(target=self._run, args=(first,), name="spool-writer", daemon=True)
        try:
            t.start()
        except RuntimeError as e:  # "can't start new thread": the ones running go on
            log.error("cannot start a spool writer thread: %s", e)
            return False
        self._running += 1
        self.most = max(self.most, self._running)
        self._threads.append(t)
        return True

    def _run(self, first: bool) -> None:
        while True:
            with self._work:
                if first:
                    while not self._jobs:
                        if self._closed:
                            self._running -= 1
                            return
                        self._work.wait()
                else:
                    while not (self._jobs and (self._closed or
                                               self._behind(time.monotonic(), WRITER_SLOW / 4))):
                        if self._closed:
                            self._running -= 1
                            return
                        self._parked += 1
                        woken = self._help.wait(WRITER_PARK)
                        self._parked -= 1
                        if not woken and not self._behind(time.monotonic(), WRITER_SLOW / 4):
                            self._running -= 1  # nothing slow for a while: end
                            return
                _, fn, args = self._jobs.popleft()
                self._more_help(time.monotonic())
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - a job reports its own errors; keep serving
                log.exception("spool writer job failed")

    def shutdown(self) -> None:
        """Run what was submitted, then end the threads."""
        with self._work:
            self._closed = True
            self._work.notify_all()
            self._help.notify_all()
        while True:  # including helpers started while the last stores were written
            with self._work:
                threads = [t for t in self._threads if t.is_alive()]
            if not threads:
                return
            for t in threads:
                t.join()


class Job:
    """One thing the flusher must make durable: a `.inf.tmp` to rename (store, update_inf), or
    nothing but a barrier (`sync()`)."""

    __slots__ = ("loop", "fut", "tmp", "final", "dat", "fds", "dir", "msg_id", "error",
                 "msg", "data")

    def __init__(self, tmp: str | None, final: str | None, dat: str | None, fds: list[int],
                 dir: str | None, msg_id: str | None):
        self.tmp, self.final, self.dat, self.fds, self.dir = tmp, final, dat, fds, dir
        self.msg_id = msg_id
        self.error: BaseException | None = None
        self.msg: Message | None = None  # a store whose files the flusher's writers create
        self.data: bytes | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fut: asyncio.Future | None = None


class GroupCommit:
    """The flusher thread of one spool, its writer threads and its sync strategy.

    `root` is the spool's directory (syncfs is called on it), `dirs` its queue directories (a
    barrier fsyncs them all under fdatasync), `finished(msg_id)` is called once a job's id is no
    longer being stored. Counter for tests and metrics: `flushes` (sync system-call rounds)."""

    def __init__(self, root: str, dirs: Iterable[str], strategy: str | None,
                 fdatasync_threads: int, finished: Callable[[str | None], None]):
        self.strategy = strategy or DEFAULT_STRATEGY
        if self.strategy not in STRATEGIES or (self.strategy == "syncfs" and _syncfs is None):
            raise ValueError(f"flush strategy {self.strategy!r} is not available here")
        self._root = root
        self._dirs = list(dirs)
        self._fdatasync_threads = fdatasync_threads
        self._finished = finished
        self.flushes = 0
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._pending: dict[asyncio.AbstractEventLoop, list[Job]] = {}  # not yet kicked
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._writers: _Writers | None = None
        self._root_fd = -1
        self._closing = False

    @property
    def closing(self) -> bool:
        return self._closing

    def writers(self) -> _Writers:
        if self._writers is None:
            self._writers = _Writers(WRITER_THREADS)
        return self._writers

    def submit(self, job: Job) -> asyncio.Future:
        """From the event loop: a job whose files exist (or a barrier); its future is done once
        the flusher has made it durable."""
        # Jobs are handed to the flusher once per event-loop pass, not one by one: everything
        # the sessions made ready in this pass store goes into one batch (a sync is faster than
        # a pass, so a flusher woken per job would sync nearly every message alone).
        loop = asyncio.get_running_loop()
        if self._closing:
            for f in job.fds:
                os.close(f)
            raise RuntimeError("spool is closed")
        job.loop = loop
        job.fut = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._kick, loop)  # runs after the tasks already ready in this pass
        pending.append(job)
        if len(pending) >= KICK_BATCH:  # a long pass: let the flusher start on these
            self._kick(loop)
        return job.fut

    def hand_over(self, job: Job) -> None:
        """From a writer thread: a store's files are written; the next sync makes them durable.
        If the flusher cannot take it, the store is answered with the error and leaves nothing."""
        try:
            with self._cond:
                if self._thread is None:
                    self._start()
                self._queue.append(job)
                self._cond.notify()
        except BaseException as e:  # noqa: BLE001 - e.g. EMFILE starting the flusher
            for f in job.fds:
                os.close(f)
            job.fds, job.error = [], e
            unlink_quiet(job.tmp, job.dat)  # not acknowledged: leave nothing
            self.resolve([job])

    def _kick(self, loop: asyncio.AbstractEventLoop | None) -> None:
        jobs = self._pending.pop(loop, None) if loop else None
        with self._cond:
            if jobs:
                if self._thread is None:
                    self._start()
                self._queue.extend(jobs)
            self._cond.notify()

    def _start(self) -> None:
        self._root_fd = os.open(self._root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        if self.strategy == "fdatasync":
            self._pool = ThreadPoolExecutor(self._fdatasync_threads, "spool-fsync")
        self._thread = threading.Thread(target=self._flusher, name="spool-flusher", daemon=True)
        self._thread.start()

    def _flusher(self) -> None:
        renaming: list[Job] = []  # data durable; rename, then the next sync commits them
        while True:
            with self._cond:
                while not self._queue and not renaming:
                    if self._closing:
                        return
                    self._cond.wait()
                batch, self._queue = self._queue, []
            for job in renaming:
                _rename_job(job)
            try:
                self._sync(batch, renaming)
                err = None
            except OSError as e:
                err = e
            finally:
                for job in batch:
                    for f in job.fds:
                        os.close(f)
                    job.fds = []
            self.flushes += 1
            finished = renaming
            renaming = []
            for job in batch:
                if err is not None:
                    job.error = err
                    unlink_quiet(*(p for p in (job.tmp, job.dat) if p))
                    finished.append(job)
                elif job.tmp is None:
                    finished.append(job)  # a barrier: this sync was all it needed
                else:
                    renaming.append(job)
            if err is not None:
                for job in finished:
                    job.error = job.error or err
            self.resolve(finished)

    def _sync(self, batch: list[Job], renamed: list[Job]) -> None:
        if self.strategy == "syncfs":
            if _syncfs(self._root_fd) != 0:
                e = ctypes.get_errno()
                raise OSError(e, f"syncfs: {os.strerror(e)}")
            return
        # fdatasync: every new file's data, and each directory that got a rename; in parallel so
        # the journal can commit many of them together
        dirs = {job.dir for job in renamed if job.error is None}
        if any(job.tmp is None for job in batch):  # a barrier: all directories
            dirs.update(self._dirs)
        assert self._pool is not None
        futs = [self._pool.submit(os.fdatasync, f) for job in batch for f in job.fds]
        futs += [self._pool.submit(fsync_dir, d) for d in dirs]
        for f in futs:
            f.result()

    def resolve(self, jobs: list[Job]) -> None:
        """Answer finished jobs' waiters on their own event loops (from any thread)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        for job in jobs:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, js in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._finish, js)
            except RuntimeError:  # that loop is closed: nobody waits any more
                for job in js:
                    self._finished(job.msg_id)

    def _finish(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._finished(job.msg_id)
            if job.fut.done():
                continue  # the waiter was cancelled
            if job.error is not None:
                job.fut.set_exception(job.error)
            else:
                job.fut.set_result(None)

    def close(self) -> None:
        """Finish pending flushes and stop the threads."""
        for loop in list(self._pending):
            self._kick(loop)
        if self._writers is not None:
            self._writers.shutdown()  # stores being written reach the flusher's queue first
            self._writers = None
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1


def _rename_job(job: Job) -> None:
    try:
        os.rename(job.tmp, job.final)
    except OSError as e:
        job.error = e


def unlink_quiet(*paths: str) -> None:
    """Delete files that may be gone already (used by the flusher, the spool and recovery)."""
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
