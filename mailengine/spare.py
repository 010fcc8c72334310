"""Spare files: the emptied files of delivered messages, kept in `mailq/spare/` for reuse.

Why. Storing a message creates two files (`ID.dat`, `ID.inf.tmp`) and delivering it deletes two.
Creating a file means allocating an inode, and on ext4 that can be the most expensive step of
the whole store: without a journal (this project's VMs), the inode allocator skips every inode
deleted between 1 and 60-300 s ago, reading each one (`find_inode_bit` → `recently_deleted` in
fs/ext4/ialloc.c), so on a spool that deletes thousands of files a minute each create scans
thousands of inodes: 300-750 µs of kernel CPU per create measured here, against 20 µs to rename
an existing file into place and overwrite it (`python3 bench/inode_alloc.py` prints both). With
a journal it is cheaper, but still an inode and a bitmap to update, where a rename updates two
directory entries only.

So a delivered message's files are renamed into `spare/` instead of being unlinked, and a new
store renames a spare file to its new name and overwrites it (then truncates it to the new
length). No inode is allocated or freed on the path a message takes when it is delivered at its
first attempt. Rules:

- A spare file is garbage: nothing reads it, recovery leaves it, deleting it is always safe.
- Taking one is a rename with RENAME_NOREPLACE (renameat2), so an existing message file is never
  replaced: the same guarantee as creating with O_EXCL. Where renameat2 is missing, the pool is off.
- Bounded: at most `max_files` files of at most `max_bytes` each are kept; others are unlinked.
- Only delivery's finishing path recycles. Mail deleted by an operator (`queue delete`), expired
  from `done/`/`incoming/`, or refused is unlinked, so what an operator deletes is gone.
- A file is reused only once its removal from the queue is durable. Given files wait in
  `spare/.new/` until `commit()` has fsync'ed the directories they left and `.new/` itself, and
  only then move to `spare/`. Otherwise a power cut could bring back the delivered message's
  directory entries (its unlink was never on disk) pointing at blocks a later store had
  overwritten: mail with another message's bytes. (Unlinking was safe: ext4 does not reuse a
  freed inode or block before its release is on disk.) At start `.new/` is synced and promoted.
- Several processes share the directory (intake workers take, the engine gives). Each keeps a list
  of names it believes are there; a name another process took meanwhile fails with ENOENT and is
  skipped. An empty list is refilled from a listing of the directory (shuffled, so processes do
  not all reach for the same names), at most every `rescan` s.
- A file with other hard links (a drop-in linked from elsewhere) is never taken in: reusing it
  would overwrite the other name's content.
- Where the file system refuses RENAME_NOREPLACE (EINVAL: NFS, older ZFS), the pool turns itself
  off and files are created and unlinked as usual.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import os
import random
import threading
import time

MAX_FILES = 4096  # enough for the messages in flight between intake and delivery at full speed
MAX_BYTES = 64 * 1024  # a bigger file is unlinked: the pool should not hoard disk space
RESCAN = 0.5  # s between listings of the directory when this process's list is empty
KINDS = ("dat", "inf")  # spare files are kept apart by what they were
NEW = ".new"  # given, not yet durable: not to be taken
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `dst`."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst),
                  _RENAME_NOREPLACE) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), src, None, dst) if e != errno.EEXIST else \
            FileExistsError(e, os.strerror(e), dst)


class SparePool:
    """The spare files of one spool directory tree, as seen by this process. Thread-safe.

    Kept by kind ("dat", "inf"), so a store reuses a file of about the size it needs: cutting a
    4 KiB `.dat` down to a 300-byte `.inf` frees a block and waits for its write-out, which cost
    more than the rename saved (py-spy on an intake worker in bench/relay)."""

    def __init__(self, path: str, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES,
                 rescan: float = RESCAN):
        self.path = path
        self.max_files = max_files if _renameat2 is not None else 0
        self.max_bytes = max_bytes
        self.rescan = rescan
        self._names: dict[str, list[str]] = {kind: [] for kind in KINDS}
        self._pending: list[tuple[str, str]] = []  # (kind, name) in .new/, not yet committed
        self._lock = threading.Lock()
        self._next_scan = 0.0
        self._seq = itertools.count()
        self._prefix = f"{os.getpid()}.{time.time_ns() // 1000}."
        self.taken = 0  # counters, for tests and metrics
        self.given = 0

    @property
    def enabled(self) -> bool:
        return self.max_files > 0

    def __len__(self) -> int:
        return sum(len(names) for names in self._names.values())

    def take(self, dst: str, kind: str = "dat") -> bool:
        """Rename a spare file of `kind` to `dst` (which must not exist). False when none is
        left: the caller creates the file. Raises FileExistsError when `dst` exists."""
        while True:
            name = self._pop(kind)
            if name is None:
                return False
            try:
                rename_noreplace(f"{self.path}/{name}", dst)
            except FileNotFoundError:
                continue  # another process took it (or someone cleaned up): try the next one
            except FileExistsError:
                self._push(kind, name)
                raise
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self.max_files = 0  # this file system cannot do it: create files as usual
                return False
            self.taken += 1
            return True

    def give(self, src: str, kind: str = "dat") -> bool:
        """Move the finished file `src` into the pool as a spare of `kind`, to be taken once
        `commit()` made its removal durable. False (nothing done) when the pool is full, the
        file too big or linked elsewhere: the caller unlinks it. Raises FileNotFoundError if
        `src` is gone."""
        if not self.enabled or (len(self) + len(self._pending) >= self.max_files
                                and not self._recount()):
            return False
        st = os.stat(src)
        if st.st_size > self.max_bytes or st.st_nlink != 1:
            return False
        while True:
            name = f"{self._prefix}{next(self._seq)}-{kind}"  # not *.dat: no glob mistakes it
            try:
                rename_noreplace(src, f"{self.path}/{NEW}/{name}")
            except FileExistsError:
                continue  # left by an earlier process with the same pid and clock: next number
            except FileNotFoundError:
                if not os.path.exists(src):
                    raise
                os.makedirs(f"{self.path}/{NEW}", exist_ok=True)  # deleted by hand meanwhile
                continue
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                self.max_files = 0
                return False
            with self._lock:
                self._pending.append((kind, name))
            self.given += 1
            return True

    def recycle(self, files: list[tuple[str, str | None]], left: list[str]) -> None:
        """Remove finished files, in order: each (path, kind) given to the pool as a spare of
        `kind`, unlinked when the pool takes no more or `kind` is None; then commit() with the
        directories they `left`. Files already gone are skipped."""
        for path, kind in files:
            try:
                if kind is None or not self.give(path, kind):
                    os.unlink(path)
            except FileNotFoundError:
                pass
        self.commit(left)

    def commit(self, left: list[str]) -> None:
        """Make the files given so far takeable: fsync the directories they `left` and `.new/`
        (so their removal from the queue is on disk), then move them into `spare/`."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            for d in [*dict.fromkeys(left), f"{self.path}/{NEW}"]:
                fsync_dir(d)
        except OSError:
            with self._lock:
                self._pending[:0] = pending  # not durable yet: try again with the next commit
            raise
        for kind, name in pending:
            try:
                os.rename(f"{self.path}/{NEW}/{name}", f"{self.path}/{name}")
            except FileNotFoundError:
                continue
            self._push(kind, name)

    def adopt_new(self) -> int:
        """At start: files left in `.new/` (a stop before their commit) are synced and become
        spare files. Returns how many."""
        new = f"{self.path}/{NEW}"
        try:
            names = [n for n in os.listdir(new) if not n.startswith(".")]
        except FileNotFoundError:
            return 0
        if names:
            os.sync()  # whatever the last run renamed into .new/ is on disk from here on
        for name in names:
            try:
                os.rename(f"{new}/{name}", f"{self.path}/{name}")
            except OSError:
                pass
        return len(names)

    def _pop(self, kind: str) -> str | None:
        with self._lock:
            names = self._names[kind]
            if not names:
                now = time.monotonic()
                if now < self._next_scan:
                    return None
                self._next_scan = now + self.rescan
                self._names = self._list()
                names = self._names[kind]
            return names.pop() if names else None

    def _recount(self) -> bool:
        """The lists look full: other processes may have taken names from them. Re-list the
        directory (at most every `rescan` s); True when there is room after all."""
        with self._lock:
            now = time.monotonic()
            if now < self._next_scan:
                return False
            self._next_scan = now + self.rescan
            self._names = self._list()
        return len(self) < self.max_files

    def _push(self, kind: str, name: str) -> None:
        with self._lock:
            self._names[kind].append(name)

    def _list(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {kind: [] for kind in KINDS}
        try:
            with os.scandir(self.path) as it:
                found = 0
                for e in it:
                    if e.name[0] != ".":  # not .new/
                        kind = e.name.rpartition("-")[2]
                        out[kind if kind in out else KINDS[0]].append(e.name)
                        found += 1
                        if found >= self.max_files:
                            break
        except FileNotFoundError:
            pass
        for names in out.values():
            random.shuffle(names)  # other processes list the same names: start elsewhere
        return out


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable (what was renamed into or out of it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
