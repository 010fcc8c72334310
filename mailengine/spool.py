"""The durable spool: `mailq/{retry,working,done,incoming}` holding `ID.dat` + `ID.inf` pairs.

`Spool` is the one door to the queue's files: stores (write, then rename; a `250` is sent only
after `store()` returns: the commit point), `.inf` updates, moves between directories, removal
and recycling, reading, the expiry of `done/` and `incoming/`, and usage. docs/QUEUE.md is the
contract: every state a message's files can be in and what each operation does to them. The
spool knows nothing of SMTP or scheduling, so intake and delivery can run in separate processes
sharing one spool.

Its parts: message_ids.py makes the ids; group_commit.py makes stores durable, many per sync
(the writer threads, the flusher, the syncfs/fdatasync strategy); recovery.py repairs what a
crash left, at start (`Spool.recover`), and finds mail that other programs drop into retry/
(`Spool.scan_dropins`).
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from .queue_dirs import DIRS, DONE, INCOMING, RETRY
from .envelope import InfError, Message, format_inf, parse_inf
from .group_commit import GroupCommit, Job, unlink_quiet
from .message_ids import default_host, new_id, safe_host
from . import recovery
from .recovery import RecoveryReport
from .recycler import Recycler
from .spare import NEW as SPARE_NEW
from .spare import SparePool

_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_O_TRUNC = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
_O_REUSE = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)  # a spare file: overwritten, then truncated
SPARE_DIR = "spare"
# Spare files kept for reuse (spare.py); the variable is for measuring with and without them.
SPARE_FILES = int(os.environ.get("MAILENGINE_SPOOL_SPARE", "4096"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_file(path: str) -> bytes:
    """A whole file: open() builds a buffered file object and asks for its size and whether it
    is a terminal first, twice the system calls of this (the engine reads an .inf per message
    it takes from retry/, and an ID.dat per message it sends itself)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        first = os.read(fd, 1 << 16)
        if len(first) < 1 << 16:  # most messages: one read
            return first
        chunks = [first]
        while chunk := os.read(fd, max(1 << 16, os.fstat(fd).st_size)):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


# ---------------------------------------------------------------- the spool

