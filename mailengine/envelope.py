"""The message record and the strict `ID.inf` codec (SPEC section 4, docs/QUEUE.md).

`Message` is everything the engine knows about one queued message except its bytes (`ID.dat`).
`format_inf` / `parse_inf` are the only code that knows the `.inf` text format: `key=value` lines,
keys case-insensitive and written lowercase in alphabetical order, as in the manual's sample.
Keys this version does not know are kept in `Message.extra` and written back unchanged, so a file
written by a newer engine or another tool survives a pass through this one.

Intake writes one `.inf` per message at thousands of messages a second, so both directions avoid
`strftime`/`strptime` and regular expressions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import quote, unquote


class InfError(ValueError):
    """An `.inf` that cannot be used (or a record that cannot be written); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# `protocol` (RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA) and `tls` ("TLSv1.3 with cipher
# TLS_AES_256_GCM_SHA384 (256/256 bits)") are what the Received: header says of the session.
RECEIVED_KEYS = ("helo", "peertcpip", "peerhostname", "localhostname", "localtcpip", "datasize",
                 "protocol", "tls")


def _now() -> datetime:
    return datetime.now().replace(microsecond=0)


@dataclass
class Message:
    id: str
    mail_from: str
    rcpt_to_send: list[str] = field(default_factory=list)
    rcpt_sent: list[str] = field(default_factory=list)
    rcpt_failed: list[str] = field(default_factory=list)
    rcpt_transient: list[str] = field(default_factory=list)
    time_created: datetime = field(default_factory=_now)  # local time, whole seconds
    priority: int = 0
    retry_time: datetime | None = None
    send_tries: int = 0
    status: str = ""
    time_finished: datetime | None = None
    log: list[str] = field(default_factory=list)
    received: dict[str, str] = field(default_factory=dict)  # keys: RECEIVED_KEYS
    dsn_ret: str = ""
    dsn_envid: str = ""
    dsn_rcpt: dict[str, dict[str, str]] = field(default_factory=dict)  # rcpt -> notify/orcpt
    auth_user: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # unknown .inf keys, written back
    size: int = 0  # bytes of ID.dat; not stored in the .inf (the spool fills it in)
    held: bool = False

    def add_log(self, text: str, now: datetime | None = None) -> None:
        self.log.append(format_log_entry(now or datetime.now(), text))


# ---------------------------------------------------------------- times

def _fmt_time(t: datetime) -> str:
    return f"{t.year:04d}/{t.month:02d}/{t.day:02d} {t.hour:02d}:{t.minute:02d}:{t.second:02d}"


def _fmt_retry(t: datetime) -> str:
    return f"{t.year:04d}{t.month:02d}{t.day:02d}{t.hour:02d}{t.minute:02d}{t.second:02d}"


# Times read from .inf files, by their text: a mailing's messages share their creation and retry
# seconds, and a datetime costs ~8 us to check and make (a third of parse_inf, which the backlog
# loader runs for each message it takes in). Both formats (19 and 14 characters) share it.
_TIMES: dict[str, datetime] = {}
_TIMES_MAX = 4096


def _parse_time(key: str, v: str) -> datetime:
    # YYYY/MM/DD HH:MM:SS
    t = _TIMES.get(v)
    if t is not None:
        return t
    if (len(v) != 19 or v[4] != "/" or v[7] != "/" or v[10] != " " or v[13] != ":"
            or v[16] != ":"):
        raise InfError(f"{key}={v!r} is not a time YYYY/MM/DD HH:MM:SS")
    return _known_time(v, _make_time(key, v, v[0:4], v[5:7], v[8:10], v[11:13], v[14:16],
                                     v[17:19]))


def _parse_retry(key: str, v: str) -> datetime:
    # YYYYMMDDHHMMSS
    t = _TIMES.get(v)
    if t is not None:
        return t
    if len(v) != 14:
        raise InfError(f"{key}={v!r} is not a time YYYYMMDDHHMMSS")
    return _known_time(v, _make_time(key, v, v[0:4], v[4:6], v[6:8], v[8:10], v[10:12],
                                     v[12:14]))


def _known_time(v: str, t: datetime) -> datetime:
    if len(_TIMES) >= _TIMES_MAX:
        _TIMES.clear()
    _TIMES[v] = t
    return t


