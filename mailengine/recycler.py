"""The recycler process: removes delivered messages' files for the engine, when the engine
delivers through delivery processes (`network.delivery_processes` of 2 or more).

Why a process. Removing a delivered message is two unlinks (or two renames into spare/ and,
per batch, directory syncs: spare.py). Done in the engine's remover thread, every one of those
system calls let go of the GIL and took it back while the event loop wanted it: in bench/drain
(perf, 2 cores) the unlinks were 11 % of the engine process's CPU and the GIL's futex calls
another 11 %, CPU the queue manager could not give to delivery. Even one hand-off per batch to
that thread cost 7 %. So the event loop hands each delivered message to this process on a pipe
(`Spool.recycle_soon`; those of one turn of the loop in one write) and goes on.

Same work, same order, same guarantees: the process runs `SparePool.recycle` on a pool of its
own over the same spare/ directory (spare.py's pools already share it across processes), all
the requests it finds waiting at once, so one directory sync covers many messages as in the
remover thread. Until it has answered, a message's files are in working/: a crash of the engine
(which ends this process too) leaves them there, as when the remover thread was cut short, and
the next start delivers them again (a duplicate, never a loss). If the process dies, what it
had not answered is removed by the engine in a thread, and from then on the engine removes
delivered mail itself again (`recycle_soon` says False). An error it meets is logged, as the
remover thread's were, and the files stay in working/ until the next start.

Frames (frames.py) on its stdin and stdout:

    ("recycle", files, left)  ...  -> ("done", how many requests, None or the OSError's text)

`files`: (path, kind) to give to the pool, or unlink (kind None: side files); `left`: the
directories they leave, synced before their spare files are takeable (SparePool.recycle).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import subprocess
import sys

from .frames import FrameError, FrameReader, FrameWriter, encode
from .spare import SparePool

log = logging.getLogger("mailengine.recycler")

STOP_TIMEOUT = 10.0  # s a stopping recycler has to finish what it has


class Recycler:
    """The engine's end, used from its event loop."""

    def __init__(self, spare: SparePool) -> None:
        self.spare = spare  # the engine's own pool: for what the process leaves undone
        self.alive = False
        self.batches = 0  # requests the process has answered (for tests)
        self._proc: subprocess.Popen | None = None
        self._writer = FrameWriter()
        self._waiting: collections.deque[tuple[list, list]] = collections.deque()  # unanswered
        self._idle = asyncio.Event()  # nothing unanswered
        self._idle.set()

    async def start(self) -> None:
        """Start the process (from the thread that lives as long as the engine: the process is
        ended when the thread that started it ends, PR_SET_PDEATHSIG)."""
        proc = subprocess.Popen(
            [sys.executable, "-c", "from mailengine.recycler import main; main()",
             self.spare.path, str(self.spare.max_files)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        loop = asyncio.get_running_loop()
        try:
            self._writer.transport, _ = await loop.connect_write_pipe(asyncio.Protocol,
                                                                      proc.stdin)
            await loop.connect_read_pipe(lambda: _Answers(self), proc.stdout)
        except BaseException:
            _end(proc)
            raise
        self._proc = proc
        self.alive = True
        log.info("recycler process started, pid %d", proc.pid)

    def post(self, files: list[tuple[str, str | None]], left: list[str]) -> bool:
        """Have the process remove `files` (no wait); False when it is not running."""
        if not self.alive:
            return False
        self._waiting.append((files, left))
        self._idle.clear()
        self._writer.send(("recycle", files, left))
        return True

    def answered(self, count: int, error: str | None) -> None:
        done = [self._waiting.popleft()[0] for _ in range(min(count, len(self._waiting)))]
        if error is not None:  # the files of these requests may still be there
            names = [os.path.basename(files[0][0]) for files in done if files]
            log.error("delivered, but cannot be removed from working/ (%s): %s",
                      ", ".join(names[:5]) + (" ..." if len(names) > 5 else ""), error)
        self.batches += count
        if not self._waiting:
            self._idle.set()

    def lost(self, why: str) -> None:
        """The process ended (or talks nonsense): what it did not answer is done here, in a
        thread; so is everything after."""
        if not self.alive:
            return
        self.alive = False
        log.error("recycler process failed (%s); the engine removes delivered mail itself", why)
        if self._proc is not None:
            self._proc.kill()
        self._writer.close()
        left, self._waiting = list(self._waiting), collections.deque()
        if left:
            asyncio.get_running_loop().run_in_executor(None, self._remove_here, left)
        else:
            self._idle.set()

    def _remove_here(self, batches: list[tuple[list, list]]) -> None:
        try:
            for files, left in batches:
                try:
                    self.spare.recycle(files, left)
                except OSError as e:
                    log.error("delivered, but cannot be removed from working/: %s", e)
        finally:
            self._idle.set()

    async def drain(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Wait until everything handed over is removed (or given up with an error); False
        when the process did not get there within `timeout` s (stuck: what it has not done
        stays in working/ for the next start)."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.error("recycler process: %d delivered messages not removed within %g s; they "
                      "are delivered again after the next start", len(self._waiting), timeout)
            return False
        return True

    def stop(self) -> None:
        """Close its pipe: it finishes what it has and exits (call drain() first)."""
        self.alive = False
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                self._writer.close()
            except RuntimeError:  # its event loop is closed: the pipe is closed below
                pass
            _end(proc, STOP_TIMEOUT)


class _Answers(asyncio.Protocol):
    def __init__(self, recycler: Recycler) -> None:
        self.recycler = recycler
        self.reader = FrameReader()

    def data_received(self, data: bytes) -> None:
        try:
            for op, count, error in self.reader.feed(data):
                if op != "done":
                    raise FrameError(f"unexpected answer {op!r:.40}")
                self.recycler.answered(count, error)
        except (FrameError, TypeError, ValueError) as e:
            self.recycler.lost(str(e))

    def connection_lost(self, exc) -> None:
        self.recycler.lost("its pipe closed")


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
    """The process: every request waiting on stdin at once, until it closes."""
    from .child_process import die_with_parent
    die_with_parent()
    spare = SparePool(sys.argv[1], max_files=int(sys.argv[2]))
    reader = FrameReader()
    while True:
        data = os.read(0, 1 << 20)
        if not data:
            return
        requests = reader.feed(data)
        if not requests:
            continue
        files: list[tuple[str, str | None]] = []
        left: dict[str, None] = {}
        for op, f, dirs in requests:
            if op != "recycle":
                raise SystemExit(f"recycler: unknown request {op!r}")
            files += f
            left.update(dict.fromkeys(dirs))
        try:
            spare.recycle(files, list(left))
            error = None
        except OSError as e:
            error = str(e)
        data = encode(("done", len(requests), error))
        while data:
            data = data[os.write(1, data):]
