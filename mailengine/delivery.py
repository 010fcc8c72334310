"""The delivery engine: the asyncio side that takes ready mail out to the world (SPEC 5).

    engine.delivery = DeliveryEngine(engine)   # app.Engine does it
    delivery.submit(msg, "retry")              # recovered, relayed, or dropped-in mail
    await delivery.run()                       # until stop()
    await delivery.stop()                      # unfinished mail stays in retry/

The flow of one send attempt of one message:

1. The scheduler (scheduler.py) releases the message when its `retrytime` comes and splits it by
   recipient domain into units (one SMTP transaction each), handed out round-robin within the
   caps: `max_outbound_connections` running units, each destination within its concurrency
   window (throttle.py), nothing while `queue.pause_sending`.
2. When its first unit starts, the message moves `retry/` -> `working/` (it stays there, whole,
   while any part of it is being delivered; a crash leaves it to start-up recovery).
3. Each unit resolves its domain (dns.py: bypass entries, MX, implicit MX, null MX; never this
   engine's own SMTP address nor hosts it prefers less: "loops back to myself", loops.py), takes a
   connection to the best host from the pool (kept and reused per host; at most
   `max_connections_per_host` per server and `max_outbound_connections` in all, idle ones
   included), and runs one transaction for all its recipients (smtp_session.py). What follows
   each reply is verdict.py's call, carried out here: a connection failure, a refused greeting,
   a 421 or a lost connection moves on to the next MX host; so do the recipients a server
   refuses with a 4xx at MAIL, RCPT, DATA or the end of data (as Postfix does: they are kept for
   a retry only when every MX host refused them).
4. When the message's last unit ends, attempt_end.py records the attempt in the message
   (outcome.py), writes its log lines and notices, and moves its files: everything done ->
   `done/` (`save_done`) or deleted; recipients left -> `ID.inf` rewritten and the message back
   in `retry/`, its timer set to the new `retrytime`.

What goes out (Received:, DKIM signatures, List-Unsubscribe copies per recipient, 7-bit
re-encoding) is bodies.py's; the queue's record of each message is the ledger's (ledger.py).
Test mode (`mailengine test`) says RSET and QUIT where DATA would go.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from .queue_dirs import RETRY, WORKING
from .attempt import Attempt
from .backlog import due_time
from .ledger import Entry
from .config import AddressSet
from .dkim import DKIMHold
from .deliverers import Deliverers, ProcessGone, RemoteSession
from .dns import MXResolver, Target
from .pool import Pool, pool_key
from .attempt_end import AttemptEnd
from .bodies import Bodies
from .envelope import Message
from .dsn import GENERATED_KEY
from .loops import Listeners
from .bounces import verp_encode
from .outcome import Kind, RcptOutcome, failure_outcomes
from .scheduler import Scheduler, Unit, domain_of
from .shaping import Shaping
from .shaping_link import ShapingLink
from .sources import Source, Sources, WarmupHold
from .sources_link import SourcesLink
from .pool_header import INF_KEY as POOL_KEY
from .smtp.client import Body, DSNRequest
from .smtp_session import ConnectError, SMTPSession
from .suppression import FILE as SUPPRESSION_FILE
from . import logs
from .shared import CUT_POLL
from .throttle import HourlyNotice, Windows, bandwidth_bucket, send_rate_bucket
from .unsubscribe import HeaderMaker
from . import verdict
from .verdict import Action, Fate, Signal, Step

if TYPE_CHECKING:
    from .app import Engine

log = logging.getLogger("mailengine.delivery")

STOP_GRACE = 5.0          # s: transactions in flight at a stop get this long to finish
HOST_DOWN = 10.0          # s: a host that refused a connection is tried last for this long
MAX_SLEEP = 1.0           # s: the send loop looks at its timers at least this often
INITIAL_WINDOW = 5        # connections a new destination starts with (slow start)
MX_MEMO = 1.0             # s: a destination's MX answer is reused this long without asking
MAX_PROBES = 100          # MX lookups of new domains at once (shaping: a provider?, _probe)


class DeliveryEngine:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        cfg = self.cfg = engine.cfg
        self.spool = engine.spool
        self.test_mode = engine.test_mode
        self.helo = cfg.network.helo_text or engine.hostname
        lim = cfg.limits
        self.resolver = MXResolver.from_config(cfg)
        self.refused = AddressSet(cfg.policy.refused_mail_servers)
        self.listeners = Listeners(cfg)  # our own SMTP addresses: never delivered to (loops.py)
        self.windows = Windows(lim.max_connections_per_host,
                               min(INITIAL_WINDOW, lim.max_connections_per_host))
        # traffic shaping per provider (shaping.py): a provider's domains share one destination
        self.shaping = Shaping.from_home(cfg.home)
        # sending sources and their pools (sources.py), from the same file
        self.sources = Sources.from_home(cfg.home)
        self.shaping.set_per_source(len(self.sources.rules.sources))
        self._source_freed: asyncio.Event | None = None  # set when a unit leaves a source
        self._rdns: asyncio.Task | None = None  # the sources' reverse DNS check (_rdns_later)
        self.sched = Scheduler(time.time, limit=self._limit, dest_of=self.shaping.dest,
                               max_active=lim.max_outbound_connections)
        self.sched.paused = cfg.queue.pause_sending
        self.shared = None
        if cfg.shared.redis_url:
            from .shared import SharedLimits
            self.shared = SharedLimits(cfg.shared.redis_url, cfg.shared.key_prefix)
        # suspensions kept across restarts, shared with other engines, and so are its rates
        self.shaping_link = ShapingLink(self.shaping, cfg.home, self.shared, self.test_mode)
        self.sources_link = SourcesLink(self.sources, self.shared)  # warm-up counts, shared
        self.pool = Pool(lim.max_outbound_connections, lim.max_connections_per_host,
                         self._new_session, self.shared)
        # network.delivery_processes: the sessions run there, every decision stays here
        n = cfg.delivery_process_count
        self.deliverers = (Deliverers(n, cfg.log_dir, cfg.logging.log_retention_days)
                           if n > 1 else None)
        self.rate = send_rate_bucket(lim.max_send_rate)
        self.bandwidth = bandwidth_bucket(lim.max_bandwidth)
        self.rate_notice = HourlyNotice()
        self.debug_out = cfg.debug.smtp_out
        self.debug_loop = cfg.debug.send_loop
        # what goes out: Received:, DKIM, List-Unsubscribe per recipient, 7-bit (bodies.py)
        self.bodies = Bodies(engine, HeaderMaker.from_config(cfg), self.deliverers is not None)
        # the queue in memory and on disk only (ledger.py): shared with app.Engine
        self.ledger = engine.ledger
        self.ledger.cache_limit = cfg.limits.max_queue_memory_kb * 1024  # bodies from intake
        self.host_down: dict[tuple[str, int], float] = {}
        self._evictable = True  # memory may hold held or later-due mail (evict)
        self.sent = 0  # recipients delivered (also in engine.stats)
        self._tasks: set[asyncio.Task] = set()
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._running = False
        # what an attempt's outcomes do to the message: records, notices, files (attempt_end.py)
        self.ends = AttemptEnd(engine, self.ledger, self.shaping, self.bodies)
        self._mx_memo: dict[str, tuple] = {}  # dest -> (MXResult, until)
        self._dest_hosts: dict[tuple, set] = {}  # (dest, source) -> its servers (_within_cap)
        self._unknown: set[str] = set()  # domains whose MX rollup is to be learnt (_limit)
        self._probing: set[str] = set()  # ... and being looked up now (_probe)
        self._suppression_seen = False  # HOME/suppression.db exists (_suppressed_since)

    # -- the interface app.py uses ----------------------------------------------------------------

    def submit(self, msg: Message, where: str = RETRY, data: bytes | None = None) -> None:
        """A message waiting in `where`: deliver it at its `retrytime` (or now).

        `where` is RETRY, or WORKING for relayed mail that intake stored straight into
        working/ (SPEC 4, relay_via_disk): its first attempt then needs no move. A message in
        working/ must be due now (nothing else would find it there before the next start).
        `data`: the bytes of ID.dat when the caller has them in memory (intake just stored
        them): the first attempt then does not read the file (kept within
        `limits.max_queue_memory_kb`; beyond it, the file is read as usual)."""
        ledger = self.ledger
        e = ledger.get(msg.id)
        if e is not None and e.attempt is not None:
            return  # being sent: its attempt owns it
        if self._stopping:
            if where == WORKING:
                try:  # stored during a stop: a clean stop leaves unfinished mail in retry/
                    self.spool.move(msg.id, WORKING, RETRY)
                except OSError as err:
                    log.warning("%s: stays in working/ until the next start: %s", msg.id, err)
                    ledger.stuck(msg.id)
                    return
            ledger.keep_on_disk(msg.id, due_time(msg))  # in the index the stop writes
            return
        if where not in (RETRY, WORKING):
            raise ValueError(f"the delivery engine takes messages from retry/ or working/, "
                             f"not {where}/")
        e = ledger.admit(msg, where)
        if data is not None and not msg.held and msg.rcpt_to_send:
            ledger.keep_data(e, data)
        self._schedule(e)

    def _schedule(self, e: Entry) -> None:
        """A message in memory waits for its `retrytime` (None = now); a held one is kept,
        known, never sent until released; one with nothing left to send is finished."""
        msg = e.msg
        if msg.held:
            self._evictable = True
            return
        if not msg.rcpt_to_send:
            self.ends.finish_idle(e)
            return
        due = msg.retry_time.timestamp() if msg.retry_time is not None else None
        if due is not None and due > time.time():
            self._evictable = True
        self.sched.add(msg.id, msg.rcpt_to_send, msg.priority, due)
        self._kick()

    def apply(self, cfg) -> None:
        """Take the settings that may change while running (web admin, `config set`)."""
        self.set_paused(cfg.queue.pause_sending)
        self.debug_out = cfg.debug.smtp_out
        self.debug_loop = cfg.debug.send_loop
        self.refused = AddressSet(cfg.policy.refused_mail_servers)
        # the resolver filters the same list: one left behind would bounce mail for a server
        # that was just taken off it ("all mail servers ... are in refused_mail_servers")
        self.resolver.refused_ips = self.refused
        self.resolver.debug = cfg.debug.dns
        if self.resolver.set_bypass(cfg.basic.dns_servers):
            self._mx_memo.clear()  # a destination pinned elsewhere now: ask again at once
        self.ledger.cache_limit = cfg.limits.max_queue_memory_kb * 1024  # bodies from intake
        if getattr(self.rate, "rate", None) != cfg.limits.max_send_rate:
            self.rate = send_rate_bucket(cfg.limits.max_send_rate)
        if getattr(self.bandwidth, "rate", None) != cfg.limits.max_bandwidth:
            self.bandwidth = bandwidth_bucket(cfg.limits.max_bandwidth)
        self.helo = cfg.network.helo_text or self.engine.hostname
        self.bodies.unsub = HeaderMaker.from_config(cfg)
        lim = cfg.limits  # the connection caps: lowered, connections beyond them are not reused
        self.sched.max_active = lim.max_outbound_connections
        self.windows.set_maximum(lim.max_connections_per_host)
        self.pool.set_caps(lim.max_outbound_connections, lim.max_connections_per_host)

    async def start_processes(self) -> None:
        """network.delivery_processes: start them (before run(); app.py does it before SMTP)."""
        if self.deliverers is not None and not self.deliverers.current:
            await self.deliverers.start()
            await self.spool.start_recycler()  # delivered mail's files removed there
            log.info("delivering through %d delivery processes", self.deliverers.count)

    def set_paused(self, paused: bool) -> None:
        """`queue.pause_sending`: mail waits in retry/; turning it off releases everything."""
        self.sched.paused = paused
        self._kick()

    async def run(self) -> None:
        self._wake = asyncio.Event()
        self._running = True
        loop = asyncio.get_running_loop()
        await self.start_processes()  # unless started already
        if self.cfg.basic.preload_domains:
            self._spawn(self.resolver.preload(self.cfg.basic.preload_domains))
        next_sweep = loop.time() + 1
        next_tidy = loop.time() + 60
        next_cuts = loop.time()
        polling: asyncio.Task | None = None
        self._rdns_later()
        while not self._stopping:
            if self.shared is not None and loop.time() >= next_cuts and \
                    (polling is None or polling.done()):
                polling = self._spawn(self._adopt_cuts())
                next_cuts = loop.time() + CUT_POLL
            for dest in self.shaping.tick():  # a suspension over, a throttle easing
                self.sched.recheck(dest)
            self.sched.release_due()
            while (u := self.sched.next_unit()) is not None:
                self._start_unit(u)
            if self._unknown and not self.sched.paused:  # never a lookup while paused
                self._unknown -= self._probing
                while self._unknown and len(self._probing) < MAX_PROBES:
                    domain = self._unknown.pop()  # the rest wait: a resolver flooded fails
                    self._probing.add(domain)
                    self._spawn(self._probe(domain))
            now = loop.time()
            if now >= next_sweep:
                self.pool.sweep(now)
                self.shaping.reload_if_changed()  # HOME/shaping.toml edited
                if self.sources.reload_if_changed():
                    self._rdns_later()
                self.shaping.set_per_source(len(self.sources.rules.sources))  # none: 1
                self.sources.save()  # the day's warm-up counts, when they changed
                next_sweep = now + 1
                if now >= next_tidy:
                    self._tidy()
                    next_tidy = now + 60
            due = self.sched.next_due()
            sleep = MAX_SLEEP if due is None else min(MAX_SLEEP, max(0.0, due - time.time()))
            self._wake.clear()
            if sleep > 0:
                try:
                    async with asyncio.timeout(sleep):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    def _back_to_retry(self, ids: list[str]) -> list[str]:
        """In a thread at a stop: working/ -> retry/ for `ids`; those moved."""
        moved = []
        for mid in ids:
            try:
                self.spool.move(mid, WORKING, RETRY)
                moved.append(mid)
            except OSError as err:
                log.warning("%s: cannot move it back to retry/: %s", mid, err)
        return moved

    def _tidy(self) -> None:
        """Forget what no longer matters (memory stays bounded with many destinations)."""
        now = time.monotonic()
        for key in [k for k, until in self.host_down.items() if until < now]:
            del self.host_down[key]
        self.windows.forget_idle(set(self.sched.destinations()))
        self._dest_hosts.clear()

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """No new work; transactions in flight get `grace` seconds; the rest stays in retry/."""
        self._stopping = True
        self._kick()
        for u in self.sched.take_ready():
            e = self.ledger.get(u.msg_id)
            att = e.attempt if e is not None else None
            if att is not None:
                att.interrupted += u.rcpts
            if self.sched.unit_done(u, ran=False) and att is not None:
                await self._finish(att)
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        for e in list(self.ledger.entries.values()):
            if e.where == WORKING and e.attempt is None:  # stored into working/, never started
                try:
                    self.spool.move(e.msg.id, WORKING, RETRY)
                    self.ledger.moved(e, RETRY)
                except OSError as err:
                    log.warning("%s: cannot move it back to retry/: %s", e.msg.id, err)
        # ... and those kept on disk only there (memory was full): in a thread, they may be many
        moved = await asyncio.get_running_loop().run_in_executor(
            None, self._back_to_retry, self.ledger.on_disk_in_working())
        for mid in moved:
            self.ledger.moved_on_disk(mid, RETRY)
        await self.pool.close_all()
        if self.deliverers is not None:
            await self.deliverers.stop()
        if self._rdns is not None:
            self._rdns.cancel()
        self.sources.save()
        if self.shared is not None:
            await self.shared.close()
        await self.resolver.aclose()
        await self.spool.recycled()  # what the recycler process was handed (remover.py)
        await asyncio.get_running_loop().run_in_executor(None, self.ends.shutdown)
        await asyncio.get_running_loop().run_in_executor(None, self.bodies.shutdown)
        left = self.ledger.in_memory
        if left:
            log.info("delivery stopped: %d messages left in retry/", left)

    # -- one unit -----------------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _host_wait(self, waiting: bool) -> bool:
        # A unit waiting for a server that other destinations share (and that is at its
        # per-host cap) holds no connection: it gives its place among the running units to
        # another destination meanwhile (up to 4 x max_outbound_connections units wait so).
        left = self.sched.set_waiting(waiting)
        if waiting and left:
            self._kick()
        return left

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _start_unit(self, u: Unit) -> None:
        e = self.ledger.entries[u.msg_id]
        att = e.attempt
        if att is None:
            msg = e.msg
            att = Attempt(msg)
            self.ledger.claim(e, att)
            try:
                if e.where == RETRY:
                    self.spool.move(msg.id, RETRY, WORKING)
                    self.ledger.moved(e, WORKING)
            except FileNotFoundError:
                log.warning("%s: its files left retry/ (removed by hand?); not sending it", msg.id)
                att.gone = True
            except OSError as err:
                log.error("%s: cannot move it to working/: %s; it stays in retry/", msg.id, err)
                att.gone = True
        if logs.tracing():
            logs.PROGRAM.debug("sending %s to %s: %d recipients, priority %d, try %d", u.msg_id,
                               u.dest, len(u.rcpts), u.priority, att.msg.send_tries + 1)
        self._spawn(self._run_unit(u, att))

    async def _run_unit(self, u: Unit, att: Attempt) -> None:
        outcomes: list[RcptOutcome] = []
        try:
            if att.gone:
                att.interrupted += u.rcpts
            else:
                outcomes = await self._deliver(u, att)
        except DKIMHold as e:  # not sent, not a try: it waits in retry/ for the key
            att.dkim_hold = e
            att.interrupted += u.rcpts
        except WarmupHold as e:  # the same: every source's warm-up budget is used today
            att.warmup_hold = max(att.warmup_hold, e.until)
            att.interrupted += u.rcpts
            if logs.tracing():
                logs.PROGRAM.debug("%s: held: %s", u.msg_id, e)
        except asyncio.CancelledError:
            att.interrupted += [a for a in u.rcpts if a not in {o.address for o in outcomes}]
        except Exception:
            log.exception("%s: delivery to %s failed unexpectedly", u.msg_id, u.dest)
            outcomes = failure_outcomes(u.rcpts, 451, "4.3.0", "Internal error while sending",
                                        "local")
        finally:
            outcomes = self._react(u, outcomes)
            att.outcomes += outcomes
            self._feedback(u.dest, outcomes)
            if self.sched.unit_done(u):
                # its place is free now: the next unit need not wait while the attempt is
                # recorded (its webhook events' commit, notices.py)
                self._kick()
                try:
                    await self._finish(att)
                except Exception:
                    # never silently: the message stays where it is (working/) until the next
                    # start's recovery puts it back in retry/
                    log.exception("%s: recording the send attempt failed", att.msg.id)
                    self.ledger.stuck(att.msg.id)
            self._kick()

    async def _resolve(self, dest: str):
        """resolver.resolve_mx, remembered for MX_MEMO seconds: a busy destination asks once
        per moment, not once per message (the resolver's own cache honours the TTLs)."""
        now = time.monotonic()
        hit = self._mx_memo.get(dest)
        if hit is not None and hit[1] > now:
            return hit[0]
        mx = await self.resolver.resolve_mx(dest)
        if len(self._mx_memo) > 10000:
            self._mx_memo.clear()
        self._mx_memo[dest] = (mx, now + MX_MEMO)
        return mx

    def _limit(self, dest: str) -> int:
        """The scheduler's limit: the destination's window within its shaping rules; 0 for a
        domain whose provider is not known yet (its MX hosts are looked up first: `_probe`)."""
        if not self.shaping.known(dest):
            self._unknown.add(dest)
            return 0
        # a provider's max_connections, not max_connections_per_host, bounds its window: its
        # connections spread over its many servers (each still under the per-host cap)
        self.windows.own_maximum(dest, self.shaping.cap(dest))
        return self.shaping.limit(dest, self.windows.limit(dest))

    async def _probe(self, domain: str) -> None:
        """Learn whether `domain` belongs to a provider before its first unit starts, so a
        mailing to a thousand domains of one provider does not open a connection per domain
        at once. The answer is remembered (MX_MEMO, the resolver's cache) for the unit."""
        hosts: list[str] = []
        try:
            mx = await self._resolve(domain)
            hosts = [t.host for t in mx.targets] if mx.ok else []
        finally:
            joined = self.shaping.learn(domain, hosts)  # failed: no provider, the unit says why
            self._probing.discard(domain)
            if joined:
                self.sched.regroup(domain, joined)
            else:
                self.sched.recheck(domain)
            self._kick()

    def _react(self, u: Unit, outcomes: list[RcptOutcome]) -> list[RcptOutcome]:
        """The unit's replies to the shaping reactions (suspend, throttle, bounce)."""
        if not outcomes:
            return outcomes
        # its provider, learnt by this very unit maybe (its dest was still the domain then)
        bounce = self.shaping.react(self.shaping.dest(u.domain), outcomes)
        if not bounce:
            return outcomes
        return [replace(o, kind=Kind.HARD, text=o.text + " (failed for good by a traffic "
                        "shaping rule)") if o.address in bounce else o for o in outcomes]

    def lift(self, dest: str):
        """`mailengine shaping lift DEST`: its suspension or throttle ends now."""
        o = self.shaping.lift(dest)
        if o is not None:
            self.sched.recheck(dest)
            self._kick()
        return o

    def _within_cap(self, dest: str, key: tuple[str, int]) -> None:
        """A unit of `dest` is about to open a connection to server `key`. The scheduler keeps
        `dest`'s running units within its max_connections, but connections kept idle to its
        other servers count too: at the cap, one of those is closed first."""
        cap = self.shaping.cap(dest)
        if cap is None:
            return
        if len(key) > 2:  # a source's connections (sources.py): its own share of the cap
            cap //= self.shaping.per_source
        hosts = self._dest_hosts.setdefault((dest, key[2:]), set())
        hosts.add(key)
        if sum(self.pool.per_host.get(k, 0) for k in hosts) >= cap:
            self.pool.drop_idle(hosts - {key})

    def _feedback(self, dest: str, outcomes: list[RcptOutcome]) -> None:
        if not outcomes:
            return
        w = self.windows.get(dest)
        signal = verdict.window_signal(outcomes)
        if signal is Signal.SUCCESS:
            w.success()
        elif signal is not Signal.NONE:
            if w.failure(signal is Signal.SITE_FAILURE):
                if self.shared is not None:
                    self.shared.publish_cut(dest, w.limit)  # the other engines follow
                if self.debug_loop:
                    log.info("%s: temporary failures, concurrency lowered to %d", dest, w.limit)

    async def _adopt_cuts(self) -> None:
        """Destinations whose concurrency another engine cut (shared.py): cut ours too."""
        for dest, limit in await self.shared.poll_cuts():
            if self.windows.get(dest).lower_to(limit):
                log.info("%s: another engine met temporary failures there; concurrency lowered "
                         "to %d here too", dest, limit)
        for dest in await self.shaping_link.poll():  # suspended, throttled or lifted there
            self.sched.recheck(dest)
            self._kick()
        await self.sources_link.poll()  # every engine's warm-up counts today

    async def _deliver(self, u: Unit, att: Attempt) -> list[RcptOutcome]:
        """One unit's outcomes, each with the attempt's duration and, in front of its
        transcript, the DNS line of the manual's transcript (for DSNs, reports, the event log)."""
        t0 = time.monotonic()
        barred = self._suppressed_since(att.msg, u.rcpts)
        if barred and len(barred) == len(u.rcpts):
            return barred
        if barred:
            gone = {o.address for o in barred}
            u = replace(u, rcpts=[r for r in u.rcpts if r not in gone])  # a copy for this call
        dest = self.shaping.dest(u.domain)  # as it was at the choice (the unit may learn more)
        src = await self._source(u, att.msg, dest) if self.sources.enabled else None
        outcomes: list[RcptOutcome] = []
        final: dict[str, RcptOutcome] = {}  # decided so far (kept when a process ends under it)
        try:
            outcomes, dns_line = await self._deliver_unit(u, att, src, final)
        except ProcessGone as e:
            # our delivery process ended, not the server's doing (deliverers.py): what was
            # decided stands, the rest is tried again shortly, no try counted, no window cut
            outcomes, dns_line = [final[a] for a in u.rcpts if a in final], ""
            att.interrupted += [a for a in u.rcpts if a not in final]
            att.process_gone = True
            log.warning("%s: %s; %d recipients of %s to be tried again", u.msg_id, e,
                        len(u.rcpts) - len(outcomes), u.dest)
        finally:
            if src is not None:
                sent = sum(o.kind is Kind.SENT for o in outcomes)
                self.sources_link.done(src, dest, len(u.rcpts), len(u.rcpts) - sent)
                if self._source_freed is not None:  # the units waiting for a place look again
                    self._source_freed.set()
                    self._source_freed = None
        took = round(time.monotonic() - t0, 3)
        if not dns_line:
            return barred + [o.timed(took, o.transcript) for o in outcomes]
        # a transaction's recipients share its transcript: the DNS line put in front once
        # for each (per recipient it cost a copy of the whole session each, n^2 for a mailing)
        head = (f"<-- {dns_line}",)
        stamped: dict[int, tuple[str, ...]] = {}

        def with_dns(o: RcptOutcome) -> tuple[str, ...]:
            if o.stage == "dns":
                return o.transcript
            t = stamped.get(id(o.transcript))
            if t is None:
                t = stamped[id(o.transcript)] = head + o.transcript
            return t
        return barred + [o.timed(took, with_dns(o)) for o in outcomes]

    def _suppressed_since(self, msg: Message, rcpts: list[str]) -> list[RcptOutcome]:
        """Recipients put on the suppression list since the message was queued (unsubscribed,
        complained, bounced elsewhere): failed for good here, never sent. An in-memory check
        (suppression.py); intake refused the ones suppressed before."""
        if not self.cfg.suppression.enabled or msg.extra.get(GENERATED_KEY):
            return []
        if not self._suppression_seen:  # no list yet: no store opened, one stat per unit
            if not (self.cfg.home / SUPPRESSION_FILE).exists():
                return []
            self._suppression_seen = True  # a list file, once made, stays
        store = self.engine.policy.suppression
        domain = domain_of(msg.mail_from) if msg.mail_from else ""
        out = []
        for r in rcpts:
            e = store.lookup(r, domain)
            if e is not None:
                out.append(RcptOutcome(r, Kind.HARD, 550, "5.7.1", f"<{r}> was put on the "
                                       f"suppression list after this message was queued "
                                       f"({e.source}: {e.reason[:200]})", "local"))
        return out

    async def _source(self, u: Unit, msg: Message, dest: str) -> Source:
        """The sending source of this unit (sources.py): its message's pool, weighted, within
        each source's warm-up budget and the provider's max_connections per source (waits for
        a place); raises WarmupHold when no source of the pool may send the provider today."""
        pool = self.sources.pool_for(msg.extra.get(POOL_KEY, ""), domain_of(msg.mail_from)
                                     if msg.mail_from else "")
        cap = self.shaping.cap(dest)
        cap = None if cap is None else cap // self.shaping.per_source
        while (src := await self.sources_link.choose(pool, dest, len(u.rcpts), cap)) is None:
            if self._source_freed is None:
                self._source_freed = asyncio.Event()
            await self._source_freed.wait()
        return src

    def _rdns_later(self) -> None:
        """The rDNS check in the background, not among the units: a stop does not wait for
        its lookups (cancelled), and a newer check replaces an older one."""
        if self._rdns is not None:
            self._rdns.cancel()
        if self.sources.enabled:
            self._rdns = asyncio.get_running_loop().create_task(self._check_rdns())

    async def _check_rdns(self) -> None:
        """Warn when a source's reverse DNS does not name its EHLO name (receivers check)."""
        for src in list(self.sources.rules.sources.values()):
            try:
                names, error = await self.resolver.resolve_ptr(src.ip)
            except Exception as e:  # a warning's lookup never stops delivery
                names, error = [], str(e)
            line = self.sources.note_rdns(src, names, error)  # kept for the web admin
            if line:
                log.warning("%s", line)

    async def _deliver_unit(self, u: Unit, att: Attempt, src: Source | None,
                            final: dict[str, RcptOutcome]) -> tuple[list[RcptOutcome], str]:
        """`final` gets each recipient's outcome as it is decided (the caller keeps it when a
        delivery process ends under the unit)."""
        msg = att.msg
        mx = await self._resolve(u.domain)
        if mx.ok and (joined := self.shaping.learn(u.domain, [t.host for t in mx.targets])):
            self.sched.regroup(u.domain, joined)  # its waiting units: under the provider's limits
            self._kick()
        if not mx.ok:  # the resolver's status: null MX, no such domain, no such MX host...
            return failure_outcomes(u.rcpts, mx.code, mx.enhanced, mx.text, "dns"), ""
        targets = [t for t in mx.targets if t.ip not in self.refused]
        if not targets:
            return failure_outcomes(u.rcpts, 550, "5.4.6", f"all mail servers of {u.dest} are "
                                    "in policy.refused_mail_servers", "dns"), ""
        ours = [t.preference for t in targets if self.listeners.is_me(t.ip, t.port)]
        if ours:  # we are one of its mail servers: only those it prefers to us (loops.py)
            targets = [t for t in targets if t.preference < min(ours)]
            if not targets:
                return failure_outcomes(u.rcpts, 554, "5.4.6",
                                        f"mail for {u.dest} loops back to myself", "dns"), ""
        now = time.monotonic()
        up = [t for t in targets if self.host_down.get((t.ip, t.port), 0) < now]
        targets = up + [t for t in targets if t not in up]  # recently dead hosts last
        body = att.body if att.body is not None else await self.bodies.for_attempt(att)
        dsn = self._dsn(msg, u.rcpts)
        await self._limit_rate(body.size, u.dest)
        rule = self.shaping.rule_for_dest(u.dest) if src is not None else None
        if src is not None and (wait := self.sources.rate_delay(src, u.dest, rule)) > 0:
            await asyncio.sleep(wait)  # the provider's message rates, for this source alone
        max_deliveries = self.shaping.rule_for_domain(u.domain).max_deliveries_per_connection
        pending = list(u.rcpts)
        last: dict[str, RcptOutcome] = {}
        for target in targets:
            fresh = False
            soft: list[str] = []  # refused with a 4xx here: for the next MX host (Postfix)
            while pending:
                key = pool_key(target, src)
                if not self.pool.idle.get(key):  # a new connection, likely
                    self._within_cap(u.dest, key)
                    await self.shaping_link.wait_connection(u.dest)  # max_connections_per_minute
                    if src is not None and (wait := self.sources.connect_delay(src, u.dest,
                                                                               rule)) > 0:
                        await asyncio.sleep(wait)  # ... for this source alone
                try:
                    sess = await self.pool.acquire(target, fresh, self._host_wait, src)
                except ConnectError as e:  # verdict.py: the next MX host, this one last
                    self.host_down[(target.ip, target.port)] = time.monotonic() + HOST_DOWN
                    for a in pending:
                        last[a] = replace(RcptOutcome.from_reply(
                            a, e.reply.code, e.reply.enhanced, e.reply.text, "connect",
                            target.host, tuple(e.transcript)), ip=target.ip, port=target.port)
                    if self.debug_out:
                        log.info("%s: %s\n%s", msg.id, e.reply, "\n".join(e.transcript))
                    break  # the next MX host
                self.host_down.pop((target.ip, target.port), None)
                reused = sess.messages_sent > 0
                try:
                    sent_body = body
                    seven = await self.bodies.needs_seven_bit(att, body, sess)
                    if seven and att.personal is None:
                        # RFC 6152 3: 8-bit MIME parts re-encoded; refused (5.6.3) only when
                        # the message cannot be converted
                        sent_body = await self.bodies.seven_bit(att) or body
                    rest, site, deferred = await self._transactions(
                        sess, target, att, pending, sent_body, seven, dsn, final, last)
                finally:
                    if max_deliveries and sess.messages_sent >= max_deliveries:
                        sess.retire = True  # max_deliveries_per_connection: closed, not kept
                    self.pool.release(sess)
                soft += deferred
                step = verdict.after_session(pending, rest, site, reused, fresh)
                if step is Step.FRESH:
                    fresh = True
                    continue
                pending = rest
                if step is Step.NEXT_MX:
                    break
            pending += soft
            if not pending:
                break
        for o in verdict.give_up(pending, last, u.domain):  # every host failed
            final[o.address] = o
        return [final[a] for a in u.rcpts if a in final], mx.text

    async def _transactions(self, sess: SMTPSession, target: Target, att: Attempt,
                            rcpts: list[str], body: Body, seven: bool, dsn: DSNRequest | None,
                            final: dict[str, RcptOutcome], last: dict[str, RcptOutcome]
                            ) -> tuple[list[str], bool, list[str]]:
        """Send to `rcpts` over `sess`; decided recipients go to `final`. Returns the recipients
        left, whether a site failure (lost connection, 421...) left them (then they go to the
        next MX host, else to a new connection to this one), and the recipients this server
        refused with a 4xx (at MAIL, RCPT, DATA or the end of data): these go to the next MX
        host as well, the others' transactions carrying on here meanwhile. `seven`: the server
        lacks 8BITMIME and `body` needs it (per-recipient copies are re-encoded here)."""
        msg = att.msg
        groups = self._envelopes(msg, rcpts, att.personal is not None)
        per = self.shaping.rule_for_domain(domain_of(rcpts[0])).max_recipients_per_transaction
        if per:  # the provider's max_recipients_per_transaction: more transactions
            groups = [(f, g[i:i + per]) for f, g in groups for i in range(0, len(g), per)]
        soft: list[str] = []
        while groups:
            sender, todo = groups.pop(0)
            sent = body
            if att.personal is not None:  # one recipient: its own copy
                sent = await self.bodies.personal(att, todo[0], seven) or body
            if not sess.is_reusable:  # closed while the copy was made: as a lost connection
                return todo + [a for _, g in groups for a in g], True, soft
            rest, deferred = await self._transaction(sess, target, msg, sender, todo, sent, dsn,
                                                     final, last)
            soft += deferred
            if rest:
                return rest + [a for _, g in groups for a in g], True, soft
            if groups and not sess.is_reusable:
                return [a for _, g in groups for a in g], False, soft  # session over: reconnect
        return [], False, soft

    def _envelopes(self, msg: Message, rcpts: list[str],
                   personal: bool = False) -> list[tuple[str, list[str]]]:
        """(MAIL FROM, recipients) per transaction: one for all, or with `logging.bounce_host`
        one per recipient from mailengine-bounce-USER%DOMAIN@bounce_host (VERP), so a bounce
        names the address that failed. The null sender stays null. `personal`: each recipient
        gets its own copy (List-Unsubscribe fields), so its own transaction."""
        host = self.cfg.logging.bounce_host
        if not host or not msg.mail_from:
            if personal:
                return [(msg.mail_from, [a]) for a in rcpts]
            return [(msg.mail_from, rcpts)]
        return [(verp_encode(a, host), [a]) for a in rcpts]

    async def _transaction(self, sess: SMTPSession, target: Target, msg: Message, sender: str,
                           rcpts: list[str], body: Body, dsn: DSNRequest | None,
                           final: dict[str, RcptOutcome], last: dict[str, RcptOutcome]
                           ) -> tuple[list[str], list[str]]:
        """One envelope over `sess`: (recipients a site failure left, recipients refused with a
        4xx). Both go to the next MX host; their outcome here is their last word meanwhile."""
        todo = rcpts
        soft: list[str] = []
        while todo:
            result = await sess.send(sender, todo, body, dsn=dsn, test_mode=self.test_mode)
            if self.debug_out:
                log.info("%s: to %s\n%s", msg.id, target.host, result.transcript_text())
            transcript = tuple(result.session_transcript + result.transcript)
            caps = sess.capabilities
            passed = bool(dsn is not None and caps is not None and caps.dsn)
            v = verdict.transaction(result, sess.is_reusable)
            for r, fate in zip(v.recipients, v.fates):
                o = RcptOutcome.from_reply(r.address, r.code, r.enhanced, r.text, r.stage,
                                           target.host, transcript, target.ip, target.port,
                                           passed)
                if fate.decided:
                    final[r.address] = o
                    if fate is Fate.DELIVERED:
                        self._count_sent(1)
                else:
                    last[r.address] = o  # its last word until another host decides it
            if v.action is Action.LEAVE_HOST:
                return v.who(Fate.NEXT_MX) + v.who(Fate.AGAIN), soft
            soft += v.who(Fate.NEXT_MX)
            todo = v.who(Fate.AGAIN)
        return [], soft

    def _count_sent(self, n: int) -> None:
        self.sent += n
        stats = self.engine.stats
        if hasattr(stats, "delivered"):
            stats.delivered(n)
        else:
            stats.sent.add(time.time(), n)

    async def _limit_rate(self, size: int, dest: str) -> None:
        await self.shaping_link.wait_message(dest)  # the provider's message rates
        rate = self.cfg.limits.max_send_rate
        taken = False
        if self.shared is not None and rate > 0:
            # every engine's cap (shared.py): nothing is taken until it may go now
            while (delay := await self.shared.send_delay(rate)) is not None and delay > 0:
                self._rate_held()
                await asyncio.sleep(delay)
            taken = delay is not None  # else Redis is down: this engine's own bucket
        if not taken:
            delay = self.rate.wait(1)
            if delay > 0:
                self._rate_held()
                await asyncio.sleep(delay)
        need = self.bandwidth.wait(size)  # limits.max_bandwidth: bytes per minute
        if need > 0:
            await asyncio.sleep(need)

    def _rate_held(self) -> None:
        if self.rate_notice.due():
            log.warning("Sending is held back by limits.max_send_rate = %d messages per hour; "
                        "mail waits in the queue (this is said once an hour)",
                        self.cfg.limits.max_send_rate)

    def _new_session(self, target: Target,
                     source: Source | None = None) -> SMTPSession | RemoteSession:
        lim = self.cfg.limits
        src = source.ip if source is not None else self.cfg.network.smtp_source_ip or None
        helo = source.helo if source is not None else self.helo
        if src and (":" in src) != (":" in target.ip):
            # an IPv4 source address cannot reach an IPv6 server, and back: the default
            # address then, with the default name (the source's would not match its address)
            src, helo = None, self.helo
        kwargs = dict(helo_name=helo, host_name=target.host, source_ip=src,
                      connect_timeout=lim.smtp_connect_timeout,
                      read_timeout=lim.smtp_read_timeout, write_timeout=lim.smtp_write_timeout,
                      body_timeout=lim.smtp_body_timeout)
        if self.deliverers is not None:  # the same session, run in a delivery process
            return RemoteSession(self.deliverers, target.ip, target.port, **kwargs)
        return SMTPSession(target.ip, target.port, **kwargs)

    @staticmethod
    def _dsn(msg: Message, rcpts: list[str]) -> DSNRequest | None:
        if not (msg.dsn_ret or msg.dsn_envid or msg.dsn_rcpt):
            return None
        notify = {a: p["notify"] for a, p in msg.dsn_rcpt.items() if p.get("notify")}
        orcpt = {a: p["orcpt"] for a, p in msg.dsn_rcpt.items() if p.get("orcpt")}
        return DSNRequest(ret=msg.dsn_ret or None, envid=msg.dsn_envid or None,
                          notify=notify or None, orcpt=orcpt or None)

    async def _finish(self, att: Attempt) -> None:
        """The attempt's last unit ended: record it (attempt_end.py); schedule what is left."""
        if await self.ends.record(att) and not self._stopping:
            self._schedule(self.ledger.entries[att.msg.id])

    # -- queue control (`mailengine queue`, through control.py and queueops.py) -----------------
    # Kept apart from delivery itself. queueops.py takes messages out of the schedule, changes
    # them and their .inf, and puts them back (or drops them); a message being delivered right
    # now is left alone: its attempt owns its files until it ends.

    def take_for_change(self, msg_ids) -> tuple[list[Message], dict[str, str]]:
        """Take waiting or held messages out of the schedule. Returns (taken, {id: why not})."""
        taken: list[Message] = []
        skipped: dict[str, str] = {}
        scheduled = []
        ledger = self.ledger
        for mid in msg_ids:
            e = ledger.get(mid)
            if e is None:
                skipped[mid] = "not in the queue"
            elif e.attempt is not None:
                skipped[mid] = "being delivered now; try again when this attempt ends"
            elif e.changing:
                skipped[mid] = "being changed by another queue command"
            elif mid in self.sched:
                scheduled.append(mid)
            else:
                taken.append(e.msg)  # held (or stopping): not scheduled
        got = self.sched.withdraw(scheduled)
        for mid in scheduled:
            if mid in got:
                taken.append(ledger.entries[mid].msg)
            else:
                skipped[mid] = "being delivered now; try again when this attempt ends"
        for msg in taken:
            ledger.take_out(ledger.entries[msg.id])
        return taken, skipped

    def put_back(self, msg: Message) -> None:
        """A message taken by take_for_change, changed or not: schedule it again at its
        `retrytime` (None = now), keep it unscheduled when held, finish it when nothing is left."""
        e = self.ledger.admit(msg)
        if not self._stopping:
            self._schedule(e)

    def evict(self, limit: int, not_before: float) -> int:
        """Make room in memory (app.Engine._load_backlog): up to `limit` messages that wait for a
        retry later than `not_before` (held ones first, then the latest due) leave the schedule
        and memory for the backlog; their files are in retry/ already. Returns how many. No walk
        over memory while nothing held or due later came into it since the last fruitless one
        (a queue of mail all due now: it would find nothing, twice a second)."""
        if not self._evictable:
            return 0
        held, later = [], []
        for mid, e in self.ledger.entries.items():
            if e.attempt is not None or e.changing or e.where != RETRY:
                continue
            if e.msg.held:
                held.append(mid)
                continue
            due = self.sched.due(mid)
            if due is not None and due > not_before:
                later.append((due, mid))
        if not held and not later:
            self._evictable = False
            return 0
        chosen = held[:limit]
        if len(chosen) < limit:
            chosen += [mid for _, mid in heapq.nlargest(limit - len(chosen), later)]
        scheduled = [mid for mid in chosen if mid in self.sched]
        self.sched.withdraw(scheduled)
        moved = 0
        for mid in chosen:
            if mid in self.sched:
                continue  # released meanwhile, a unit running: it stays
            self.ledger.keep_on_disk(mid, due_time(self.ledger.entries[mid].msg))
            moved += 1
        return moved

    def forget_message(self, msg_id: str) -> None:
        """A message taken by take_for_change whose files are gone (deleted)."""
        self.ledger.finish(msg_id)

    def files_in(self, msg_id: str) -> str:
        """The directory holding a waiting message's files: "retry", or "working" for relayed
        mail stored straight there and not started yet, and mail being sent."""
        e = self.ledger.get(msg_id)
        return RETRY if e is None else e.where

    def queue_state(self, msg_id: str) -> tuple[str, float | None]:
        """('sending' | 'held' | 'waiting' | '', when due) of a message this engine holds."""
        e = self.ledger.get(msg_id)
        if e is None:
            return "", None
        state = e.state
        return state, self.sched.due(msg_id) if state == "waiting" else None
