"""What the web admin and the API show of the queue: messages, destinations, one message.

The running engine holds every queued message in memory or in its backlog
(`engine.ledger`), so listing the queue costs no directory scan. Without a delivery
engine (not built, or stopped), retry/ is read from disk, at most SCAN_LIMIT `.inf` files.
Actions (delete, hold, release, retry now) go through mailengine.queueops when it is there.
"""
from __future__ import annotations

import asyncio
import itertools
import datetime as dt
import os
from dataclasses import dataclass, field

from ..queue_dirs import RETRY, WORKING
from ..categories import categorize_reply
from ..envelope import InfError, Message, last_replies
from ..scheduler import domain_of
from ..message_ids import is_message_id

SCAN_LIMIT = 20000
WHERE = (RETRY, WORKING)


async def off_loop(fn, *args):
    """Run a walk over many messages in a thread, so SMTP sessions are not held up by it (the
    list it walks is a copy made on the event loop)."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def messages(engine) -> list[Message]:
    """Every queued message: a copy of the delivery engine's table and the backlog's messages
    (read from disk, at most SCAN_LIMIT), or read from retry/."""
    in_memory = list(engine.ledger.messages())
    if not len(engine.ledger.backlog):
        return in_memory
    return in_memory + await off_loop(backlog_messages, engine)


def queued_total(engine, msgs: list[Message]) -> int:
    """How many messages are queued: all of them, though `msgs` holds at most SCAN_LIMIT of the
    backlog's (its .inf files are read to show them)."""
    return engine.ledger.total


def partial(engine) -> bool:
    """True when the backlog holds more than the pages read of it (SCAN_LIMIT)."""
    return len(engine.ledger.backlog) > SCAN_LIMIT


def backlog_messages(engine) -> list[Message]:
    return [m for _, m in itertools.islice(engine.backlog_messages(), SCAN_LIMIT)]


def state_of(engine, msg: Message, now: dt.datetime | None = None) -> str:
    e = engine.ledger.get(msg.id)
    if e is not None and e.attempt is not None:
        return "sending"
    if msg.held:
        return "held"
    now = now or dt.datetime.now()
    if msg.retry_time is not None and msg.retry_time > now:
        return "waiting for retry"
    if engine.cfg.queue.pause_sending:
        return "paused"
    return "ready"


@dataclass
class DomainRow:
    domain: str
    messages: int = 0
    recipients: int = 0
    held: int = 0
    sending: int = 0
    waiting: int = 0
    oldest: dt.datetime | None = None
    next_retry: dt.datetime | None = None
    last_log: str = ""
    _last_time: dt.datetime | None = field(default=None, repr=False)


def by_domain(engine, msgs: list[Message]) -> list[DomainRow]:
    now = dt.datetime.now()
    rows: dict[str, DomainRow] = {}
    for m in msgs:
        state = state_of(engine, m, now)
        for dom in {domain_of(r) for r in m.rcpt_to_send}:
            row = rows.get(dom)
            if row is None:
                row = rows[dom] = DomainRow(dom)
            row.messages += 1
            row.recipients += sum(1 for r in m.rcpt_to_send if domain_of(r) == dom)
            row.held += state == "held"
            row.sending += state == "sending"
            if state == "waiting for retry":
                row.waiting += 1
                if row.next_retry is None or m.retry_time < row.next_retry:
                    row.next_retry = m.retry_time
            if row.oldest is None or m.time_created < row.oldest:
                row.oldest = m.time_created
            if m.log and (row._last_time is None or m.time_created >= row._last_time):
                row._last_time, row.last_log = m.time_created, m.log[-1]
    return sorted(rows.values(), key=lambda r: (-r.recipients, r.domain))


def in_domain(msgs: list[Message], domain: str) -> list[Message]:
    domain = domain.lower()
    return [m for m in msgs if any(domain_of(r) == domain for r in m.rcpt_to_send)]


def find(engine, msg_id: str) -> tuple[Message | None, str | None]:
    """(message, directory) of a queued message, looked up in memory first, then on disk."""
    if not is_message_id(msg_id):
        return None, None
    msg = engine.ledger.message(msg_id)
    for where in WHERE:
        if os.path.exists(engine.spool.inf_path(msg_id, where)):
            if msg is None:
                try:
                    msg = engine.spool.load(msg_id, where)
                except (OSError, InfError):
                    return None, where
            return msg, where
    return msg, None


def inf_text(engine, msg_id: str, where: str | None) -> str:
    if where is None:
        return ""
    try:
        with open(engine.spool.inf_path(msg_id, where), "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")
    except OSError as e:
        return f"(cannot read: {e.strerror})"


def head_of_data(engine, msg_id: str, where: str | None, limit: int = 16384) -> str:
    """The header block of ID.dat (at most `limit` bytes)."""
    if where is None:
        return ""
    try:
        with open(engine.spool.dat_path(msg_id, where), "rb") as f:
            data = f.read(limit)
    except OSError as e:
        return f"(cannot read: {e.strerror})"
    end = data.find(b"\r\n\r\n")
    return data[: end if end >= 0 else len(data)].decode("utf-8", "replace")


def to_json(engine, m: Message, now: dt.datetime | None = None) -> dict:
    return {"id": m.id, "from": m.mail_from, "to": list(m.rcpt_to_send),
            "sent": list(m.rcpt_sent), "failed": list(m.rcpt_failed),
            "created": m.time_created.isoformat(), "size": m.size,
            "retry_time": m.retry_time.isoformat() if m.retry_time else None,
            "tries": m.send_tries, "status": m.status, "held": m.held,
            "state": state_of(engine, m, now),
            "last_replies": {a: {"time": w, "reply": r, "category": categorize_reply(r)}
                             for a, (w, r) in last_replies(m).items() if a in m.rcpt_to_send}}
