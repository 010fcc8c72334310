"""The HTTP API's message document -> envelopes and RFC 5322 bytes (pure; no I/O).

A request is JSON:

    {"from": "list@example.org",                  # envelope sender; "" = null sender
     "to": ["a@example.com", "b@example.net"],    # one message for all of them...
     "headers": {"Subject": "Hi {{name}}", "From": "List <list@example.org>"},
     "body": "Hello {{name}}\n",                  # ...made of headers + body,
     "raw": "Subject: ...\r\n\r\nbody",           # or raw RFC 5322 text instead of both
     "raw_base64": "...",                         # or raw bytes, base64
     "substitutions": {"a@example.com": {"name": "Ann"}},   # optional, per recipient
     "defaults": {"name": "reader"},              # optional, for recipients without a value
     "pool": "bulk"}                              # optional: the sending pool (sources.py)

Without substitutions one message is stored for every recipient (one `.dat`, many
`rcpttosend`). With them each recipient gets its own message in which every `{{key}}` is
replaced by that recipient's value, else the default; `{{to}}` is always the recipient. A
placeholder left without a value is an error (no half-personalised mail goes out).

Headers may be an object or a list of [name, value] pairs (to repeat a name). Missing `From`,
`Date` and `Message-ID` are added; non-ASCII header values are encoded (RFC 2047); a non-ASCII
body without a Content-Type gets `text/plain; charset=utf-8` and `8bit`. Line endings become CRLF.
`pool` goes in front of each message as an `X-MailEngine-Pool:` field, which intake takes out
again and keeps in the `.inf` (pool_header.py): the API and SMTP clients choose a pool one way.
"""
from __future__ import annotations

import base64
import binascii
import email.utils
import re
from dataclasses import dataclass
from email.header import Header

from .. import pool_header
from ..smtp import wire

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.\-]+)\s*\}\}")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable ASCII except ':' (RFC 5322 ftext)
_LINE_END = re.compile(r"\r\n|\r|\n")
_LINE_END_B = re.compile(rb"\r\n|\r|\n")


class InjectError(ValueError):
    """The request cannot be turned into mail; the message says which field and why."""


@dataclass
class Prepared:
    mail_from: str
    rcpts: list[str]
    data: bytes


def _address(value, field: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise InjectError(f"{field}: must be a string address")
    v = value.strip()
    if v.startswith("<") and v.endswith(">"):
        v = v[1:-1]
    try:
        address = wire.parse_mailbox(f"<{v}>", allow_empty=allow_empty)
    except wire.SyntaxProblem as e:
        raise InjectError(f"{field}: {value!r}: {e}") from None
    if not address.isprintable():  # as SMTP refuses it (smtp/server.py): the .inf cannot hold it
        raise InjectError(f"{field}: {value!r} has a character that cannot be stored")
    return address


def _crlf(text: str) -> str:
    return _LINE_END.sub("\r\n", text)


def _header_list(headers) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, dict):
        items = list(headers.items())
    elif isinstance(headers, list) and all(isinstance(h, (list, tuple)) and len(h) == 2
                                           for h in headers):
        items = [tuple(h) for h in headers]
    else:
        raise InjectError("headers: must be an object or a list of [name, value] pairs")
    out = []
    for name, value in items:
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise InjectError(f"headers: {name!r} is not a header name")
        if not isinstance(value, str):
            raise InjectError(f"headers: the value of {name} must be a string")
        if "\r" in value or "\n" in value:
            raise InjectError(f"headers: the value of {name} may not hold a line break")
        out.append((name, value))
    return out


def _encode_value(value: str) -> str:
    if value.isascii():
        return value
    return Header(value, "utf-8").encode()


def build_from_parts(mail_from: str, headers: list[tuple[str, str]], body: str,
                     hostname: str) -> bytes:
    names = {n.lower() for n, _ in headers}
    lines = [f"{n}: {_encode_value(v)}" for n, v in headers]
    if "from" not in names:
        lines.append(f"From: {mail_from or 'MAILER-DAEMON@' + hostname}")
    if "date" not in names:
        lines.append(f"Date: {email.utils.formatdate(localtime=True)}")
    if "message-id" not in names:
        lines.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}")
    if not body.isascii() and "content-type" not in names:
        lines += ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                  "Content-Transfer-Encoding: 8bit"]
    body = _crlf(body)
    if body and not body.endswith("\r\n"):
        body += "\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")


