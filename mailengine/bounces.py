"""VERP addresses and bounce intake (SPEC 2.3, 3 `logging.bounce_host`, 6).

VERP: with `logging.bounce_host` set, outbound mail for `user@domain` goes out with
MAIL FROM `mailengine-bounce-user%domain@bounce_host`, so whatever comes back to that address is
a bounce for `user@domain`, whatever shape the report has. Mail to such an address is taken as a
bounce at `bounce_host` or at a local domain (policy.on_rcpt): at any other domain it is an
ordinary address, relayed only for a client that may relay.

Bounce intake: `parse_report(data)` reads one returned mail and says whether it is a failure
report at all (an out-of-office reply or a success notice is not) and, for each failed recipient
it names, the status code, the SMTP reply, the reason text and the original message's id. It
understands RFC 3464 reports (`multipart/report; report-type=delivery-status`, what Postfix,
Sendmail, modern Exim, Exchange, Gmail and most large providers send) and the common plain-text
shapes (qmail, old Exim, old Sendmail, Yahoo-like, and "user unknown"/"mailbox full" prose).

Hard or soft: the enhanced status code decides when there is one, then the SMTP reply code, then
the words (outcome.classify is the one rule: X.2.2 mailbox full, X.3.2, X.4.5 pass with time and
are soft even behind a 5xx). A report that is recognisably a failure but names no cause counts
as soft: the address stays on the list until a clearer answer comes.

Category: each bounce also has a category (categories.py: bad-mailbox, quota-issues,
spam-related, ...) from its status, code and reason, by the same rules as the replies the engine
gets while sending.

`BounceLog.record` appends the address to `hard-bounces.txt` or `soft-bounces.txt` and one JSON
line to `log/bounces.jsonl` (address, kind, category, codes, reason, original message id when
known).
"""
from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from email.message import Message as EmailMessage
from pathlib import Path

from .categories import categorize, use_home
from .lists import AddressLists, AppendFile
from .outcome import Kind, bounce_class, classify
from .policy import BOUNCE_PREFIX, is_verp
from .smtp.wire import quote_local_part, unquote_local_part

log = logging.getLogger("mailengine.bounces")

BOUNCES_JSONL = "bounces.jsonl"
MAX_SCAN = 64 * 1024  # characters of report text searched for addresses and codes


# ------------------------------------------------------------------------------------------- VERP

def verp_encode(address: str, bounce_host: str) -> str:
    """The VERP return path for mail to `address`; unchanged when there is no bounce host or
    the address is the null sender or has no '@'. A recipient whose local part is quoted
    (`"john doe"@d`) gets a quoted one too (`"mailengine-bounce-john doe%d"@host`), so the
    return path is itself a valid address."""
    if not bounce_host or not address:
        return address
    user, at, domain = address.rpartition("@")
    if not at or not user or not domain:
        return address
    local = quote_local_part(f"{BOUNCE_PREFIX}{unquote_local_part(user)}%{domain}")
    return f"{local}@{bounce_host}"


def verp_decode(address: str) -> str | None:
    """`mailengine-bounce-user%domain@host` -> `user@domain` (quoted forms too); None for any
    other address."""
    local, at, _host = address.rpartition("@")
    local = unquote_local_part(local)
    if not at or not local.lower().startswith(BOUNCE_PREFIX):
        return None
    inner = local[len(BOUNCE_PREFIX):]
    user, pct, domain = inner.rpartition("%")
    if not pct or not user or not domain or "@" in domain:
        return None
    return f"{quote_local_part(user)}@{domain}"


# ----------------------------------------------------------------------------------------- results

@dataclass
class Bounce:
    """One failed (or delayed) recipient named by a report."""
    address: str
    kind: str                 # "hard" | "soft"
    status: str = ""          # RFC 3463 enhanced code, e.g. "5.1.1"
    code: int = 0             # SMTP reply code, e.g. 550
    reason: str = ""          # the diagnostic text
    action: str = ""          # RFC 3464 Action (failed, delayed); "" for plain-text reports
    remote_mta: str = ""
    shape: str = ""           # rfc3464 | qmail | exim | sendmail | text
    original_message_id: str = ""
    queue_id: str = ""        # this engine's id of the returned message, when it shows
    reported_recipient: str = ""  # the address as the report names it (VERP may differ)

    @property
    def bounce_class(self) -> str:
        return bounce_class(self.code, self.status)

    @property
    def category(self) -> str:
        """Why it failed (categories.py): bad-mailbox, quota-issues, spam-related, ..."""
        return categorize(self.code, self.status, self.reason)


