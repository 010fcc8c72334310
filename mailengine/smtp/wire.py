"""SMTP on the wire: pure functions shared by the server and client state machines.

Addresses and ESMTP parameters (RFC 5321 4.1.2), xtext (RFC 3461), reply formatting with enhanced
status codes (RFC 3463), dot-stuffing, and line-ending checks. No I/O, no state.
"""
from __future__ import annotations

import re

CRLF = b"\r\n"


class SyntaxProblem(ValueError):
    """A command argument does not follow RFC 5321; the message is fit for a 501 reply."""


# --- replies -------------------------------------------------------------------------------------

def reply(code: int, enhanced: str, text: str) -> bytes:
    """One reply, multi-line when text has newlines: '250-2.0.0 a\\r\\n250 2.0.0 b\\r\\n'."""
    lines = text.split("\n")
    prefix = f"{code} {enhanced} " if enhanced else f"{code} "
    if len(lines) == 1:
        return (prefix + text + "\r\n").encode("utf-8", "replace")
    cont = f"{code}-{enhanced} " if enhanced else f"{code}-"
    out = [cont + line for line in lines[:-1]] + [prefix + lines[-1]]
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "replace")


def ehlo_reply(code: int, lines: list[str]) -> bytes:
    """EHLO replies carry keywords, not enhanced codes (RFC 2034 section 3)."""
    out = [f"{code}-{line}" for line in lines[:-1]] + [f"{code} {lines[-1]}"]
    return ("\r\n".join(out) + "\r\n").encode("ascii", "replace")


# --- addresses -----------------------------------------------------------------------------------

# RFC 5321 4.1.2: atext of RFC 5322 for a Dot-string local part.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]"
_DOT_STRING = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*\Z")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_LABEL = r"(?:[A-Za-z0-9\x80-\U0010ffff](?:[A-Za-z0-9\-\x80-\U0010ffff]*[A-Za-z0-9\x80-\U0010ffff])?)"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_ADDR_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]\Z")
_PARAM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")


def split_path(arg: str, prefix: str) -> tuple[str, str]:
    """'FROM:<a@b> SIZE=10' with prefix 'FROM:' -> ('<a@b>', 'SIZE=10')."""
    if arg[: len(prefix)].upper() != prefix:
        raise SyntaxProblem(f"Syntax: {prefix}<address>")
    rest = arg[len(prefix):].lstrip(" ")  # some clients write 'MAIL FROM: <a@b>'
    if not rest.startswith("<"):
        raise SyntaxProblem("Address must be enclosed in <>")
    # The closing '>' is the first one outside a quoted local part.
    in_quote = escaped = False
    for i, ch in enumerate(rest):
        if escaped:
            escaped = False
        elif ch == "\\" and in_quote:
            escaped = True
        elif ch == '"':
            in_quote = not in_quote
        elif ch == ">" and not in_quote:
            return rest[: i + 1], rest[i + 1:].strip(" ")
    raise SyntaxProblem("Address must be enclosed in <>")


def parse_mailbox(path: str, allow_empty: bool = False) -> str:
    """'<user@example.com>' -> 'user@example.com'; '<>' -> '' when allowed.

    A source route ('<@relay:user@d>', RFC 5321 4.1.2) is accepted and its route dropped, as the
    RFC asks; the relay decision then sees only the final mailbox, so no route can sneak past it.
    """
    inner = path[1:-1]
    if inner == "":
        if allow_empty:
            return ""
        raise SyntaxProblem("An empty address is not allowed here")
    if inner.startswith("@"):
        route, sep, inner = inner.partition(":")
        if not sep:
            raise SyntaxProblem("Bad source route")
    local, at, domain = inner.rpartition("@")
    if not at or not local or not domain:
        raise SyntaxProblem("Address must be user@domain")
    if not (_DOT_STRING.match(local) or _QUOTED.match(local)):
        raise SyntaxProblem("Bad local part of address")
    if not (_DOMAIN.match(domain) or _ADDR_LITERAL.match(domain)):
        raise SyntaxProblem("Bad domain in address")
    if len(local.encode()) > 64 * 4 or len(domain.encode()) > 255:
        raise SyntaxProblem("Address too long")
    return f"{local}@{domain}"


