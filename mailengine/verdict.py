"""Verdicts: what delivery does after each reply, in one place (Postfix: smtp_trouble.c).

delivery.py talks to servers and carries out verdicts; it reads no reply code itself. Everything
here is pure (no I/O, no clock), so each decision has a unit test without sockets
(tests/test_verdict.py). The kind of a single reply (SENT / HARD / SOFT, RFC 3463 refinements
included) is `outcome.classify`; this module decides what follows from it.

Strategies:

- **A recipient's fate after one transaction** (`RECIPIENT_RULES`, the first rule that matches):
  1. the session failed under it (a 421, a lost connection, a timeout, garbage: the client's
     `site_failure`) and the reply is soft -> NEXT_MX, and the whole session leaves this host;
  2. 452 (or 452 4.5.3) at RCPT while others of the transaction were delivered and the session
     is still usable -> AGAIN: too many recipients, the rest in another transaction on this
     session (RFC 5321 4.5.3.1.10);
  3. any other 4xx from the server at MAIL, RCPT, DATA or the end of data -> NEXT_MX: one
     server's greylisting or full spool says nothing of the others, so its recipients try the
     next MX host once this host's other transactions are done (Postfix smtp_trouble.c);
  4. otherwise the reply is final for this attempt: DELIVERED (2xx), FAILED (5xx: for good) or
     RETRY (soft, e.g. 552 5.2.2 or a local 4xx: it waits for the next attempt, outcome.py).
  A NEXT_MX or AGAIN reply is the recipient's last word meanwhile: it stands when no host is
  left.
- **A transaction's action** (`transaction`): LEAVE_HOST when rule 1 hit a recipient (the session
  is dead: it and anything left go to the next MX host), AGAIN when rule 2 did, else DONE (the
  next envelope goes over the same session, or a new connection when it cannot be reused).
- **After a session on one host** (`after_session`): nothing left -> DONE; a session that
  failed before any of its recipients was decided, on a kept connection that had sent mail
  before, is retried once on a fresh connection (the server dropped the idle connection: not its
  verdict on this mail); any other failure, or a session that decided nobody, -> the next MX
  host; a session that ended with work left (test mode...) -> a new connection to the same host.
- **A failed connection** (refused, timed out, greeting or EHLO refused, 421 at the start): every
  recipient -> NEXT_MX with that reply as its last word, and the host is tried last for a while
  (delivery.HOST_DOWN).
- **No host left** (`give_up`): each recipient's last word stands (it waits for a retry, or
  fails when its reply was a 5xx); one that never got a reply gets 451 4.4.1.
- **The destination's concurrency window** (`window_signal`, throttle.py), once per unit of
  delivery: any recipient delivered -> SUCCESS (the window grows); else a soft failure other
  than DNS -> SITE_FAILURE when any reply was a 421 or a failed connection (cut at once, the
  cooldown permitting), FAILURE otherwise (cut after a run of them); else (hard failures, DNS)
  NONE.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple

from .outcome import Kind, RcptOutcome, classify
from .smtp.client import RecipientResult, TransactionResult


class Fate(enum.Enum):
    DELIVERED = "delivered"  # 2xx: done
    FAILED = "failed"        # 5xx: failed for good
    RETRY = "retry"          # soft and decided for this attempt: waits for the next one
    NEXT_MX = "next-mx"      # try the next MX host; this reply stands when none is left
    AGAIN = "again"          # another transaction on this session (too many recipients)

    @property
    def decided(self) -> bool:
        """Final for this attempt (the reply goes into the message's record)."""
        return self in (Fate.DELIVERED, Fate.FAILED, Fate.RETRY)


class Action(enum.Enum):
    """What follows one transaction on one session."""
    DONE = "done"              # go on: the next envelope on this session (or a new connection)
    AGAIN = "again"            # the AGAIN recipients in another transaction on this session
    LEAVE_HOST = "leave-host"  # the session failed: the next MX host


class Step(enum.Enum):
    """What follows a session on one MX host."""
    DONE = "done"              # nothing left for this host
    FRESH = "fresh"            # once more on a new connection to the same host
    RECONNECT = "reconnect"    # work left after a session that ended normally: same host
    NEXT_MX = "next-mx"


class Signal(enum.Enum):
    """What one unit of delivery tells its destination's concurrency window."""
    NONE = "none"
    SUCCESS = "success"
    FAILURE = "failure"            # a temporary failure: counts towards a cut
    SITE_FAILURE = "site-failure"  # a 421 or a failed connection: cut without a run


class Seen(NamedTuple):
    """One recipient's reply and its transaction, as the rules read them."""
    code: int
    enhanced: str
    stage: str
    kind: Kind
    session_failed: bool  # the client's site_failure: the session ended under the transaction
    progress: bool        # some recipient of the transaction was delivered
    reusable: bool        # the session can carry another transaction


_SERVER_STAGES = ("mail", "rcpt", "data", "body")  # replies from the server, not made up here
_SITE_STAGES = ("connect", "connection")           # stages of a failed connection or session


def _session_failed(s: Seen) -> bool:
    return s.session_failed and s.kind is Kind.SOFT


def _too_many_recipients(s: Seen) -> bool:
    return (s.code == 452 and s.stage == "rcpt" and s.enhanced in ("", "4.5.3") and s.progress
            and s.reusable)


def _server_4xx(s: Seen) -> bool:
    return 400 <= s.code < 500 and s.stage in _SERVER_STAGES


# (rule, fate), the first that matches decides; replies none matches are final (`_final`).
RECIPIENT_RULES: tuple[tuple[Callable[[Seen], bool], Fate], ...] = (
    (_session_failed, Fate.NEXT_MX),
    (_too_many_recipients, Fate.AGAIN),
    (_server_4xx, Fate.NEXT_MX),
)
_final = {Kind.SENT: Fate.DELIVERED, Kind.HARD: Fate.FAILED, Kind.SOFT: Fate.RETRY}


def recipient_fate(s: Seen) -> Fate:
    for rule, fate in RECIPIENT_RULES:
        if rule(s):
            return fate
    return _final[s.kind]


@dataclass(frozen=True)
class TransactionVerdict:
    """A fate for each of the result's recipients (in its order) and what follows."""
    recipients: tuple[RecipientResult, ...]
    fates: tuple[Fate, ...]
    action: Action

    def who(self, fate: Fate) -> list[str]:
        return [r.address for r, f in zip(self.recipients, self.fates) if f is fate]


def transaction(result: TransactionResult, reusable: bool) -> TransactionVerdict:
    """The verdict on one transaction; `reusable`: the session can carry another one."""
    progress = len(result.delivered) > 0
    fates = tuple(recipient_fate(Seen(r.code, r.enhanced, r.stage, classify(r.code, r.enhanced),
                                      result.site_failure, progress, reusable))
                  for r in result.recipients)
    if result.site_failure and Fate.NEXT_MX in fates:
        action = Action.LEAVE_HOST
    elif Fate.AGAIN in fates:
        action = Action.AGAIN
    else:
        action = Action.DONE
    return TransactionVerdict(tuple(result.recipients), fates, action)


def after_session(pending: list[str], rest: list[str], session_failed: bool, reused: bool,
                  fresh: bool) -> Step:
    """What follows a session to one host that was given `pending` and left `rest` undecided;
    `reused`: the connection had carried mail before; `fresh`: it is already the retry on a
    new connection."""
    if not rest:
        return Step.DONE
    if session_failed and reused and not fresh and rest == pending:
        return Step.FRESH  # the server had dropped the kept connection (idle timeout)
    if session_failed or len(rest) >= len(pending):
        return Step.NEXT_MX  # trouble at this host, or no progress
    return Step.RECONNECT


def give_up(rcpts: Iterable[str], last: dict[str, RcptOutcome], dest: str) -> list[RcptOutcome]:
    """No MX host is left: each recipient's last word stands; one without any gets 451 4.4.1."""
    return [last.get(a) or RcptOutcome.from_reply(
        a, 451, "4.4.1", f"No mail server of {dest} could be reached", "connect") for a in rcpts]


def site_trouble(o: RcptOutcome) -> bool:
    """Trouble with the server rather than the message: a 421, or no connection or session."""
    return o.code == 421 or o.stage in _SITE_STAGES


def window_signal(outcomes: list[RcptOutcome]) -> Signal:
    """What one unit's outcomes tell the destination's concurrency window."""
    if any(o.kind is Kind.SENT for o in outcomes):
        return Signal.SUCCESS
    if any(o.kind is Kind.SOFT and o.stage != "dns" for o in outcomes):
        return Signal.SITE_FAILURE if any(site_trouble(o) for o in outcomes) else Signal.FAILURE
    return Signal.NONE