def _raw_bytes(doc: dict) -> bytes | None:
    if "raw" in doc and "raw_base64" in doc:
        raise InjectError("give raw or raw_base64, not both")
    if "raw" in doc:
        if not isinstance(doc["raw"], str) or not doc["raw"]:
            raise InjectError("raw: must be a non-empty string")
        data = doc["raw"].encode("utf-8")
    elif "raw_base64" in doc:
        try:
            data = base64.b64decode(doc["raw_base64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InjectError("raw_base64: not valid base64") from None
        if not data:
            raise InjectError("raw_base64: empty")
    else:
        return None
    data = _LINE_END_B.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _substitute(template: str, values: dict[str, str], rcpt: str) -> str:
    missing = set()

    def one(m: re.Match) -> str:
        key = m.group(1)
        if key == "to":
            return rcpt
        if key in values:
            return values[key]
        missing.add(key)
        return m.group(0)

    out = PLACEHOLDER.sub(one, template)
    if missing:
        raise InjectError(f"substitutions: no value for {', '.join(sorted(missing))} "
                          f"(recipient {rcpt}); give one or a default")
    return out


def _string_map(value, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise InjectError(f"{field}: must be an object of name: text")
    out = {}
    for k, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise InjectError(f"{field}.{k}: must be text or a number")
        out[k] = str(v)
    return out


def prepare(doc, hostname: str, max_recipients: int, max_size: int) -> list[Prepared]:
    """Validate a request document; return the messages to store (one, or one per recipient)."""
    if not isinstance(doc, dict):
        raise InjectError("the request body must be a JSON object")
    unknown = set(doc) - {"from", "to", "headers", "body", "raw", "raw_base64", "substitutions",
                          "defaults", "pool"}
    if unknown:
        raise InjectError(f"unknown fields: {', '.join(sorted(unknown))}")
    if "from" not in doc:
        raise InjectError("from: required (use \"\" for the null sender)")
    mail_from = _address(doc["from"], "from", allow_empty=True)
    to = doc.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to:
        raise InjectError("to: required, a list of one or more addresses")
    if max_recipients and len(to) > max_recipients:
        raise InjectError(f"to: {len(to)} recipients; at most {max_recipients} per request "
                          f"(limits.max_recipients)")
    rcpts = []
    for i, a in enumerate(to):
        r = _address(a, f"to[{i}]")
        if r not in rcpts:
            rcpts.append(r)
    raw = _raw_bytes(doc)
    if raw is not None and ("headers" in doc or "body" in doc):
        raise InjectError("give either raw content or headers and body, not both")
    subs_doc = doc.get("substitutions")
    if subs_doc is not None and not isinstance(subs_doc, dict):
        raise InjectError("substitutions: must be an object: recipient -> {name: text}")
    subs = {}
    for k, v in (subs_doc or {}).items():
        subs[_address(k, "substitutions key").lower()] = _string_map(v, f"substitutions[{k}]")
    defaults = _string_map(doc.get("defaults"), "defaults")

    if raw is None:
        headers = _header_list(doc.get("headers"))
        body = doc.get("body", "")
        if not isinstance(body, str):
            raise InjectError("body: must be a string")
        if not headers and not body:
            raise InjectError("give headers and body, or raw content")
    personal = subs_doc is not None or "defaults" in doc
    out: list[Prepared] = []
    if not personal:
        data = raw if raw is not None else build_from_parts(mail_from, headers, body, hostname)
        out.append(Prepared(mail_from, rcpts, data))
    else:
        for r in rcpts:
            values = {**defaults, **subs.get(r.lower(), {})}
            if raw is not None:
                text = _substitute(raw.decode("utf-8", "surrogateescape"), values, r)
                data = text.encode("utf-8", "surrogateescape")
            else:
                hs = [(n, _substitute(v, values, r)) for n, v in headers]
                for n, v in hs:
                    if "\r" in v or "\n" in v:
                        raise InjectError(f"substitutions: a value put a line break in {n}")
                data = build_from_parts(mail_from, hs, _substitute(body, values, r), hostname)
            out.append(Prepared(mail_from, [r], data))
    pool = doc.get("pool")
    if pool is not None:
        if not isinstance(pool, str) or not pool_header.NAME.match(pool):
            raise InjectError(f"pool: the name of a sending pool (lower-case letters, digits, "
                              f"- and _), not {pool!r}")
        for p in out:  # first: it wins over a field of the raw message (pool_header.take)
            p.data = f"{pool_header.HEADER}: {pool}\r\n".encode() + p.data
    for p in out:
        if max_size and len(p.data) > max_size:
            raise InjectError(f"the message is {len(p.data)} bytes; at most {max_size} "
                              f"(limits.max_message_size)")
        if wire.has_bare_line_ending(p.data):
            raise InjectError("the message holds a bare CR or LF")
    return out
