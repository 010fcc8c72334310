"""One-click unsubscribe (RFC 2369, RFC 8058): the header fields put in each recipient's copy, and
the act of unsubscribing that the public listener and the mailto address share.

Since 2024 Gmail and Yahoo want bulk mail to carry

    List-Unsubscribe: <https://unsub.example.com/u/TOKEN>,
     <mailto:unsubscribe+TOKEN@unsub.example.com>
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

with both fields covered by the DKIM signature. TOKEN is a recipient_token: it names the one
recipient of that copy and the envelope sender's domain, signed with the home's key, so it can be
neither forged nor moved to another address. A per-recipient field means one SMTP transaction
per recipient for such mail, as VERP already does (delivery.py splits it the same way) and a
DKIM signature per recipient (made at each attempt, never kept in ID.dkim). ID.dat is never
changed: the fields go in front of it at send time, before the signature is made.

What is configured (the [unsubscribe] settings): the sender domains the fields are added for (the
MAIL FROM domain, or "*"), the public URL of the listener (unsubscribe_web.py) and the domain of
the mailto address (mail to it reaches this engine's SMTP intake; policy.py accepts it, intake.py
calls `Unsubscriber.mailto`). A message that already carries a List-Unsubscribe field of its
own keeps it and gets nothing added: the sender handles its own unsubscribes.

Unsubscribing puts the address in the suppression store (suppression.py) for the token's sender
domain, source "unsubscribe", writes an `unsubscribed` line to log/events.jsonl and a log line.
"""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

from . import recipient_token, webhooks
from .events import EventLog, iso_time

log = logging.getLogger("mailengine.unsubscribe")

URL_PATH = "/u/"  # the listener's path: URL_BASE/u/TOKEN
MAILTO_PREFIX = "unsubscribe+"  # the mailto local part: unsubscribe+TOKEN
POST_FIELD = b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
# DKIM must cover both fields, whatever dkim.headers says (RFC 8058 section 4)
SIGNED_FIELDS = ("List-Unsubscribe", "List-Unsubscribe-Post")
# RFC 5321 allows servers to refuse longer local parts; ours takes up to 256 (smtp/wire.py)
MAX_LOCAL_PART = 240
_OWN_FIELD = re.compile(rb"(?im)^list-unsubscribe(?:-post)?[ \t]*:")


def sender_domain(mail_from: str) -> str:
    """The envelope sender's domain, as the suppression store and the tokens name it."""
    return mail_from.rpartition("@")[2].rstrip(".").lower() if "@" in mail_from else ""


