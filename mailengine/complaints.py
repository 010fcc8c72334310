"""Complaints: feedback-loop reports read, matched to the original recipient, suppressed, logged.

Mailbox providers tell a sender when one of their users pressed "this is spam" by mailing a
report to an address the sender registered with them (Yahoo's Complaint Feedback Loop,
Microsoft's JMRP, most European and ISP loops). `complaints.addresses` names those addresses:
the policy takes mail to them from anyone as local mail, and the intake, once the report is
stored and before the 250, hands it to `ComplaintDesk.handle`, as it hands bounces to bounces.py.

`parse(data, secret)` reads one report and never raises:

- ARF (RFC 5965): `multipart/report; report-type=feedback-report` with a machine-readable
  `message/feedback-report` part (Feedback-Type, User-Agent, Version, Original-Mail-From,
  Original-Rcpt-To, Arrival-Date, Reporting-MTA, Source-IP, Reported-Domain...) and the original
  message or its headers (`message/rfc822`, `text/rfc822-headers`). Microsoft's JMRP is ARF with
  an `X-HmXmrOriginalRecipient` header in the quoted message. Reports whose feedback fields sit in
  a text/plain part (a mislabelled ARF) are read as well.
- Non-ARF forwards (older Yahoo/AOL-like loops, hand-forwarded abuse mail): a mail whose subject
  or text speaks of abuse, spam or a complaint and which carries the original message, attached
  or quoted after an "original message" line.
- Not complaints, with the reason in `why`: a delivery status notification, an autoreply,
  `Feedback-Type: not-spam`, `auth-failure` (DMARC/DKIM failure reports, RFC 6591) or `virus`,
  and anything else.

Each complaint is matched to the recipient of the original message, the first that works of:
a recipient token (recipient_token.py, verified with the home's key) in the quoted
`List-Unsubscribe` header (else anywhere in the report: a forged token never verifies); the VERP
address (bounces.verp_decode) in the quoted `Return-Path` or the ARF `Original-Mail-From`; the
ARF `Original-Rcpt-To` (or JMRP's header) unless it is redacted, as Yahoo and others do. No match
is logged and recorded without an address. The sender domain (the token's, else the original
envelope sender's when it is not VERP, else the quoted From:'s) and the original queue id (from
our Received: line) and Message-ID are kept too: complaint_rates.py counts by that domain.
"""
from __future__ import annotations

import base64
import binascii
import email
import email.policy
import email.utils
import json
import logging
import quopri
import re
import threading
import time
from dataclasses import asdict, dataclass
from email.message import Message as EmailMessage
from typing import Any

from . import recipient_token, webhooks
from .bounces import _RETURNED_MARKERS, _header, _id_from_headers, _is_autoreply, _text_of
from .bounces import verp_decode
from .events import EventLog, iso_time
from .lists import AppendFile, rotate_if_over

log = logging.getLogger("mailengine.complaints")

COMPLAINTS_JSONL = "complaints.jsonl"
# Anyone may mail the complaint address, so the file is bounded: past this size it becomes
# complaints.jsonl.1 (the one before is dropped) and a new one is started.
MAX_BYTES = 16 << 20
MAX_SCAN = 256 * 1024  # bytes of a report searched for tokens and quoted headers
# Feedback types (RFC 5965 and its registry) that are not a recipient's complaint.
NOT_COMPLAINTS = {"not-spam": "the recipient marked the message as not spam",
                  "auth-failure": "an authentication failure report (RFC 6591), not a complaint",
                  "virus": "a virus report, not a recipient's complaint"}
# A token is "payload.mac", both base64url; the MAC is 16 bytes = 22 characters.
_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])([A-Za-z0-9_-]{8,900}\.[A-Za-z0-9_-]{22})(?![A-Za-z0-9_-])")
_COMPLAINT_WORDS = re.compile(
    r"\babuse\b|complain|spam report|reported (?:this |the |a )?(?:message |mail |e-?mail )?"
    r"as (?:spam|junk)|marked as (?:spam|junk)|feedback[- ]loop|this is spam|junk mail report|"
    r"email feedback report|scomp", re.I)
