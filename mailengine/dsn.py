"""Delivery status notifications (`queue.dsn`; RFC 3461, 3462/6522, 3464; SPEC 5).

After a send attempt, `notices(msg, res, outcomes)` says which notices the sender gets:

- **failed**: recipients that failed for good this attempt (a 5xx, or still failing softly after
  the last of `queue.retry_intervals`), when their NOTIFY asks for FAILURE (the default when the
  client gave no NOTIFY); one given up on keeps its 4.x.x Status (RFC 3463, as Postfix does);
- **delayed**: recipients deferred for the first time, only when their NOTIFY names DELAY;
- **relayed**: recipients delivered to a server that did not offer DSN, when NOTIFY names
  SUCCESS (a server that offered DSN got the NOTIFY parameter and reports success itself).

NOTIFY=NEVER means none. A notice is never sent for a message whose MAIL FROM is the null sender
`<>` (which every notice, delivery report and alert of this engine uses: a notice about a notice
cannot happen, so no loop can form).

`build(...)` makes one `multipart/report; report-type=delivery-status` message:
1. `text/plain`: the manual's words and the session transcript (`-->` what was sent, `<--` what
   came back), one block per distinct transcript;
2. `message/delivery-status`: Reporting-MTA, Original-Envelope-Id (ENVID), Arrival-Date,
   Received-From-MTA; per recipient Original-Recipient (ORCPT), Final-Recipient, Action, Status,
   Remote-MTA, Diagnostic-Code, Last-Attempt-Date, Will-Retry-Until (delayed);
3. the returned message: `message/rfc822` for RET=FULL (and by default, when it fits in
   FULL_LIMIT bytes and is plain 7-bit text), `text/rfc822-headers` for RET=HDRS or otherwise.

Internationalized mail (RFC 6533): when an address the notice names (sender, recipients,
ORCPT) is not ASCII, part 2 is `message/global-delivery-status` (8bit, the UTF-8 addresses as
`utf-8;` address types); when the original's headers are not ASCII, it comes back as
`message/global` or `message/global-headers`. The notice itself then goes out with SMTPUTF8
(delivery adds it for a non-ASCII address).
"""
from __future__ import annotations

import email.utils
import quopri
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from .envelope import Message
from .outcome import AttemptResult, Kind, RcptOutcome

FULL_LIMIT = 1024 * 1024  # without RET, messages larger than this come back as headers only
GENERATED_KEY = "generated"  # .inf key marking mail the engine made itself (dsn, report, alert)


@dataclass
class Notice:
    action: str                  # failed | delayed | relayed
    outcomes: list[RcptOutcome]


def notify_of(msg: Message, rcpt: str) -> set[str]:
    """The recipient's NOTIFY words (upper case); {"FAILURE"} when the client gave none."""
    value = msg.dsn_rcpt.get(rcpt, {}).get("notify", "")
    if not value:
        return {"FAILURE"}
    return {w.strip().upper() for w in value.split(",") if w.strip()}


def notices(msg: Message, res: AttemptResult, outcomes: list[RcptOutcome]) -> list[Notice]:
    """The notices one attempt calls for (empty for the null sender)."""
    if not msg.mail_from or msg.mail_from == "<>":
        return []
    by_addr = {o.address: o for o in outcomes}
    out = []
    failed = [by_addr[a] for a in res.failed + res.gave_up
              if a in by_addr and "FAILURE" in notify_of(msg, a)]
    if failed:
        out.append(Notice("failed", failed))
    # a delay notice once: when the recipient is deferred for the first time
    delayed = [by_addr[a] for a in res.deferred
               if a in by_addr and "DELAY" in notify_of(msg, a) and msg.send_tries <= 1]
    if delayed:
        out.append(Notice("delayed", delayed))
    relayed = [by_addr[a] for a in res.sent
               if a in by_addr and "SUCCESS" in notify_of(msg, a)
               and not by_addr[a].dsn_passed]
    if relayed:
        out.append(Notice("relayed", relayed))
    return out


def _status(o: RcptOutcome, action: str) -> str:
    if o.enhanced and o.enhanced[0] in "245":
        status = o.enhanced
    elif action == "relayed":
        status = "2.0.0"
    elif 500 <= o.code < 600:
        status = "5.0.0"
    else:
        status = "4.0.0"
    # A recipient given up on after the last retry keeps its 4.x.x code (RFC 3463: the class
    # says what the failure was, Action says what became of the mail; Postfix does the same):
    # a bounce processor then sees a soft bounce, not an address to remove.
    if action == "delayed" and status[0] == "5":
        status = "4" + status[1:]
    return status


