"""The outbound SMTP protocol as a sans-IO state machine (RFC 5321 and the ESMTP extensions we use).

Bytes from the server go in with `receive_data()`; commands come out of `data_to_send()`. The
client knows nothing of sockets, clocks or asyncio: the adapter (`mailengine/smtp_session.py`)
moves the bytes, runs the TLS handshake when the state says so, and reports a lost connection
(`connection_lost()`) or an expired timer (`timed_out()`).

One session: greeting -> EHLO (HELO when EHLO is refused) -> capabilities -> optional STARTTLS
(then EHLO again) -> READY. From READY, `start_transaction()` runs one mail transaction: MAIL FROM,
every RCPT TO (in one write when the server offers PIPELINING), DATA only when a recipient was
accepted, then the dot-stuffed body as one raw chunk. When it ends, every recipient has a
`RecipientResult` (the reply that decided it, enhanced code included) and the transaction a
transcript in the manual's format ("--> MAIL FROM:<a@b>" / "<-- 250 ok"). The connection then
goes back to READY for the next message (after an RSET when the transaction stopped half way),
or `quit()` ends it. Test mode (SPEC 5) sends RSET and QUIT where DATA would go.

Server behaviour never raises: garbage, a 421, a lost connection or a timeout end in failure
replies for every open recipient (temporary, `site_failure=True`) and in the CLOSED or ERROR state.
Only calling the client out of order raises `SMTPClientError`.
"""
from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple

from .wire import dot_stuff, has_bare_line_ending, xtext_encode

MAX_LINE = 8192  # RFC 5321 says 512 per reply line; real servers exceed it, so be generous
MAX_REPLY_LINES = 1000


class SMTPClientError(Exception):
    """The client was used out of order (a transaction while not READY, TLS when not asked...).

    This is the only exception the module raises; nothing a server sends can cause it.
    """


class State(enum.Enum):
    GREETING = "greeting"        # waiting for the server's 220
    EHLO = "ehlo"                # EHLO (or HELO) sent
    STARTTLS = "starttls"        # STARTTLS sent
    TLS_PENDING = "tls_pending"  # 220 to STARTTLS: the adapter must run the handshake, then tls_started()
    READY = "ready"              # idle, a transaction may start
    TRANSACTION = "transaction"  # MAIL/RCPT/DATA/body in flight
    RSET = "rset"                # RSET sent after a transaction that stopped half way
    QUIT = "quit"                # QUIT sent
    CLOSED = "closed"            # the session is over (QUIT answered, 421, connection lost)
    ERROR = "error"              # protocol violation or timeout: drop the connection


