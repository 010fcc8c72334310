"""One engine per queue: an exclusive lock on `HOME/mailengine.lock` (`mailengine-test.lock` for
the test-mode queue, mailq-test/), held for the engine's whole life.

Two engines on one queue both recover it, both deliver it, and each answers the operator for
half of it. So the engine takes this lock before anything touches the queue (recovery included)
and a second `start`, `-bd` or `test` on the same queue stops at once, naming the holder's pid.

The lock is flock(2) on an open file: the kernel drops it when its holder dies, however it dies,
so a lock file left by a killed engine is simply taken over (its stale pid is overwritten). The
pid inside is for people only; the lock is the flock. The descriptor is not inherited by the
intake worker processes (they are exec'd, and Python opens files close-on-exec), but it is
shared across the daemon's forks (`-bd` locks before forking, so its parent can report a refusal).
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = "mailengine.lock"
TEST_LOCK_NAME = "mailengine-test.lock"
# holder() takes the lock for an instant to see whether it is free: a start meeting that instant
# tries again before it believes the queue taken.
ACQUIRE_TRIES = 5
ACQUIRE_PAUSE = 0.05  # s


def lock_path(home: Path | str, test_mode: bool = False) -> Path:
    return Path(home) / (TEST_LOCK_NAME if test_mode else LOCK_NAME)


class Held(Exception):
    """Another process holds the lock; `pid` is what it wrote there (None if unreadable)."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"MailEngine is already running on this queue ({who} holds {path}); "
                         "stop it first (mailengine shutdown)")


class HomeLock:
    """The held lock. `acquire()` raises Held when another process has it."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    @classmethod
    def acquire(cls, home: Path | str, test_mode: bool = False) -> "HomeLock":
        path = lock_path(home, test_mode)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            for attempt in range(ACQUIRE_TRIES):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == ACQUIRE_TRIES - 1:
                        raise Held(path, _read_pid(fd)) from None
                    time.sleep(ACQUIRE_PAUSE)
        except BaseException:
            os.close(fd)
            raise
        lock = cls(path, fd)
        lock.write_pid()
        return lock

    def write_pid(self, pid: int | None = None) -> None:
        """Write the holder's pid (again after the daemon's forks: the lock stays, the pid
        changes)."""
        text = f"{pid or os.getpid()}\n".encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text, 0)

    def release(self) -> None:
        """Drop the lock (the file stays: removing it could race with a new engine's lock)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def holder(home: Path | str, test_mode: bool = False) -> int | None:
    """The pid of the engine holding the queue's lock, or None when no process holds it."""
    path = lock_path(home, test_mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
