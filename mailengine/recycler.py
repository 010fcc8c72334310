"""The recycler process: removes delivered messages' files for the engine (`Spool.recycle`),
when the engine delivers through delivery processes (`network.delivery_processes` of 2 or more).

Why a process. Removing a delivered message is two unlinks (or two renames into spare/ and,
per batch, directory syncs: spare.py). Done in the engine's remover thread, every one of those
system calls let go of the GIL and took it back while the event loop wanted it: in bench/drain
(perf, 2 cores) the unlinks were 11 % of the engine process's CPU and the GIL's futex calls
another 11 %, CPU the queue manager could not give to delivery. Here the remover thread sends
a batch in one write and sleeps in one read until it is done.

Same work, same order, same guarantees: the process runs `SparePool.recycle` on a pool of its
own over the same spare/ directory (spare.py's pools already share it across processes), and
`Spool.recycle` returns only when it has answered, so a batch is gone and its spare files
committed exactly when it was before. A crash of the engine ends this process too (it is
killed with its parent); whatever it had not removed stays in working/, as when the remover
thread was cut short: the next start delivers it again (a duplicate, never a loss). When the
process fails (it died, or answers nonsense), the remover thread does the batch itself, and
every batch after it: one failure, and the engine goes back to the way that always works.

Frames (frames.py) on its stdin and stdout:

    ("recycle", files, left)  -> ("done", None) or ("done", "the OSError's text")

`files`: (path, kind) to give to the pool, or unlink (kind None: side files); `left`: the
directories they leave, synced before their spare files are takeable (SparePool.recycle).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading

from .frames import FrameError, FrameReader, encode
from .spare import SparePool

log = logging.getLogger("mailengine.recycler")

STOP_TIMEOUT = 10.0  # s a stopping recycler has to finish the batch it has


class RecyclerGone(Exception):
    """The process did not answer: the caller removes the batch itself."""


class Recycler:
    """The engine's end: one batch at a time (thread-safe), from the remover thread."""

    def __init__(self, spare_path: str, max_files: int) -> None:
        self.spare_path = spare_path
        self.max_files = max_files
        self.batches = 0  # done by the process (for tests)
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._reader = FrameReader()

    @property
    def running(self) -> bool:
        return self._proc is not None

    def start(self) -> None:
        """Start the process (in the thread that lives as long as the engine: the process is
        killed when the thread that started it ends, PR_SET_PDEATHSIG)."""
        if self._proc is not None:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from mailengine.recycler import main; main()",
             self.spare_path, str(self.max_files)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        log.info("recycler process started, pid %d", self._proc.pid)

    def recycle(self, files: list[tuple[str, str | None]], left: list[str]) -> None:
        """Have the process remove the batch; OSError as the process met it; RecyclerGone when
        there is no process (any more): then nothing is known of the batch."""
        with self._lock:
            proc = self._proc
            if proc is None:
                raise RecyclerGone("no recycler process")
            try:
                _write(proc.stdin.fileno(), encode(("recycle", files, left)))
                answer = self._read(proc.stdout.fileno())
                if not (isinstance(answer, tuple) and len(answer) == 2 and answer[0] == "done"):
                    raise FrameError(f"unexpected answer {answer!r:.80}")
            except (OSError, EOFError, FrameError) as e:
                log.error("recycler process (pid %d) failed (%s); removing delivered mail in "
                          "the engine from now on", proc.pid, e or type(e).__name__)
                self._proc = None
                _end(proc)
                raise RecyclerGone(str(e)) from None
            self.batches += 1
        if answer[1] is not None:
            raise OSError(answer[1])

    def _read(self, fd: int):
        while True:
            data = os.read(fd, 65536)
            if not data:
                raise EOFError("end of the pipe")
            frames = self._reader.feed(data)
            if frames:
                if len(frames) > 1 or self._reader.pending:
                    raise FrameError("more than one answer")
                return frames[0]

    def stop(self) -> None:
        """Close its pipe: it finishes the batch it has (if any) and exits."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            _end(proc, STOP_TIMEOUT)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _end(proc: subprocess.Popen, timeout: float = 0.0) -> None:
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except OSError:
            pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    """The process: batches from stdin until it closes."""
    from .child_process import die_with_parent
    die_with_parent()
    spare = SparePool(sys.argv[1], max_files=int(sys.argv[2]))
    reader = FrameReader()
    while True:
        data = os.read(0, 65536)
        if not data:
            return
        for op, files, left in reader.feed(data):
            if op != "recycle":
                raise SystemExit(f"recycler: unknown request {op!r}")
            try:
                spare.recycle(files, left)
                error = None
            except OSError as e:
                error = str(e)
            _write(1, encode(("done", error)))
