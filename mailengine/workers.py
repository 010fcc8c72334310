"""Extra SMTP intake processes, so intake can use more than one core.

With `network.intake_workers = N` (N > 1), the engine starts N worker processes and takes no SMTP
itself: it delivers. Each binds the same SMTP port with SO_REUSEPORT (the kernel spreads
connections over them), runs the same sans-IO server, policy and `Intake`, and stores into the
same spool. The spool is the
interface (DESIGN.md): a worker tells the engine what it stored with one line per message on a
pipe, `W <id> <envelope>` (relayed, in mailq/working: the engine is sending), `R <id>
<envelope>` (relayed, in mailq/retry: sending is paused) or `L` (local only), so the engine can
schedule it and count it. The envelope is the stored message's `Message`, pickled, in base64:
the engine need not read back the `.inf` the worker just wrote (35 us of its event loop per
message, against 8 to unpickle; workers.envelope_line).
A line lost to a crash costs nothing: the message is on disk and the next start's recovery, or
the drop-in scan, finds it. `C open total refused` reports its SMTP sessions (once a second, when
they change) for the engine's status, admin page and metrics. `max_inbound_connections` counts
the sessions of all workers together, through a shared counter (session_slots.py).

A worker is started as `python -m mailengine.workers` (a fresh interpreter, not a fork of a
running event loop); it reads the engine's effective settings as JSON on stdin, so command-line
overrides reach it too, and says `U` on the pipe once it listens. When settings change while
running (web admin, `config set`), the engine starts a new worker with them for each old one and,
once the new one listens, sends the old one SIGUSR1: it stops accepting, lets its sessions end
and exits (SIGTERM, as at the engine's stop, closes idle sessions at once).
"""
from __future__ import annotations

import asyncio
import base64
import copy
import fcntl
import json
import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Callable

from .child_process import die_with_parent
from .queue_dirs import RETRY, WORKING
from .config import BY_NAME
from .session_slots import SessionSlots
from .setting import DELIVERY

log = logging.getLogger("mailengine.workers")

RESTART_DELAY = 1.0  # s before a worker that died is started again
RETIRE_SIGNAL = signal.SIGUSR1  # "stop accepting, finish your sessions, exit" (SIGTERM: stop now)
ENVELOPE_MAX = 16 * 1024  # bytes of an envelope sent on a line; larger ones: the .inf is read
LINE_LIMIT = 1 << 20  # bytes of a notification line the engine reads
PIPE_SIZE = 1 << 20  # the notification pipe's buffer (fs.pipe-max-size allows 1 MiB by default)


def notification_pipe() -> tuple[int, int]:
    """(read, write) ends of a worker's notification pipe, with room for ~1,000 envelope lines
    while the engine's event loop is busy (a full pipe would stall the worker's intake)."""
    read_fd, write_fd = os.pipe()
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # Linux
    except (AttributeError, OSError):
        pass  # the system's default (64 KiB)
    return read_fd, write_fd


def envelope_line(msg, where: str) -> str:
    """A worker's line for a relayed message it stored in `where` (the engine: read_envelope).
    A large envelope (a thousand recipients with long ORCPTs) goes without: the engine reads
    the `.inf` of that one."""
    kind = "W" if where == WORKING else "R"
    payload = base64.b64encode(pickle.dumps(msg, 5))
    if len(payload) > ENVELOPE_MAX:
        return f"{kind} {msg.id}\n"
    return f"{kind} {msg.id} {payload.decode()}\n"


def read_envelope(payload: str):
    """The Message of an envelope line; None when it cannot be read (then the engine reads
    the `.inf`). The pipe is the engine's own, from its own child: the pickle is trusted."""
    try:
        return pickle.loads(base64.b64decode(payload))
    except Exception:
        return None


