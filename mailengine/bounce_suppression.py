"""Which failures put an address on the suppression list (issue 18), and putting it there.

A recipient that failed for good — a 5xx reply at RCPT or after DATA, or an asynchronous bounce
report that says the delivery failed — in a category that means "this address will never work"
(`suppression.bounce_categories`; by default categories.PERMANENT: bad-mailbox, bad-domain,
inactive-mailbox) is suppressed for every sender domain (the address does not exist, whoever
writes to it), for `suppression.bounce_days` days (0: for good). Mailbox providers count mail
to addresses that do not exist against the sender; stopping after the first hard bounce is what
they ask.

Never suppressed: soft failures (a `450 ... user unknown` is bad-mailbox by its text, but a 4xx
may pass), a recipient given up after the last retry (message-expired: nothing says the address
is bad), failures of the engine's own notices, and anything in test mode (`mailengine test`
changes nothing). The engine process calls `from_attempt` after each send attempt, the intake
processes `from_bounces` for each bounce report; `suppress` writes (blocking: run it in a thread).

A bounce report is mail anyone can send to a VERP address (`mailengine-bounce-USER%DOMAIN@...`
carries no signature): it suppresses only when the returned copy it quotes holds this engine's
signed List-Unsubscribe token for that very address (recipient_token.quoted_recipients; with
one-click unsubscribe on, every copy has one), or when the operator trusts every report that
reaches the bounce host (`suppression.trust_unsigned_bounces`). Otherwise it is recorded in the
bounce lists as before, and suppresses nothing.
"""
from __future__ import annotations

import logging
from typing import Iterable

from .categories import categorize
from .outcome import AttemptResult, Kind, RcptOutcome

log = logging.getLogger("mailengine.suppression")

DAY = 86400.0


def _reply(code: int, enhanced: str, text: str) -> str:
    return " ".join(x for x in (str(code) if code else "", enhanced, " ".join(text.split())) if x)


def from_attempt(categories: Iterable[str], outcomes: list[RcptOutcome],
                 res: AttemptResult) -> list[tuple[str, str]]:
    """(address, reason) of each recipient of this attempt to suppress."""
    wanted = set(categories)
    if not wanted or not res.failed:
        return []
    failed = set(res.failed) - set(res.gave_up)
    out = []
    for o in outcomes:
        if o.kind is Kind.HARD and o.address in failed:
            category = categorize(o.code, o.enhanced, o.text)
            if category in wanted:
                out.append((o.address, f"{category}: {_reply(o.code, o.enhanced, o.text)}"))
    return out


def from_bounces(categories: Iterable[str], bounces: list,
                 proven: set[str] | None = None) -> list[tuple[str, str]]:
    """(address, reason) of each bounces.Bounce to suppress: hard ones of the categories whose
    address is `proven` (None: all are trusted, suppression.trust_unsigned_bounces)."""
    wanted = set(categories)
    return [(b.address, f"{b.category}: bounce report: {_reply(b.code, b.status, b.reason)}")
            for b in bounces if b.kind == "hard" and b.category in wanted
            and (proven is None or b.address.lower() in proven)]


def suppress(store, failures: list[tuple[str, str]], days: float) -> int:
    """Put the failures on the list (for every sender); how many. Blocking (SQLite)."""
    import time
    expires = time.time() + days * DAY if days > 0 else None
    n = 0
    for address, reason in failures:
        try:
            store.add(address, reason=reason[:500], source="bounce", expires=expires)
            n += 1
        except ValueError as e:  # an address the list cannot hold (it was sent to, though)
            log.warning("cannot suppress %s after its bounce: %s", address, e)
    if n:
        log.info("suppressed after a hard bounce: %s", ", ".join(a for a, _ in failures[:10])
                 + (f" and {len(failures) - 10} more" if len(failures) > 10 else ""))
    return n