@dataclass
class Report:
    """What one returned mail is: failures, or no bounce at all (`why` says what instead)."""
    bounces: list[Bounce] = field(default_factory=list)
    why: str = ""             # autoreply | success | not a bounce (when bounces is empty)
    shape: str = ""
    original_message_id: str = ""
    queue_id: str = ""

    @property
    def is_bounce(self) -> bool:
        return bool(self.bounces)


# ---------------------------------------------------------------------------------- classification

_ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
_CODE = re.compile(r"(?:^|(?<=[\s:#(\[=;]))([45]\d\d)(?=[\s:-]|$)", re.M)
_ADDRESS = re.compile(r"<?([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*"
                      r"[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)+)>?")

# Words that decide when no code does (checked soft first: "mailbox full" beats "mailbox").
_SOFT_WORDS = re.compile(
    r"mailbox (?:is )?full|over ?quota|quota exceeded|exceeded (?:the |his |her |its )?"
    r"(?:storage |mailbox )?quota|insufficient (?:system )?storage|out of storage|"
    r"temporar(?:y|ily)|try (?:again )?later|will (?:be )?retr|still trying|"
    r"(?:has been |was )?delayed|deferr|greylist|too many connections|rate limit|"
    r"has not yet been delivered|not (?:yet )?been able to deliver", re.I)
_HARD_WORDS = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient|address)|"
    r"(?:mailbox|user|address|recipient|account)[^.\n]{0,40}(?:does ?n[o']t exist|not found|"
    r"unavailable|disabled|deactivated|inactive|suspended)|"
    r"does not exist|doesn't exist|doesn't have an? \S+ account|no mailbox here|"
    r"invalid (?:recipient|address|mailbox)|recipient (?:address )?rejected|"
    r"address rejected|couldn't be found|could not be found|unrouteable|"
    r"host or domain name not found|domain (?:name )?not found|no such domain|"
    r"permanent (?:fatal )?error|permanent failure|i've given up|given up|"
    r"undeliverable|not be delivered|couldn't be delivered|could not be delivered|"
    r"wasn't able to deliver|was not delivered|failed permanently|delivery (?:has )?failed",
    re.I)


def classify_reply(status: str, code: int, text: str) -> str:
    """'hard' or 'soft' from an enhanced status code, an SMTP reply code and the reason text."""
    if status and status[0] in "45":
        return "soft" if classify(500 if status[0] == "5" else 400, status) is Kind.SOFT \
            else "hard"
    if code >= 400:
        return "soft" if classify(code, status) is Kind.SOFT else "hard"
    if _SOFT_WORDS.search(text):
        return "soft"
    if _HARD_WORDS.search(text):
        return "hard"
    return "soft"


def _first_status(text: str) -> str:
    m = _ENHANCED.search(text)
    return m.group(0) if m and m.group(1) in "45" else ""


def _first_code(text: str) -> int:
    m = _CODE.search(text)
    return int(m.group(1)) if m else 0


# ------------------------------------------------------------------------------------ recognition

_BOUNCE_SENDERS = re.compile(r"mailer-daemon|postmaster|mail delivery (?:system|subsystem)|"
                             r"mail ?administrator|mmdf|mailer@", re.I)
_BOUNCE_SUBJECTS = re.compile(
    r"undeliver|undelivered|returned mail|return(?:ed)? to sender|delivery status notification|"
    r"delivery (?:failure|failed|problem|notification)|failure notice|mail delivery failed|"
    r"non[- ]?delivery|could not be delivered|delivery has failed|warning: could not send|"
    r"delayed mail|delivery delayed|message not delivered|mail system error|"
    r"rejected|nondeliverable|address not found", re.I)