class Spool:
    """The queue directories under `root` (HOME/mailq or HOME/mailq-test).

    `durable=False` is memory mode: files are written but never synced. `strategy` picks how a
    batch is made durable ("syncfs" or "fdatasync"); the default is the measured best.
    Counters for tests and metrics: `stores`, `flushes` (sync system-call rounds).
    """

    def __init__(self, root: Path | str, durable: bool = True, hostname: str | None = None,
                 strategy: str | None = None, fdatasync_threads: int = 32):
        self.root = Path(root)
        self.durable = durable
        self.hostname = safe_host(hostname) if hostname else default_host()
        self._dir = {d: str(self.root / d) for d in DIRS}
        self.stores = 0
        self._inflight: set[str] = set()  # ids being stored: not drop-ins
        self._warned: set[tuple] = set()  # (file name, size, mtime) already warned about
        self._commit = GroupCommit(str(self.root), self._dir.values(), strategy,
                                   fdatasync_threads, self._inflight.discard)
        self.strategy = self._commit.strategy
        # Files kept beside ID.dat that go where it goes (".dkim": the DKIM signature made at
        # the first attempt, dkim.load_or_sign). Set by the engine when it uses them, so that
        # moves cost no extra system call otherwise; recover() deletes orphans.
        self.side_files: tuple[str, ...] = ()
        self.spare = SparePool(str(self.root / SPARE_DIR), max_files=SPARE_FILES)
        self._recycler: Recycler | None = None  # start_recycler

    # ---- paths and basics

    def ensure_dirs(self) -> None:
        for d in DIRS:
            os.makedirs(self._dir[d], exist_ok=True)
        os.makedirs(f"{self.spare.path}/{SPARE_NEW}", exist_ok=True)

    def new_id(self) -> str:
        return new_id(self.hostname)

    def dir(self, where: str) -> Path:
        return self.root / where

    def dat_path(self, msg_id: str, where: str) -> str:
        return f"{self._dir[where]}/{msg_id}.dat"

    def inf_path(self, msg_id: str, where: str) -> str:
        return f"{self._dir[where]}/{msg_id}.inf"

    # ---- writing

    async def store(self, msg: Message, data: bytes, where: str = RETRY) -> None:
        """Write a new message. When `durable`, returns once `.dat`, `.inf` and their directory
        entries are on stable storage (the commit point). May give `msg` a new id if its id is
        taken (and gives it one when `msg.id` is empty). On error nothing is left behind."""
        d = self._dir[where]
        if not msg.id:
            msg.id = self.new_id()
        msg.size = len(data)
        if self.durable:
            # The files are created by the flusher's writer threads, not here: creating a file
            # can take hundreds of µs (spare.py), and on the event loop that stalled every
            # session (40 % of intake time in bench/intake's profile).
            if self._commit.closing:
                raise RuntimeError("spool is closed")
            job = Job(None, None, None, [], d, msg.id)
            job.msg, job.data = msg, data
            job.loop = asyncio.get_running_loop()
            job.fut = job.loop.create_future()
            self._inflight.add(msg.id)
            # Writer threads create the files while the flusher syncs the previous batch.
            self._commit.writers().submit(self._write_job, job)
            try:
                await job.fut
            except asyncio.CancelledError:
                raise  # the flusher still finishes the job: a commit without a 250 is a duplicate
            except BaseException:
                if job.final:
                    unlink_quiet(job.final, job.tmp, job.dat)  # not acknowledged: leave nothing
                raise
            self.stores += 1
            return
        self._write_files(msg, data, d)
        self.stores += 1

    def _write_files(self, msg: Message, data: bytes, d: str, keep_fds: bool = False
                     ) -> tuple[str, str, str, list[int]]:
        """Create `ID.dat` (never over an existing file: a taken id gets a new one) and
        `ID.inf.tmp`, reusing spare files when there are some; in memory mode rename the `.inf`
        into place at once. Returns (dat, tmp, final, open fds)."""
        inf = format_inf(msg)  # before any file exists: a record that cannot be written fails clean
        for _ in range(100):
            dat = f"{d}/{msg.id}.dat"
            try:
                fd, reused = self._open_new(dat, "dat")
                break
            except FileExistsError:
                msg.id = self.new_id()
                inf = format_inf(msg)
        else:
            raise OSError(f"could not find a free message id in {d}")
        final = dat[:-4] + ".inf"
        tmp = final + ".tmp"
        fds = [fd]
        try:
            _write_all(fd, data)
            if reused:
                os.ftruncate(fd, len(data))  # the spare file may have been longer
            try:
                fd2, reused = self._open_new(tmp, "inf")
            except FileExistsError:  # left by a failed update: replace it
                fd2, reused = os.open(tmp, _O_TRUNC, 0o644), False
            fds.append(fd2)
            _write_all(fd2, inf)
            if reused:
                os.ftruncate(fd2, len(inf))
            if not self.durable:
                os.rename(tmp, final)
        except BaseException:
            for f in fds:
                os.close(f)
            unlink_quiet(tmp, dat)
            raise
        if not keep_fds:
            for f in fds:
                os.close(f)
            fds = []
        return dat, tmp, final, fds

    def _open_new(self, path: str, kind: str) -> tuple[int, bool]:
        """Open `path` for writing as a new file: a spare file renamed to it (True: to be cut
        to length once written), else a file created with O_EXCL. FileExistsError when `path`
        exists (never overwritten)."""
        if self.spare.take(path, kind):
            try:
                return os.open(path, _O_REUSE), True
            except BaseException:
                unlink_quiet(path)
                raise
        return os.open(path, _O_NEW, 0o644), False

    def _write_job(self, job: Job) -> None:
        """Writer thread: create a store job's files (the flusher syncs them afterwards)."""
        msg = job.msg
        try:
            job.dat, job.tmp, job.final, job.fds = self._write_files(
                msg, job.data, job.dir, keep_fds=self.strategy == "fdatasync")
        except BaseException as e:  # noqa: BLE001 - handed to the waiting store()
            job.error = e
        if msg.id != job.msg_id:  # the id was taken (by a file already there): a new one
            self._inflight.add(msg.id)
            self._inflight.discard(job.msg_id)  # else that file would never be scanned again
            job.msg_id = msg.id
        job.data = None
        if job.error is not None:
            self._commit.resolve([job])
            return
        self._commit.hand_over(job)  # written: the flusher makes it durable with the next sync

    async def update_inf(self, msg: Message, where: str, flush: bool = False) -> None:
        """Replace `ID.inf` atomically (write `.inf.tmp`, rename over). With `flush` (and a
        durable spool), returns once the new content is on stable storage."""
        final = self.inf_path(msg.id, where)
        tmp = final + ".tmp"
        fd = os.open(tmp, _O_TRUNC, 0o644)
        try:
            _write_all(fd, format_inf(msg))
        except BaseException:
            os.close(fd)
            unlink_quiet(tmp)
            raise
        if not (self.durable and flush):
            os.close(fd)
            os.rename(tmp, final)
            return
        fds = [fd]
        if self.strategy != "fdatasync":
            os.close(fd)
            fds = []
        await self._commit.submit(Job(tmp, final, None, fds, self._dir[where], None))

    async def sync(self) -> None:
        """Make every rename, move and removal done so far durable (a barrier)."""
        if self.durable:
            await self._commit.submit(Job(None, None, None, [], None, None))

    def move(self, msg_id: str, src: str, dst: str) -> None:
        """Move a message between directories: `.dat` first, `.inf` (the marker) last."""
        s_dat, d_dat = self.dat_path(msg_id, src), self.dat_path(msg_id, dst)
        try:
            os.rename(s_dat, d_dat)
        except FileNotFoundError:
            if not os.path.exists(d_dat):  # not a half-done earlier move: really missing
                raise
        os.rename(self.inf_path(msg_id, src), self.inf_path(msg_id, dst))
        for suffix in self.side_files:
            name = f"/{msg_id}{suffix}"
            try:
                os.rename(self._dir[src] + name, self._dir[dst] + name)
            except FileNotFoundError:
                pass

    def remove(self, msg_id: str, where: str) -> None:
        """Delete a message: `.inf` first (the message is gone), then `.dat` (and side files).
        Delivered mail goes through `recycle` instead."""
        unlink_quiet(self.inf_path(msg_id, where))
        unlink_quiet(self.dat_path(msg_id, where))
        for suffix in self.side_files:
            unlink_quiet(f"{self._dir[where]}/{msg_id}{suffix}")

    def recycle(self, msg_ids: list[str], where: str) -> None:
        """Remove delivered messages, their files becoming spare files (spare.py): usable by a
        store only after one fsync of `where` for the whole lot has made the removals durable."""
        self.spare.recycle([f for m in msg_ids for f in self._recycled_files(m, where)],
                           [self._dir[where]])

    def _recycled_files(self, msg_id: str, where: str) -> list[tuple[str, str | None]]:
        d = self._dir[where]
        return [(f"{d}/{msg_id}.inf", "inf"), (f"{d}/{msg_id}.dat", "dat"),
                *((f"{d}/{msg_id}{suffix}", None) for suffix in self.side_files)]

    def recycle_soon(self, msg_id: str, where: str) -> bool:
        """recycle() a delivered message in the recycler process (recycler.py), without waiting:
        False when none runs (the caller recycles it itself)."""
        r = self._recycler
        return r is not None and r.post(self._recycled_files(msg_id, where), [self._dir[where]])

    async def start_recycler(self) -> None:
        """Start the recycler process for recycle_soon (the engine with delivery processes)."""
        if self._recycler is None:
            r = Recycler(self.spare)
            await r.start()
            self._recycler = r

    async def recycled(self) -> None:
        """Wait until the messages handed to recycle_soon are removed (at most
        recycler.STOP_TIMEOUT s)."""
        if self._recycler is not None:
            await self._recycler.drain()

    def stop_recycler(self) -> None:
        r, self._recycler = self._recycler, None
        if r is not None:
            r.stop()

    # ---- reading

    def read_data(self, msg_id: str, where: str) -> bytes:
        return _read_file(self.dat_path(msg_id, where))

    def load(self, msg_id: str, where: str) -> Message:
        """Read and parse `ID.inf`; `size` from `ID.dat`. InfError when broken or no `.dat`."""
        msg = parse_inf(_read_file(self.inf_path(msg_id, where)), msg_id)
        try:
            msg.size = os.stat(self.dat_path(msg_id, where)).st_size
        except FileNotFoundError:
            raise InfError(f"{msg_id}.dat is missing") from None
        return msg

    # ---- scans

    def scan_dropins(self, known: set[str] | frozenset[str]) -> tuple[list[Message], list[str]]:
        """New messages dropped into retry/ by other programs: `.inf` files whose id is not in
        `known`. Broken ones are reported once per process and left in place (recovery.py)."""
        return recovery.scan_dropins(self, known, self._inflight, self._warned)

    def recover(self, load: bool = True, retry_known: bool = False) -> RecoveryReport:
        """Start-up recovery, per the state table of docs/QUEUE.md (recovery.py). Run once,
        before intake. `load=False` reads no `.inf`: the ids in retry/ are returned instead.
        `retry_known`: retry/ is as the backlog index says, so it is not listed."""
        return recovery.recover(self, self._warned, load, retry_known)

    def expire(self, where: str, retention_minutes: float, now: float | None = None) -> int:
        """Remove messages older than the retention from done/ or incoming/ (0 = keep forever).
        Age is that of the `.inf` (last written when the message finished). Returns the count."""
        if retention_minutes <= 0:
            return 0
        if where not in (DONE, INCOMING):
            raise ValueError(f"expire() is for done/ and incoming/, not {where}/")
        cutoff = (time.time() if now is None else now) - retention_minutes * 60
        removed = 0
        try:
            it = os.scandir(self._dir[where])
        except FileNotFoundError:
            return 0
        with it:
            entries = list(it)
        infs = {e.name[:-4] for e in entries if e.name.endswith(".inf")}
        for e in entries:
            name = e.name
            if name.startswith("."):
                continue
            try:
                old = e.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if not old:
                continue
            if name.endswith(".inf"):
                self.remove(name[:-4], where)
                removed += 1
            elif name.endswith(".dat") and name[:-4] not in infs:
                unlink_quiet(e.path)  # the .dat of a half-done removal
            elif name.endswith(".dkim") and name[:-5] not in infs:
                unlink_quiet(e.path)  # a signature kept while DKIM signing was on
            elif name.endswith(".inf.tmp"):
                unlink_quiet(e.path)
        return removed

    def usage(self) -> dict[str, tuple[int, int]]:
        """Per directory: (messages, bytes of their .dat files). Walks the directories."""
        out = {}
        for d in DIRS:
            count = size = 0
            try:
                with os.scandir(self._dir[d]) as it:
                    for e in it:
                        if e.name.endswith(".inf") and not e.name.startswith("."):
                            count += 1
                        elif e.name.endswith(".dat"):
                            try:
                                size += e.stat().st_size
                            except FileNotFoundError:
                                pass
            except FileNotFoundError:
                pass
            out[d] = (count, size)
        return out

    @property
    def flushes(self) -> int:
        """Sync system-call rounds so far (group_commit.py), for tests and metrics."""
        return self._commit.flushes

    def close(self) -> None:
        """Finish pending flushes and stop the flusher thread (and the recycler process)."""
        self.stop_recycler()
        self._commit.close()
