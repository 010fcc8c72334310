"""The `X-MailEngine-Pool:` header: a message's choice of sending pool (sources.py).

It is an instruction to us, never for the recipient: intake takes it out of the message before
the message is stored (so it is neither sent nor DKIM-signed) and keeps the choice in the
`.inf` key `pool`. The HTTP API's `pool` field is carried the same way (web/inject.py puts the
header in front, intake takes it out). Pure; no I/O.
"""
from __future__ import annotations

import re

HEADER = "X-MailEngine-Pool"
INF_KEY = "pool"  # the .inf key (envelope.Message.extra) holding the choice
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # as sources.py's pool names
# the field with its folded continuation lines, at the start of a header line
_FIELD = re.compile(rb"^x-mailengine-pool[ \t]*:(.*(?:\r?\n[ \t].*)*)\r?\n", re.I | re.M)


def take(data: bytes) -> tuple[bytes, str]:
    """(the message without any X-MailEngine-Pool field, the first one's pool name or "").
    Only the header section is looked at; the body is never changed."""
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end + 2]
    if b"-pool" not in head.lower():  # the common case costs one scan of the header
        return data, ""
    found = _FIELD.findall(head)
    if not found:
        return data, ""
    name = found[0].decode("ascii", "replace").strip().lower()
    rest = b"" if end < 0 else data[end + 2:]
    return _FIELD.sub(b"", head) + rest, name if NAME.match(name) else ""
