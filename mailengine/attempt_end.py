"""The end of a send attempt: what its outcomes do to the message (SPEC 5).

When the last unit of an attempt ends (delivery.py), `AttemptEnd.record`:

1. records the attempt in the message (outcome.record_attempt): each recipient sent, failed,
   given up or left for a later try, by the retry plan of its provider's rules (shaping.py) or
   `queue.retry_intervals`;
2. holds the next try back where the attempt ended for a reason of ours, not the mail's: a DKIM
   key unusable under `dkim.missing_key = "hold"` (DKIM_HOLD_RETRY), a delivery process gone
   (PROCESS_GONE_RETRY), every source's warm-up budget spent (until it has budget again);
3. writes the log lines (`status=sent` per delivered recipient, as Postfix's) and hands the
   attempt to notices.py (lists, event log, webhooks, DSNs, delivery reports);
4. moves the files: all done -> done/ (`queue.save_done`) or removed (remover.py); recipients
   left -> `ID.inf` rewritten and back to retry/, the DKIM signature made now kept beside it
   (bodies.py) -- and tells the ledger (ledger.py). The caller schedules what waits again.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from . import logs
from .envelope import Message, set_last_replies
from .outcome import Kind, record_attempt
from .queue_dirs import DONE, RETRY, WORKING
from .remover import Remover
from .scheduler import domain_of

if TYPE_CHECKING:
    from .attempt import Attempt
    from .bodies import Bodies
    from .dkim import DKIMHold
    from .ledger import Entry, Ledger
    from .shaping import Shaping

log = logging.getLogger("mailengine.delivery")

DKIM_HOLD_RETRY = 30.0    # s: a message held for a missing DKIM key is looked at again after
PROCESS_GONE_RETRY = 2.0  # s: recipients left when a delivery process ended are tried after


def not_before(msg: Message, later: datetime) -> None:
    """The message's next try no earlier than `later` (a hold: DKIM key, warm-up, process)."""
    if msg.retry_time is None or msg.retry_time < later:
        msg.retry_time = later


