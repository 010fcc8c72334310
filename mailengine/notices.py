"""What follows each send attempt, in one place: undeliverable lists, the event log (and its
events for webhooks.py: the attempt waits until they are on disk), DSNs and delivery reports;
and how the engine sends mail of its own (notices, reports, alerts).

The delivery engine calls `await engine.notices.after_attempt(msg, res, outcomes)` once an
attempt is recorded in the message and before its files leave `working/` (the DSN may need the
original message). Mail the engine makes itself is stored in `mailq/retry` like any other mail
(so it survives a crash and is retried), with the null sender `<>` and the `.inf` key
`generated=dsn|report|alert`; such mail never causes a notice or a report of its own.
"""
from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import TYPE_CHECKING

from . import bounce_suppression, dsn, reports
from .categories import use_home
from .complaint_rates import DeliveredTally
from .envelope import Message
from .events import EventLog
from .lists import AddressLists
from .outcome import AttemptResult, RcptOutcome
from .queue_dirs import RETRY, WORKING
from .shared import list_mirror

if TYPE_CHECKING:
    from .app import Engine

log = logging.getLogger("mailengine.notices")


class Notices:
    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self.cfg = engine.cfg
        use_home(self.cfg.home)  # the operator's bounce_categories.toml, when there is one
        self.lists = AddressLists(self.cfg.home, mirror=list_mirror(self.cfg))
        self.events = EventLog(self.cfg.log_dir, getattr(engine, "test_mode", False))
        self.generated = 0  # messages of its own this engine has queued
        # delivered recipients per sender domain, for the complaint rates (complaint_rates.py)
        self.delivered = None if engine.test_mode else DeliveredTally(self.cfg.home)

    async def after_attempt(self, msg: Message, res: AttemptResult,
                            outcomes: list[RcptOutcome], where: str = WORKING) -> None:
        cfg = self.cfg
        committed = None
        try:
            if cfg.logging.log_undeliverable and (res.failed or res.gave_up):
                self.lists.undeliverable(res.failed, res.gave_up)
            records = self.events.attempt(msg, outcomes, res)
            webhooks = getattr(self.engine, "webhooks", None)
            if webhooks is not None:
                committed = webhooks.attempt(records)
        except Exception:
            log.exception("%s: cannot write the lists, the event log or webhook events", msg.id)
        if committed is not None:  # its files stay until its webhook events are on disk
            await committed
        if msg.extra.get(dsn.GENERATED_KEY):
            return  # a notice, report or alert of ours: nothing more
        if self.delivered is not None and res.sent:
            self.delivered.add(msg.mail_from, len(res.sent))
        if res.failed and not self.engine.test_mode:
            await self._suppress(bounce_suppression.from_attempt(
                cfg.suppression.bounce_categories, outcomes, res), msg.id)
        try:
            if cfg.queue.dsn and msg.mail_from:
                wanted = dsn.notices(msg, res, outcomes)
                if wanted:
                    data = self._data(msg, where)
                    until = dsn.retry_until(msg, cfg.queue.retry_intervals)
                    for n in wanted:
                        body = dsn.build(msg, n, self.engine.hostname, data, until)
                        await self.send([msg.mail_from], body, "dsn",
                                        f"{n.action} notice about {msg.id}")
            mode = cfg.reports.delivery_reports
            if mode and cfg.reports.recipients and reports.wanted(mode, msg, res):
                body = reports.build(msg, res, outcomes, cfg.reports.recipients,
                                     cfg.reports.domains, self.engine.hostname)
                await self.send(list(cfg.reports.recipients), body, "report",
                                f"delivery report about {msg.id}")
        except Exception:
            log.exception("%s: cannot queue its delivery notice or report", msg.id)

    async def _suppress(self, failures: list[tuple[str, str]], msg_id: str) -> None:
        """Addresses that will never work onto the suppression list (bounce_suppression.py)."""
        if not failures:
            return
        try:
            await asyncio.to_thread(bounce_suppression.suppress, self.engine.policy.suppression,
                                    failures, self.cfg.suppression.bounce_days)
        except Exception:
            log.exception("%s: cannot put its hard-bounced recipients on the suppression list",
                          msg_id)

    def _data(self, msg: Message, where: str) -> bytes | None:
        try:
            return self.engine.spool.read_data(msg.id, where)
        except OSError as e:
            log.warning("%s: cannot read the message for its notice: %s", msg.id, e)
            return None

    async def send(self, rcpts: list[str], data: bytes, kind: str, what: str = "") -> Message:
        """Queue mail of the engine's own to `rcpts`, from `<>`; raises OSError if it cannot be
        stored."""
        eng = self.engine
        now = datetime.now().replace(microsecond=0)
        msg = Message(id=eng.spool.new_id(), mail_from="", rcpt_to_send=list(rcpts),
                      time_created=now, retry_time=now, extra={dsn.GENERATED_KEY: kind},
                      size=len(data))
        msg.add_log(f"Made by this engine: {what or kind}", now)
        await eng.spool.store(msg, data, RETRY)
        self.generated += 1
        eng.take(msg, RETRY)  # into memory, or on disk only when memory is full
        log.info("%s: queued %s to %s", msg.id, what or kind, ", ".join(rcpts))
        return msg

    def close(self) -> None:
        if self.delivered is not None:
            self.delivered.save()
        self.lists.close()
        self.events.close()