def has_own_field(data: bytes) -> bool:
    """Whether the message's header section already has a List-Unsubscribe (or
    List-Unsubscribe-Post) field: the sender's own stay, alone."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        end = data.find(b"\n\n")
    head = data if end < 0 else data[:end]
    return _OWN_FIELD.search(b"\n" + head) is not None


def mailto_token(address: str, mailto_domain: str) -> str | None:
    """The token of `unsubscribe+TOKEN@mailto_domain` (prefix and domain in any case), else None."""
    local, _, domain = address.rpartition("@")
    mailto_domain = _domain_setting(mailto_domain)
    if not mailto_domain or domain.rstrip(".").lower() != mailto_domain:
        return None
    if local[:len(MAILTO_PREFIX)].lower() != MAILTO_PREFIX or len(local) == len(MAILTO_PREFIX):
        return None
    return local[len(MAILTO_PREFIX):]


def _domain_setting(value: str) -> str:
    return value.strip().rstrip(".").lower()


class HeaderMaker:
    """The List-Unsubscribe fields for each recipient of mail from the configured domains."""

    def __init__(self, secret: bytes, domains: list[str], url_base: str = "",
                 mailto_domain: str = ""):
        self.secret = secret
        self.all_domains = "*" in domains
        self.domains = frozenset(_domain_setting(d) for d in domains if d != "*")
        self.url_base = url_base.rstrip("/")
        self.mailto_domain = _domain_setting(mailto_domain)

    @classmethod
    def from_config(cls, cfg: Any) -> HeaderMaker | None:
        """None when off: no domains, or neither a URL nor a mailto domain to put in the field."""
        u = cfg.unsubscribe
        if not u.sender_domains or not (u.url_base or u.mailto_domain):
            return None
        return cls(recipient_token.load_secret(cfg.home), u.sender_domains, u.url_base,
                   u.mailto_domain)

    def applies(self, mail_from: str) -> bool:
        """Mail from this envelope sender gets the fields (never bounces: the null sender)."""
        domain = sender_domain(mail_from)
        return bool(domain) and (self.all_domains or domain in self.domains)

    def fields(self, rcpt: str, mail_from: str) -> bytes:
        """The header fields naming `rcpt` (CRLF-ended), b"" when no token can name it."""
        try:
            token = recipient_token.make(self.secret, rcpt, sender_domain(mail_from))
        except ValueError:  # '|' in the address: a token cannot carry it
            return b""
        uris = []
        if self.url_base:
            uris.append(f"<{self.url_base}{URL_PATH}{token}>")
        if self.mailto_domain and len(MAILTO_PREFIX) + len(token) <= MAX_LOCAL_PART:
            uris.append(f"<mailto:{MAILTO_PREFIX}{token}@{self.mailto_domain}>")
        if not uris:
            return b""
        field = ("List-Unsubscribe: " + ",\r\n ".join(uris) + "\r\n").encode("ascii")
        # One-click (RFC 8058 section 3.1) needs an HTTPS URI: a mailto or an http:// link alone
        # gets no Post field
        return field + POST_FIELD if self.url_base.startswith("https://") else field


class Unsubscriber:
    """Verifies a token and suppresses the address it names; shared by the listener and intake.

    `store`: a suppression.SuppressionStore, or a function making one (it is made at the first
    unsubscribe, so an engine that never gets one opens no database). Blocking (SQLite): the
    callers run `unsubscribe` in a thread."""

    def __init__(self, home: Path | str, store: Any, log_dir: Path | str | None = None):
        self.secret = recipient_token.load_secret(home)
        self._store = store
        self.events = EventLog(Path(log_dir) if log_dir else Path(home) / "log")
        self.cfg: Any = None  # set by for_config: unsubscribes are posted to webhooks too

    @classmethod
    def for_config(cls, cfg: Any) -> Unsubscriber:
        def make_store():
            from .suppression import shared_store
            return shared_store(cfg)
        unsubscriber = cls(cfg.home, make_store, cfg.log_dir)
        unsubscriber.cfg = cfg
        return unsubscriber

    @property
    def store(self) -> Any:
        if callable(self._store) and not hasattr(self._store, "add"):
            self._store = self._store()
        return self._store

    def verify(self, token: str) -> recipient_token.Recipient | None:
        return recipient_token.verify(self.secret, token)

    def unsubscribe(self, token: str, via: str, peer: str = "") -> recipient_token.Recipient | None:
        """Suppress the address `token` names (for its sender domain); None for a token this
        engine did not make. `via`: "https" or "mailto", for the log and the event line."""
        who = self.verify(token)
        if who is None:
            return None
        if self.store.lookup(who.address, who.sender_domain) is not None:
            return who  # already: a link POSTed again (or by a scanner) writes nothing more
        self.store.add(who.address, reason=f"unsubscribed via {via}", source="unsubscribe",
                       sender_domain=who.sender_domain)
        self.events.write([{"time": iso_time(), "event": "unsubscribed", "address": who.address,
                            "sender_domain": who.sender_domain, "via": via,
                            "issued": who.issued, "peer": peer}])
        webhooks.emit_quietly(self.cfg, [webhooks.event(
            "unsubscribed", who.address, sender_domain=who.sender_domain, via=via, peer=peer)])
        log.info("unsubscribe: %s for mail from %s (via %s%s, link of %s)", who.address,
                 who.sender_domain or "every sender", via, f" from {peer}" if peer else "",
                 time.strftime("%Y-%m-%d", time.gmtime(who.issued)))
        return who

    def mailto(self, rcpts: list[str], mailto_domain: str, msg_id: str = "",
               peer: str = "") -> list[recipient_token.Recipient]:
        """Mail to unsubscribe+TOKEN@mailto_domain has come in: unsubscribe each token's
        address. A token that does not verify (policy.py refuses it at RCPT already) is logged
        and ignored."""
        done = []
        for rcpt in rcpts:
            token = mailto_token(rcpt, mailto_domain)
            if token is None:
                continue
            who = self.unsubscribe(token, "mailto", peer)
            if who is None:
                log.warning("unsubscribe mail %s to %s: not a token of this engine; ignored",
                            msg_id or "(no id)", rcpt)
            else:
                done.append(who)
        return done