_BOUNCE_BODIES = re.compile(
    r"this is the qmail-send program|i'm afraid i wasn't able to deliver|"
    r"could not be delivered to one or more of its\s+recipients|"
    r"following address(?:es)?(?: had| failed)|addresses had permanent fatal errors|"
    r"unable to deliver your message|delivery to the following recipients? failed|"
    r"delivery has failed to these recipients|this is the mail system at host|"
    r"message could not be delivered|your message wasn't delivered|"
    r"message you sent could not be delivered|has not yet been delivered", re.I)
_AUTO_SUBJECTS = re.compile(
    r"^\s*(?:auto(?:matic)?[ -]?(?:reply|response|antwort)|autoreply|auto:|"
    r"out of (?:the )?office|abwesenheit|vacation|away from|on leave|r[ée]ponse automatique|"
    r"respuesta autom[áa]tica|thank you for (?:your )?(?:e-?mail|message|contacting))", re.I)
# Where a report starts quoting the returned message: addresses below are not failures.
# [ \t], not \s: \s crosses lines, and a run of blank lines made the search take minutes.
_RETURNED_MARKERS = re.compile(
    r"^[ \t]*-*[ \t]*(?:below this line is a copy of the message|this is a copy of the message|"
    r"original message follows|the original message (?:follows|headers)|"
    r"returned message follows|unsent message below|the header of the original message|"
    r"a copy of (?:your|the) message|original message headers|"
    r"message headers follow|--- original message ---|----- original message -----)", re.I | re.M)
_QUEUE_ID = re.compile(r"\(MailEngine\) (?:with \S+ )?id (\S+?);")


def _header(msg: EmailMessage, name: str) -> str:
    v = msg.get(name)
    if v is None:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(str(v))))
    except Exception:
        return str(v)


def _is_autoreply(msg: EmailMessage) -> bool:
    auto = _header(msg, "Auto-Submitted").strip().lower()
    if auto and auto != "no":
        return True
    if any(msg.get(h) for h in ("X-Autoreply", "X-Autorespond", "X-Autoresponder",
                                "X-Auto-Response-Suppress-Reply")):
        return True
    prec = _header(msg, "Precedence").strip().lower()
    if prec == "auto_reply":
        return True
    return bool(_AUTO_SUBJECTS.search(_header(msg, "Subject")))


def _text_of(part: EmailMessage) -> str:
    try:
        payload = part.get_payload(decode=True)
    except Exception:
        payload = None
    if payload is None:
        p = part.get_payload()
        return p if isinstance(p, str) else ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _human_text(msg: EmailMessage) -> str:
    """The report's own text: text parts outside any returned message, up to the first marker."""
    chunks: list[str] = []

    def walk(part: EmailMessage) -> None:
        ctype = part.get_content_type()
        if ctype in ("message/rfc822", "text/rfc822-headers", "message/rfc822-headers",
                     "message/delivery-status", "message/global-delivery-status",
                     "message/global", "message/global-headers"):
            return
        if part.is_multipart():
            for sub in part.get_payload():
                walk(sub)
        elif part.get_content_maintype() == "text":
            text = _text_of(part)
            if ctype == "text/html":
                text = re.sub(r"<br\s*/?>|</p>|</div>|</tr>", "\n", text, flags=re.I)
                text = re.sub(r"<[^>]+>", " ", text)
                text = re.sub(r"&lt;", "<", re.sub(r"&gt;", ">", re.sub(r"&nbsp;", " ", text)))
            chunks.append(text)

    walk(msg)
    text = "\n".join(chunks)[:MAX_SCAN]
    m = _RETURNED_MARKERS.search(text)
    return text[:m.start()] if m else text


