"""Append-only text files other programs read while the engine runs (SPEC 6).

`hard-undeliverable.txt`, `soft-undeliverable.txt`, `hard-bounces.txt`, `soft-bounces.txt`: one
address per line. `log/events.jsonl` and `log/bounces.jsonl`: one JSON object per line.

The contract with the programs that read them: a line is written whole (one `write()` of complete
lines on a descriptor opened with O_APPEND, so it lands at the end of the file as it is *now*),
and the file may be truncated, emptied, renamed away or deleted at any time:

- truncated or emptied: O_APPEND puts the next line at the new end, no hole of NUL bytes;
- renamed away (log rotation) or deleted: before each write the descriptor's inode is compared
  with the path's, and the path is opened again (and created) when they differ. (The event log,
  written for every delivery, compares at most once a second: `recheck`.)

A cleaning script can therefore `mv hard-undeliverable.txt work.txt`, wait a moment (a line
being written as the rename happens still lands in the old file, as with any log rotation), and
process the addresses at leisure: nothing written after the move is lost or doubled. Reading
and then truncating in place (`: > file`) can lose a line written between the two steps; the
rename is the safe way.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("mailengine.lists")

HARD_UNDELIVERABLE = "hard-undeliverable.txt"
SOFT_UNDELIVERABLE = "soft-undeliverable.txt"
HARD_BOUNCES = "hard-bounces.txt"
SOFT_BOUNCES = "soft-bounces.txt"


class AppendFile:
    """One append-only file: `append_lines` writes whole lines, safe against truncation and
    rotation by other programs. Thread-safe (the delivery engine and the intake may share one)."""

    def __init__(self, path: Path | str, mode: int = 0o644, recheck: float = 0.0) -> None:
        self.path = Path(path)
        self.mode = mode
        self.recheck = recheck  # s between checks that `path` is still our file
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def _open(self) -> int:
        """The descriptor for the file now at `path` (reopened after a rename or delete)."""
        if self._fd is not None:
            if self.recheck:
                now = time.monotonic()
                if now - self._checked < self.recheck:
                    return self._fd
                self._checked = now
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    return self._fd
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.mode)
        st = os.fstat(fd)
        self._fd, self._ino = fd, (st.st_dev, st.st_ino)
        self._checked = time.monotonic()
        return fd

    def append_lines(self, lines: list[str]) -> None:
        """Append `lines` (each without its line end) in one write. Raises OSError."""
        if not lines:
            return
        data = "".join(_one_line(x) + "\n" for x in lines).encode("utf-8", "surrogateescape")
        with self._lock:
            fd = self._open()
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]

    def read_lines(self) -> list[str]:
        try:
            text = self.path.read_text("utf-8", "surrogateescape")
        except FileNotFoundError:
            return []
        return [line for line in text.split("\n") if line]

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def rotate_if_over(path: Path | str, max_bytes: int) -> bool:
    """Rename `path` to `path.1` (replacing the one before) once it holds `max_bytes` or more,
    so a file written by several processes stays bounded. True when it was rotated.

    The writers' AppendFile (recheck 0) sees the new inode and opens a fresh file at its next
    line. The rename is done under a lock on the directory, and the size looked at again under
    it: two processes finding the file full at once rotate it once, not twice (a second rename
    would replace the full `.1` with the new, nearly empty file)."""
    path = Path(path)
    try:
        if os.stat(path).st_size < max_bytes:
            return False
        fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.stat(path).st_size < max_bytes:
            return False  # another process rotated it while we waited
        os.replace(path, path.with_name(path.name + ".1"))
        return True
    except OSError as e:
        log.warning("cannot rotate %s: %s", path, e)
        return False
    finally:
        os.close(fd)  # releases the lock


def _one_line(text: str) -> str:
    """A line can never break in two: CR, LF and NUL become spaces."""
    if "\n" in text or "\r" in text or "\x00" in text:
        text = text.replace("\r", " ").replace("\n", " ").replace("\x00", " ")
    return text


class AddressLists:
    """The four address lists of a home directory."""

    def __init__(self, home: Path | str, mirror=None) -> None:
        home = Path(home)
        self.hard_undeliverable = AppendFile(home / HARD_UNDELIVERABLE)
        self.soft_undeliverable = AppendFile(home / SOFT_UNDELIVERABLE)
        self.hard_bounces = AppendFile(home / HARD_BOUNCES)
        self.soft_bounces = AppendFile(home / SOFT_BOUNCES)
        self.mirror = mirror  # shared.ListMirror: the same lines onto Redis lists, or None

    def undeliverable(self, hard: list[str], soft: list[str]) -> None:
        """Failed addresses of one attempt: hard (5xx) and soft (given up after the last retry)."""
        for f, addrs in ((self.hard_undeliverable, hard), (self.soft_undeliverable, soft)):
            if addrs:
                self._append(f, [a.strip() for a in addrs])

    def bounce(self, address: str, hard: bool) -> None:
        self._append(self.hard_bounces if hard else self.soft_bounces, [address.strip()])

    def _append(self, f: AppendFile, lines: list[str]) -> None:
        try:
            f.append_lines(lines)
        except OSError as e:
            log.warning("cannot append to %s: %s", f.path, e)
        if self.mirror is not None:
            self.mirror.push(f.path.name, lines)

    def close(self) -> None:
        for f in (self.hard_undeliverable, self.soft_undeliverable, self.hard_bounces,
                  self.soft_bounces):
            f.close()