def _make_time(key: str, v: str, *parts: str) -> datetime:
    if not all(p.isdigit() and p.isascii() for p in parts):
        raise InfError(f"{key}={v!r} is not a time")
    try:
        t = datetime(*(int(p) for p in parts))
        t.timestamp()  # the scheduler works with it: year 0001 raises there, killing the engine
        return t
    except (ValueError, OverflowError, OSError) as e:
        raise InfError(f"{key}={v!r} is not a valid time: {e}") from None


def format_log_entry(now: datetime, text: str) -> str:
    """One history entry: `YYYY/MM/DD HH:MM:SS: text`; `|` and line breaks cannot appear in it."""
    if "|" in text or "\n" in text or "\r" in text:
        text = text.replace("|", "/").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return f"{_fmt_time(now)}: {text}"


# ---------------------------------------------------------------- format

_BAD_VALUE_CHARS = ("\n", "\r", "\x00")


def _check_value(key: str, v: str) -> str:
    for c in _BAD_VALUE_CHARS:
        if c in v:
            raise InfError(f"{key}: value {v!r} contains a line break or NUL")
    return v


# Addresses in comma lists. One that cannot stand in a comma list as it is (a quoted local part
# with a comma or a space, `"doe,john"@example.com`, or any character that is not printable) is
# written `<` percent-encoded UTF-8 `>`. A mailbox starts with atext or `"`, never with `<`, so
# the two kinds cannot be confused, and every address written before this encoding existed is
# still written byte for byte as it was. Older readers parse such an item as an address too.
_ITEM_SAFE = "".join(chr(c) for c in range(0x21, 0x7f) if chr(c) not in "%,<>")


def _fmt_item(key: str, a: str) -> str:
    if not a:
        raise InfError(f"{key}: an empty address cannot be written in a comma list")
    if "," in a or " " in a or a[0] == "<" or not a.isprintable():
        return "<" + quote(a, safe=_ITEM_SAFE, errors="surrogateescape") + ">"
    return a


def _parse_item(a: str) -> tuple[str, bool]:
    """(the address, whether it was encoded)."""
    if len(a) > 1 and a[0] == "<" and a[-1] == ">":
        return unquote(a[1:-1], errors="surrogateescape"), True
    return a, False


def _fmt_list(key: str, items: list[str]) -> str:
    return _check_value(key, ",".join([_fmt_item(key, a) for a in items]))


def format_address_list(items: list[str]) -> str:
    """A comma list of addresses as the `.inf` writes them (for keys outside `Message`, such as
    the `rcptto` of mail kept in `incoming/`)."""
    return _fmt_list("rcptto", items)


_DSN_SAFE = "@.+-_"


def _fmt_dsn_rcpt(d: dict[str, dict[str, str]]) -> str:
    return ",".join(
        f"{quote(a, safe=_DSN_SAFE)};{quote(p.get('notify', ''), safe=_DSN_SAFE)};"
        f"{quote(p.get('orcpt', ''), safe=_DSN_SAFE)}"
        for a, p in d.items())


# The last reply of each destination of a deferred message, kept across restarts in the .inf
# key `lastreply` (an extra key: older readers keep it unread). Entries `addr;time;reply`,
# percent-encoded, comma-separated; one per domain, at most LAST_REPLY_MAX.
LAST_REPLY_KEY = "lastreply"
LAST_REPLY_MAX = 50
_REPLY_SAFE = _DSN_SAFE + " :/()[]<>=#"


def set_last_replies(msg: Message, replies: dict[str, tuple[str, str]]) -> None:
    """Keep {address: (time 'Y/m/d H:M:S', reply)} in the message (its .inf at the next write);
    an empty dict removes the key."""
    entries, domains = [], set()
    for addr, (when, text) in replies.items():
        dom = addr.rpartition("@")[2].lower()
        if dom in domains:
            continue
        domains.add(dom)
        entries.append(";".join(quote(x, safe=_REPLY_SAFE) for x in (addr, when, text)))
        if len(entries) >= LAST_REPLY_MAX:
            break
    if entries:
        msg.extra[LAST_REPLY_KEY] = ",".join(entries)
    else:
        msg.extra.pop(LAST_REPLY_KEY, None)