def _returned_headers(msg: EmailMessage, data: bytes) -> tuple[str, str]:
    """(Message-ID, this engine's queue id) of the returned message, when the report has it."""
    for part in msg.walk():
        ctype = part.get_content_type()
        head = None
        if ctype in ("message/rfc822", "message/global"):
            inner = part.get_payload()
            if isinstance(inner, list) and inner:
                inner = inner[0]
            if isinstance(inner, EmailMessage):
                head = "".join(f"{k}: {v}\n" for k, v in inner.items())
        elif ctype in ("text/rfc822-headers", "message/rfc822-headers",
                       "message/global-headers"):
            head = _text_of(part)
        if head is not None:
            return _id_from_headers(head)
    # Plain-text reports quote the original after a marker.
    text = data[:4 * MAX_SCAN].decode("utf-8", "replace")
    m = _RETURNED_MARKERS.search(text)
    if m:
        return _id_from_headers(text[m.end():])
    return "", ""


def _id_from_headers(text: str) -> tuple[str, str]:
    mid = re.search(r"^message-id:\s*(<[^>\s]+>|\S+)", text, re.I | re.M)
    qid = _QUEUE_ID.search(text)
    return (mid.group(1) if mid else ""), (qid.group(1) if qid else "")


# ---------------------------------------------------------------------------------- RFC 3464 part

def _field_blocks(part: EmailMessage) -> list[dict[str, str]]:
    """The header-like blocks of a message/delivery-status part, names lower-cased."""
    payload = part.get_payload()
    if isinstance(payload, list):
        if part.get_content_type() == "message/delivery-status":
            return [{k.lower(): " ".join(str(v).split()) for k, v in m.items()} for m in payload]
        # other message/* types were parsed as one enclosed message: read its text again (as
        # bytes: message/global-delivery-status carries UTF-8 addresses, RFC 6533)
        return _parse_blocks(b"".join(m.as_bytes() for m in payload).decode("utf-8", "replace"))
    text = payload if isinstance(payload, str) else _text_of(part)
    return _parse_blocks(text)


