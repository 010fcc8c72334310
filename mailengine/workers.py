"""Extra SMTP intake processes, so intake can use more than one core.

With `network.intake_workers = N`, the engine starts N-1 worker processes besides itself. Each
binds the same SMTP port with SO_REUSEPORT (the kernel spreads connections over them), runs the
same sans-IO server, policy and `Intake`, and stores into the same spool. The spool is the
interface (DESIGN.md): a worker tells the engine what it stored with one line per message on a
pipe, `R <id>` (relayed, in mailq/retry) or `L` (local only), so the engine can schedule it and
count it. A line lost to a crash costs nothing: the message is on disk and the next start's
recovery, or the drop-in scan, finds it.

A worker is started as `python -m mailengine.workers` (a fresh interpreter, not a fork of a
running event loop); it reads the engine's effective settings as JSON on stdin, so command-line
overrides reach it too.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

log = logging.getLogger("mailengine.workers")

RESTART_DELAY = 1.0  # s before a worker that died is started again


class WorkerPool:
    """Starts, watches and stops the extra intake processes (engine side)."""

    def __init__(self, cfg, test_mode: bool, count: int,
                 on_line: Callable[[str], None]):
        self.cfg = cfg
        self.test_mode = test_mode
        self.count = count
        self.on_line = on_line
        self.procs: list[asyncio.subprocess.Process] = []
        self.stopping = False
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        for i in range(self.count):
            self._tasks.append(asyncio.create_task(self._keep_running(i)))

    async def _keep_running(self, index: int) -> None:
        while not self.stopping:
            proc = await self._spawn(index)
            code = await proc.wait()
            if self.stopping:
                return
            log.error("intake worker %d (pid %d) exited with %s; starting it again",
                      index, proc.pid, code)
            await asyncio.sleep(RESTART_DELAY)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        settings = json.dumps({"home": str(self.cfg.home), "values": self.cfg.values,
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
        self._tasks.append(asyncio.create_task(self._read_lines(reader)))
        log.info("intake worker %d started, pid %d", index, proc.pid)
        return proc

    async def _read_lines(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                self.on_line(line.decode().rstrip("\n"))
            except Exception:  # one bad line must not stop this worker's notifications
                log.exception("intake worker notification %r could not be handled", line[:200])

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every worker (they finish what they are storing) and wait for them."""
        self.stopping = True
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
        try:
            notify.write(f"R {relayed.id}\n" if relayed is not None else "L\n")
        except OSError:
            pass  # the engine is gone; the message is on disk all the same

    intake = Intake(cfg, spool, hostname, stored)
    ctx = tls.server_context(cfg.home, cfg.network.tls_cert, cfg.network.tls_key, hostname)
    policy = Policy(cfg, PasswordFile(cfg.password_file))
    # its own low-disk watcher (the engine's logs and alerts): 452 4.3.1 while space is low
    watch = DiskWatch(spool.root, policy, cfg.basic.min_free_disk_mb, quiet=True)
    watch.check()
    server = InboundServer(cfg, policy, intake.on_message,
                           ctx, auth_available=True, hostname=hostname, reuse_port=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    watching = asyncio.create_task(watch.run())
    await stop.wait()
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