def last_replies(msg: Message) -> dict[str, tuple[str, str]]:
    """The replies kept by set_last_replies; a malformed value reads as none."""
    out: dict[str, tuple[str, str]] = {}
    for entry in msg.extra.get(LAST_REPLY_KEY, "").split(","):
        parts = entry.split(";")
        if len(parts) == 3:
            addr, when, text = (unquote(x) for x in parts)
            out[addr] = (when, text)
    return out


def format_inf(msg: Message) -> bytes:
    """The `.inf` text of `msg`: UTF-8, one `key=value` per line, keys sorted, LF line ends."""
    kv: dict[str, str] = {
        "messageid": msg.id,
        "mailfrom": msg.mail_from,
        "timecreated": _fmt_time(msg.time_created),
        "priority": str(int(msg.priority)),
        "sendtries": str(int(msg.send_tries)),
    }
    if not msg.id or "/" in msg.id or msg.id.startswith("."):
        raise InfError(f"messageid {msg.id!r} cannot be a file name")
    if msg.rcpt_to_send:
        kv["rcpttosend"] = v = _fmt_list("rcpttosend", msg.rcpt_to_send)
        _parse_rcpt_to_send("rcpttosend", v)  # write nothing parse_inf would refuse
    _parse_mailfrom("mailfrom", msg.mail_from)
    if msg.rcpt_sent:
        kv["rcptsent"] = _fmt_list("rcptsent", msg.rcpt_sent)
    if msg.rcpt_failed:
        kv["rcptfailed"] = _fmt_list("rcptfailed", msg.rcpt_failed)
    if msg.rcpt_transient:
        kv["rcpttransient"] = _fmt_list("rcpttransient", msg.rcpt_transient)
    if msg.retry_time is not None:
        kv["retrytime"] = _fmt_retry(msg.retry_time)
    if msg.time_finished is not None:
        kv["timefinished"] = _fmt_time(msg.time_finished)
    if msg.status:
        kv["status"] = msg.status
    if msg.log:
        kv["log"] = "|".join(msg.log) + "|"
    if msg.dsn_ret:
        kv["dsnret"] = msg.dsn_ret
    if msg.dsn_envid:
        kv["dsnenvid"] = msg.dsn_envid
    if msg.dsn_rcpt:
        kv["dsnrcpt"] = _fmt_dsn_rcpt(msg.dsn_rcpt)
    if msg.auth_user:
        kv["authuser"] = msg.auth_user
    if msg.held:
        kv["held"] = "1"
    for k, v in msg.received.items():
        if k not in RECEIVED_KEYS:
            raise InfError(f"received key {k!r} is not one of {', '.join(RECEIVED_KEYS)}")
        if v != "":
            kv[k] = v
    for k, v in msg.extra.items():
        k = k.lower()
        if k in kv or k in _PARSERS or k in RECEIVED_KEYS or not _valid_key(k):
            raise InfError(f"extra key {k!r} is not allowed")
        kv[k] = v
    out = []
    for k in sorted(kv):
        v = kv[k]
        if k != "log":  # log entries were made safe by format_log_entry; others are checked
            _check_value(k, v)
        elif "\n" in v or "\r" in v:
            raise InfError("log: an entry contains a line break (use format_log_entry)")
        out.append(f"{k}={v}\n")
    return "".join(out).encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- parse

# letters, digits, "_-." (ASCII): a regular expression, as a loop over the characters was a tenth
# of reading an .inf, which the engine does for every message it takes from retry/
_valid_key = re.compile(r"[A-Za-z0-9_.-]+").fullmatch


