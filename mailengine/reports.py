"""Delivery reports (`reports.*`, SPEC 3 and 5): mail to the operators about send attempts.

`reports.delivery_reports` says when: `e` after every attempt, `f` after the first, `l` after the
last (when the message is finished), `x` after the first and the last. The report goes to every
address of `reports.recipients` and holds the counts (recipients in total, delivered so far,
failed, still waiting) and, for each address that failed or was deferred in this attempt, its
reply, its category (categories.py: bad-mailbox, quota-issues, spam-related, ...) and the SMTP
transcript in the manual's format, after a count of the attempt's failures by category.
`reports.domains` (substrings, e.g. `@example.com` or `example`) limits which failed addresses
are shown; empty = all.

Reports are sent with the null sender `<>`, and mail the engine made itself (reports, DSNs,
alerts) is never reported on: no report can cause another.
"""
from __future__ import annotations

import email.utils
import quopri
import uuid
from collections import Counter
from datetime import datetime

from .envelope import Message
from .events import category
from .outcome import AttemptResult, Kind, RcptOutcome


def wanted(mode: str, msg: Message, res: AttemptResult) -> bool:
    """Does this attempt call for a report under `reports.delivery_reports` = mode?"""
    first = msg.send_tries == 1
    last = res.done
    return {"e": True, "f": first, "l": last, "x": first or last}.get(mode, False)


def shown(address: str, domains: list[str]) -> bool:
    if not domains:
        return True
    low = address.lower()
    return any(d.lower() in low for d in domains if d)


def build(msg: Message, res: AttemptResult, outcomes: list[RcptOutcome], recipients: list[str],
          domains: list[str], hostname: str, now: datetime | None = None) -> bytes:
    """The report as message bytes (CRLF line ends, UTF-8 text)."""
    now = now or datetime.now()
    total = len(msg.rcpt_sent) + len(msg.rcpt_failed) + len(msg.rcpt_to_send)
    delivered = len(msg.rcpt_sent)
    bad = [o for o in outcomes if o.kind is not Kind.SENT]
    show = [o for o in bad if shown(o.address, domains)]
    deferred = set(res.deferred)
    gave_up = set(res.gave_up)
    cats = {o.address: category(o, gave_up) for o in bad}
    lines = [f"Delivery report for message {msg.id}",
             f"From: {msg.mail_from or '<>'}",
             f"Attempt {msg.send_tries} finished at {now:%Y/%m/%d %H:%M:%S}"
             + (", the message is done" if res.done else ""),
             "",
             f"Recipients in total: {total}",
             f"Delivered so far: {delivered}",
             f"Delivered in this attempt: {len(res.sent)}",
             f"Failed permanently so far: {len(msg.rcpt_failed)}",
             f"Waiting for a retry: {len(msg.rcpt_to_send)}"
             + (f" (next try at {msg.retry_time:%Y/%m/%d %H:%M:%S})"
                if msg.rcpt_to_send and msg.retry_time else ""),
             ""]
    if bad:
        note = f" ({len(show)} of {len(bad)} shown, reports.domains = {', '.join(domains)})" \
            if domains else ""
        lines.append(f"Addresses that failed in this attempt: {len(bad)}{note}")
        lines.append("By category: " + ", ".join(
            f"{c} {n}" for c, n in sorted(Counter(cats.values()).items(),
                                          key=lambda x: (-x[1], x[0]))))
        lines.append("")
    for o in show:
        state = ("deferred, will be retried" if o.address in deferred
                 else "given up after the last retry" if o.address in res.gave_up
                 else "failed permanently")
        lines.append(f"{o.address}: {o.reply} ({state})")
        lines.append(f"Category: {cats[o.address]}")
        lines.append(f"--> Sending email to: {o.address}")
        lines += list(o.transcript) or [f"<-- {o.reply}"]
        lines.append("---")
    subject = (f"Delivery report: {msg.id}, attempt {msg.send_tries}: "
               f"{delivered} of {total} delivered")
    head = [f"From: MailEngine <MAILER-DAEMON@{hostname}>",
            f"To: {', '.join(f'<{r}>' for r in recipients)}",
            f"Subject: {subject}",
            f"Date: {email.utils.format_datetime(now.astimezone())}",
            f"Message-ID: <{uuid.uuid4().hex}.report@{hostname}>",
            "Auto-Submitted: auto-generated",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8"]
    body = ("\n".join(lines) + "\n").replace("\r\n", "\n").replace("\r", " ")
    if body.isascii():
        head.append("Content-Transfer-Encoding: 7bit")
        raw = body.encode("ascii")
    else:  # 7-bit on the wire: any server takes it, 8BITMIME or not
        head.append("Content-Transfer-Encoding: quoted-printable")
        raw = quopri.encodestring(body.encode("utf-8", "replace"))
    out = ("\n".join(head) + "\n\n").encode("ascii", "replace") + raw
    return out.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