class AttemptEnd:
    def __init__(self, engine, ledger: Ledger, shaping: Shaping, bodies: Bodies) -> None:
        self.engine = engine  # its live settings (cfg), test mode and notices
        self.spool = engine.spool
        self.ledger = ledger
        self.shaping = shaping  # the rules' retry plans
        self.bodies = bodies  # keeps a fresh DKIM signature for the next attempt
        self.remover = Remover(self.spool)  # finished mail out of working/, in a thread
        self._hold_noted: dict[str, tuple[float, int]] = {}  # domain -> (last line, held since)

    async def record(self, att: Attempt) -> bool:
        """Record the attempt; True when the message waits in retry/ again (the caller puts it
        back in the schedule). The ledger keeps it the attempt's (`sending`) until then."""
        msg = att.msg
        ledger = self.ledger
        cfg = self.engine.cfg
        e = ledger.get(msg.id)
        ledger.take_data(e)
        if att.gone:
            ledger.finish(msg.id)
            return False
        now = datetime.now()
        def intervals() -> list[float]:  # the rules' retry_intervals and max_age
            return self.shaping.retry_plan(map(domain_of, msg.rcpt_to_send),
                                           cfg.queue.retry_intervals)
        res = record_attempt(msg, att.outcomes, intervals, now, att.interrupted)
        if logs.tracing():
            logs.PROGRAM.debug("%s attempt over: %d sent, %d failed, %d to retry%s", msg.id,
                               len(res.sent), len(res.failed) + len(res.gave_up),
                               len(res.deferred), "" if res.done or msg.retry_time is None
                               else f" at {msg.retry_time:%Y/%m/%d %H:%M:%S}")
        if not res.done:
            self._hold(att, now)
            # `queue list` shows why it waits, after a restart too
            why = {o.address: o for o in att.outcomes}
            when = now.strftime("%Y/%m/%d %H:%M:%S")
            set_last_replies(msg, {a: (when, why[a].reply) for a in res.deferred if a in why})
        self._note(msg, res, att)
        notices = getattr(self.engine, "notices", None)
        if notices is not None:  # lists, event log, DSNs, delivery reports (notices.py)
            await notices.after_attempt(msg, res, att.outcomes, WORKING)
        spool = self.spool
        try:
            if res.done:
                if cfg.queue.save_done:
                    await spool.update_inf(msg, WORKING)
                    spool.move(msg.id, WORKING, DONE)
                else:
                    self.remover.remove(msg.id)
                ledger.finish(msg.id)
                return False
            if att.fresh_signature:  # recipients left: the next attempt sends it again
                await self.bodies.keep_signature(msg.id, att.fresh_signature)
            await spool.update_inf(msg, WORKING)
            spool.move(msg.id, WORKING, RETRY)
        except OSError as err:
            log.error("%s: cannot record the send attempt: %s; the message stays in working/ "
                      "until the next start", msg.id, err)
            ledger.stuck(msg.id)
            return False
        if e is None or e.attempt is not att:  # taken out meanwhile (never, by the table)
            return False
        ledger.moved(e, RETRY)
        ledger.attempt_over(e)
        return True

    def finish_idle(self, e: Entry) -> None:
        """A queued message with nothing left to send: finished without an attempt."""
        msg, where = e.msg, e.where
        msg.status = msg.status or "done"
        try:
            if self.engine.cfg.queue.save_done:
                self.spool.move(msg.id, where, DONE)
            else:
                self.spool.remove(msg.id, where)
        except OSError as err:
            log.warning("%s: nothing to send, but cannot finish it: %s", msg.id, err)
        self.ledger.finish(msg.id)

    def shutdown(self) -> None:
        """Wait for the removals handed over (a stop)."""
        self.remover.shutdown()

    def _hold(self, att: Attempt, now: datetime) -> None:
        """Not the mail's fault: its next try waits for what stopped it, not a retry interval."""
        msg = att.msg
        if att.dkim_hold is not None:
            self._held_for_dkim(msg, att.dkim_hold, now)
        if att.process_gone:  # while it is started again (deliverers.py)
            not_before(msg, now + timedelta(seconds=PROCESS_GONE_RETRY))
        if att.warmup_hold:  # sources.py: tomorrow's budget, or a new rule
            not_before(msg, datetime.fromtimestamp(att.warmup_hold))

    def _held_for_dkim(self, msg: Message, hold: DKIMHold, now: datetime) -> None:
        """A message not sent because its domain's DKIM key is unusable (missing_key = hold):
        it waits in retry/ and is looked at again in DKIM_HOLD_RETRY seconds (the signer
        retries loading the key every 30 s). One line per domain a minute, with a count."""
        not_before(msg, now + timedelta(seconds=DKIM_HOLD_RETRY))
        t = time.monotonic()
        last, count = self._hold_noted.get(hold.domain, (None, 0))
        if last is not None and t - last < 60:
            self._hold_noted[hold.domain] = (last, count + 1)
            return
        since = f" ({count} more messages held since the last line)" if count else ""
        log.warning("%s: held in retry/, not sent: %s (dkim.missing_key = hold); looked at "
                    "again in %d s%s", msg.id, hold, DKIM_HOLD_RETRY, since)
        self._hold_noted[hold.domain] = (t, 0)

    def _note(self, msg: Message, res, att: Attempt) -> None:
        """Log lines (the lists and the event log are written by notices.py): one per delivered
        recipient, as Postfix's `status=sent`, and one per failed or deferred one."""
        text = msg.log[-1].split(": ", 1)[-1] if msg.log else ""
        if res.sent:
            status = "tested" if self.engine.test_mode else "sent"  # test mode: RSET, not DATA
            log.info("%s", "\n".join(
                f"{msg.id}: to=<{o.address}>, relay={o.host or '-'}[{o.ip or '-'}]:{o.port}, "
                f"delay={o.duration:.2f}, status={status} ({o.reply})"
                for o in att.outcomes if o.kind is Kind.SENT),
                extra={logs.EACH_LINE: True, logs.FILE_ONLY: True})
        if res.failed or res.gave_up or res.deferred:
            why = {o.address: o for o in att.outcomes}
            for a in res.failed + res.gave_up + res.deferred:
                o = why.get(a)
                if o is not None:
                    log.info("%s: %s %s: %s", msg.id, a,
                             "deferred" if a in res.deferred else "failed", o.reply)
            log.info("%s: %s", msg.id, text)
        elif self.engine.cfg.debug.send_loop:
            log.info("%s: %s", msg.id, text)