_FORWARD_MARKERS = re.compile(
    r"^[ \t]*-{2,}[ \t]*(?:forwarded message|original message)[ \t]*-{2,}[ \t]*$|"
    r"^begin forwarded message:",
    re.I | re.M)
_REDACTED_LOCAL = re.compile(r"^(?:x+|\*+|-+|#+|\.+|redacted|\[redacted\]|<redacted>|"
                             r"removed|unknown|anonymous|hidden)$", re.I)


@dataclass
class Complaint:
    """What one report is. `is_complaint` False: `why` says what it is instead."""
    is_complaint: bool = False
    why: str = ""
    shape: str = ""                # arf | arf-text | forward
    feedback_type: str = ""
    user_agent: str = ""
    version: str = ""
    arrival_date: str = ""
    reporting_mta: str = ""
    source_ip: str = ""
    reported_domain: str = ""
    original_mail_from: str = ""
    original_rcpt_to: str = ""
    address: str = ""              # the original recipient, "" when it could not be matched
    matched_by: str = ""           # token | verp | original-rcpt-to | ""
    unmatched_why: str = ""        # why no address, when there is none
    sender_domain: str = ""
    message_id: str = ""           # the original message's Message-ID
    queue_id: str = ""             # this engine's id of the original message, when it shows
    subject: str = ""              # the original message's

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------- field blocks

def _fields(text: str) -> dict[str, list[str]]:
    """'Name: value' lines (with folded continuations) -> lower-cased name -> values in order."""
    out: dict[str, list[str]] = {}
    last = ""
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            last = ""
            continue
        if line[0] in " \t" and last:
            out[last][-1] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if colon and name and " " not in name:
            last = name.lower()
            out.setdefault(last, []).append(value.strip())
        else:
            last = ""
    return out


def _first(fields: dict[str, list[str]], name: str) -> str:
    values = fields.get(name)
    return " ".join(values[0].split()) if values else ""


def _part_text(part: EmailMessage) -> str:
    """A part's text, whether the parser made it a string or an enclosed message, decoded when
    a sender base64- or QP-encoded it (RFC 2046 forbids that for message/*; some do it)."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        return _text_of(part)
    chunks = []
    for m in payload:
        try:
            chunks.append(m.as_bytes().decode("utf-8", "replace"))
        except Exception:  # an odd enclosed part: its string form
            chunks.append(str(m))
    text = "".join(chunks)
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if cte == "base64":
            return base64.b64decode("".join(text.split())).decode("utf-8", "replace")
        if cte == "quoted-printable":
            return quopri.decodestring(text.encode()).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        return ""
    return text


# -------------------------------------------------------------------------- the original message

def _enclosed(part: EmailMessage) -> EmailMessage | None:
    """The message a message/rfc822 part holds (decoded, if a sender base64-encoded it)."""
    inner = part.get_payload()
    if isinstance(inner, list):
        inner = inner[0] if inner else None
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    if cte in ("base64", "quoted-printable"):
        raw = inner.as_bytes() if isinstance(inner, EmailMessage) else str(inner or "").encode()
        try:
            raw = base64.b64decode(raw) if cte == "base64" else quopri.decodestring(raw)
        except (binascii.Error, ValueError):
            return None
        return email.message_from_bytes(raw, policy=email.policy.compat32)
    if isinstance(inner, EmailMessage):
        return inner
    if isinstance(inner, str):
        return email.message_from_string(inner, policy=email.policy.compat32)
    return None


def _original(msg: EmailMessage, data: bytes) -> tuple[EmailMessage | None, str]:
    """The quoted original message (perhaps headers only) and its raw header text."""
    for part in msg.walk():
        ctype = part.get_content_type()
        head = None
        if ctype in ("message/rfc822", "message/global"):
            head = _enclosed(part)
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers", "message/global-headers"):
            text = _part_text(part)
            head = email.message_from_string(text.lstrip("\r\n"), policy=email.policy.compat32)
        if head is not None and len(head.keys()):
            return head, "".join(f"{k}: {v}\n" for k, v in head.items())
    # a forward quoting it inline, after a marker line
    text = data[:MAX_SCAN].decode("utf-8", "replace").replace("\r\n", "\n")
    for marker in (_FORWARD_MARKERS, _RETURNED_MARKERS):
        m = marker.search(text)
        if m:
            rest = text[m.end():].lstrip("\n")
            rest = re.sub(r"^> ?", "", rest, flags=re.M)  # quoted with '>'
            head = email.message_from_string(rest, policy=email.policy.compat32)
            if len(head.keys()):
                return head, "".join(f"{k}: {v}\n" for k, v in head.items())
    return None, ""


def _address_of(value: str) -> str:
    """'<a@b>' or 'rfc822; a@b' or 'Name <a@b>' -> 'a@b' ('' for none)."""
    value = value.strip()
    if ";" in value and value.split(";", 1)[0].strip().lower() in ("rfc822", "utf-8"):
        value = value.split(";", 1)[1]
    addrs = [a for _, a in email.utils.getaddresses([value]) if "@" in a]
    return addrs[0].strip() if addrs else ""


def _domain(address: str) -> str:
    return address.rpartition("@")[2].strip().strip(">").lower().rstrip(".") \
        if "@" in address else ""


def is_redacted(address: str) -> bool:
    """An Original-Rcpt-To a provider rewrote to hide who complained (RFC 6590)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return True
    local = local.strip('"')
    return bool(_REDACTED_LOCAL.match(local)) or "redacted" in address.lower()


