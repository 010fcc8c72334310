"""What happens to a received message: stored for relay and/or kept as local mail, then promised.

`Intake.on_message` turns the server's MessageReceived into files in the spool and returns the
reply for the client. The `250` is returned only after `Spool.store` returns, which (durable
mode) is after the files are on stable storage. Relayed mail goes to mailq/retry, local mail to
mailq/incoming when `save_incoming` (else it is accepted and discarded, as the manual says).
Mail to VERP bounce addresses (bounces.py) and to the feedback-loop addresses of
`complaints.addresses` (complaints.py) is parsed once stored and recorded before the 250.
The same class runs in the engine's process and in extra intake worker processes.
"""
from __future__ import annotations

import asyncio
import datetime
import errno
import logging
from typing import TYPE_CHECKING, Callable

from . import bounce_suppression, pool_header, recipient_token
from .complaints import ComplaintDesk, addressed
from .config import Config
from .envelope import Message, format_address_list
from .events import EventLog
from .policy import is_verp
from .queue_dirs import INCOMING, RETRY
from .smtp.server import MessageReceived, Reply, Session
from .spool import Spool
from .suppression import dropped_records, shared_store
from .unsubscribe import Unsubscriber, mailto_token

if TYPE_CHECKING:
    from .bounces import BounceLog

log = logging.getLogger("mailengine.intake")

# Called once a message is safely stored: (the relayed Message or None, had local recipients,
# the directory the relayed message is in, its bytes).
OnStored = Callable[[Message | None, bool, str, bytes], None]


def with_protocol(s: Session) -> str:
    """RFC 3848's word for the session, for the Received: header's `with`: SMTP after HELO,
    ESMTP after EHLO, S when under TLS, A when the client authenticated."""
    if not s.esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if s.tls else "") + ("A" if s.auth_user else "")