def unquote_local_part(local: str) -> str:
    """'"john doe"' -> 'john doe' (quoted pairs undone); a Dot-string comes back as it is."""
    if len(local) >= 2 and local[0] == '"' and local[-1] == '"':
        return re.sub(r"\\(.)", r"\1", local[1:-1])
    return local


def quote_local_part(text: str) -> str:
    """The local part that stands for `text`: itself when it is a Dot-string, else quoted."""
    if _DOT_STRING.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def domain_of(address: str) -> str:
    """The domain of a mailbox, lower-cased, trailing dot removed."""
    return address.rpartition("@")[2].rstrip(".").lower()


def is_ascii(text: str) -> bool:
    return text.isascii()


def parse_params(text: str) -> dict[str, str | None]:
    """'SIZE=100 BODY=8BITMIME SMTPUTF8' -> {'SIZE': '100', 'BODY': '8BITMIME', 'SMTPUTF8': None}."""
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not _PARAM_KEY.match(key) or (eq and not value):
            raise SyntaxProblem(f"Bad parameter {word[:40]!r}")
        key = key.upper()
        if key in params:
            raise SyntaxProblem(f"Parameter {key} given twice")
        params[key] = value if eq else None
    return params


def xtext_decode(text: str) -> str:
    """RFC 3461 xtext: '+' followed by two upper-case hex digits encodes one byte."""
    out = bytearray()
    i = 0
    raw = text.encode("utf-8")
    while i < len(raw):
        c = raw[i]
        if c == 0x2B:  # '+'
            hexpart = raw[i + 1:i + 3]
            if len(hexpart) != 2 or not re.fullmatch(rb"[0-9A-F]{2}", hexpart):
                raise SyntaxProblem("Bad xtext encoding")
            out.append(int(hexpart, 16))
            i += 3
        elif 33 <= c <= 126 and c != 0x3D:
            out.append(c)
            i += 1
        else:
            raise SyntaxProblem("Bad character in xtext")
    return out.decode("utf-8", "replace")


def xtext_encode(text: str) -> str:
    return "".join(
        chr(b) if 33 <= b <= 126 and b not in (0x2B, 0x3D) else f"+{b:02X}"
        for b in text.encode("utf-8"))


# --- message data --------------------------------------------------------------------------------

def has_bare_line_ending(data: bytes) -> bool:
    """True when data holds a CR not followed by LF or an LF not preceded by CR.

    Such line endings are how SMTP smuggling hides a second message (a bare '\\n.\\n' that one
    server ignores and the next one treats as end of data), so the server refuses them.
    """
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)


def hop_count(data: bytes, stop_at: int) -> int:
    """The `Received:` fields in the header section of a message (each is one hop it made,
    RFC 5321 6.3), counted up to `stop_at`: the limit decides, not the exact number."""
    if data.startswith(b"\r\n"):
        return 0  # no header section
    end = data.find(b"\r\n\r\n")
    end = len(data) if end < 0 else end + 2
    n = 0
    for _ in _RECEIVED.finditer(data, 0, end):
        n += 1
        if n >= stop_at:
            break
    return n


def dot_unstuff(data: bytes) -> bytes:
    """Remove the extra leading dot of every line (RFC 5321 4.5.2); data ends with CRLF."""
    if b"\n." not in data and not data.startswith(b"."):
        return data
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


def dot_stuff(data: bytes) -> bytes:
    """Message bytes -> DATA payload: leading dots doubled, CRLF.CRLF appended.

    A message not ending in CRLF gets one, so the terminator always stands on its own line; the
    empty message stays empty (its payload is the terminator alone).
    """
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"
