"""What a reply is, and what one send attempt writes into a message.

Two jobs, both pure (no I/O, no clock of their own). What delivery does next after a reply
(next MX host, another transaction, the destination's window) is verdict.py's.

1. **Classify** every reply, or the lack of one, at three levels (SPEC 5):
   - a *recipient* is SENT (2xx), HARD (5xx: failed for good) or SOFT (4xx, a timeout, a lost
     connection: try again later);
   - a *message* reply (to MAIL, DATA or the end of data) decides every recipient of that
     transaction at once;
   - a *site* failure (no connection, a refused greeting or EHLO, a 421, a lost connection, a
     timeout, garbage) gives every open recipient a soft reply; what follows from it (the next
     MX host, less traffic for the host) is decided in verdict.py.
   RFC 3463 enhanced codes refine the basic code where the two disagree in practice: a full
   mailbox (X.2.2) and a congested system (X.3.2, X.4.5) are soft even behind a 5xx, because
   they pass; an enhanced code whose class contradicts the basic code is ignored (the SMTP client
   already drops those).

2. **Record** the end of one send attempt in the `Message` exactly as SPEC 4 says: the history
   line in `log` (the manual's words: "Finished send attempt 1, sent to 1 of 1 recipients, now done
   sending"), `sendtries`, the recipient lists (`rcpttosend` still to send, `rcptsent`,
   `rcptfailed` hard, `rcpttransient` soft), `retrytime`, `priority` (+1 per retry, so retries
   yield to new mail), `status` and `timefinished`. After the last of `queue.retry_intervals`
   (minutes, fractions allowed; `[]` or `[0]` = no retries) a recipient still failing softly
   fails for good: it moves to `rcptfailed` and the attempt's `gave_up` lists it (for
   `soft-undeliverable.txt`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable

from .envelope import Message

MAX_PRIORITY = 99


class Kind(enum.Enum):
    SENT = "sent"
    HARD = "hard"
    SOFT = "soft"


# Enhanced codes (RFC 3463 subject.detail) that mean "passes with time" even behind a 5xx.
_SOFT_DETAILS = {"2.2", "3.2", "4.5"}  # mailbox full, system not accepting mail, congestion
# Subjects, for the bounce class carried in results and logs.
_SUBJECTS = {"0": "other", "1": "address", "2": "mailbox", "3": "mail-system", "4": "network",
             "5": "protocol", "6": "content", "7": "policy"}


def classify(code: int, enhanced: str = "") -> Kind:
    """What one reply code (with its optional enhanced code) means for a recipient."""
    if 200 <= code < 300:
        return Kind.SENT
    if code >= 500:
        if enhanced and enhanced[0] == "5" and enhanced[2:] in _SOFT_DETAILS:
            return Kind.SOFT
        return Kind.HARD
    return Kind.SOFT  # 4xx, 3xx where a final reply was due, made-up codes for network trouble


def bounce_class(code: int, enhanced: str = "") -> str:
    """A coarse reason for reports and logs: 'address', 'mailbox', 'policy', 'network'..."""
    if enhanced and len(enhanced) >= 3:
        return _SUBJECTS.get(enhanced.split(".")[1][:1], "other")
    if code in (421, 451) or code == 0:
        return "network"
    return "other"


@dataclass(frozen=True)
class RcptOutcome:
    """How one recipient came out of one attempt; `text` is the reply (or why there was none)."""
    address: str
    kind: Kind
    code: int = 0
    enhanced: str = ""
    text: str = ""
    stage: str = ""  # dns | connect | mail | rcpt | data | body | test | local | connection
    host: str = ""   # the MX host that gave the reply
    transcript: tuple[str, ...] = ()  # the SMTP session, for DSNs and delivery reports
    # For the event log (events.py): the server's address and how long the attempt took.
    ip: str = ""
    port: int = 0
    duration: float = 0.0  # seconds, DNS + connection + transaction
    dsn_passed: bool = False  # the server offered DSN: RFC 3461 notices are now its job

    @classmethod
    def from_reply(cls, address: str, code: int, enhanced: str, text: str, stage: str,
                   host: str = "", transcript: tuple[str, ...] = (), ip: str = "",
                   port: int = 0, dsn_passed: bool = False) -> "RcptOutcome":
        return cls(address, classify(code, enhanced), code, enhanced, text, stage, host,
                   transcript, ip, port, 0.0, dsn_passed)

    def timed(self, duration: float, transcript: tuple[str, ...]) -> "RcptOutcome":
        """This outcome with the attempt's duration and whole transcript: a copy through its
        __dict__, as dataclasses.replace costs five times as much and this is made for every
        recipient (100,000 for a mailing)."""
        new = object.__new__(RcptOutcome)
        new.__dict__.update(self.__dict__, duration=duration, transcript=transcript)
        return new

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}".strip()


@dataclass
class AttemptResult:
    """What `record_attempt` did: who was sent, failed, deferred or given up on this time."""
    sent: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)     # hard this attempt
    deferred: list[str] = field(default_factory=list)   # soft, will be retried
    gave_up: list[str] = field(default_factory=list)    # soft after the last retry: failed now
    done: bool = False          # nothing left to send: the message is finished
    retry_at: datetime | None = None


def retries_allowed(intervals: list[float]) -> list[float]:
    """`queue.retry_intervals` as the list of gaps actually used: [] and [0] mean none."""
    if not intervals or (len(intervals) == 1 and intervals[0] <= 0):
        return []
    return [max(0.0, float(x)) for x in intervals]


def next_retry(tries: int, intervals: list[float], now: datetime) -> datetime | None:
    """When attempt `tries + 1` is due after attempt number `tries` failed softly; None when
    `tries` was the last attempt allowed (len(intervals) retries after the first attempt)."""
    gaps = retries_allowed(intervals)
    if tries < 1 or tries > len(gaps):
        return None
    return now + timedelta(minutes=gaps[tries - 1])


def _merge(existing: list[str], new: list[str]) -> list[str]:
    seen = set(existing)
    out = list(existing)
    for a in new:
        if a not in seen:
            seen.add(a)
            out.append(a)
    return out


_UNKNOWN = object()  # record_attempt: the retry time not looked up yet


def record_attempt(msg: Message, outcomes: list[RcptOutcome],
                   intervals: list[float] | Callable[[], list[float]],
                   now: datetime | None = None, interrupted: list[str] = ()) -> AttemptResult:
    """Write the end of one send attempt into `msg` (SPEC 4). `outcomes` cover the recipients
    tried; `interrupted` ones (a shutdown cut the attempt short) stay to send, without counting
    against them. Recipients of `rcpttosend` in neither list are left to send as well.
    `intervals`: the retry plan (minutes), or what makes it, called only for a soft failure."""
    precise = now or datetime.now()
    now = precise.replace(microsecond=0)  # what the .inf shows
    res = AttemptResult()
    by_addr = {o.address: o for o in outcomes}
    cut = set(interrupted)
    tried = [a for a in msg.rcpt_to_send if a in by_addr]
    if not tried:
        # Nothing was really attempted (a stop before any reply): no try is counted.
        msg.retry_time = now
        return res
    msg.send_tries += 1
    tries = msg.send_tries
    # not rounded: short intervals stay exact; only looked up for a soft failure (most
    # attempts have none, and this is done for each of them)
    retry_at = _UNKNOWN
    still: list[str] = []
    for a in msg.rcpt_to_send:
        o = by_addr.get(a)
        if o is None or a in cut:
            still.append(a)
        elif o.kind is Kind.SENT:
            res.sent.append(a)
        elif o.kind is Kind.HARD:
            res.failed.append(a)
        else:
            if retry_at is _UNKNOWN:
                if callable(intervals):  # a plan made only when needed (attempt_end.py)
                    intervals = intervals()
                retry_at = next_retry(tries, intervals, precise)
            if retry_at is None:
                res.gave_up.append(a)
            else:
                res.deferred.append(a)
                still.append(a)
    msg.rcpt_sent = _merge(msg.rcpt_sent, res.sent)
    msg.rcpt_failed = _merge(msg.rcpt_failed, res.failed + res.gave_up)
    # rcpttransient: the recipients failing softly and still waiting for a retry (this attempt's,
    # and earlier ones' that this attempt did not reach)
    deferred, before = set(res.deferred), set(msg.rcpt_transient)
    msg.rcpt_transient = [a for a in still
                          if a in deferred or (a in before and (a not in by_addr or a in cut))]
    msg.rcpt_to_send = still
    msg.time_finished = now
    total = len(msg.rcpt_sent) + len(msg.rcpt_failed) + len(msg.rcpt_to_send)
    parts = [f"Finished send attempt {tries}, sent to {len(msg.rcpt_sent)} of {total} recipients"]
    if res.failed:
        parts.append(f"{len(res.failed)} failed permanently")
    if res.gave_up:
        parts.append(f"{len(res.gave_up)} still failing after the last retry, given up")
    if still:
        res.retry_at = retry_at if res.deferred else now
        if res.deferred:
            parts.append(f"{len(res.deferred)} failed temporarily, "
                         f"next try at {res.retry_at:%Y/%m/%d %H:%M:%S}")
        if len(still) > len(res.deferred):
            parts.append(f"{len(still) - len(res.deferred)} not tried yet")
        msg.retry_time = res.retry_at
        msg.priority = min(MAX_PRIORITY, msg.priority + 1)
        msg.status = "retry"
        msg.add_log(", ".join(parts), now)
    else:
        res.done = True
        msg.rcpt_transient = []
        msg.status = "done"
        msg.add_log(", ".join(parts) + ", now done sending", now)
    return res


def failure_outcomes(rcpts: list[str], code: int, enhanced: str, text: str, stage: str,
                     host: str = "", transcript: tuple[str, ...] = ()) -> list[RcptOutcome]:
    """The same reply for every recipient of a group (a DNS failure, a dead site)."""
    return [RcptOutcome.from_reply(a, code, enhanced, text, stage, host, transcript)
            for a in rcpts]
