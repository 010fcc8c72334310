"""8-bit MIME mail for a server without 8BITMIME (RFC 6152 section 3): re-encoded, not bounced.

`seven_bit(data)` returns the message with every 8-bit leaf part re-encoded: text parts as
quoted-printable, anything else as base64 (RFC 2045 section 6); a multipart or message/rfc822
whose Content-Transfer-Encoding said 8bit or binary then says 7bit, since nothing inside is 8-bit
any more. Parts that are already 7-bit are left as they were. It returns None when the message
cannot be converted so, and only then is the mail refused (554 5.6.3, smtp/client.py):

- 8-bit header fields (internationalized mail needs SMTPUTF8, not a transfer encoding);
- no `MIME-Version` field: without MIME there is no part to say how it is encoded;
- 8-bit bytes where no encoding can carry them (inside a base64 or quoted-printable part, or in
  a multipart's preamble or epilogue).

Python's email package parses and writes the message (compat32 policy, CRLF, header fields
written as received, never refolded). Delivery signs the converted bytes with DKIM, since a
signature over the 8-bit original would not verify after the conversion.
"""
from __future__ import annotations

import base64
import email
import email.policy
import quopri
from email.generator import BytesGenerator
from email.message import Message
from io import BytesIO

_POLICY = email.policy.compat32.clone(linesep="\r\n")


def _header_block(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i]
    return data


class _Unconvertible(Exception):
    pass


def _cte(part: Message) -> str:
    return str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()


def _set_cte(part: Message, value: str) -> None:
    if "Content-Transfer-Encoding" in part:
        part.replace_header("Content-Transfer-Encoding", value)
    else:
        part["Content-Transfer-Encoding"] = value


def _convert(part: Message) -> None:
    if part.is_multipart():  # multipart/*, and message/rfc822 (its payload is the message)
        if not (str(part.preamble or "").isascii() and str(part.epilogue or "").isascii()):
            raise _Unconvertible("8-bit text outside the parts")
        for sub in part.get_payload():
            _convert(sub)
        if _cte(part) in ("8bit", "binary"):
            _set_cte(part, "7bit")
        return
    payload = part.get_payload()
    if not isinstance(payload, str) or payload.isascii():
        return  # 7-bit already: as it was
    if _cte(part) not in ("7bit", "8bit", "binary"):
        raise _Unconvertible(f"8-bit bytes in a {_cte(part)} part")
    raw = part.get_payload(decode=True)  # the bytes, 8-bit ones as they came
    if part.get_content_maintype() == "text":
        # line ends as LF for quopri (the generator writes CRLF); hard line breaks stay
        encoded = quopri.encodestring(raw.replace(b"\r\n", b"\n"))
        _set_cte(part, "quoted-printable")
    else:
        encoded = base64.encodebytes(raw).rstrip(b"\n")
        _set_cte(part, "base64")
    part.set_payload(encoded.decode("ascii"))


def seven_bit(data: bytes) -> bytes | None:
    """The message re-encoded in 7 bits, or None when it cannot be (see the module's notes)."""
    if not _header_block(data).isascii():
        return None
    msg = email.message_from_bytes(data, policy=_POLICY)
    if msg.get("MIME-Version") is None:
        return None
    try:
        _convert(msg)
    except _Unconvertible:
        return None
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, maxheaderlen=0, policy=_POLICY).flatten(msg)
    result = out.getvalue()
    return result if result.isascii() else None
