"""Extra SMTP intake processes, so intake can use more than one core.

With `network.intake_workers = N` (N > 1), the engine starts N worker processes and takes no SMTP
itself: it delivers. Each binds the same SMTP port with SO_REUSEPORT (the kernel spreads
connections over them), runs the same sans-IO server, policy and `Intake`, and stores into the
same spool. The spool is the
interface (DESIGN.md): a worker tells the engine what it stored with one line per message on a
pipe, `W <id>` (relayed, in mailq/working: the engine is sending), `R <id>` (relayed, in
mailq/retry: sending is paused) or `L` (local only), so the engine can schedule it and count it.
A line lost to a crash costs nothing: the message is on disk and the next start's recovery, or
the drop-in scan, finds it.

A worker is started as `python -m mailengine.workers` (a fresh interpreter, not a fork of a
running event loop); it reads the engine's effective settings as JSON on stdin, so command-line
overrides reach it too, and says `U` on the pipe once it listens. When settings change while
running (web admin, `config set`), the engine starts a new worker with them for each old one and,
once the new one listens, sends the old one SIGUSR1: it stops accepting, lets its sessions end
and exits (SIGTERM, as at the engine's stop, closes idle sessions at once).
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("mailengine.workers")

RESTART_DELAY = 1.0  # s before a worker that died is started again
RETIRE_SIGNAL = signal.SIGUSR1  # "stop accepting, finish your sessions, exit" (SIGTERM: stop now)


class WorkerPool:
    """Starts, watches, replaces and stops the intake processes (engine side)."""

    def __init__(self, cfg, test_mode: bool, count: int,
                 on_line: Callable[[str], None]):
        self.cfg = cfg
        self.test_mode = test_mode
        self.count = count
        self.on_line = on_line
        self.procs: list[asyncio.subprocess.Process] = []  # every one started, for stop()
        self.current: dict[int, asyncio.subprocess.Process] = {}  # index -> the one serving
        self.stopping = False
        self._retired: set[int] = set()  # pids replaced on purpose: their exit is no crash
        self._up: dict[int, asyncio.Future] = {}  # pid -> set when it listens
        self._values: dict = {}  # the settings the serving workers were started with
        self._tasks: list[asyncio.Task] = []
        self._replacing: asyncio.Task | None = None

    async def start(self) -> None:
        for i in range(self.count):
            self.current[i] = await self._spawn(i)
        for i in range(self.count):
            self._tasks.append(asyncio.create_task(self._keep_running(i)))
        await self._wait_up(list(self.current.values()))

    async def _keep_running(self, index: int) -> None:
        while not self.stopping:
            proc = self.current[index]
            code = await proc.wait()
            if self.stopping:
                return
            if proc.pid in self._retired:
                self._retired.discard(proc.pid)
                continue  # replaced by apply(): watch its successor
            log.error("intake worker %d (pid %d) exited with %s; starting it again",
                      index, proc.pid, code)
            await asyncio.sleep(RESTART_DELAY)
            if not self.stopping and self.current[index] is proc:
                self.current[index] = await self._spawn(index)

    def apply(self, cfg) -> bool:
        """Settings changed: when what the workers were given differs, start a new set of workers
        with the new settings, then stop the old ones, which finish the sessions they have (the
        port is never closed meanwhile). True when that is under way."""
        self.cfg = cfg
        if cfg.values == self._values or self.stopping:
            return False
        if self._replacing is None or self._replacing.done():
            self._replacing = asyncio.create_task(self._replace_all())
        return True

    async def _replace_all(self) -> None:
        while not self.stopping and self.cfg.values != self._values:
            for index in range(self.count):
                if self.stopping:
                    return
                old = self.current[index]
                new = await self._spawn(index)
                self.current[index] = new
                await self._wait_up([new])
                self._retired.add(old.pid)
                if old.returncode is None:
                    old.send_signal(RETIRE_SIGNAL)
            log.info("intake processes restarted with the new settings")

    async def _wait_up(self, procs: list, timeout: float = 20.0) -> None:
        futs = [self._up[p.pid] for p in procs if p.pid in self._up]
        try:
            async with asyncio.timeout(timeout):
                for f in futs:
                    await asyncio.shield(f)
        except TimeoutError:
            log.error("an intake worker did not start listening within %g s", timeout)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        self._values = copy.deepcopy(self.cfg.values)
        settings = json.dumps({"home": str(self.cfg.home), "values": self._values,
                               "test_mode": self.test_mode, "notify_fd": write_fd})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mailengine.workers", stdin=asyncio.subprocess.PIPE,
            pass_fds=(write_fd,))
        os.close(write_fd)
        proc.stdin.write(settings.encode())
        proc.stdin.close()
        reader = asyncio.StreamReader(limit=1 << 20)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(read_fd, "rb", buffering=0))
        self.procs.append(proc)
        self._up[proc.pid] = loop.create_future()
        self._tasks.append(asyncio.create_task(self._read_lines(reader, proc.pid)))
        log.info("intake worker %d started, pid %d", index, proc.pid)
        return proc

    async def _read_lines(self, reader: asyncio.StreamReader, pid: int) -> None:
        while line := await reader.readline():
            text = line.decode().rstrip("\n")
            if text == "U":  # listening
                fut = self._up.get(pid)
                if fut is not None and not fut.done():
                    fut.set_result(None)
                continue
            try:
                self.on_line(text)
            except Exception:  # one bad line must not stop this worker's notifications
                log.exception("intake worker notification %r could not be handled", line[:200])
        fut = self._up.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result(None)  # it ended before listening: nobody should wait for it

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every worker (they finish what they are storing) and wait for them."""
        self.stopping = True
        if self._replacing is not None:
            self._replacing.cancel()
        live = [p for p in self.procs if p.returncode is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                for p in live:
                    await p.wait()
        except TimeoutError:
            for p in live:
                if p.returncode is None:
                    p.kill()
        for t in self._tasks:
            t.cancel()


# --- the worker process ---------------------------------------------------------------------------

async def worker_main(spec: dict) -> None:
    from . import tls
    from .app import host_name
    from .config import Config
    from .diskwatch import DiskWatch
    from .inbound import InboundServer
    from .intake import Intake
    from .policy import Policy
    from .spool import Spool
    from .users import PasswordFile

    cfg = Config(home=Path(spec["home"]), values=spec["values"])
    notify = os.fdopen(spec["notify_fd"], "w", buffering=1)
    hostname = host_name(cfg)
    spool = Spool(cfg.mailq(spec["test_mode"]), durable=cfg.queue.relay_via_disk,
                  hostname=hostname)

    def stored(relayed, local: bool, where: str = "retry", data: bytes = b"") -> None:
        kind = "W" if where == "working" else "R"
        try:
            notify.write(f"{kind} {relayed.id}\n" if relayed is not None else "L\n")
        except OSError:
            pass  # the engine is gone; the message is on disk all the same

    def relay_dir() -> str:
        # Straight into working/ when the engine is sending (it moves the message to retry/
        # if its memory is full): two renames fewer in the engine's event loop per message.
        return "retry" if cfg.queue.pause_sending else "working"

    intake = Intake(cfg, spool, hostname, stored, relay_dir=relay_dir)
    ctx = tls.server_context(cfg.home, cfg.network.tls_cert, cfg.network.tls_key, hostname)
    policy = Policy(cfg, PasswordFile(cfg.password_file))
    # its own low-disk watcher (the engine's logs and alerts): 452 4.3.1 while space is low
    watch = DiskWatch(spool.root, policy, cfg.basic.min_free_disk_mb, quiet=True)
    watch.check()
    server = InboundServer(cfg, policy, intake.on_message,
                           ctx, auth_available=True, hostname=hostname, reuse_port=True)
    stop = asyncio.Event()
    retire = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(RETIRE_SIGNAL, retire.set)
    await server.start()
    try:
        notify.write("U\n")  # listening: the engine may now retire the worker this one replaces
    except OSError:
        pass
    watching = asyncio.create_task(watch.run())
    stopping, retiring = asyncio.create_task(stop.wait()), asyncio.create_task(retire.wait())
    await asyncio.wait((stopping, retiring), return_when=asyncio.FIRST_COMPLETED)
    if retiring.done() and not stop.is_set():
        # replaced by a worker with new settings: let the sessions end, unless told to stop
        ending = asyncio.create_task(server.retire())
        await asyncio.wait((ending, stopping), return_when=asyncio.FIRST_COMPLETED)
        ending.cancel()
    stopping.cancel()
    retiring.cancel()
    watching.cancel()
    await server.stop()
    spool.close()


def die_with_parent() -> None:
    """Linux: get SIGTERM when the engine dies (even by SIGKILL), so no worker outlives it and
    keeps the SMTP port."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the engine died before prctl took effect
        sys.exit(0)


def main() -> None:
    die_with_parent()
    from . import logs
    from .app import loop_factory
    spec = json.loads(sys.stdin.read())
    values = spec["values"]
    logs.setup(Path(spec["home"]) / "log", values["logging.log_retention_days"])
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(worker_main(spec))


if __name__ == "__main__":
    main()