# --- replies ---------------------------------------------------------------------------------------

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) reply. `lines` hold the text with the enhanced code removed.

    `local` replies were made up by the client (a lost connection, a timeout, a message the server
    cannot take); they carry SMTP-like codes so one classification serves both kinds.
    """
    code: int
    enhanced: str
    lines: tuple[str, ...]
    raw: tuple[str, ...] = ()  # the lines as received, for transcripts
    local: bool = False

    @property
    def text(self) -> str:
        return " ".join(line for line in self.lines if line)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def transcript_lines(self) -> list[str]:
        if self.local:
            return [f"<-- [local] {self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}"]
        return ["<-- " + line for line in self.raw]

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}"


def local_reply(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, (text,), (), True)


def _make_reply(code: int, raw: list[str]) -> Reply:
    texts = [line[4:] for line in raw]
    enhanced = ""
    m = _ENHANCED.match(texts[0])
    if m and m.group(1) == str(code)[0]:
        enhanced = m.group(0).rstrip(" ")
        n = len(enhanced)
        texts = [t[n:].lstrip(" ") if t.startswith(enhanced) else t for t in texts]
    return Reply(code, enhanced, tuple(texts), tuple(raw))


class _ReplyReader:
    """Splits server bytes into replies. Lenient about bare LF endings, strict about everything
    else: a line that is not 'DDD', 'DDD text' or 'DDD-text', codes changing inside one reply,
    or lines and replies beyond the limits are garbage."""

    __slots__ = ("buf", "pending", "code", "error")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pending: list[str] = []
        self.code = 0
        self.error = ""

    def feed(self, data: bytes) -> list[Reply]:
        """Replies completed by data; on garbage, the replies before it and `self.error` set."""
        buf = self.buf
        buf += data
        replies: list[Reply] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            reply = self._line(line)
            if self.error:
                del buf[:]
                return replies
            if reply is not None:
                replies.append(reply)
        del buf[:start]
        if len(buf) > MAX_LINE:
            self.error = f"reply line longer than {MAX_LINE} bytes"
            del buf[:]
        return replies

    def _line(self, line: bytes) -> Reply | None:
        sep = line[3:4]
        if len(line) > MAX_LINE or not line[:3].isdigit() or sep not in (b"", b" ", b"-"):
            self.error = f"not an SMTP reply: {line[:60]!r}"
            return None
        code = int(line[:3])
        if not 200 <= code <= 599 or (self.pending and code != self.code):
            self.error = f"bad reply code in {line[:60]!r}"
            return None
        self.code = code
        self.pending.append(line.decode("utf-8", "replace"))
        if sep == b"-":
            if len(self.pending) > MAX_REPLY_LINES:
                self.error = f"reply of more than {MAX_REPLY_LINES} lines"
            return None
        raw, self.pending = self.pending, []
        return _make_reply(code, raw)

    @property
    def idle(self) -> bool:
        return not self.buf and not self.pending


# --- capabilities, bodies, DSN requests -----------------------------------------------------------

@dataclass(slots=True)
class Capabilities:
    """What the server's EHLO reply offered. `size` is None when SIZE is not offered, 0 when it is
    offered without a limit. `keywords` maps every keyword (upper case) to its parameters."""
    esmtp: bool = False
    pipelining: bool = False
    size: int | None = None
    eightbitmime: bool = False
    smtputf8: bool = False
    starttls: bool = False
    enhancedstatuscodes: bool = False
    chunking: bool = False
    dsn: bool = False
    keywords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_ehlo(cls, reply: Reply) -> "Capabilities":
        caps = cls(esmtp=True)
        for raw in reply.raw[1:]:  # the first line is the server's name and greeting
            keyword, _, params = raw[4:].strip().partition(" ")
            keyword = keyword.upper()
            if keyword:
                caps.keywords[keyword] = params.strip()
        kw = caps.keywords
        caps.pipelining = "PIPELINING" in kw
        caps.eightbitmime = "8BITMIME" in kw
        caps.smtputf8 = "SMTPUTF8" in kw
        caps.starttls = "STARTTLS" in kw
        caps.enhancedstatuscodes = "ENHANCEDSTATUSCODES" in kw
        caps.chunking = "CHUNKING" in kw
        caps.dsn = "DSN" in kw
        if "SIZE" in kw:
            size = kw["SIZE"].split(" ")[0]
            caps.size = int(size) if size.isdigit() and len(size) < 20 else 0
        return caps


def normalize_line_endings(data: bytes) -> bytes:
    """Every bare LF or bare CR becomes CRLF, so no server can read a different message than we
    meant (the SMTP smuggling trick hides a second message behind a bare '\\n.\\n')."""
    if not has_bare_line_ending(data):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


@dataclass(frozen=True, slots=True)
class Body:
    """A message ready for DATA: prepared once, sent on any number of connections.

    `payload` is dot-stuffed and ends with CRLF.CRLF; `size` is the message's size in octets
    (for SIZE=); `eight_bit` says it needs 8BITMIME."""
    payload: bytes
    size: int
    eight_bit: bool

    @classmethod
    def from_bytes(cls, data: bytes) -> "Body":
        data = normalize_line_endings(data)
        return cls(dot_stuff(data), len(data), not data.isascii())


@dataclass(frozen=True, slots=True)
class DSNRequest:
    """RFC 3461 parameters, passed on only when the server offers DSN.

    `notify` is one value for every recipient ("NEVER" or a comma list of SUCCESS, FAILURE, DELAY)
    or a mapping address -> value; `orcpt` maps address -> original recipient ("rfc822;a@b" or
    just "a@b")."""
    ret: str | None = None
    envid: str | None = None
    notify: str | Mapping[str, str] | None = None
    orcpt: Mapping[str, str] | None = None

    def mail_params(self) -> list[str]:
        out = []
        if self.ret:
            out.append(f"RET={self.ret.upper()}")
        if self.envid:
            out.append(f"ENVID={xtext_encode(self.envid)}")
        return out

    def rcpt_params(self, address: str) -> list[str]:
        out = []
        notify = self.notify.get(address) if isinstance(self.notify, Mapping) else self.notify
        if notify:
            out.append(f"NOTIFY={notify.upper()}")
        original = self.orcpt.get(address) if self.orcpt else None
        if original:
            kind, sep, addr = original.partition(";")
            if not sep:
                kind, addr = "rfc822", original
            out.append(f"ORCPT={kind};{xtext_encode(addr)}")
        return out


# --- results ---------------------------------------------------------------------------------------

class RecipientResult(NamedTuple):
    """What happened to one recipient: the reply that decided it and where it came from.

    `stage` is "local" (refused before anything was sent), "mail", "rcpt", "data" (the reply to
    DATA), "body" (the reply after the message), "test" (accepted in test mode: nothing sent),
    or "connection" (lost connection, timeout, protocol error)."""
    address: str
    code: int
    enhanced: str
    text: str
    stage: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500


@dataclass(slots=True)
class TransactionResult:
    """One message over one connection: a result for every recipient, in the order given.

    `reply` is the reply that decided the message as a whole (a local refusal, the MAIL reply, the
    DATA or end-of-data reply, a 421 or a made-up connection failure); None when it was decided
    recipient by recipient (all refused at RCPT, or test mode). `site_failure` says the session
    ended under the transaction (a 421, a lost connection, a timeout, garbage); what follows
    from that (the next MX host, a smaller window) is mailengine/verdict.py's call."""
    mail_from: str
    recipients: list[RecipientResult]
    reply: Reply | None
    site_failure: bool
    test_mode: bool
    transcript: list[str]
    session_transcript: list[str]

    @property
    def delivered(self) -> list[RecipientResult]:
        return [r for r in self.recipients if r.ok]

    @property
    def failed(self) -> list[RecipientResult]:
        return [r for r in self.recipients if r.permanent]

    @property
    def deferred(self) -> list[RecipientResult]:
        return [r for r in self.recipients if r.temporary]

    def transcript_text(self, with_session: bool = True) -> str:
        lines = (self.session_transcript + self.transcript) if with_session else self.transcript
        return "\n".join(lines) + "\n"