def worker_values(values: dict) -> dict:
    """The settings that matter to an intake process: all but those of the delivery scope
    (setting.py), so changing one of those restarts no worker."""
    return {k: v for k, v in values.items()
            if k not in BY_NAME or BY_NAME[k].scope != DELIVERY}


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
        self._started = False
        self._values_of: dict[int, dict] = {}  # index -> settings its serving worker got
        self._spawned: dict[int, dict] = {}  # pid -> settings it was started with
        self._up: dict[int, asyncio.Future] = {}  # pid -> True once it listens, False if it ended
        self._watch: dict[int, asyncio.Task] = {}  # index -> restarts its worker if it dies
        self._readers: list[asyncio.Task] = []
        self._replacing: asyncio.Task | None = None
        self._conns: dict[int, tuple[int, int, int]] = {}  # pid -> open, total, refused (C lines)
        self._ended_totals = [0, 0]  # sessions and refusals of workers that have ended
        # the engine-wide inbound session count; room for the workers that overlap while old
        # ones, replaced after a settings change, finish their sessions
        self.session_slots = SessionSlots.make(8 * count + 4)
        self._slot_of: dict[int, int] = {}  # pid -> its slot in session_slots

    async def start(self) -> None:
        for i in range(self.count):
            self._serve(i, await self._spawn(i))
        await self._wait_up(list(self.current.values()))
        self._started = True
        self.apply(self.cfg)  # settings changed while they were starting

    def _serve(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """`proc` serves for `index` from now on, watched."""
        self.current[index] = proc
        self._values_of[index] = self._spawned.pop(proc.pid, {})
        old = self._watch.get(index)
        if old is not None:
            old.cancel()
        self._watch[index] = asyncio.create_task(self._keep_running(index, proc))

    async def _keep_running(self, index: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.stopping or self.current.get(index) is not proc:
            return  # stopping, or replaced: its successor has its own watcher
        log.error("intake worker %d (pid %d) exited with %s; starting it again",
                  index, proc.pid, code)
        await asyncio.sleep(RESTART_DELAY)
        if not self.stopping and self.current.get(index) is proc:
            self._serve(index, await self._spawn(index))

    def apply(self, cfg) -> bool:
        """Settings changed: when what the workers read differs, replace them one by one by
        workers started with the new settings; each old one is retired (it stops accepting and
        finishes its sessions) only once its successor listens. True when that is under way."""
        self.cfg = cfg
        if self.stopping or not self._stale():
            return False
        if not self._started:
            return True  # start() does it once they all listen
        if self._replacing is None or self._replacing.done():
            self._replacing = asyncio.create_task(self._replace_all())
        return True

    def _stale(self) -> list[int]:
        want = worker_values(self.cfg.values)
        return [i for i in range(self.count) if self._values_of.get(i) != want]

    async def _replace_all(self) -> None:
        try:
            while not self.stopping and (stale := self._stale()):
                for index in stale:
                    if self.stopping or not await self._replace(index):
                        return
                log.info("intake processes restarted with the new settings")
        except Exception:
            log.exception("replacing the intake processes failed; the old ones keep serving")

    async def _replace(self, index: int) -> bool:
        old = self.current[index]
        new = await self._spawn(index)
        if not await self._wait_up([new]):
            log.error("a new intake worker (pid %d) did not start listening; worker %d (pid %d) "
                      "keeps serving with its old settings", new.pid, index, old.pid)
            if new.returncode is None:
                new.kill()
            self._spawned.pop(new.pid, None)
            return False
        serving = self.current[index]  # `old`, or what replaced it if it died meanwhile
        self._serve(index, new)
        for p in {old, serving}:
            if p.returncode is None:
                p.send_signal(RETIRE_SIGNAL)
        return True

    async def _wait_up(self, procs: list, timeout: float = 20.0) -> bool:
        """True when every one of `procs` said it listens within `timeout`."""
        ok = True
        try:
            async with asyncio.timeout(timeout):
                for p in procs:
                    fut = self._up.get(p.pid)
                    ok = ok and fut is not None and await asyncio.shield(fut)
        except TimeoutError:
            log.error("an intake worker did not start listening within %g s", timeout)
            return False
        return ok

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        loop = asyncio.get_running_loop()
        read_fd, write_fd = notification_pipe()
        values = copy.deepcopy(self.cfg.values)
        slots = self.session_slots
        slot = slots.take() if slots is not None else None
        if slots is not None and slot is None:
            log.warning("intake worker %d counts its sessions alone (an equal share of "
                        "max_inbound_connections and max_connections_per_ip): the %d shared "
                        "session slots are held by workers still finishing their sessions",
                        index, slots.slots)
        spec = {"home": str(self.cfg.home), "values": values, "test_mode": self.test_mode,
                "notify_fd": write_fd}
        pass_fds = [write_fd]
        if slot is not None:
            spec |= {"sessions_fd": slots.fd, "sessions_slot": slot}
            pass_fds.append(slots.fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mailengine.workers", stdin=asyncio.subprocess.PIPE,
                pass_fds=pass_fds)
        except BaseException:
            if slot is not None:
                slots.give_back(slot)
            raise
        finally:
            os.close(write_fd)
        settings = json.dumps(spec)
        if slot is not None:
            self._slot_of[proc.pid] = slot
        self.procs.append(proc)
        self._spawned[proc.pid] = worker_values(values)
        self._up[proc.pid] = loop.create_future()
        proc.stdin.write(settings.encode())
        proc.stdin.close()
        reader = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                     os.fdopen(read_fd, "rb", buffering=0))
        self._readers.append(asyncio.create_task(self._read_lines(reader, proc.pid)))
        log.info("intake worker %d started, pid %d", index, proc.pid)
        return proc

    async def _read_lines(self, reader: asyncio.StreamReader, pid: int) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:  # longer than the reader's limit: dropped, the next one read
                log.error("intake worker %d: a notification line over %d bytes was dropped "
                          "(its message is on disk: the drop-in scan, or for working/ the next "
                          "start, takes it)",
                          pid, LINE_LIMIT)
                continue
            if not line:
                break
            text = line.decode().rstrip("\n")
            if text == "U":  # listening
                fut = self._up.get(pid)
                if fut is not None and not fut.done():
                    fut.set_result(True)
                continue
            if text.startswith("C "):  # its connection counts
                try:
                    self._conns[pid] = tuple(int(x) for x in text.split()[1:4])  # type: ignore
                except ValueError:
                    pass
                continue
            try:
                self.on_line(text)
            except Exception:  # one bad line must not stop this worker's notifications
                log.exception("intake worker notification %r could not be handled", line[:200])
        fut = self._up.pop(pid, None)
        if fut is not None and not fut.done():
            fut.set_result(False)  # it ended before listening
        slot = self._slot_of.pop(pid, None)
        if slot is not None:  # its pipe closed: it has ended, and its sessions with it
            self.session_slots.give_back(slot)
        ended = self._conns.pop(pid, None)
        if ended is not None:
            self._ended_totals[0] += ended[1]
            self._ended_totals[1] += ended[2]

    def inbound_counts(self) -> dict:
        """Open sessions and totals over every intake process (as last reported, <= 1 s old)."""
        now = list(self._conns.values())
        return {"open": sum(c[0] for c in now),
                "sessions_total": self._ended_totals[0] + sum(c[1] for c in now),
                "refused_busy": self._ended_totals[1] + sum(c[2] for c in now),
                "processes": self.count}

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every worker (they finish what they are storing), wait for them, and read
        what they said until then (mail they stored must reach the engine)."""
        self.stopping = True
        if self._replacing is not None:
            self._replacing.cancel()
            await asyncio.gather(self._replacing, return_exceptions=True)
        for t in self._watch.values():
            t.cancel()
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
        try:  # their pipes are closed now: the readers end after the last lines
            async with asyncio.timeout(5.0):
                await asyncio.gather(*self._readers, return_exceptions=True)
        except TimeoutError:
            for t in self._readers:
                t.cancel()
        if self.session_slots is not None:
            self.session_slots.close()
            self.session_slots = None


# --- the worker process ---------------------------------------------------------------------------

async def worker_main(spec: dict) -> None:
    from . import tls
    from .hostname import host_name
    from .config import Config
    from .diskwatch import DiskWatch
    from .inbound import InboundServer
    from .intake import Intake
    from .policy import Policy
    from .session_slots import SharedSessionCount
    from .shared import close_list_mirrors
    from .spool import Spool
    from .users import PasswordFile

    cfg = Config(home=Path(spec["home"]), values=spec["values"])
    notify = os.fdopen(spec["notify_fd"], "w", buffering=1)
    hostname = host_name(cfg)
    spool = Spool(cfg.mailq(spec["test_mode"]), durable=cfg.queue.relay_via_disk,
                  hostname=hostname)

    def stored(relayed, local: bool, where: str = RETRY, data: bytes = b"") -> None:
        try:
            notify.write(envelope_line(relayed, where) if relayed is not None else "L\n")
        except OSError:
            pass  # the engine is gone; the message is on disk all the same

    def relay_dir() -> str:
        # Straight into working/ when the engine is sending (it moves the message to retry/
        # if its memory is full): two renames fewer in the engine's event loop per message.
        return RETRY if cfg.queue.pause_sending else WORKING

    intake = Intake(cfg, spool, hostname, stored, relay_dir=relay_dir)
    ctx = tls.server_context(cfg.home, cfg.network.tls_cert, cfg.network.tls_key, hostname)
    policy = Policy(cfg, PasswordFile(cfg.password_file))
    # its own low-disk watcher (the engine's logs and alerts): 452 4.3.1 while space is low
    watch = DiskWatch(spool.root, policy, cfg.basic.min_free_disk_mb, quiet=True)
    watch.check()
    shared_count = None
    if "sessions_fd" in spec:
        shared_count = SharedSessionCount(spec["sessions_fd"], spec["sessions_slot"])
    server = InboundServer(cfg, policy, intake.on_message, ctx, auth_available=True,
                           hostname=hostname, reuse_port=True, shared_count=shared_count)
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
    reporting = asyncio.create_task(_report_connections(server, notify))
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
    reporting.cancel()
    await server.stop()
    spool.close()
    close_list_mirrors()


async def _report_connections(server, notify) -> None:
    """`C open total refused` on the pipe when they change (at most once a second), so the
    engine's status, admin and metrics count this process's sessions."""
    last = None
    while True:
        c = server.counts()
        now = (c["open"], c["sessions_total"], c["refused_busy"])
        if now != last:
            try:
                notify.write("C %d %d %d\n" % now)
            except OSError:
                return
            last = now
        await asyncio.sleep(1.0)


def main() -> None:
    die_with_parent()
    from . import logs
    from .eventloop import loop_factory
    from .config import Config
    spec = json.loads(sys.stdin.read())
    cfg = Config(home=Path(spec["home"]), values=spec["values"])
    # the engine's debug switches hold here too (debug.smtp_in traces at DEBUG level)
    logs.setup(cfg.log_dir, cfg.logging.log_retention_days, debug_any=logs.debug_any(cfg),
               program=cfg.debug.program)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            runner.run(worker_main(spec))
    except (OSError, ValueError, RuntimeError) as e:  # e.g. a broken key file, a taken port
        # one line for the engine's console and log, not a traceback; the engine keeps or
        # restarts the worker this one was to replace
        log.error("intake worker (pid %d) cannot serve: %s", os.getpid(), e)
        sys.exit(1)


if __name__ == "__main__":
    main()