# --------------------------------------------------------------------------------------- matching

def _tokens(*texts: str) -> list[str]:
    seen: list[str] = []
    for text in texts:
        for m in _TOKEN.finditer(text):
            if m.group(1) not in seen:
                seen.append(m.group(1))
    return seen


def _match(c: Complaint, head: EmailMessage | None, head_text: str, data: bytes,
           secret: bytes) -> str:
    """Fill c.address / matched_by / sender_domain; returns the token's sender domain."""
    if secret:
        unsub = " ".join(str(v) for v in head.get_all("List-Unsubscribe", [])) if head else ""
        unsub = re.sub(r"\s+", "", unsub)  # a folded header
        for text in (unsub, data[:MAX_SCAN].decode("utf-8", "replace")):
            for t in _tokens(text):
                r = recipient_token.verify(secret, t)
                if r is not None:
                    c.address, c.matched_by = r.address, "token"
                    return r.sender_domain
    return_path = _address_of(_header(head, "Return-Path")) if head is not None else ""
    for candidate in (return_path, c.original_mail_from):
        rcpt = verp_decode(candidate) if candidate else None
        if rcpt:
            c.address, c.matched_by = rcpt, "verp"
            return ""
    rcpt_to = c.original_rcpt_to
    if not rcpt_to and head is not None:  # Microsoft JMRP names the recipient in its own header
        rcpt_to = _address_of(_header(head, "X-HmXmrOriginalRecipient"))
    if rcpt_to and not is_redacted(rcpt_to):
        c.address, c.matched_by = rcpt_to, "original-rcpt-to"
        return ""
    c.unmatched_why = ("Original-Rcpt-To is redacted" if rcpt_to else
                       "no recipient token, VERP address or Original-Rcpt-To in the report")
    return ""


def _sender_domain(c: Complaint, head: EmailMessage | None, token_domain: str) -> str:
    if token_domain:
        return token_domain.lower()
    for value in (c.original_mail_from,
                  _header(head, "Return-Path") if head is not None else ""):
        addr = _address_of(value)
        if addr and verp_decode(addr) is None:
            return _domain(addr)
    if head is not None:
        d = _domain(_address_of(_header(head, "From")))
        if d:
            return d
    return c.reported_domain.lower()


# ----------------------------------------------------------------------------------------- parser

def parse(data: bytes, secret: bytes = b"") -> Complaint:
    """Read one mail sent to a complaint address. Never raises: garbage is "not a complaint".
    `secret`: the home's recipient-token key (recipient_token.load_secret); b"" skips tokens."""
    if not isinstance(data, (bytes, bytearray)) or not data.strip():
        return Complaint(why="empty message")
    try:
        return _parse(bytes(data), secret)
    except Exception as e:  # a parser surprise must not lose the mail or fail the session
        log.warning("complaint report could not be read: %s: %s", type(e).__name__, e)
        return Complaint(why=f"unreadable report ({type(e).__name__})")