def _date(t: datetime) -> str:
    return email.utils.format_datetime(t.astimezone())


def _clean(text: str) -> str:
    return " ".join(text.replace("\r", " ").replace("\n", " ").split())


def _human(msg: Message, notice: Notice, retry_until: datetime | None, returned: str) -> str:
    addrs = [o.address for o in notice.outcomes]
    if notice.action == "failed":
        lines = [f"Your message (id {msg.id}) could not be delivered to"]
    elif notice.action == "delayed":
        lines = [f"Your message (id {msg.id}) has not yet been delivered to"]
    else:
        lines = [f"Your message (id {msg.id}) was delivered to"]
    lines += [f" {a}" for a in addrs]
    if notice.action == "delayed":
        until = f" until {retry_until:%Y/%m/%d %H:%M:%S}" if retry_until else ""
        lines.append(f"The mail system will keep trying{until}; you need not send it again.")
    if notice.action == "relayed":
        lines.append("The receiving server does not send delivery notifications itself.")
    lines.append("A transcript of the session follows:")
    groups: dict[tuple[str, ...], list[RcptOutcome]] = {}
    for o in notice.outcomes:
        groups.setdefault(o.transcript, []).append(o)
    for transcript, members in groups.items():
        lines.append(f"--> Sending email to: {', '.join(o.address for o in members)}")
        body = list(transcript)
        if not body or members[0].stage == "dns":
            body = body or [f"<-- {members[0].reply}"]
        lines += body
    lines.append("---")
    if returned == "full":
        lines.append("A copy of your message is reproduced below.")
    elif returned == "headers":
        lines.append("The headers of your message are reproduced below.")
    return "\n".join(lines) + "\n"


def _international(msg: Message, notice: Notice) -> bool:
    """RFC 6533: does the delivery status name a non-ASCII address?"""
    addrs = [msg.mail_from] + [o.address for o in notice.outcomes] + [
        msg.dsn_rcpt.get(o.address, {}).get("orcpt", "") for o in notice.outcomes]
    return not all(a.isascii() for a in addrs)


def _addr_type(addr: str) -> str:
    return "rfc822" if addr.isascii() else "utf-8"


def _delivery_status(msg: Message, notice: Notice, reporting_mta: str,
                     retry_until: datetime | None) -> str:
    head = [f"Reporting-MTA: dns; {reporting_mta}"]
    if msg.dsn_envid:
        head.append(f"Original-Envelope-Id: {_clean(msg.dsn_envid)}")
    helo = msg.received.get("helo") or msg.received.get("peerhostname")
    if helo:
        head.append(f"Received-From-MTA: dns; {_clean(helo)}")
    head.append(f"Arrival-Date: {_date(msg.time_created)}")
    blocks = ["\n".join(head)]
    last = msg.time_finished or datetime.now().replace(microsecond=0)
    for o in notice.outcomes:
        b = []
        orcpt = msg.dsn_rcpt.get(o.address, {}).get("orcpt", "")
        if orcpt:
            kind, semi, addr = orcpt.partition(";")
            b.append(f"Original-Recipient: {kind.strip() if semi else 'rfc822'};"
                     f"{_clean(addr if semi else orcpt)}")
        b.append(f"Final-Recipient: {_addr_type(o.address)}; {o.address}")
        b.append(f"Action: {notice.action}")
        b.append(f"Status: {_status(o, notice.action)}")
        if o.host:
            b.append(f"Remote-MTA: dns; {o.host}")
        if o.code and o.stage not in ("dns", "local", "connect", "connection", "test"):
            b.append(f"Diagnostic-Code: smtp; {_clean(o.reply)}")
        elif o.text:
            b.append(f"Diagnostic-Code: X-MailEngine; {_clean(o.reply)}")
        b.append(f"Last-Attempt-Date: {_date(last)}")
        if notice.action == "delayed" and retry_until is not None:
            b.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append("\n".join(b))
    return "\n\n".join(blocks) + "\n"


