"""The running engine: wires settings, spool, SMTP intake and housekeeping under one event loop.

Start-up: lock the queue (homelock.py: one engine per queue), check file descriptors, recover
the spool (working/ back to retry/), make sure nothing else listens on the SMTP port, bind it,
then run until SIGTERM, Ctrl-C or `mailengine shutdown` (mailq/retry/shutdown.txt). A clean stop
stops accepting, lets messages being stored finish, and leaves every unfinished message in retry/.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import signal
import time
from typing import Callable

from .queue_dirs import DONE, INCOMING, RETRY, WORKING
from . import NAME, __version__, diskwatch, filemodes, hostname, logs, shared, tls
from .backlog import HELD, Backlog, due_time
from .config import Config
from .control import ControlServer
from .delivery import DeliveryEngine
from .envelope import InfError, Message
from .eventloop import loop_factory
from .homelock import HomeLock
from .inbound import InboundServer
from .intake import Intake
from .ledger import Ledger
from .notices import Notices
from .policy import Policy
from .spool import Spool
from .suppression import FILE as SUPPRESSION_FILE
from .stats import Stats
from .users import PasswordFile
from .web.server import WebServer
from .webhooks import Webhooks
from .workers import WorkerPool, read_envelope

log = logging.getLogger("mailengine")

SHUTDOWN_FILE = "shutdown.txt"
SHUTDOWN_POLL_SECONDS = 0.5
BACKLOG_CHECK_SECONDS = 0.5  # how often the backlog is looked at for mail due and room for it
BACKLOG_BATCH = 500  # messages loaded (or put back on disk) between two looks at the event loop
# A message waiting in memory for a retry further away than this gives its place to backlog mail
# that is due now when memory is full.
EVICT_HORIZON = 60.0
INDEX_SLICE = 50_000  # backlog index lines read between two looks at the event loop
BACKLOG_RETRY_SECONDS = 5.0  # backlog mail that could not be read for a file system error
FD_WARNING = ("Warning: you are out of file descriptors. Performance may be very poor until you "
              "increase them. Try lowering the number of mail sends.")


def check_file_descriptors(cfg: Config) -> int:
    """Raise the soft fd limit as far as allowed; warn (in the manual's words) if still short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    need = cfg.limits.max_outbound_connections + cfg.limits.max_inbound_connections + 64
    if soft < need:
        log.warning(FD_WARNING)
    return soft


def make_dkim_signer(engine: "Engine"):
    """The DKIM signer (dkim.py) when `dkim.signing_table` has entries, else None. Its keys are
    loaded here; their problems are logged when the engine starts (and shown in the admin).
    The signature of each message is kept in ID.dkim beside ID.dat, moved and deleted with it."""
    if not engine.cfg.values.get("dkim.signing_table"):
        return None
    from .dkim import DKIMSigner
    signer = DKIMSigner.from_config(engine.cfg)
    engine.spool.side_files = (".dkim",)
    return signer


class Engine:
    def __init__(self, cfg: Config, test_mode: bool = False, lock: HomeLock | None = None):
        self.cfg = cfg
        self.test_mode = test_mode
        self.lock = lock  # this queue's lock (taken by run() when the caller did not)
        self.hostname = hostname.host_name(cfg)
        self.spool = Spool(cfg.mailq(test_mode), durable=cfg.queue.relay_via_disk,
                           hostname=self.hostname)
        self.incoming = self.spool  # local mail goes to mailq/incoming of the same spool
        self.users = PasswordFile(cfg.password_file)
        self.policy = Policy(cfg, self.users)
        self.stats = Stats()
        # every queued message this engine knows: in memory, or on disk only (the backlog,
        # beyond limits.messages_in_memory); ledger.py
        self.ledger = Ledger()
        self.queue_commands = asyncio.Lock()  # one queue command at a time (queueops.py)
        self.stopping = asyncio.Event()
        self.inbound: InboundServer | None = None
        self.workers: WorkerPool | None = None
        self.intake = Intake(cfg, self.spool, self.hostname, self.stored,
                             relay_dir=self.relay_dir)
        # events posted to webhooks.urls (webhooks.py): captured after each attempt, then sent
        self.webhooks = Webhooks(cfg, test_mode)
        # after each send attempt: lists, event log, DSNs, delivery reports (notices.py)
        self.notices = Notices(self)
        self.diskwatch = diskwatch.for_engine(self)  # low disk space: 452 4.3.1 and an alert
        self.log_retention_days = cfg.logging.log_retention_days  # the daily files' (logs.setup)
        self.dkim = make_dkim_signer(self)  # None unless dkim.signing_table has entries
        self.delivery = DeliveryEngine(self)
        # started after the SMTP listener (`await start()`), stopped before delivery
        self.services = [ControlServer(self), WebServer(self)]
        if cfg.unsubscribe.listen:  # the public one-click unsubscribe listener (aiohttp)
            from .unsubscribe_web import UnsubscribeListener
            self.services.append(UnsubscribeListener(self))

    # --- intake ----------------------------------------------------------------------------------

    def stored(self, relayed: Message | None, local: bool, where: str = RETRY,
               data: bytes | None = None) -> None:
        """A message is safely in the spool (stored by this process or an intake worker)."""
        if relayed is not None:
            if logs.tracing():
                logs.PROGRAM.debug("stored %s in %s/: %d recipients, %d bytes", relayed.id, where,
                                   len(relayed.rcpt_to_send), relayed.size)
            self.take(relayed, where, data)
        self.stats.received(local=relayed is None)

    def apply_settings(self) -> list[str]:
        """Hand changed settings (web admin, `config set`) to the parts that copied them at
        start; returns notes for the operator. Parts that read `self.cfg` when they need a value
        see a change without this."""
        cfg = self.cfg
        # network.helo_text: the greeting, Received: lines, notices and delivery's EHLO
        self.hostname = self.intake.hostname = hostname.host_name(cfg)
        self.spool.durable = cfg.queue.relay_via_disk  # how this process stores from now on
        self.diskwatch.set_threshold(cfg.basic.min_free_disk_mb)
        if cfg.logging.log_retention_days != self.log_retention_days:  # run() set the logs up
            self.log_retention_days = cfg.logging.log_retention_days
            for f in logs.set_retention(cfg.log_dir, self.log_retention_days):
                log.debug("removed the old log file %s", f)
        self.policy.reload(cfg)
        if self.inbound is not None:
            self.inbound.apply(cfg, self.hostname)
        self.delivery.apply(cfg)
        logging.getLogger("mailengine").setLevel(logging.DEBUG if logs.debug_any(cfg) else logging.INFO)
        logs.program_trace(cfg.debug.program)
        if self.workers and self.workers.apply(cfg):
            return ["the intake processes are restarted with the new settings; sessions in "
                    "progress finish under the old ones"]
        return []

    # --- messages in memory (limits.messages_in_memory) -------------------------------------------

    def has_room(self) -> bool:
        return self.ledger.in_memory < self.cfg.limits.messages_in_memory

    def take(self, msg: Message, where: str, data: bytes | None = None) -> bool:
        """Hand a queued message to delivery, or keep it on disk only (the backlog) when memory
        holds `messages_in_memory` already: it is loaded when it is due and there is room."""
        # Stopping: delivery takes nothing more; the message waits in the backlog, so the index
        # written at the stop has it.
        stopping = self.stopping.is_set()
        keep_on_disk = stopping or not self.has_room()
        if keep_on_disk and where == WORKING and stopping:
            # a clean stop leaves waiting mail in retry/, where the index it writes says
            try:
                self.spool.move(msg.id, WORKING, RETRY)
                where = RETRY
            except OSError as e:
                log.warning("%s: cannot move it back to retry/ (%s); kept in memory", msg.id, e)
        if keep_on_disk and (where == RETRY or not stopping):
            # Relayed mail stored into working/ (relay_dir, intake processes) while memory is
            # full stays there: a rename out and one back in for each message of a queue larger
            # than memory cost the event loop ~100 us a message (ledger.disk_where).
            ledger = self.ledger
            if not ledger.backlog and not stopping:
                log.info("%d messages in memory (limits.messages_in_memory): further mail waits "
                         "on disk until it is due and there is room", ledger.in_memory)
            ledger.keep_on_disk(msg.id, due_time(msg), where)
            if logs.tracing():
                logs.PROGRAM.debug("%s waits on disk only (memory full)", msg.id)
            return False
        self.delivery.submit(msg, where, data)
        return True

    async def _load_backlog(self) -> None:
        """Backlog mail that is due comes into memory while there is room, earliest first; when
        memory is full, messages waiting there for a later retry make room for it."""
        while True:
            try:
                while await self._load_backlog_batch():
                    await asyncio.sleep(0)  # SMTP and delivery go on between batches
            except OSError as e:  # a loop of the TaskGroup: never a reason to stop the engine
                log.error("cannot load queued mail from %s: %s", self.spool.root / RETRY, e)
            await asyncio.sleep(BACKLOG_CHECK_SECONDS)

    def backlog_messages(self):
        """(id, Message) of each backlog message, read from its files (queue commands); those
        gone or unreadable meanwhile are left out."""
        ledger = self.ledger
        for mid in ledger.backlog:
            try:
                yield mid, self.spool.load(mid, ledger.disk_where(mid))
            except (OSError, InfError):
                continue

    def withdraw_from_backlog(self, msg: Message) -> None:
        """A queue command changes a backlog message: in memory, taken out (so nothing takes,
        sends or evicts it meanwhile) until take() puts it back, or it is deleted."""
        ledger = self.ledger
        ledger.take_out(ledger.admit(msg, ledger.disk_where(msg.id)))

    async def _load_backlog_batch(self) -> bool:
        """One batch; True when there may be more to do at once."""
        d, ledger = self.delivery, self.ledger
        backlog = ledger.backlog
        if d is None or not backlog or self.stopping.is_set():
            return False
        now = time.time()
        first = backlog.next_due()
        if first is None or first > now:
            return False
        room = self.cfg.limits.messages_in_memory - ledger.in_memory
        if room <= 0:
            # a tenth of memory per walk over it, at least a batch
            room = d.evict(max(BACKLOG_BATCH, ledger.in_memory // 10), now + EVICT_HORIZON)
            if not room:
                return False
        ids = backlog.pop_due(now, min(room, BACKLOG_BATCH))
        for i, mid in enumerate(ids):
            if mid in ledger.entries:
                continue
            where = ledger.disk_where(mid)
            try:
                msg = self.spool.load(mid, where)
            except FileNotFoundError:
                ledger.finish(mid)
                continue  # removed by hand (or by a queue command) meanwhile
            except InfError:
                ledger.finish(mid)
                if where == WORKING:  # nothing looks in working/ before the next start
                    try:
                        self.spool.move(mid, WORKING, RETRY)
                    except OSError:
                        pass
                continue  # broken: the drop-in scan reports it and leaves it in place
            except OSError:
                # the file system fails now (out of descriptors, EIO): this one and the rest of
                # the batch wait in the backlog; the loop logs it and looks again later
                for rest in ids[i:]:
                    backlog.add(rest, now + BACKLOG_RETRY_SECONDS)
                raise
            self.take(msg, where)
        return bool(ids)

    def relay_dir(self) -> str:
        """Relayed mail goes straight to working/ when this engine will send it at once."""
        if not self.cfg.queue.pause_sending and self.has_room():
            return WORKING
        return RETRY

    def inbound_counts(self) -> dict:
        """Open SMTP sessions and totals, whichever processes take SMTP."""
        if self.inbound is not None:
            return {**self.inbound.counts(), "processes": 1}
        if self.workers is not None:
            return self.workers.inbound_counts()
        return {"open": 0, "sessions_total": 0, "refused_busy": 0, "processes": 0}

    def worker_stored(self, line: str) -> None:
        """A notification line from an intake worker: 'W <id> <envelope>' (in working/),
        'R <id> <envelope>' (in retry/) or 'L' (local mail only); workers.envelope_line. Without
        a readable envelope the `.inf` is read."""
        kind, _, rest = line.partition(" ")
        msg_id, _, payload = rest.partition(" ")
        if kind == "L":
            self.stats.received(local=True)
        elif kind in ("R", "W") and msg_id:
            if msg_id in self.ledger:  # the drop-in scan saw the files first
                self.stats.received(local=False)
                return
            where = WORKING if kind == "W" else RETRY
            msg = read_envelope(payload) if payload else None
            if msg is not None and msg.id == msg_id:
                self.stored(msg, False, where)
                return
            try:
                msg = self.spool.load(msg_id, where)
            except (OSError, InfError) as e:
                log.warning("intake worker stored %s, but it cannot be read: %s", msg_id, e)
                if where == WORKING:  # nothing looks in working/ before the next start
                    try:
                        self.spool.move(msg_id, WORKING, RETRY)  # the drop-in scan does
                    except OSError:
                        pass
                return
            self.stored(msg, False, where)

    async def _read_index(self, lines: list[str]) -> None:
        """The backlog index of the last clean stop, once SMTP answers: in slices, so sessions
        are served meanwhile (a million lines take about a second)."""
        ledger = self.ledger
        for i in range(0, len(lines), INDEX_SLICE):
            # A held message's .inf is read once all the same: a release on the files while the
            # engine was stopped may have rewritten it in place, which the index cannot see.
            ledger.backlog.add_many((mid, 0.0 if due == HELD else due) for mid, due in
                                    Backlog.parse_index(lines[i:i + INDEX_SLICE])
                                    if mid not in ledger.entries)
            await asyncio.sleep(0)
        log.info("queue: %d messages waiting in %s (from the index of the last stop)",
                 ledger.total, self.spool.root / RETRY)

    def save_backlog_index(self) -> None:
        """At a clean stop: when each queued message is due (backlog.py), so that the next
        start reads no .inf before it delivers."""
        if self.delivery is None:
            return
        backlog = self.ledger.backlog
        entries = [(mid, backlog.due(mid)) for mid in backlog]
        entries += [(mid, due_time(e.msg)) for mid, e in self.ledger.entries.items()]
        try:
            n = Backlog.save(self.spool.root, entries)
        except OSError as e:
            log.warning("cannot write the queue index (the next start reads every .inf): %s", e)
            return
        log.debug("queue index: %d messages", n)

    # --- housekeeping loops ----------------------------------------------------------------------

    async def _watch_shutdown_file(self) -> None:
        path = self.spool.root / RETRY / SHUTDOWN_FILE
        while not self.stopping.is_set():
            if path.exists():
                log.info("found %s: shutting down", path)
                path.unlink(missing_ok=True)
                self.stopping.set()
                return
            await asyncio.sleep(SHUTDOWN_POLL_SECONDS)

    async def _print_stats(self) -> None:
        while True:
            await after_setting(lambda: self.cfg.logging.stats_interval)
            for line in self.stats.lines():
                log.info("%s", line)  # console and daily file, stamped by the log format

    async def _scan_dropins(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.queue.queue_check_interval)
            # A loop of the TaskGroup: an exception would stop the whole engine (EMFILE)
            try:
                await self.rescan()
            except OSError as e:
                log.error("cannot scan %s for dropped-in mail: %s", self.spool.root / RETRY, e)

    async def rescan(self) -> int:
        """Scan retry/ for mail dropped in (queue commands: it is part of "all"); the listing
        runs in a thread: retry/ of a long queue holds millions of names."""
        found = await asyncio.get_running_loop().run_in_executor(
            None, self.spool.scan_dropins, self.ledger)
        return self._take_dropins(*found)

    def scan_dropins(self) -> int:
        """rescan() in the caller's thread (tests, and code outside the event loop)."""
        return self._take_dropins(*self.spool.scan_dropins(self.ledger))

    async def read_backlog(self, wanted=None) -> dict[str, Message]:
        """The backlog's messages read from their files in a thread (a queue command over a long
        queue reads many), those `wanted(msg)` says; only those still in the backlog."""
        def read() -> dict[str, Message]:
            return {mid: m for mid, m in self.backlog_messages() if wanted is None or wanted(m)}
        found = await asyncio.get_running_loop().run_in_executor(None, read)
        return {mid: m for mid, m in found.items() if mid in self.ledger.backlog}

    def _take_dropins(self, found: list[Message], warnings: list[str]) -> int:
        for w in warnings:
            log.warning("%s", w)
        taken = 0
        for msg in found:
            if msg.id in self.ledger:
                continue  # taken meanwhile (the scan ran in a thread)
            log.info("picked up dropped-in message %s for %d recipients", msg.id,
                     len(msg.rcpt_to_send))
            if self.take(msg, RETRY):
                taken += 1
        return taken

    async def _expire(self) -> None:
        minutes = 0
        while True:
            await asyncio.sleep(60)
            try:
                if self.cfg.queue.save_incoming:
                    self.spool.expire(INCOMING, self.cfg.queue.incoming_retention_minutes)
                if self.cfg.queue.save_done:
                    self.spool.expire(DONE, self.cfg.queue.done_retention_minutes)
            except OSError as e:  # a loop of the TaskGroup: never a reason to stop the engine
                log.error("cannot remove old mail from done/ or incoming/: %s", e)
            minutes += 1
            if minutes % 60 == 0:  # a quiet engine opens no new log file: prune here too
                for f in logs.prune(self.cfg.log_dir, self.cfg.logging.log_retention_days):
                    log.debug("removed the old log file %s", f)
                await self._purge_suppressions()

    async def _purge_suppressions(self) -> None:
        """Expired suppression entries count for nothing already: removed hourly to save room."""
        if not (self.cfg.home / SUPPRESSION_FILE).exists():
            return
        try:
            n = await asyncio.to_thread(self.policy.suppression.purge_expired)
        except Exception:
            log.exception("cannot remove expired entries from the suppression list")
            return
        if n:
            log.info("suppression list: %d expired entries removed", n)

    def queue_lines(self) -> list[str]:
        """`debug.queue_size` / `debug.queue_memory`: what the queue holds now."""
        ledger = self.ledger
        out = []
        if self.cfg.debug.queue_size:
            out.append(f"queue: {ledger.total} messages queued, {ledger.sending} being delivered")
        if self.cfg.debug.queue_memory:
            bodies = sum(e.attempt.body.size for e in list(ledger.entries.values())
                         if e.attempt is not None and e.attempt.body is not None)
            try:
                with open("/proc/self/statm") as f:
                    rss = int(f.read().split()[1]) * resource.getpagesize()
            except (OSError, ValueError, IndexError):
                rss = 0
            out.append(f"queue memory: {bodies // 1024} KB of mail being sent, "
                       f"process {rss // 1048576} MB")
        return out

    async def _log_queue(self) -> None:
        """Log the queue lines every stats_interval (10 s when that is off), when they change."""
        def interval() -> float:
            d = self.cfg.debug
            return (self.cfg.logging.stats_interval or 10) if d.queue_size or d.queue_memory else 0

        last: list[str] = []
        while True:
            await after_setting(interval)
            lines = self.queue_lines()
            first = lines[:1]
            if first != last[:1]:  # the size moved (memory alone changes all the time)
                for line in lines:
                    log.info("%s", line)
            last = lines

    # --- life cycle ------------------------------------------------------------------------------

    async def run(self, ready: asyncio.Event | None = None) -> None:
        cfg = self.cfg
        if self.lock is None:  # before anything touches the queue; raises homelock.Held
            self.lock = HomeLock.acquire(cfg.home, self.test_mode)
        for w in cfg.warnings:
            log.warning("config: %s", w)
        log.info("%s %s starting in %s%s", NAME, __version__, cfg.home,
                 " (TEST MODE: mailq-test, nothing is really sent)" if self.test_mode else "")
        check_file_descriptors(cfg)
        unqualified = hostname.unqualified_warning(cfg)
        if unqualified:
            log.warning("%s", unqualified)
        if self.dkim is not None:
            for line in self.dkim.problems():
                log.warning("%s", line)
            usable = sorted({r["domain"] for r in self.dkim.dns_records() if r["record"]})
            if usable:
                log.info("DKIM: signing mail of %s", ", ".join(usable))
        self.spool.ensure_dirs()
        self.diskwatch.check()  # refuse from the first connection if the disk is already low
        # A request left over from a stop that happened otherwise must not stop this run.
        (self.spool.root / RETRY / SHUTDOWN_FILE).unlink(missing_ok=True)
        # No .inf is read here: the messages in retry/ go to the backlog, due when the index of
        # the last clean stop says (it is read once SMTP answers), else now, and are loaded as
        # memory allows.
        index = Backlog.take_index(self.spool.root)  # before recovery changes retry/
        report = self.spool.recover(load=False, retry_known=index is not None)
        for w in report.warnings:
            log.warning("%s", w)
        for msg in report.messages:
            self.take(msg, RETRY)
        self.ledger.backlog.add_many((mid, 0.0) for mid in report.ids)
        if index is None:
            log.info("queue: %d messages waiting in %s",
                     len(report.messages) + len(report.ids), self.spool.root / RETRY)

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        # The control socket and the web admin first: once SMTP answers, they answer too.
        for service in self.services:
            await service.start()
        # before SMTP: mail taken from the first session on is sent at once
        await self.delivery.start_processes()
        if cfg.network.smtp_port != 1:
            ctx = tls.server_context(cfg.home, cfg.network.tls_cert, cfg.network.tls_key,
                                     self.hostname)
            # One intake process: this one. Several: that many worker processes, and this one
            # only delivers (and runs the admin, drop-ins, notices): sharing a process and its
            # interpreter lock with intake cost delivery a third of its speed in bench/relay.
            n = cfg.intake_processes
            inbound = InboundServer(cfg, self.policy, self.intake.on_message, ctx,
                                    auth_available=True, hostname=self.hostname,
                                    reuse_port=n > 1)
            bound = await inbound.start(serve=n == 1)  # errors such as "port in use" show here
            if n == 1:
                self.inbound = inbound
                for host, port in bound:
                    log.info("accepting SMTP on %s port %d", host, port)
            else:
                self.workers = WorkerPool(cfg, self.test_mode, n, self.worker_stored)
                await self.workers.start()
                log.info("accepting SMTP on %s in %d intake processes",
                         ", ".join(f"{h} port {p}" for h, p in bound), n)
        else:
            log.info("SMTP intake is off (network.smtp_port = 1)")
        if index is not None:
            await self._read_index(index)
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c()) for c in (
                self._watch_shutdown_file, self._print_stats, self._scan_dropins, self._expire,
                self.diskwatch.run, self._log_queue, self._load_backlog, self.delivery.run,
                self.webhooks.run)]
            if ready is not None:
                ready.set()
            await self.stopping.wait()
            log.info("stopping: no new connections; finishing messages in flight")
            if self.inbound:
                await self.inbound.stop()
            for service in reversed(self.services):
                await service.stop()
            if self.workers:
                await self.workers.stop()
            await self.delivery.stop()  # unfinished mail is left in retry/
            await self.webhooks.stop()  # captured events committed; posting stops
            for t in tasks:
                t.cancel()
        for line in self.stats.lines():
            log.info("%s", line)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        self.spool.close()  # finishes pending flushes, stops the flusher thread
        self.save_backlog_index()  # last: it holds while nothing changes retry/ after it
        self.notices.close()  # its files; the delivered counts of the complaint rates saved
        shared.close_list_mirrors()  # the bounce lines not yet in Redis (for at most 2 s)
        log.info("stopped cleanly; unfinished mail stays in %s", self.spool.root / RETRY)
        self.lock.release()


async def after_setting(seconds: Callable[[], float]) -> None:
    """Wait `seconds()` (a setting's interval), read again each second so that a change made
    while running counts at once; while it is 0 (off), wait until it is turned on."""
    waited = 0.0
    while True:
        wanted = seconds()
        if wanted <= 0:
            waited = 0.0
            await asyncio.sleep(1.0)
            continue
        if waited >= wanted:
            return
        step = min(1.0, wanted - waited)
        await asyncio.sleep(step)
        waited += step


def run(cfg: Config, test_mode: bool = False, lock: HomeLock | None = None) -> None:
    """Run the engine in the foreground until it is stopped. Raises homelock.Held when another
    engine runs on the same queue (`lock`: the lock when the caller took it already)."""
    if lock is None:
        lock = HomeLock.acquire(cfg.home, test_mode)
    filemodes.restrict(cfg, test_mode)  # the queue and the logs: the engine's user only
    logs.setup(cfg.log_dir, cfg.logging.log_retention_days,
               debug_any=logs.debug_any(cfg), program=cfg.debug.program)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(Engine(cfg, test_mode, lock).run())