class Transaction:
    """The client's bookkeeping for the transaction in flight; `result` is set once `done`."""

    __slots__ = ("mail_from", "rcpts", "body", "dsn", "test_mode", "final", "accepted",
                 "to_send", "pipelined", "data_pipelined", "mail_failed", "rcpt_replies_left", "reply",
                 "site_failure", "log", "done", "result", "_session_log")

    def __init__(self, mail_from: str, rcpts: list[str], body: Body, dsn: DSNRequest | None,
                 test_mode: bool, session_log: list[str]) -> None:
        self.mail_from = mail_from
        self.rcpts = rcpts
        self.body = body
        self.dsn = dsn
        self.test_mode = test_mode
        self.final: list[RecipientResult | None] = [None] * len(rcpts)
        self.accepted: list[int] = []  # indices accepted at RCPT, waiting for the body's reply
        self.to_send: list[int] = []   # indices with a well-formed address
        self.pipelined = False
        self.data_pipelined = False  # DATA sent with MAIL and RCPT
        self.mail_failed = False
        self.rcpt_replies_left = 0
        self.reply: Reply | None = None
        self.site_failure = False
        self.log: list[str] = []
        self.done = False
        self.result: TransactionResult | None = None
        self._session_log = session_log

    def decide(self, index: int, reply: Reply, stage: str) -> None:
        self.final[index] = RecipientResult(self.rcpts[index], reply.code, reply.enhanced,
                                            reply.text, stage)

    def decide_all_open(self, reply: Reply, stage: str) -> None:
        for i, r in enumerate(self.final):
            if r is None:
                self.decide(i, reply, stage)

    def finish(self) -> None:
        # Whatever path led here, no recipient leaves without an outcome.
        self.decide_all_open(local_reply(451, "4.3.0", "No outcome recorded"), "connection")
        self.done = True
        self.result = TransactionResult(self.mail_from, list(self.final), self.reply,  # type: ignore[arg-type]
                                        self.site_failure, self.test_mode, self.log,
                                        list(self._session_log))