def _parse_int(key: str, v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise InfError(f"{key}={v!r} is not a whole number") from None
    if n < 0:
        raise InfError(f"{key}={v!r} is negative")
    return n


def _parse_list(key: str, v: str) -> list[str]:
    return [_parse_item(a)[0] for a in (a.strip() for a in v.split(",")) if a]


def _parse_rcpt_to_send(key: str, v: str) -> list[str]:
    items = []
    for raw in v.split(","):
        raw = raw.strip()
        if not raw:
            continue
        a, encoded = _parse_item(raw)
        at = a.rfind("@")
        # A plain space means a hand-written list without its commas; an encoded one is part
        # of a quoted local part.
        if at <= 0 or at == len(a) - 1 or (" " in a and not encoded) or not a.isprintable():
            raise InfError(f"{key}: {raw!r} is not an address")
        items.append(a)
    return items


def _parse_dsn_rcpt(key: str, v: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for entry in v.split(","):
        if not entry:
            continue
        parts = entry.split(";")
        if len(parts) != 3:
            raise InfError(f"{key}: entry {entry!r} is not addr;notify;orcpt")
        try:
            addr, notify, orcpt = (unquote(p, errors="strict") for p in parts)
        except UnicodeDecodeError:
            raise InfError(f"{key}: entry {entry!r} is not percent-encoded UTF-8") from None
        params = {}
        if notify:
            params["notify"] = notify
        if orcpt:
            params["orcpt"] = orcpt
        out[addr] = params
    return out


def _parse_held(key: str, v: str) -> bool:
    if v in ("1", "0", ""):
        return v == "1"
    raise InfError(f"{key}={v!r} must be 1 or 0")


def _parse_log(key: str, v: str) -> list[str]:
    return [e for e in v.split("|") if e.strip()]


def _parse_mailfrom(key: str, v: str) -> str:
    if not v.isprintable():
        raise InfError(f"{key}={v!r} is not a printable address")
    return v


# key -> (Message field, parser). Everything not here and not RECEIVED_KEYS goes to `extra`.
_PARSERS = {
    "messageid": ("id", lambda k, v: v),
    "mailfrom": ("mail_from", _parse_mailfrom),
    "rcpttosend": ("rcpt_to_send", _parse_rcpt_to_send),
    "rcptsent": ("rcpt_sent", _parse_list),
    "rcptfailed": ("rcpt_failed", _parse_list),
    "rcpttransient": ("rcpt_transient", _parse_list),
    "timecreated": ("time_created", _parse_time),
    "timefinished": ("time_finished", _parse_time),
    "retrytime": ("retry_time", lambda k, v: _parse_retry(k, v) if v else None),
    "priority": ("priority", _parse_int),
    "sendtries": ("send_tries", _parse_int),
    "status": ("status", lambda k, v: v),
    "log": ("log", _parse_log),
    "dsnret": ("dsn_ret", lambda k, v: v),
    "dsnenvid": ("dsn_envid", lambda k, v: v),
    "dsnrcpt": ("dsn_rcpt", _parse_dsn_rcpt),
    "authuser": ("auth_user", lambda k, v: v),
    "held": ("held", _parse_held),
}


def parse_inf(data: bytes, name: str | None = None) -> Message:
    """Parse an `.inf`. `name` is the file name without `.inf`; when given, `messageid` (if
    present) must equal it, and stands in for it when absent. Raises InfError(reason)."""
    if b"\x00" in data:
        raise InfError("contains NUL bytes: not an .inf text file")
    text = data.decode("utf-8", "surrogateescape")
    if text.startswith("\ufeff"):  # a byte-order mark from a Windows editor
        text = text[1:]
    fields: dict[str, object] = {}
    received: dict[str, str] = {}
    extra: dict[str, str] = {}
    seen: set[str] = set()
    for n, line in enumerate(text.split("\n"), 1):
        line = line.strip()  # also drops the CR of CRLF files
        if not line:
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise InfError(f"line {n} has no '=': {line[:60]!r}")
        key = key.strip().lower()
        if not _valid_key(key):
            raise InfError(f"line {n}: {key[:40]!r} is not a key")
        if key in seen:
            raise InfError(f"line {n}: key {key!r} appears twice")
        seen.add(key)
        value = value.strip()
        p = _PARSERS.get(key)
        if p is not None:
            fields[p[0]] = p[1](key, value)
        elif key in RECEIVED_KEYS:
            received[key] = value
        else:
            extra[key] = value
    if "mail_from" not in fields:
        raise InfError("no mailfrom key")
    msg_id = fields.get("id")
    if name is not None:
        if msg_id is None or msg_id == "":
            fields["id"] = name
        elif msg_id != name:
            raise InfError(f"messageid={msg_id!r} does not match the file name {name!r}")
    elif not msg_id:
        raise InfError("no messageid key")
    msg = Message(**fields)  # type: ignore[arg-type]
    msg.received = received
    msg.extra = extra
    return msg
