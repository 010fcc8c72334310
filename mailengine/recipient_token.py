"""Signed per-recipient tokens: who a message was sent to, in a form only this engine can make.

One-click unsubscribe links (RFC 8058) and complaint matching (ARF reports quote the original
message's headers) both need to name the recipient inside the message, and a stranger must not be
able to write a token for an address of their choosing (unsubscribing someone else) or move a
token to another address. So a token is

    base64url("v1|<address>|<sender domain>|<issued, epoch seconds>") "." base64url(HMAC-SHA256)

keyed with a secret kept in the home (`HOME/recipient-token.key`, 32 random bytes, 0600, made on
first use; every process of the engine reads the same file). The address and sender domain are
readable by whoever holds the token, as they are in any unsubscribe link; the signature is what
counts. Tokens do not expire: a link must keep working for as long as the mail sits in a mailbox.
Replacing the key file invalidates every token issued before.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

KEY_FILE = "recipient-token.key"
VERSION = "v1"
MAX_TOKEN = 1024  # longer input is refused before any decoding
_MAC_BYTES = 16  # 128 bits of HMAC-SHA256: enough against forgery, keeps URLs short


@dataclass(frozen=True)
class Recipient:
    address: str
    sender_domain: str
    issued: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_secret(home: Path | str) -> bytes:
    """The home's token key, made (atomically, 0600) the first time any process asks."""
    path = Path(home) / KEY_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs wins
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_bytes()


def make(secret: bytes, address: str, sender_domain: str = "", issued: float | None = None) -> str:
    """The token naming `address` (lower-cased) as a recipient of mail from `sender_domain`."""
    if "|" in address or "|" in sender_domain:
        raise ValueError("'|' in an address or domain cannot be put in a token")
    stamp = int(time.time() if issued is None else issued)
    payload = f"{VERSION}|{address.lower()}|{sender_domain.lower()}|{stamp}".encode()
    mac = hmac.new(secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    return f"{_b64(payload)}.{_b64(mac)}"


# A token as the engine writes it into List-Unsubscribe: after the listener's path or the mailto
# prefix (unsubscribe.py); quoted messages (bounces, complaints) are searched for it.
_QUOTED = re.compile(rb"(?:/u/|unsubscribe\+)([A-Za-z0-9_-]{8,700}\.[A-Za-z0-9_-]{8,200})")


def quoted_recipients(secret: bytes, data: bytes, limit: int = 50) -> set[str]:
    """The addresses named by valid tokens anywhere in `data` (a returned or reported copy of
    mail this engine sent): proof that the report is about our mail to them."""
    out = set()
    for m in itertools.islice(_QUOTED.finditer(data), limit):
        who = verify(secret, m.group(1).decode("ascii"))
        if who is not None:
            out.add(who.address)
    return out


def verify(secret: bytes, token: str) -> Recipient | None:
    """The recipient a token names, or None for anything not made with `secret` (never raises)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 1:
        return None
    body, _, sig = token.partition(".")
    try:
        payload, mac = _unb64(body), _unb64(sig)
    except (ValueError, TypeError):
        return None
    good = hmac.new(secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]
    if not hmac.compare_digest(mac, good):
        return None
    try:
        version, address, domain, stamp = payload.decode().split("|")
        if version != VERSION or "@" not in address:
            return None
        return Recipient(address, domain, int(stamp))
    except ValueError:
        return None