def _headers_of(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i + len(sep) // 2]
    return data


def _returned(msg: Message, data: bytes | None) -> str:
    """'full', 'headers' or '' (nothing to return)."""
    if data is None:
        return ""
    ret = msg.dsn_ret.upper()
    if ret == "HDRS":
        return "headers"
    if not _headers_of(data).isascii():  # message/global carries it as it is (RFC 6533)
        return "full" if ret == "FULL" or len(data) <= FULL_LIMIT else "headers"
    plain = data.isascii()
    if ret == "FULL":
        return "full" if plain or not _headers_of(data).isascii() else "headers"
    return "full" if len(data) <= FULL_LIMIT and plain else "headers"


def _crlf(text: str | bytes) -> bytes:
    b = text.encode("utf-8") if isinstance(text, str) else text
    return b.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def build(msg: Message, notice: Notice, reporting_mta: str, data: bytes | None = None,
          retry_until: datetime | None = None, now: datetime | None = None) -> bytes:
    """The notice as the bytes of a message to `msg.mail_from` (CRLF line ends)."""
    now = now or datetime.now()
    boundary = f"=_{uuid.uuid4().hex}/{reporting_mta}"
    returned = _returned(msg, data)
    subject = {"failed": "Undelivered Mail Returned to Sender",
               "delayed": "Delayed Mail (still being retried)",
               "relayed": "Successful Mail Delivery Report"}[notice.action]
    human = _human(msg, notice, retry_until, returned)
    if human.isascii():
        human_part = ("Content-Type: text/plain; charset=us-ascii\n"
                      "Content-Transfer-Encoding: 7bit\n\n").encode() + _crlf(human)
    else:
        human_part = ("Content-Type: text/plain; charset=utf-8\n"
                      "Content-Transfer-Encoding: quoted-printable\n\n").encode() + \
            _crlf(quopri.encodestring(human.encode("utf-8")))
    status = _delivery_status(msg, notice, reporting_mta, retry_until)
    international = _international(msg, notice)
    status_type = ("message/global-delivery-status\nContent-Transfer-Encoding: 8bit"
                   if international else "message/delivery-status")
    parts = [
        _crlf("Content-Description: Notification\n") + _crlf(human_part),
        _crlf(f"Content-Description: Delivery report\nContent-Type: {status_type}\n\n"
              + status),
    ]
    utf8_headers = data is not None and not _headers_of(data).isascii()
    if returned == "full":
        kind = "message/global\nContent-Transfer-Encoding: 8bit" if utf8_headers \
            else "message/rfc822"
        parts.append(_crlf(f"Content-Description: Undelivered Message\nContent-Type: {kind}\n\n")
                     + _crlf(data))
    elif returned == "headers":
        kind = "message/global-headers\nContent-Transfer-Encoding: 8bit" if utf8_headers \
            else "text/rfc822-headers"
        parts.append(_crlf(f"Content-Description: Undelivered Message Headers\n"
                           f"Content-Type: {kind}\n\n") + _crlf(_headers_of(data)))
    top = "\n".join([
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{msg.mail_from}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{uuid.uuid4().hex}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        # RFC 6522: report-type names the subtype of the second part
        "Content-Type: multipart/report; report-type="
        f"{'global-delivery-status' if international else 'delivery-status'};",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        ""])
    out = _crlf(top)
    for p in parts:
        # the CRLF before a boundary belongs to the boundary: one more keeps the part's last one
        out += _crlf(f"--{boundary}\n") + p + (b"" if p.endswith(b"\r\n") else b"\r\n") + b"\r\n"
    out += _crlf(f"--{boundary}--\n")
    return out


def retry_until(msg: Message, intervals: list[float]) -> datetime | None:
    """When the last retry is due, counted from the message's arrival."""
    from .outcome import retries_allowed
    gaps = retries_allowed(intervals)
    if not gaps:
        return None
    return msg.time_created + timedelta(minutes=sum(gaps))


def for_attempt(msg: Message, res: AttemptResult, outcomes: list[RcptOutcome],
                reporting_mta: str, data: bytes | None, intervals: list[float]
                ) -> list[bytes]:
    """Every notice one attempt calls for, built (the caller sends each to msg.mail_from)."""
    until = retry_until(msg, intervals)
    return [build(msg, n, reporting_mta, data, until) for n in notices(msg, res, outcomes)]


__all__ = ["Notice", "notices", "notify_of", "build", "for_attempt", "GENERATED_KEY", "Kind"]