# Characters that would break the command line (CR, LF, controls) or the <path>. Anything else
# is sent as given: real mailboxes such as 'a..b@docomo.ne.jp' break the RFC's dot-string rule
# and their servers take them anyway.
_bad_address = re.compile(r"[\x00-\x1f\x7f<>]").search


# --- the client ------------------------------------------------------------------------------------

_BODY_LINE = "[message body, {} bytes]"


class SMTPClient:
    """One outbound SMTP session, sans-IO.

    `starttls`: ask for STARTTLS when offered (the adapter wraps the connection when the state is
    TLS_PENDING, then calls `tls_started()`). `failure` says why the session cannot carry mail
    (refused greeting or EHLO, 421, lost connection, timeout, protocol error)."""

    def __init__(self, helo_name: str, *, starttls: bool = True) -> None:
        if not helo_name or _bad_address(helo_name) or " " in helo_name:
            raise SMTPClientError(f"bad HELO name {helo_name!r}")
        self.helo_name = helo_name
        self.want_starttls = starttls
        self.state = State.GREETING
        self.capabilities = Capabilities()
        self.tls_active = False
        self.greeting: Reply | None = None
        self.failure: Reply | None = None
        self.session_log: list[str] = []
        self._reader = _ReplyReader()
        self._out: list[bytes] = []
        # Commands waiting for their reply, oldest first: (kind, index, command line, log).
        self._expect: deque[tuple[str, int, str | None, list[str]]] = deque()
        self._expect.append(("GREETING", 0, None, self.session_log))
        self._tx: Transaction | None = None
        self._quit_after_rset = False

    # -- what the adapter asks ---------------------------------------------------------------------

    @property
    def waiting_for(self) -> str | None:
        """The oldest command without a reply: 'GREETING', 'EHLO', ..., 'BODY' (end of data)."""
        return self._expect[0][0] if self._expect else None

    @property
    def is_ready(self) -> bool:
        return self.state is State.READY

    @property
    def is_finished(self) -> bool:
        return self.state in (State.CLOSED, State.ERROR)

    @property
    def transaction(self) -> Transaction | None:
        return self._tx

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def note(self, line: str) -> None:
        """A line of the adapter's own (connecting, TLS) for the session transcript."""
        self.session_log.append(line)

    # -- events from the adapter -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b'' means the server closed the connection."""
        if self.is_finished:
            return
        if not data:
            self.connection_lost()
            return
        if self.state is State.TLS_PENDING:
            # Bytes after the 220 to STARTTLS would be read as if they came over TLS.
            self._protocol_error("data received before the TLS handshake")
            return
        replies = self._reader.feed(data)
        for reply in replies:
            if self.is_finished:
                return
            if self.state is State.TLS_PENDING:
                self._protocol_error("data received before the TLS handshake")
                return
            self._on_reply(reply)
        if self._reader.error and not self.is_finished:
            self._protocol_error(self._reader.error)
        elif self.state is State.TLS_PENDING and not self._reader.idle:
            self._protocol_error("data received before the TLS handshake")

    def connection_lost(self) -> None:
        if self.is_finished:
            return
        if self.state is State.QUIT:  # the server hung up on our QUIT: nothing lost
            self._expect.clear()
            self.state = State.CLOSED
            return
        what = self.waiting_for
        text = (f"Connection lost while waiting for the reply to {what}" if what
                else "Connection closed by the server")
        self._fail(local_reply(421 if what is None else 451, "4.4.2", text), State.CLOSED)

    def timed_out(self) -> None:
        if self.is_finished:
            return
        if self.state is State.QUIT:
            self._expect.clear()
            self.state = State.CLOSED
            return
        what = self.waiting_for or "a reply"
        self._fail(local_reply(451, "4.4.2", f"Timed out waiting for the reply to {what}"),
                   State.ERROR)

    def tls_started(self) -> None:
        """The adapter finished the TLS handshake: the session starts over with EHLO."""
        if self.state is not State.TLS_PENDING:
            raise SMTPClientError(f"tls_started() in state {self.state.name}")
        self.tls_active = True
        self.capabilities = Capabilities()
        self._reader = _ReplyReader()
        self._send("EHLO", f"EHLO {self.helo_name}", log=self.session_log)
        self.state = State.EHLO

    # -- commands from the caller ------------------------------------------------------------------

    def start_transaction(self, mail_from: str, rcpts: Iterable[str], body: bytes | Body, *,
                          dsn: DSNRequest | None = None, test_mode: bool = False) -> Transaction:
        """Begin one message; its `result` is ready when `done` (at once if refused locally)."""
        if self.state is not State.READY:
            raise SMTPClientError(f"start_transaction() in state {self.state.name}")
        if not isinstance(body, Body):
            body = Body.from_bytes(body)
        rcpts = list(rcpts)
        if not rcpts:
            raise SMTPClientError("a transaction needs at least one recipient")
        tx = Transaction(mail_from, rcpts, body, dsn, test_mode, self.session_log)
        self._tx = tx
        caps = self.capabilities

        refusal = self._local_refusal(tx)
        if refusal is not None:
            tx.log.extend(refusal.transcript_lines())
            tx.reply = refusal
            tx.decide_all_open(refusal, "local")
            tx.finish()
            return tx
        for i, rcpt in enumerate(rcpts):
            if _bad_address(rcpt) or "@" not in rcpt:
                bad = local_reply(553, "5.1.3", f"Bad recipient address syntax: {rcpt!r}")
                tx.log.extend(bad.transcript_lines())
                tx.decide(i, bad, "local")
            else:
                tx.to_send.append(i)
        if not tx.to_send:
            tx.finish()
            return tx

        params = []
        if caps.size is not None:
            params.append(f"SIZE={body.size}")
        if body.eight_bit and caps.eightbitmime:
            params.append("BODY=8BITMIME")
        if not (mail_from.isascii() and all(r.isascii() for r in rcpts)):
            params.append("SMTPUTF8")
        if dsn is not None and caps.dsn:
            params.extend(dsn.mail_params())
        self.state = State.TRANSACTION
        self._send("MAIL", " ".join([f"MAIL FROM:<{mail_from}>"] + params))
        tx.rcpt_replies_left = len(tx.to_send)
        if caps.pipelining:
            tx.pipelined = True
            for i in tx.to_send:
                self._send_rcpt(i)
            if not test_mode:
                # DATA in the same batch (RFC 2920 3.1): one round trip fewer per message. If
                # every recipient is refused, the server refuses DATA too (or, if it says 354
                # anyway, gets a lone "." and no message).
                tx.data_pipelined = True
                self._send("DATA", "DATA")
        return tx

    def quit(self) -> None:
        """End the session politely; from any other state than READY the adapter just closes."""
        if self.state is State.READY:
            self._send("QUIT", "QUIT", log=self.session_log)
            self.state = State.QUIT
        elif not self.is_finished and self.state is not State.QUIT:
            raise SMTPClientError(f"quit() in state {self.state.name}")

    # -- internals -----------------------------------------------------------------------------------

    def _send(self, kind: str, line: str, index: int = 0, log: list[str] | None = None) -> None:
        self._out.append(line.encode("utf-8") + b"\r\n")
        self._expect.append((kind, index, line, self._tx.log if log is None else log))

    def _send_rcpt(self, i: int) -> None:
        tx = self._tx
        assert tx is not None
        rcpt = tx.rcpts[i]
        params = tx.dsn.rcpt_params(rcpt) if tx.dsn is not None and self.capabilities.dsn else []
        self._send("RCPT", " ".join([f"RCPT TO:<{rcpt}>"] + params), i)

    def _local_refusal(self, tx: Transaction) -> Reply | None:
        """A message this server cannot take: refuse it cleanly, without a MAIL command."""
        caps, body = self.capabilities, tx.body
        if _bad_address(tx.mail_from):
            return local_reply(553, "5.1.7", f"Bad sender address syntax: {tx.mail_from!r}")
        if caps.size and body.size > caps.size:
            return local_reply(552, "5.3.4", f"Message size {body.size} exceeds the server's "
                                             f"limit of {caps.size} bytes")
        if body.eight_bit and not caps.eightbitmime:
            return local_reply(554, "5.6.3", "Message has 8-bit content and the server does "
                                             "not offer 8BITMIME")
        if not (tx.mail_from.isascii() and all(r.isascii() for r in tx.rcpts)) \
                and not caps.smtputf8:
            return local_reply(553, "5.6.7", "Non-ASCII address and the server does not offer "
                                             "SMTPUTF8")
        return None

    def _on_reply(self, reply: Reply) -> None:
        if not self._expect:
            if reply.code == 421:  # e.g. an idle timeout announced by the server
                self._fail(reply, State.CLOSED, log=self.session_log)
            else:
                self._protocol_error(f"unexpected reply {reply.code} with no command pending")
            return
        kind, index, line, log = self._expect.popleft()
        if line is not None:
            log.append("--> " + line)
        log.extend(reply.transcript_lines())
        if reply.code == 421 and kind != "QUIT":
            self._fail(reply, State.CLOSED, stage=kind.lower(), logged=True)
            return
        if reply.code // 100 == 3 and kind != "DATA":  # only DATA may ask for more
            self._protocol_error(f"{reply.code} in reply to {kind}")
            return
        getattr(self, "_on_" + kind)(reply, index)

    def _on_GREETING(self, reply: Reply, _: int) -> None:
        if reply.code // 100 == 2:
            self.greeting = reply
            self._send("EHLO", f"EHLO {self.helo_name}", log=self.session_log)
            self.state = State.EHLO
        else:
            self.failure = reply
            self._send("QUIT", "QUIT", log=self.session_log)
            self.state = State.QUIT

    def _on_EHLO(self, reply: Reply, _: int) -> None:
        if reply.code // 100 == 2:
            self.capabilities = Capabilities.from_ehlo(reply)
            if self.want_starttls and self.capabilities.starttls and not self.tls_active:
                self._send("STARTTLS", "STARTTLS", log=self.session_log)
                self.state = State.STARTTLS
            else:
                self.state = State.READY
        elif reply.code >= 500:  # an old server without ESMTP
            self._send("HELO", f"HELO {self.helo_name}", log=self.session_log)
        else:
            self.failure = reply
            self._send("QUIT", "QUIT", log=self.session_log)
            self.state = State.QUIT

    def _on_HELO(self, reply: Reply, _: int) -> None:
        if reply.code // 100 == 2:
            self.capabilities = Capabilities()
            self.state = State.READY
        else:
            self.failure = reply
            self._send("QUIT", "QUIT", log=self.session_log)
            self.state = State.QUIT

    def _on_STARTTLS(self, reply: Reply, _: int) -> None:
        # Refused STARTTLS: opportunistic TLS carries on in plain text.
        self.state = State.TLS_PENDING if reply.code // 100 == 2 else State.READY

    def _on_MAIL(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        if reply.code // 100 == 2:
            if not tx.pipelined:
                self._send_rcpt(tx.to_send[0])
            return
        tx.mail_failed = True
        tx.reply = reply
        tx.decide_all_open(reply, "mail")
        if not tx.pipelined:
            self._end_transaction()

    def _on_RCPT(self, reply: Reply, index: int) -> None:
        tx = self._tx
        assert tx is not None
        tx.rcpt_replies_left -= 1
        if not tx.mail_failed:
            if reply.code // 100 == 2:
                tx.accepted.append(index)
            else:
                tx.decide(index, reply, "rcpt")
        if tx.rcpt_replies_left:
            if not tx.pipelined:
                self._send_rcpt(tx.to_send[len(tx.to_send) - tx.rcpt_replies_left])
            return
        if tx.data_pipelined:
            return  # the reply to DATA, already sent, comes next
        if tx.mail_failed or not tx.accepted:
            self._end_transaction()
        elif tx.test_mode:
            for i in tx.accepted:
                tx.final[i] = tx.final[i] or RecipientResult(
                    tx.rcpts[i], 250, "2.0.0", "Accepted (test mode: nothing sent)", "test")
            self._end_transaction()
        else:
            self._send("DATA", "DATA")

    def _on_DATA(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        if tx.data_pipelined and (tx.mail_failed or not tx.accepted):
            # sent before the refusals were known: every recipient is decided already
            if reply.code // 100 == 3:
                self._out.append(b".\r\n")  # end an empty message: nothing is delivered
                self._expect.append(("DOT", 0, ".", tx.log))
            elif reply.code // 100 == 2:
                self._protocol_error(f"{reply.code} in reply to DATA")
            else:
                self._end_transaction()
            return
        if reply.code // 100 == 3:
            self._out.append(tx.body.payload)  # one raw chunk: the adapter writes it at once
            self._expect.append(("BODY", 0, _BODY_LINE.format(tx.body.size), tx.log))
        elif reply.code // 100 == 2:
            self._protocol_error(f"{reply.code} in reply to DATA")
        else:
            tx.reply = reply
            tx.decide_all_open(reply, "data")
            self._end_transaction()

    def _on_BODY(self, reply: Reply, _: int) -> None:
        tx = self._tx
        assert tx is not None
        tx.reply = reply
        tx.decide_all_open(reply, "body")
        tx.finish()
        # After the end of data the server has reset the transaction, whatever it replied.
        self.state = State.READY

    def _on_DOT(self, reply: Reply, _: int) -> None:
        # The end of the empty message sent after a 354 with no recipient accepted: whatever
        # the reply, the server's transaction is over and nothing was delivered.
        self._tx.finish()  # type: ignore[union-attr]
        self.state = State.READY

    def _on_RSET(self, reply: Reply, _: int) -> None:
        if reply.code // 100 == 2 and not self._quit_after_rset:
            self.state = State.READY
            return
        if reply.code // 100 != 2:
            self.failure = reply  # a server that cannot reset cannot carry another message
        self._send("QUIT", "QUIT", log=self._tx.log if self._tx is not None else self.session_log)
        self.state = State.QUIT

    def _on_QUIT(self, reply: Reply, _: int) -> None:
        self.state = State.CLOSED

    def _end_transaction(self) -> None:
        """Close a transaction that did not reach the end of data: RSET (and QUIT in test mode)."""
        tx = self._tx
        assert tx is not None
        tx.finish()
        self._quit_after_rset = tx.test_mode
        self._send("RSET", "RSET", log=tx.log)
        self.state = State.RSET

    def _protocol_error(self, why: str) -> None:
        self._fail(local_reply(451, "4.5.0", f"Protocol error: {why}"), State.ERROR)

    def _fail(self, reply: Reply, state: State, stage: str = "connection",
              logged: bool = False, log: list[str] | None = None) -> None:
        """The session is over: every open recipient of the transaction gets `reply`."""
        tx = self._tx
        if log is None:
            log = tx.log if tx is not None and not tx.done else self.session_log
        for _, _, line, _ in self._expect:  # sent, never answered
            if line is not None:
                log.append("--> " + line)
        if not logged:
            log.extend(reply.transcript_lines())
        self._expect.clear()
        self._out.clear()
        if self.failure is None:
            self.failure = reply
        if tx is not None and not tx.done:
            tx.reply = reply
            tx.site_failure = True
            for i in tx.accepted:
                tx.final[i] = None  # accepted at RCPT but never delivered
            tx.decide_all_open(reply, stage)
            tx.finish()
        self.state = state