def _feedback_part(msg: EmailMessage) -> tuple[dict[str, list[str]] | None, str]:
    for part in msg.walk():
        if part.get_content_type() == "message/feedback-report":
            return _fields(_part_text(part)), "arf"
    # a mislabelled ARF: the feedback fields in a text part of their own
    for part in msg.walk():
        if part.get_content_maintype() == "text" and not part.is_multipart() and \
                part.get_content_type() != "text/rfc822-headers":  # the original's, not ours
            text = _text_of(part)[:MAX_SCAN]
            if re.search(r"^feedback-type:", text, re.I | re.M):
                f = _fields(text)
                if "feedback-type" in f and ("user-agent" in f or "version" in f):
                    return f, "arf-text"
    return None, ""


def _parse(data: bytes, secret: bytes) -> Complaint:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    c = Complaint()
    fields, c.shape = _feedback_part(msg)
    head, head_text = _original(msg, data)
    if fields is None:
        ctype = msg.get_content_type()
        report_type = str(msg.get_param("report-type") or "").lower()
        if report_type in ("delivery-status", "disposition-notification") or any(
                p.get_content_type() in ("message/delivery-status",
                                         "message/global-delivery-status",
                                         "message/disposition-notification")
                for p in msg.walk()):
            return Complaint(why="a delivery status or read notification, not a complaint")
        if _is_autoreply(msg):
            return Complaint(why="an autoreply, not a complaint")
        words = _header(msg, "Subject") + "\n" + (
            _text_of(msg) if not msg.is_multipart() else "\n".join(
                _text_of(p) for p in msg.walk()
                if p.get_content_maintype() == "text" and not p.is_multipart()
                and p.get_content_type() not in ("text/rfc822-headers",)))[:MAX_SCAN]
        if head is None or not _COMPLAINT_WORDS.search(words):
            why = "no feedback report and no quoted original message" if head is None else \
                "no feedback report, and nothing says it is a complaint"
            return Complaint(why=f"not a complaint ({why}; {ctype})")
        c.shape, c.feedback_type = "forward", "abuse"
    else:
        c.feedback_type = _first(fields, "feedback-type").lower() or "abuse"
        c.user_agent = _first(fields, "user-agent")
        c.version = _first(fields, "version")
        c.arrival_date = _first(fields, "arrival-date") or _first(fields, "received-date")
        c.reporting_mta = _first(fields, "reporting-mta")
        c.source_ip = _first(fields, "source-ip")
        c.reported_domain = _first(fields, "reported-domain")
        c.original_mail_from = _address_of(_first(fields, "original-mail-from"))
        c.original_rcpt_to = _address_of(_first(fields, "original-rcpt-to"))
        if c.feedback_type in NOT_COMPLAINTS:
            c.why = NOT_COMPLAINTS[c.feedback_type]
            return c
    c.is_complaint = True
    if head is not None:
        c.message_id, c.queue_id = _id_from_headers(head_text)
        c.subject = _header(head, "Subject")[:300]
    c.sender_domain = _sender_domain(c, head, _match(c, head, head_text, data, secret))
    return c


# ----------------------------------------------------------------------------------------- intake

def addressed(cfg, rcpts: list[str]) -> list[str]:
    """The recipients among `rcpts` that are complaint addresses (complaints.addresses)."""
    wanted = {a.strip().lower() for a in cfg.complaints.addresses}
    return [r for r in rcpts if r.lower() in wanted] if wanted else []