def _parse_blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last = ""
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur, last = {}, ""
            continue
        if line[0] in " \t" and last:
            cur[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if colon and name.strip() and " " not in name.strip():
            last = name.strip().lower()
            cur[last] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def _typed(value: str) -> str:
    """'rfc822; a@b' -> 'a@b' (the address-type prefix of RFC 3464 fields dropped)."""
    kind, semi, rest = value.partition(";")
    v = rest if semi else kind
    return v.strip().strip("<>").strip()


def _from_delivery_status(part: EmailMessage) -> list[Bounce]:
    blocks = _field_blocks(part)
    if not blocks:
        return []
    # The first block holds the per-message fields (Reporting-MTA...), unless it is a recipient.
    per_rcpt = blocks if "final-recipient" in blocks[0] else blocks[1:]
    out: list[Bounce] = []
    for b in per_rcpt:
        rcpt = _typed(b.get("final-recipient", "")) or _typed(b.get("original-recipient", ""))
        if not rcpt:
            continue
        action = b.get("action", "").strip().lower()
        if action in ("delivered", "relayed", "expanded"):
            continue
        diag = b.get("diagnostic-code", "")
        diag_type, semi, diag_text = diag.partition(";")
        reason = (diag_text if semi else diag).strip()
        status = b.get("status", "").strip().split(" ")[0]
        said = _first_status(reason)
        if not _ENHANCED.fullmatch(status):
            status = said
        elif status.endswith(".0.0") and said[:1] == status[:1]:
            status = said  # "Status: 5.0.0" with the server's "550 5.1.1" behind it
        code = _first_code(reason)
        if action == "delayed":
            kind = "soft"
            if status.startswith("5"):
                status = "4" + status[1:]
        else:
            kind = classify_reply(status, code, reason)
        out.append(Bounce(address=rcpt, kind=kind, status=status, code=code, reason=reason,
                          action=action or "failed", remote_mta=_typed(b.get("remote-mta", "")),
                          shape="rfc3464", reported_recipient=rcpt))
    return out


# -------------------------------------------------------------------------------- plain-text shapes

def _text_shape(text: str) -> str:
    low = text.lower()
    if "qmail-send program" in low:
        return "qmail"
    if "mail delivery software" in low or "smtp error from remote mail server" in low:
        return "exim"
    if "permanent fatal errors" in low or "transcript of session follows" in low:
        return "sendmail"
    return "text"


def _from_text(text: str, ignore: set[str]) -> list[Bounce]:
    """Failed recipients named in prose: each address's block runs to the next address."""
    found: list[tuple[int, str]] = []
    seen: set[str] = set()
    for m in _ADDRESS.finditer(text):
        addr = m.group(1).strip(".")
        key = addr.lower()
        local = key.split("@")[0]
        if key in ignore or local in ("mailer-daemon", "postmaster") and key in ignore:
            continue
        if local == "mailer-daemon" or is_verp(key):
            continue
        # "Message-ID"-like tokens and Received-header ids are not recipients
        before = text[max(0, m.start() - 40):m.start()].lower()
        if "message-id" in before or " id " in before[-5:]:
            continue
        if key in seen:
            continue
        seen.add(key)
        found.append((text.rfind("\n", 0, m.start()) + 1, addr))
    out = []
    shape = _text_shape(text)
    for i, (start, addr) in enumerate(found):
        end = found[i + 1][0] if i + 1 < len(found) else len(text)
        if end <= start:  # two addresses on one line: share the line's block
            end = text.find("\n\n", start)
            end = len(text) if end < 0 else end
        block = text[start:end]
        status = _first_status(block)
        code = _first_code(block)
        words = block if (status or code or _SOFT_WORDS.search(block)
                          or _HARD_WORDS.search(block)) else text
        if not (status or code):
            status, code = _first_status(words), _first_code(words)
        kind = classify_reply(status, code, words)
        reason = _reason_line(block, addr)
        out.append(Bounce(address=addr, kind=kind, status=status, code=code, reason=reason,
                          shape=shape, reported_recipient=addr))
    return out


def _reason_line(block: str, addr: str) -> str:
    """The most telling line of a block: the one with the SMTP reply, else the first words."""
    head, blank, _ = block.strip("\n").partition("\n\n")
    lines = [ln.strip() for ln in head.split("\n") if ln.strip()]
    for ln in lines:
        if _CODE.search(ln) or _ENHANCED.search(ln):
            return ln[:500]
    rest = [ln for ln in lines if ln.strip("<>:").lower() != addr.lower()]
    return " ".join(rest)[:500]


# --------------------------------------------------------------------------------------- the parser

def parse_report(data: bytes, ignore: tuple[str, ...] = ()) -> Report:
    """Read one returned mail. `ignore`: addresses that are never failed recipients (the
    bounce's own sender and recipient)."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    rep = Report()
    rep.original_message_id, rep.queue_id = _returned_headers(msg, data)
    dsn_parts = [p for p in msg.walk() if p.get_content_type() in (
        "message/delivery-status", "message/global-delivery-status")]
    ignored = {a.lower() for a in ignore if a}
    for h in ("From", "To", "Return-Path", "Sender", "Reply-To"):
        for _name, a in email.utils.getaddresses([_header(msg, h)]):
            if a and _BOUNCE_SENDERS.search(a):
                ignored.add(a.lower())
    if dsn_parts:
        rep.shape = "rfc3464"
        for p in dsn_parts:
            rep.bounces += _from_delivery_status(p)
        if not rep.bounces:
            rep.why = "success"  # delivered/relayed/expanded notices only
        else:
            human = _human_text(msg)
            for b in rep.bounces:  # a report without a Diagnostic-Code: take the prose's reason
                if not b.reason and human:
                    found = _from_text(human, ignored)
                    same = [f for f in found if f.address.lower() == b.address.lower()]
                    if same:
                        b.reason = same[0].reason
                        if not b.status and not b.code:
                            b.status, b.code = same[0].status, same[0].code
                            b.kind = classify_reply(b.status, b.code, b.reason)
        _stamp(rep)
        return rep
    sender = _header(msg, "From") + " " + _header(msg, "Return-Path")
    subject = _header(msg, "Subject")
    text = _human_text(msg)
    looks_bounce = bool(_BOUNCE_SENDERS.search(sender) or _BOUNCE_SUBJECTS.search(subject))
    if not looks_bounce and _is_autoreply(msg):
        rep.why = "autoreply"
        return rep
    if not looks_bounce and not _BOUNCE_BODIES.search(text):
        rep.why = "not a bounce"
        return rep
    rep.shape = _text_shape(text)
    rep.bounces = _from_text(text, ignored)
    if not rep.bounces:
        rep.why = "no recipient named"
    _stamp(rep)
    return rep


def _stamp(rep: Report) -> None:
    for b in rep.bounces:
        b.original_message_id = rep.original_message_id
        b.queue_id = rep.queue_id


def bounce_for(rep: Report, address: str) -> Bounce | None:
    """The report's word on `address` (a VERP-decoded recipient): its own entry when the report
    names it, else the report's first failure (forwarded mail fails under another name), else,
    for a recognised failure report that names no one, a soft bounce without a cause."""
    low = address.lower()
    for b in rep.bounces:
        if b.address.lower() == low:
            b.address = address
            return b
    if rep.bounces:
        first = rep.bounces[0]
        return Bounce(**{**asdict(first), "address": address})
    if rep.why == "no recipient named":
        return Bounce(address=address, kind="soft", reason="unrecognised failure report",
                      shape=rep.shape, original_message_id=rep.original_message_id,
                      queue_id=rep.queue_id)
    return None


# ------------------------------------------------------------------------------------- the records

class BounceLog:
    """Appends bounces to the lists and to log/bounces.jsonl; one per home directory."""

    def __init__(self, home: Path | str, lists: AddressLists | None = None,
                 log_dir: Path | str | None = None) -> None:
        home = Path(home)
        use_home(home)  # the operator's bounce_categories.toml, when there is one
        self.lists = lists or AddressLists(home)
        self.jsonl = AppendFile(Path(log_dir or home / "log") / BOUNCES_JSONL)

    def handle(self, rcpts: list[str], data: bytes, mail_from: str = "",
               bounce_id: str = "") -> list[Bounce]:
        """Mail for `rcpts` (the VERP ones among them count) has come in: parse it once, record
        a bounce for each VERP address it fails. Blocking: run it in a thread."""
        targets = [(r, verp_decode(r)) for r in rcpts]
        targets = [(r, a) for r, a in targets if a]
        if not targets:
            return []
        try:
            rep = parse_report(data, ignore=tuple(r for r, _ in targets) + (mail_from,))
        except Exception:
            log.exception("bounce %s could not be parsed", bounce_id or "(no id)")
            rep = Report(why="no recipient named")
        out = []
        for rcpt, addr in targets:
            b = bounce_for(rep, addr)
            if b is None:
                log.info("mail to %s is not a bounce (%s); nothing recorded", rcpt, rep.why)
                self._write_json({"time": _now(), "address": addr, "kind": "ignored",
                                  "why": rep.why, "bounce_id": bounce_id, "from": mail_from})
                continue
            self.record(b, bounce_id=bounce_id, mail_from=mail_from)
            out.append(b)
        return out

    def record(self, b: Bounce, bounce_id: str = "", mail_from: str = "") -> None:
        self.lists.bounce(b.address, b.kind == "hard")
        category = b.category
        line = {"time": _now(), "address": b.address, "kind": b.kind, "category": category,
                "status": b.status, "code": b.code, "reason": b.reason, "class": b.bounce_class,
                "action": b.action, "remote_mta": b.remote_mta, "shape": b.shape,
                "reported_recipient": b.reported_recipient,
                "original_message_id": b.original_message_id, "queue_id": b.queue_id,
                "bounce_id": bounce_id, "from": mail_from}
        self._write_json(line)
        log.info("bounce: %s %s %s (%s) %s", b.address, b.kind,
                 " ".join(x for x in (b.status, str(b.code) if b.code else "") if x) or "-",
                 category, b.reason[:200])

    def _write_json(self, obj: dict) -> None:
        try:
            self.jsonl.append_lines([json.dumps(obj, ensure_ascii=False)])
        except OSError as e:
            log.warning("cannot append to %s: %s", self.jsonl.path, e)


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t)) + \
        f".{int(t % 1 * 1000):03d}" + time.strftime("%z", time.localtime(t))
