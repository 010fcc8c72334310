"""Who may send what through MailEngine: relay rules, local domains, refused senders, AUTH.

The sans-IO server asks these questions (`on_mail`, `on_rcpt`, `on_auth`); the answers come from
the settings of SPEC 3 only. Every refusal is a clear SMTP reply with an enhanced status code.
"""
from __future__ import annotations

import logging

from . import recipient_token
from .config import AddressSet, Config
from .hostname import host_name
from .smtp import wire
from .smtp.server import Reply, Session, Transaction
from .unsubscribe import mailto_token
from .suppression import FILE as SUPPRESSION_FILE, SuppressionStore, shared_store
from .users import PasswordFile

log = logging.getLogger("mailengine.policy")

BOUNCE_PREFIX = "mailengine-bounce-"

RELAY_DENIED = Reply(554, "5.7.1", "relay not approved")
# A forged or damaged unsubscribe+TOKEN address: refused, so nothing is stored for it
NO_SUCH_UNSUBSCRIBE = Reply(550, "5.1.1", "no such unsubscribe address")


def is_verp(address: str) -> bool:
    """Shaped like a VERP bounce address: the local part, quoted or not, starts with the prefix
    (bounces.verp_encode quotes it when the recipient's own local part needed quotes)."""
    lowered = address.lower()
    return lowered.startswith(BOUNCE_PREFIX) or lowered.startswith('"' + BOUNCE_PREFIX)


def suppressed_reply(address: str, entry) -> Reply:
    """RCPT's answer for a suppressed recipient (suppression.action = reject)."""
    why = "".join(c for c in entry.reason if 32 <= ord(c) < 127)[:80]
    scope = f" for mail from {entry.sender_domain}" if entry.sender_domain else ""
    return Reply(550, "5.7.1", f"<{address}> is on the suppression list{scope} "
                               f"({entry.source}{': ' + why if why else ''})")


class Policy:
    def __init__(self, cfg: Config, users: PasswordFile | None = None):
        self.users = users
        self._token_key: bytes | None = None  # the home's recipient-token key, read when needed
        self._suppression: SuppressionStore | None = None  # opened at the first relayed RCPT
        self.reload(cfg)
        # Set by the disk-space watcher: new mail is refused for a while, never accepted and lost.
        self.refuse_new_mail: Reply | None = None

    def reload(self, cfg: Config) -> None:
        """Take new settings (the web admin and `config set` change them while running)."""
        local = [d.strip().lower().rstrip(".") for d in cfg.basic.local_domains]
        self.all_local = any(d in (".", "@", "") for d in local)
        self.local_domains = frozenset(d for d in local if d not in (".", "@", ""))
        self.relay_ips = AddressSet(cfg.policy.relay_ips)
        self.relay_domains = frozenset(d[1:].lower().rstrip(".") for d in cfg.policy.rcpt_relay_domains)
        self.refused_from = [s.lower() for s in cfg.policy.refused_mail_from if s]
        # RFC 5321 4.5.1: postmaster of this host is always accepted (and kept local).
        host = host_name(cfg)
        self.postmaster = f"postmaster@{host}".lower()
        # VERP addresses (mailengine-bounce-USER%DOMAIN@...) are taken as bounces only at the
        # bounce host and at local domains (where all mail is local): elsewhere they are
        # ordinary addresses, relayed only for a client that may relay.
        self.bounce_host = cfg.logging.bounce_host.strip().lower().rstrip(".")
        # unsubscribe+TOKEN@mailto_domain (unsubscribe.py) is local mail from anyone when its
        # token is one of ours; intake.py unsubscribes the address it names
        self.home = cfg.home
        self.unsubscribe_domain = cfg.unsubscribe.mailto_domain.strip().lower().rstrip(".")
        self.cfg = cfg
        self.suppress_on = cfg.suppression.enabled
        self.suppress_drop = cfg.suppression.action == "drop"
        if self.suppress_on and (cfg.home / SUPPRESSION_FILE).exists():
            self.suppression.lookup("")  # the list into memory now, not at the first RCPT
        # Feedback-loop report addresses (complaints.py): taken from anyone, kept local.
        self.complaint_addresses = frozenset(a.strip().lower()
                                             for a in cfg.complaints.addresses)
        if self.relay_ips.everyone:
            log.warning("policy.relay_ips contains '0': this engine is an OPEN RELAY and will "
                        "relay mail for anyone on the internet. Restrict it unless this is a test.")

    def is_local(self, address: str) -> bool:
        return self.all_local or wire.domain_of(address) in self.local_domains

    def may_relay(self, session: Session) -> bool:
        return bool(session.auth_user) or session.peer_ip in self.relay_ips

    # --- hooks of smtp.server --------------------------------------------------------------------

    def on_mail(self, session: Session, txn: Transaction, address: str) -> Reply | None:
        if self.refuse_new_mail is not None:
            return self.refuse_new_mail
        lowered = address.lower()
        for needle in self.refused_from:
            if needle in lowered:
                return Reply(550, "5.7.1", "Sender refused by policy")
        return None

    def on_rcpt(self, session: Session, txn: Transaction, address: str) -> Reply | None:
        return self.rcpt(session, txn, address, self.suppress_drop)

    def rcpt(self, session: Session, txn: Transaction, address: str,
             drop_suppressed: bool) -> Reply | None:
        """on_rcpt, saying what a suppressed recipient gets: with `drop_suppressed` it is put
        in txn.dropped (the HTTP API lists them in its answer), else refused."""
        # The domain is the part after the last '@' of the parsed mailbox: source routes are
        # already stripped, and '%' or quoted '@' in the local part never select another domain.
        domain = wire.domain_of(address)
        lowered = address.lower()
        if self.unsubscribe_domain and domain == self.unsubscribe_domain:
            token = mailto_token(address, domain)
            if token is not None:
                if self._token_key is None:
                    self._token_key = recipient_token.load_secret(self.home)
                if recipient_token.verify(self._token_key, token) is None:
                    log.info("RCPT %s from %s: not a token of this engine; refused", address,
                             session.peer_ip)
                    return NO_SUCH_UNSUBSCRIBE
                txn.local.add(address)
                return None
        if self.all_local or domain in self.local_domains or lowered == self.postmaster \
                or (domain == self.bounce_host and is_verp(address)) \
                or lowered in self.complaint_addresses:
            txn.local.add(address)
            return None
        if self.may_relay(session) or domain in self.relay_domains:
            return self._suppressed(txn, address, drop_suppressed) if self.suppress_on else None
        return RELAY_DENIED

    @property
    def suppression(self) -> SuppressionStore:
        if self._suppression is None:
            self._suppression = shared_store(self.cfg)
        return self._suppression

    def _suppressed(self, txn: Transaction, address: str, drop: bool) -> Reply | None:
        """Only relayed recipients are checked: local mail (bounces, postmaster) is never
        suppressed. The sender domain is the MAIL FROM's ("" for <>: entries for all only)."""
        try:
            entry = self.suppression.lookup(address, wire.domain_of(txn.mail_from)
                                            if txn.mail_from else "")
        except Exception:  # a broken list file must not stop the mail: say so, send
            log.exception("suppression list: cannot check %s", address)
            return None
        if entry is None:
            return None
        if drop:
            txn.dropped[address] = entry
            return None
        return suppressed_reply(address, entry)

    def on_auth(self, session: Session, user: str, password: str) -> bool:
        return self.users is not None and self.users.check(user, password)
