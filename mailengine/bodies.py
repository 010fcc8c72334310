"""The bytes a send attempt puts on the wire (delivery.py asks; SPEC 5, docs/DKIM.md).

`ID.dat` as received, with our `Received:` trace field in front (received_header; `ID.dat`
itself is never changed), and with DKIM signing on, the `DKIM-Signature:` field(s) in front of
that: signed once per attempt in a signing thread (RSA costs ~250 us of CPU, spent by OpenSSL
without the GIL), the signature kept in `ID.dkim` beside `ID.dat` when recipients are left for a
later attempt (dkim.load_or_sign). Mail done at its first attempt writes no `ID.dkim`: on ext4
creating and deleting it cost more CPU than the signature. Our Received field is added after
signing and is not signed (trace fields never are).

- A server without 8BITMIME gets 8-bit MIME mail re-encoded in 7 bits (downgrade.py), made once
  per attempt and signed anew (`seven_bit`).
- Mail of the sender domains in `unsubscribe.sender_domains` gets List-Unsubscribe fields naming
  each recipient (unsubscribe.py), unless it has such a field of its own: one copy per
  recipient, the fields then ID.dat, signed as one (`personal`; nothing kept in ID.dkim).
- With delivery processes (`file_bodies`), a body is a `FileBody`: the name of `ID.dat` in
  working/ and the fields to put in front; the process reads the file itself.
- The bytes intake handed over (the ledger's `data`) are used once instead of reading the file.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .deliverer import FileBody
from .last_one import LastOne
from .dkim import load_or_sign
from .downgrade import seven_bit
from .queue_dirs import WORKING
from .smtp.client import Body
from .unsubscribe import SIGNED_FIELDS, has_own_field

if TYPE_CHECKING:
    from .attempt import Attempt
    from .envelope import Message
    from .unsubscribe import HeaderMaker

log = logging.getLogger("mailengine.delivery")

# Threads signing DKIM: RSA-2048 costs ~250 us of CPU, which OpenSSL spends without the GIL, so
# signing off the event loop leaves the loop ~20 us per message (bench figures in docs/DKIM.md).
SIGN_THREADS = max(1, min(4, os.cpu_count() or 1))


# time_created -> its RFC 5322 text: a mailing's messages share a second (signing threads make
# Received fields too: last_one.py is safe for them)
_date_text = LastOne(lambda created: email.utils.format_datetime(created.astimezone()))


def received_header(msg: Message, hostname: str) -> bytes:
    """The trace header put in front of the message when it goes out (RFC 5321 4.4)."""
    r = msg.received
    when = _date_text(msg.time_created)
    by = r.get("localhostname") or hostname
    if r.get("peertcpip"):
        peer = r.get("peerhostname") or r["peertcpip"]
        head = f"Received: from {r.get('helo') or peer} ({peer} [{r['peertcpip']}])\r\n"
        if r.get("tls"):  # as Postfix says it
            head += f"\t(using {r['tls']})\r\n"
        # RFC 3848 (ESMTP, ESMTPS, ESMTPA, ESMTPSA), recorded by intake; SMTP for older .infs
        head += f"\tby {by} (MailEngine) with {r.get('protocol') or 'SMTP'} id {msg.id};"
        return f"{head}\r\n\t{when}\r\n".encode("utf-8", "replace")
    return f"Received: by {by} (MailEngine) id {msg.id};\r\n\t{when}\r\n".encode("utf-8", "replace")


class Bodies:
    def __init__(self, engine, unsub: HeaderMaker | None, file_bodies: bool) -> None:
        self.engine = engine  # its hostname (for Received:), spool, ledger and DKIM signer
        self.spool = engine.spool
        self.ledger = engine.ledger
        self.signer = getattr(engine, "dkim", None)  # dkim.DKIMSigner, or None: no signing
        self.unsub = unsub  # List-Unsubscribe per recipient (unsubscribe.py), or None
        self.file_bodies = file_bodies  # delivery processes read ID.dat themselves
        self._signing: ThreadPoolExecutor | None = None  # its threads, made at the first use

    def shutdown(self) -> None:
        """Wait for the signing threads (a stop)."""
        if self._signing is not None:
            self._signing.shutdown()

    def _plain(self, msg: Message) -> Body | FileBody:
        """The bytes that go out: a Received: header, then ID.dat as received (no signing)."""
        prefix = received_header(msg, self.engine.hostname)
        data = self.ledger.take_data(self.ledger.get(msg.id))
        if data is None:
            if self.file_bodies:  # the delivery process reads it: only its size here
                path = self.spool.dat_path(msg.id, WORKING)
                size = msg.size or os.stat(path).st_size  # the spool set it (ID.dat's size)
                return FileBody(path, prefix, len(prefix) + size, None)
            data = self.spool.read_data(msg.id, WORKING)
        return self._made(msg, prefix, data)

    def _made(self, msg: Message, prefix: bytes, data: bytes) -> Body | FileBody:
        """`prefix` + ID.dat (`data`): made here, or by the delivery process from the file (so
        the pipe carries its name, not its bytes)."""
        if self.file_bodies:
            return FileBody(self.spool.dat_path(msg.id, WORKING), prefix,
                            len(prefix) + len(data), not data.isascii())
        return Body.from_bytes(prefix + data)

    async def needs_seven_bit(self, att: Attempt, body: Body | FileBody, sess) -> bool:
        """The server lacks 8BITMIME and the body needs it (RFC 6152)."""
        if getattr(sess.capabilities, "eightbitmime", True):
            return False
        if body.eight_bit is None:  # a FileBody not looked into: once, in a thread (rare)
            def eight_bit() -> bool:
                with open(body.path, "rb") as f:
                    return not f.read().isascii()
            body = replace(body, eight_bit=await asyncio.to_thread(eight_bit))
            if att.body is not None and att.body.eight_bit is None:
                att.body = body
        return body.eight_bit

    async def for_attempt(self, att: Attempt) -> Body:
        """The attempt's Body, made once for all its units. Signing runs in a signing thread,
        so units of other domains starting meanwhile wait for the same one (signed once)."""
        if (self.unsub is not None and att.preparing is None
                and self.unsub.applies(att.msg.mail_from) and self._personal(att)):
            return att.body
        if self.signer is None:
            att.body = self._plain(att.msg)
            return att.body
        if att.preparing is None:
            msg = att.msg
            data = self.ledger.take_data(self.ledger.get(msg.id))
            att.preparing = asyncio.get_running_loop().run_in_executor(
                self._pool(), self._signed, msg, data)
            # retrieved even when every unit waiting for it was cancelled (a stop)
            att.preparing.add_done_callback(lambda f: f.cancelled() or f.exception())
        # DKIMHold is raised to each unit
        body, att.fresh_signature = await asyncio.shield(att.preparing)
        att.body = body
        return body

    def _personal(self, att: Attempt) -> bool:
        """Whether the message gets per-recipient fields: yes unless it has a List-Unsubscribe
        field of its own. Then its bytes are kept in the attempt for the copies, and `att.body`
        (never sent as it is) gives the size and the 8-bit flag."""
        msg = att.msg
        e = self.ledger.get(msg.id)
        data = self.ledger.take_data(e)
        if data is None:
            data = self.spool.read_data(msg.id, WORKING)
        if has_own_field(data):  # the sender's own unsubscribe: sent as it is, signed once
            if e is not None:
                self.ledger.keep_data(e, data)
            return False
        att.personal, att.data = self.unsub, data
        att.body = Body.from_bytes(received_header(msg, self.engine.hostname) + data)
        return True

    def _pool(self) -> ThreadPoolExecutor:
        if self._signing is None:
            self._signing = ThreadPoolExecutor(SIGN_THREADS, "dkim-sign")
        return self._signing

    async def personal(self, att: Attempt, rcpt: str, seven: bool) -> Body | None:
        """One recipient's copy: its List-Unsubscribe fields, then ID.dat (re-encoded in 7 bits
        for a server without 8BITMIME: None when it cannot be), DKIM-signed as one, in a
        signing thread. A DKIMHold is raised at the first copy, before anything of its unit
        is sent (a key, once loaded, stays usable)."""
        loop = asyncio.get_running_loop()
        data = att.data
        if seven:
            if att.seven_data is None:
                att.seven_data = loop.run_in_executor(self._pool(), seven_bit, data)
                att.seven_data.add_done_callback(lambda f: f.cancelled() or f.exception())
            data = await asyncio.shield(att.seven_data)
            if data is None:
                return None
        return await loop.run_in_executor(self._pool(), self._make_personal, att,
                                          rcpt, data)

    def _make_personal(self, att: Attempt, rcpt: str, data: bytes) -> Body:
        msg = att.msg
        copy = att.personal.fields(rcpt, msg.mail_from) + data
        signature = b""
        if self.signer is not None:
            signature = self.signer.sign(copy, msg.mail_from.rpartition("@")[2] or None,
                                         SIGNED_FIELDS)
        return Body.from_bytes(signature + received_header(msg, self.engine.hostname) + copy)

    def _signed(self, msg: Message, data: bytes | None) -> tuple[Body, bytes]:
        """In a signing thread: DKIM-Signature field(s), then our Received field, then ID.dat;
        and the signature when made now (b"" when kept from an earlier attempt). Raises
        DKIMHold."""
        if data is None:
            data = self.spool.read_data(msg.id, WORKING)
        sender_domain = msg.mail_from.rpartition("@")[2] or None
        dat = Path(self.spool.dat_path(msg.id, WORKING))
        if not os.path.exists(dat.with_suffix(".dkim")):
            signature = fresh = self.signer.sign(data, sender_domain)
        else:  # kept by an earlier attempt: sent again (signed anew near its x= or if rotated)
            fresh = b""
            try:
                signature = load_or_sign(self.signer, dat, data, sender_domain)
            except OSError as e:
                log.warning("%s: cannot keep its DKIM signature: %s", msg.id, e)
                signature = self.signer.sign(data, sender_domain)
        return (self._made(msg, signature + received_header(msg, self.engine.hostname), data),
                fresh)

    async def seven_bit(self, att: Attempt) -> Body | None:
        """The attempt's body re-encoded in 7 bits for servers without 8BITMIME (downgrade.py),
        made once per attempt in a thread and DKIM-signed as sent; None when it cannot be."""
        if att.seven_bit is None:
            att.seven_bit = asyncio.get_running_loop().run_in_executor(
                self._pool(), self._downgraded, att.msg)
            att.seven_bit.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(att.seven_bit)

    def _downgraded(self, msg: Message) -> Body | None:
        data = seven_bit(self.spool.read_data(msg.id, WORKING))
        if data is None:
            return None
        signature = b""
        if self.signer is not None:  # the 8-bit original's signature would not verify
            signature = self.signer.sign(data, msg.mail_from.rpartition("@")[2] or None)
        return Body.from_bytes(signature + received_header(msg, self.engine.hostname) + data)

    async def keep_signature(self, msg_id: str, signature: bytes) -> None:
        """Write ID.dkim beside ID.dat in working/ (the move to retry/ takes it along), in a
        signing thread: the next attempt sends the same signature."""
        path = Path(self.spool.dat_path(msg_id, WORKING)).with_suffix(".dkim")

        def write() -> None:
            tmp = path.with_suffix(".dkim.tmp")
            tmp.write_bytes(signature)
            os.replace(tmp, path)  # no fsync: a lost file only means signing again
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool(), write)
        except OSError as e:
            log.warning("%s: cannot keep its DKIM signature for the next attempt: %s (it is "
                        "signed again then)", msg_id, e)