class ComplaintDesk:
    """Records the reports sent to the complaint addresses; one per intake (process).

    For each complaint: the matched recipient is suppressed (suppression.py, source
    "complaint", for the original sender domain or for all per
    `complaints.suppress_all_senders`), one line goes to `log/complaints.jsonl` (rotated to
    `complaints.jsonl.1` at MAX_BYTES), one `"event": "complaint"` line to `log/events.jsonl`,
    and one line to the log. A report that is not a complaint only gets a log line saying why:
    it would otherwise let any mail to the address grow the file (the mail itself is stored as
    local mail)."""

    def __init__(self, cfg, store=None) -> None:
        self.cfg = cfg
        self._store = store  # suppression.SuppressionStore, opened on the first complaint
        self._secret: bytes | None = None
        self._lock = threading.Lock()  # handle() runs in worker threads
        self.jsonl = AppendFile(cfg.log_dir / COMPLAINTS_JSONL)
        self.max_bytes = MAX_BYTES
        self.events = EventLog(cfg.log_dir)

    def secret(self) -> bytes:
        if self._secret is None:
            try:
                self._secret = recipient_token.load_secret(self.cfg.home)
            except OSError as e:
                log.warning("recipient token key unreadable (%s): tokens not matched", e)
                return b""
        return self._secret

    def store(self):
        if self._store is None:
            from .suppression import shared_store
            self._store = shared_store(self.cfg)
        return self._store

    def handle(self, rcpts: list[str], data: bytes, mail_from: str = "",
               report_id: str = "") -> Complaint:
        """A report came in for `rcpts` (complaint addresses): parse, suppress, record.
        Blocking (file and store writes): run it in a thread. Raises nothing for bad input."""
        c = parse(data, self.secret())
        now = time.time()
        if not c.is_complaint:
            log.info("mail %s from %s to %s is not a complaint: %s", report_id or "-",
                     mail_from or "<>", ",".join(rcpts), c.why)
            return c
        line = {"time": iso_time(now), "unix": round(now, 3), "report_id": report_id,
                "to": ",".join(rcpts), "from": mail_from, **c.to_json(), "suppressed": False}
        with self._lock:
            if c.address and (c.matched_by == "token" or self.cfg.complaints.trust_unsigned):
                line["suppressed"] = self._suppress(c)
            self._write(self.jsonl, line)
            self.events.write([{
                "time": line["time"], "event": "complaint", "rcpt": c.address,
                "sender_domain": c.sender_domain, "feedback_type": c.feedback_type,
                "id": c.queue_id, "message_id": c.message_id, "matched_by": c.matched_by,
                "user_agent": c.user_agent, "source_ip": c.source_ip,
                "report_id": report_id, "suppressed": line["suppressed"]}])
            webhooks.emit_quietly(self.cfg, [webhooks.event(
                "complained", c.address, sender_domain=c.sender_domain,
                feedback_type=c.feedback_type, id=c.queue_id, message_id=c.message_id,
                matched_by=c.matched_by, user_agent=c.user_agent, source_ip=c.source_ip,
                report_id=report_id)])
        if c.address:
            log.info("complaint: %s (%s) about mail from %s, matched by %s%s%s", c.address,
                     c.feedback_type, c.sender_domain or "?", c.matched_by,
                     f", original {c.queue_id}" if c.queue_id else "",
                     "; suppressed" if line["suppressed"] else
                     "; not suppressed: only a signed token proves the report is about our "
                     "mail (complaints.trust_unsigned)" if c.matched_by != "token" else "")
        else:
            log.warning("complaint (%s) about mail from %s could not be matched to a recipient: "
                        "%s (report %s)", c.feedback_type, c.sender_domain or "?",
                        c.unmatched_why, report_id or "-")
        return c

    def _suppress(self, c: Complaint) -> bool:
        domain = "" if self.cfg.complaints.suppress_all_senders else c.sender_domain
        reason = f"complaint ({c.feedback_type})" + (f" via {c.user_agent}" if c.user_agent
                                                     else "")
        try:
            self.store().add(c.address, reason=reason, source="complaint", sender_domain=domain)
            return True
        except Exception:
            log.exception("complaint: %s could not be suppressed", c.address)
            return False

    def _write(self, f: AppendFile, obj: dict) -> None:
        rotate_if_over(f.path, self.max_bytes)
        try:
            f.append_lines([json.dumps(obj, ensure_ascii=False)])
        except OSError as e:
            log.warning("cannot append to %s: %s", f.path, e)

    def close(self) -> None:
        self.jsonl.close()
        self.events.close()