class Intake:
    def __init__(self, cfg: Config, spool: Spool, hostname: str, on_stored: OnStored,
                 bounces: "BounceLog | None" = None,
                 relay_dir: Callable[[], str] = lambda: RETRY):
        self.cfg = cfg
        # Where relayed mail is stored: working/ when this process delivers it at once (SPEC 4,
        # relay_via_disk), else retry/ (sending paused, or an intake worker process).
        self.relay_dir = relay_dir
        self.spool = spool
        self.hostname = hostname
        self.on_stored = on_stored
        if bounces is None:
            from .bounces import BounceLog
            from .lists import AddressLists
            from .shared import list_mirror
            bounces = BounceLog(cfg.home, AddressLists(cfg.home, mirror=list_mirror(cfg)),
                                log_dir=cfg.log_dir)
        self.bounces = bounces  # mail to mailengine-bounce-USER%DOMAIN@... (SPEC 2.3)
        self._unsubscriber: Unsubscriber | None = None  # made at the first unsubscribe mail
        self._events: EventLog | None = None  # for suppressed recipients dropped (rare)
        self.complaints = ComplaintDesk(cfg)  # mail to complaints.addresses (feedback loops)

    async def on_message(self, ev: MessageReceived) -> Reply:
        try:
            return await self._on_message(ev)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # The disk filled between the space checks (diskwatch.py): nothing is promised, the
            # client keeps the message and tries again later.
            log.error("cannot store a message from %s: %s", ev.session.peer_ip, e)
            return Reply(452, "4.3.1", "Insufficient system storage, try again later")

    async def _on_message(self, ev: MessageReceived) -> Reply:
        txn, s, data = ev.txn, ev.session, ev.data
        relay = [r for r in txn.rcpts if r not in txn.local and r not in txn.dropped]
        local = [r for r in txn.rcpts if r in txn.local]
        if txn.dropped and not relay and not local:  # every recipient suppressed: no file
            self._dropped(txn, "")
            return Reply(250, "2.0.0", "Ok: not queued, every recipient is suppressed")
        # the X-MailEngine-Pool header is for us (sources.py): out before anything is stored
        data, pool = pool_header.take(data)
        now = datetime.datetime.now().replace(microsecond=0)
        received = {"helo": s.helo, "peertcpip": s.peer_ip,
                    "peerhostname": s.peer_hostname or s.peer_ip,
                    "localhostname": self.hostname, "localtcpip": s.local_ip,
                    "datasize": str(len(data)), "protocol": with_protocol(s),
                    "tls": f"{s.tls} with cipher {s.tls_cipher}" if s.tls_cipher else s.tls}
        msg_id = self.spool.new_id()
        # --- unsubscribe mail (unsubscribe.py): recorded before anything is stored, so that a
        # failure answers 451 with nothing promised and the sender tries again ---
        unsub_domain = self.cfg.unsubscribe.mailto_domain
        unsubs = [r for r in local if mailto_token(r, unsub_domain)] if unsub_domain else []
        if unsubs:
            try:
                if self._unsubscriber is None:
                    self._unsubscriber = Unsubscriber.for_config(self.cfg)
                await asyncio.to_thread(self._unsubscriber.mailto, unsubs, unsub_domain,
                                        msg_id, s.peer_ip)
            except Exception:
                log.exception("unsubscribe mail to %s could not be recorded", ",".join(unsubs))
                return Reply(451, "4.3.0", "Cannot record the unsubscribe now, try again later")
        relayed = None
        where = RETRY
        if relay:
            relayed = Message(id=msg_id, mail_from=txn.mail_from, rcpt_to_send=relay,
                              time_created=now, retry_time=now, received=received,
                              dsn_ret=txn.ret, dsn_envid=txn.envid,
                              dsn_rcpt={r: p for r, p in txn.rcpt_params.items() if r in relay},
                              auth_user=s.auth_user, size=len(data),
                              extra={pool_header.INF_KEY: pool} if pool else {})
            relayed.log.append(f"{now:%Y/%m/%d %H:%M:%S}: Received from {s.peer_ip} for "
                               f"{len(relay)} recipients")
            where = self.relay_dir()
            await self.spool.store(relayed, data, where)
            msg_id = relayed.id  # store() picks another id if this one was taken
        if local and self.cfg.queue.save_incoming:
            kept = Message(id=msg_id, mail_from=txn.mail_from, rcpt_to_send=[],
                           time_created=now, received=received, size=len(data),
                           extra={"rcptto": format_address_list(local)})
            try:
                await self.spool.store(kept, data, INCOMING)
            except Exception:
                if relayed is not None:
                    # Not acknowledged: the client sends it again. Left here, the relayed copy
                    # (in working/, which nothing scans) would go out only at the next start.
                    self.spool.remove(relayed.id, where)
                raise
            msg_id = kept.id
        # --- bounce intake (bounces.py): parsed once stored, recorded before the 250 ---
        verp = [r for r in local if is_verp(r)]
        if verp:
            try:
                found = await asyncio.to_thread(self.bounces.handle, verp, data, txn.mail_from,
                                                msg_id)
                proven = None if self.cfg.suppression.trust_unsigned_bounces else \
                    recipient_token.quoted_recipients(
                        recipient_token.load_secret(self.cfg.home), data)
                failures = bounce_suppression.from_bounces(
                    self.cfg.suppression.bounce_categories, found, proven)
                if failures:
                    await asyncio.to_thread(bounce_suppression.suppress, shared_store(self.cfg),
                                            failures, self.cfg.suppression.bounce_days)
            except Exception:
                log.exception("bounce %s to %s could not be recorded", msg_id, ",".join(verp))
        # --- complaint intake (complaints.py): the same, for feedback-loop reports ---
        fbl = addressed(self.cfg, local)
        if fbl:
            try:
                await asyncio.to_thread(self.complaints.handle, fbl, data, txn.mail_from, msg_id)
            except Exception:
                log.exception("complaint %s to %s could not be recorded", msg_id, ",".join(fbl))
        if txn.dropped:
            self._dropped(txn, msg_id)
        self.on_stored(relayed, bool(local), where, data)
        return Reply(250, "2.0.0", f"Ok: queued as {msg_id}")

    def _dropped(self, txn, msg_id: str) -> None:
        """The event lines of the recipients accepted and not delivered (suppression.action =
        drop); `msg_id` is "" when nothing was stored."""
        if self._events is None:
            self._events = EventLog(self.cfg.log_dir)
        self._events.write(dropped_records(msg_id, txn.mail_from, txn.dropped))
