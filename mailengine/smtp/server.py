"""The SMTP server protocol as a sans-IO state machine (RFC 5321 and its ESMTP extensions).

Bytes from the client go in with `receive()`; `step()` returns the reply bytes to send and, when the
adapter must act, one event: a whole message to store (`MessageReceived`), a password to check
(`AuthCheck`: slow and throttled, so the adapter runs it off its event loop and answers with
`auth_done()`), a TLS handshake to run (`StartTLS`) or the end of the session (`Close`). Policy
questions (may this sender, this recipient?) are asked of a `Hooks` object synchronously: they are
pure decisions. Nothing here touches a socket, a clock or a file, so every behaviour is tested
bytes in, bytes out.

Extensions: PIPELINING, SIZE, 8BITMIME, SMTPUTF8, ENHANCEDSTATUSCODES, CHUNKING, DSN, STARTTLS,
AUTH PLAIN/LOGIN (only once TLS is on). Every reply carries an RFC 3463 enhanced code.

Memory is bounded per session: a command line is at most `max_command_line` bytes, a message at
most `max_message_size` (the rest is read and dropped, then refused with 552), and the adapter
stops reading while a stored message is pending. Across sessions the adapter keeps a memory
budget: it tells the machine the `room` left (a SIZE beyond it, or DATA/BDAT with none left, gets
452 4.3.1) and may `release_message()` one being received (its bytes are dropped at once, the rest
is read and dropped, and the given reply answers it). For the adapter's deadlines the machine
counts whole lines read (`lines_read`) and says whether a message is being received.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from . import wire


class Reply(NamedTuple):
    code: int
    enhanced: str
    text: str

    def encode(self) -> bytes:
        return wire.reply(self.code, self.enhanced, self.text)


@dataclass
class ServerOptions:
    hostname: str = "localhost"
    max_message_size: int = 10485760  # 0 = no limit
    max_recipients: int = 1000
    max_command_line: int = 2048
    max_errors: int = 20
    max_hops: int = 50  # Received: fields a message may carry (0 = no limit): more is a loop
    tls_available: bool = False
    auth_available: bool = False


@dataclass
class Session:
    """What is known about the client; filled by the adapter (addresses) and the machine."""
    peer_ip: str = ""
    peer_port: int = 0
    peer_hostname: str = ""
    local_ip: str = ""
    local_port: int = 0
    helo: str = ""
    esmtp: bool = False
    tls: str = ""  # TLS version once encrypted
    tls_cipher: str = ""  # as Received names it: "TLS_AES_256_GCM_SHA384 (256/256 bits)"
    auth_user: str = ""


@dataclass
class Transaction:
    mail_from: str = ""
    mail_params: dict = field(default_factory=dict)
    rcpts: list = field(default_factory=list)
    rcpt_params: dict = field(default_factory=dict)  # address -> {"notify": .., "orcpt": ..}
    local: set = field(default_factory=set)  # recipients the policy found local (not relayed)
    # recipients accepted but not to be delivered (a suppressed address with suppression.action
    # = drop): address -> why, for the event line
    dropped: dict = field(default_factory=dict)
    smtputf8: bool = False
    body_8bit: bool = False
    ret: str = ""  # DSN RET=FULL|HDRS
    envid: str = ""  # DSN ENVID, decoded


class Hooks(Protocol):
    def on_mail(self, session: Session, txn: Transaction, address: str) -> Reply | None: ...
    def on_rcpt(self, session: Session, txn: Transaction, address: str) -> Reply | None: ...
    def on_auth(self, session: Session, user: str, password: str) -> bool:
        """Asked by the adapter, not the machine (see AuthCheck)."""


class AcceptAll:
    """Hooks that accept every sender and recipient and no password (for tests and fuzzing)."""

    def on_mail(self, session, txn, address):
        return None

    def on_rcpt(self, session, txn, address):
        return None

    def on_auth(self, session, user, password):
        return False


@dataclass
class MessageReceived:
    session: Session
    txn: Transaction
    data: bytes  # as received, dot-stuffing removed, ends with CRLF unless sent by BDAT without


@dataclass
class AuthCheck:
    """The adapter must check this password (off its event loop: hashes are slow), then call
    auth_done() with True, False, or a Reply refusing to check (e.g. 454 while throttled)."""
    session: Session
    user: str
    password: str


class StartTLS:
    """The 220 reply is out: the adapter must run the TLS handshake, then call tls_started()."""


class Close:
    """The adapter must send what step() returned, then close the connection."""


START_TLS = StartTLS()
CLOSE = Close()

# States
CMD, DATA, BDAT, AUTH, WAIT, TLS, CLOSED = range(7)

_DATA_END = b"\r\n.\r\n"


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' (int() fails) and '١' (int() gives 1)."""
    return text.isascii() and text.isdigit()


# What the session keeps (HELO name, addresses, ENVID, ORCPT) ends up in the queue's `.inf`, in
# Received: headers and in the commands of the next hop: a NUL, a control character or a line or
# format separator there is refused at the command that carries it, never after DATA.
def _printable(text: str) -> bool:
    return text.isprintable()


_OK = Reply(250, "2.0.0", "OK")
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")


class ServerConnection:
    def __init__(self, options: ServerOptions, hooks: Hooks, session: Session | None = None):
        self.opt = options
        self.hooks = hooks
        self.session = session or Session()
        self.txn: Transaction | None = None
        self.state = CMD
        self.errors = 0
        self._in = bytearray()
        self._out: list[bytes] = []
        self._scan = 0  # DATA: where the terminator search resumes
        self._discarding = False  # DATA/BDAT: message over the size limit, bytes are dropped
        self._refusal: Reply | None = None  # while discarding: the reply instead of 552 (memory)
        self._dropped = 0
        # Bytes the adapter's memory budget still lets this session buffer (None: no budget).
        self.room: int | None = None
        self.lines_read = 0  # whole command (and AUTH) lines taken: the adapter's line deadline
        self._bdat_left = 0  # BDAT: bytes of the current chunk still to read
        self._bdat_last = False
        self._bdat_data = bytearray()
        self._bdat_used = False  # this transaction used BDAT (then DATA is out of sequence)
        self._bdat_refuse: Reply | None = None  # the chunk is being read only to be refused
        self._auth_step = ""  # AUTH: "plain", "login-user", "login-pass"
        self._auth_user = ""
        self._too_long = False  # a command line overflowed: drop bytes until its end
        self._commands = {
            "HELO": self._helo, "EHLO": self._ehlo, "MAIL": self._mail, "RCPT": self._rcpt,
            "DATA": self._data, "BDAT": self._bdat, "RSET": self._rset, "NOOP": self._noop,
            "QUIT": self._quit, "VRFY": self._vrfy, "EXPN": self._expn, "HELP": self._help,
            "STARTTLS": self._starttls, "AUTH": self._auth,
        }

    # --- the adapter's side ----------------------------------------------------------------------

    def greeting(self) -> bytes:
        return Reply(220, "", f"{self.opt.hostname} ESMTP MailEngine ready").encode()

    def receive(self, data: bytes) -> None:
        """Bytes from the client.

        After the StartTLS event the adapter must pass only bytes that came through TLS: asyncio
        may deliver the first decrypted bytes before start_tls() returns (so before tls_started()),
        and they are kept. Clear-text bytes read between the 220 and the start of the handshake
        must be dropped by the adapter, never passed here: the machine cannot tell them apart, and
        running them would allow the CVE-2011-0411 command injection. (Bytes pipelined with
        STARTTLS in the same read are dropped here, see _starttls.)
        """
        if self.state != CLOSED:
            self._in += data

    def step(self) -> tuple[bytes, object | None]:
        """Process buffered input; return (bytes to send, event or None when more input is needed)."""
        event = None
        while event is None:
            st = self.state
            if st == CMD:
                event = self._read_command()
            elif st == DATA:
                event = self._read_data()
            elif st == BDAT:
                event = self._read_bdat()
            elif st == AUTH:
                event = self._read_auth()
            else:  # WAIT, TLS, CLOSED: the adapter owes us something, or we are done
                event = CLOSE if st == CLOSED else None
                break
            if event is False:  # need more input
                event = None
                break
        out = b"".join(self._out)
        self._out.clear()
        return out, event

    def message_done(self, reply: Reply) -> None:
        """The adapter stored (or refused) the MessageReceived; its reply goes out next."""
        self._out.append(reply.encode())
        self.txn = None
        self.state = CMD

    def tls_started(self, version: str) -> None:
        """TLS is up: RFC 3207 says forget everything learned before, including EHLO."""
        self.session.tls = version
        self.session.helo = ""
        self.session.esmtp = False
        self.txn = None
        self.state = CMD

    def auth_done(self, result: bool | Reply) -> None:
        """The answer to AuthCheck: the password is right, wrong, or was not checked (a Reply)."""
        self.state = CMD
        if isinstance(result, Reply):
            self._error(*result)
        elif result:
            self.session.auth_user = self._auth_user
            self._reply(235, "2.7.0", "Authentication succeeded")
        else:
            self._error(535, "5.7.8", "Authentication credentials invalid")

    def release_message(self, reply: Reply) -> bool:
        """Give up the message being received (the adapter's memory budget is spent): its bytes
        are dropped (BDAT chunks now, DATA's by the next step(), which first looks for its end),
        the rest is read and dropped, and `reply` answers it. True if it was not given up yet."""
        if not self.receiving_message or self._refusal is not None:
            return False
        self._discarding, self._refusal = True, reply
        self._bdat_data = bytearray()
        return True

    @property
    def pending_input(self) -> int:
        return len(self._in)

    @property
    def held(self) -> int:
        """Bytes this session buffers: input not yet taken, and BDAT chunks of its message."""
        return len(self._in) + len(self._bdat_data)

    @property
    def receiving_message(self) -> bool:
        """Inside DATA, or inside a BDAT chunk or between the chunks of one message."""
        return self.state in (DATA, BDAT) or (
            self.state == CMD and self._bdat_used and self.txn is not None)

    @property
    def reading_line(self) -> bool:
        """Waiting for a command line or an AUTH answer."""
        return self.state in (CMD, AUTH)

    # --- reading ---------------------------------------------------------------------------------

    def _reply(self, code: int, enhanced: str, text: str) -> None:
        self._out.append(wire.reply(code, enhanced, text))

    def _error(self, code: int, enhanced: str, text: str) -> None:
        self._reply(code, enhanced, text)
        self.errors += 1
        if self.errors >= self.opt.max_errors:
            self._reply(421, "4.7.0", f"{self.opt.hostname} Too many errors, closing connection")
            self.state = CLOSED

    def _next_line(self) -> bytes | None | bool:
        """One command line without CRLF; None if incomplete; False if it was refused already."""
        buf = self._in
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > self.opt.max_command_line:
                # Keep reading (and dropping) until the line ends, then say why once.
                del buf[:-1]
                self._too_long = True
            return None
        line = bytes(buf[:end + 1])
        del buf[:end + 1]
        self.lines_read += 1
        if self._too_long or len(line) > self.opt.max_command_line:
            self._too_long = False
            self._error(500, "5.5.2", "Line too long")
            return False
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            self._error(500, "5.5.2", "Lines must end with CRLF, bare CR or LF is not allowed")
            return False
        return line[:-2]

    def _read_command(self):
        line = self._next_line()
        if line is None:
            return False
        if line is False:
            return None
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(500, "5.5.2", "Command is not valid UTF-8")
            return None
        verb, _, arg = text.partition(" ")
        # ASCII only: str.upper() maps 'quıt' to 'QUIT' and 'ſtarttls' to 'STARTTLS'.
        handler = self._commands.get(verb.upper()) if verb.isascii() else None
        if handler is None:
            if not text.strip():
                self._error(500, "5.5.2", "Empty command")
            else:
                self._error(500, "5.5.1", f"Command unrecognized: {verb[:20]!r}")
            return None
        return handler(arg)

    # --- commands --------------------------------------------------------------------------------

    def _helo(self, arg: str):
        arg = arg.strip()
        if not arg:
            return self._error(501, "5.5.4", "Syntax: HELO hostname")
        if not _printable(arg):
            return self._error(501, "5.5.2", "HELO hostname has a character that is not printable")
        self.session.helo, self.session.esmtp, self.txn = arg, False, None
        self._reply(250, "", f"{self.opt.hostname} Hello {arg}")

    def _ehlo(self, arg: str):
        arg = arg.strip()
        if not arg:
            return self._error(501, "5.5.4", "Syntax: EHLO hostname")
        if not _printable(arg):
            return self._error(501, "5.5.2", "EHLO hostname has a character that is not printable")
        self.session.helo, self.session.esmtp, self.txn = arg, True, None
        lines = [f"{self.opt.hostname} Hello {arg}", "PIPELINING"]
        size = self.opt.max_message_size
        lines.append(f"SIZE {size}" if size else "SIZE")
        lines += ["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"]
        if self.opt.tls_available and not self.session.tls:
            lines.append("STARTTLS")
        if self.opt.auth_available and self.session.tls and not self.session.auth_user:
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        self._out.append(wire.ehlo_reply(250, lines))

    def _mail(self, arg: str):
        if not self.session.helo:
            return self._error(503, "5.5.1", "Send HELO or EHLO first")
        if self.txn is not None:
            return self._error(503, "5.5.1", "Nested MAIL command")
        try:
            path, rest = wire.split_path(arg, "FROM:")
            address = wire.parse_mailbox(path, allow_empty=True)
            params = wire.parse_params(rest)
        except wire.SyntaxProblem as e:
            return self._error(501, "5.5.4", str(e))
        if params and not self.session.esmtp:
            return self._error(555, "5.5.4", "Parameters need EHLO")
        txn = Transaction(mail_from=address, mail_params=params)
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _is_number(value) or len(value) > 20:
                    return self._error(501, "5.5.4", "Bad SIZE value")
                limit = self.opt.max_message_size
                if limit and int(value) > limit:
                    return self._reply(552, "5.3.4", f"Message size exceeds the limit of {limit} bytes")
                if self.room is not None and int(value) > self.room:
                    return self._reply(*NO_STORAGE)  # RFC 1870 6.1
            elif key == "BODY":
                if (value or "").upper() not in ("7BIT", "8BITMIME"):
                    return self._error(555, "5.5.4", "BODY must be 7BIT or 8BITMIME")
                txn.body_8bit = value.upper() == "8BITMIME"
            elif key == "SMTPUTF8":
                if value is not None:
                    return self._error(555, "5.5.4", "SMTPUTF8 takes no value")
                txn.smtputf8 = True
            elif key == "RET":
                if (value or "").upper() not in ("FULL", "HDRS"):
                    return self._error(555, "5.5.4", "RET must be FULL or HDRS")
                txn.ret = value.upper()
            elif key == "ENVID":
                try:
                    txn.envid = wire.xtext_decode(value or "")
                except wire.SyntaxProblem as e:
                    return self._error(501, "5.5.4", f"ENVID: {e}")
                if not txn.envid or len(txn.envid) > 100:
                    return self._error(501, "5.5.4", "ENVID must be 1 to 100 characters")
                if not _printable(txn.envid):
                    return self._error(501, "5.5.4", "ENVID has a character that is not printable")
            elif key == "AUTH":
                pass  # RFC 4954 5: informational; we record who authenticated ourselves
            else:
                return self._error(555, "5.5.4", f"Unsupported parameter {key}")
        if not address.isascii() and not txn.smtputf8:
            return self._error(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
        if not _printable(address):
            return self._error(553, "5.1.7", "Sender address has a character that cannot be stored")
        refusal = self.hooks.on_mail(self.session, txn, address)
        if refusal is not None and refusal.code >= 400:
            self._out.append(refusal.encode())
            return None
        self.txn = txn
        self._bdat_used = False
        self._out.append((refusal or Reply(250, "2.1.0", "Sender OK")).encode())

    def _rcpt(self, arg: str):
        txn = self.txn
        if txn is None:
            return self._error(503, "5.5.1", "Send MAIL first")
        try:
            path, rest = wire.split_path(arg, "TO:")
            if path[1:-1].lower() == "postmaster":  # RFC 5321 4.5.1: domain-less postmaster
                address = f"postmaster@{self.opt.hostname}"
            else:
                address = wire.parse_mailbox(path)
            params = wire.parse_params(rest)
        except wire.SyntaxProblem as e:
            return self._error(501, "5.5.4", str(e))
        if params and not self.session.esmtp:
            return self._error(555, "5.5.4", "Parameters need EHLO")
        dsn: dict[str, str] = {}
        for key, value in params.items():
            if key == "NOTIFY":
                words = [w.upper() for w in (value or "").split(",")]
                if not words or not (words == ["NEVER"] or set(words) <= {"SUCCESS", "FAILURE", "DELAY"}):
                    return self._error(501, "5.5.4", "NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY")
                dsn["notify"] = ",".join(words)
            elif key == "ORCPT":
                atype, semi, xtext = (value or "").partition(";")
                try:
                    decoded = wire.xtext_decode(xtext)
                except wire.SyntaxProblem as e:
                    return self._error(501, "5.5.4", f"ORCPT: {e}")
                if not semi or not atype or not decoded:
                    return self._error(501, "5.5.4", "ORCPT must be addr-type;address")
                if not _printable(decoded):
                    return self._error(501, "5.5.4", "ORCPT has a character that is not printable")
                dsn["orcpt"] = f"{atype};{decoded}"
            else:
                return self._error(555, "5.5.4", f"Unsupported parameter {key}")
        if not address.isascii() and not txn.smtputf8:
            return self._error(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
        if not _printable(address):
            return self._error(553, "5.1.3", "Address has a character that cannot be stored")
        if len(txn.rcpts) >= self.opt.max_recipients:
            return self._reply(452, "4.5.3", "Too many recipients")
        refusal = self.hooks.on_rcpt(self.session, txn, address)
        if refusal is not None and refusal.code >= 400:
            self._out.append(refusal.encode())
            return None
        txn.rcpts.append(address)
        if dsn:
            txn.rcpt_params[address] = dsn
        self._out.append((refusal or Reply(250, "2.1.5", "Recipient OK")).encode())

    def _data(self, arg: str):
        if arg.strip():
            return self._error(501, "5.5.4", "DATA takes no arguments")
        if self.txn is None:
            return self._error(503, "5.5.1", "Send MAIL first")
        if self._bdat_used:
            return self._error(503, "5.5.1", "DATA after BDAT is not allowed")
        if not self.txn.rcpts:
            return self._error(554, "5.5.1", "No valid recipients")
        if self.room is not None and self.room <= 0:
            return self._reply(*NO_STORAGE)
        self._reply(354, "", "End data with <CR><LF>.<CR><LF>")
        # A virtual CRLF in front lets one search find a terminator on the very first line.
        self._in[0:0] = b"\r\n"
        self._scan = 0
        self._discarding, self._refusal = False, None
        self._dropped = 0
        self.state = DATA

    def _read_data(self):
        buf = self._in
        end = buf.find(_DATA_END, self._scan)
        limit = self.opt.max_message_size
        if end < 0:
            self._scan = max(0, len(buf) - 4)
            # The body is buf[2:p+2] for a terminator at p >= len(buf) - 4, so it is at least
            # len(buf) - 4 bytes long: only beyond that is it surely over the limit.
            if self._discarding or (limit and len(buf) > limit + 4):
                # Over the limit (or released): keep only what may be the start of the terminator.
                self._discarding = True
                self._dropped += max(0, len(buf) - 4)
                del buf[:-4]
                self._scan = 0
            return False
        body = bytes(buf[2:end + 2])  # drop the virtual CRLF, keep the last line's CRLF
        del buf[:end + 5]
        self.state = CMD
        if self._discarding or (limit and len(body) > limit):
            self.txn = None
            self._out.append((self._refusal or Reply(
                552, "5.3.4", f"Message size exceeds the limit of {limit} bytes")).encode())
            return None
        return self._finish(wire.dot_unstuff(body))

    def _finish(self, body: bytes):
        if wire.has_bare_line_ending(body):
            # Refused rather than repaired: ID.dat keeps the exact bytes received, and mail with
            # ambiguous line ends is never passed on to a server that may split it differently.
            self.txn = None
            self._reply(550, "5.6.0", "Message has a bare CR or LF; lines must end with CRLF")
            return None
        hops = self.opt.max_hops
        if hops and wire.hop_count(body, hops + 1) > hops:
            # A mail loop (Postfix's hopcount_limit): refused, so the loop ends here.
            self.txn = None
            self._reply(554, "5.4.6", "Too many hops")
            return None
        self.state = WAIT
        return MessageReceived(self.session, self.txn, body)

    def _bdat(self, arg: str):
        words = arg.split()
        if not words or len(words) > 2 or not _is_number(words[0]) or len(words[0]) > 18 or (
                len(words) == 2 and words[1].upper() != "LAST"):
            # The chunk length is unknown, so its bytes cannot be skipped: end the session.
            self._reply(501, "5.5.4", "Syntax: BDAT size [LAST]; closing connection")
            self.state = CLOSED
            return None
        size, last = int(words[0]), len(words) == 2
        self._bdat_left, self._bdat_last = size, last
        self._bdat_refuse = None
        if self.txn is None:
            self._bdat_refuse = Reply(503, "5.5.1", "Send MAIL first")
        elif not self.txn.rcpts:
            self._bdat_refuse = Reply(554, "5.5.1", "No valid recipients")
        elif not self._bdat_used:
            self._bdat_used = True
            self._bdat_data = bytearray()
            self._discarding, self._refusal = False, None
            if self.room is not None and self.room <= 0:
                self._discarding, self._refusal = True, NO_STORAGE
        self.state = BDAT

    def _read_bdat(self):
        take = min(self._bdat_left, len(self._in))
        if take:
            if self._bdat_refuse is None and not self._discarding:
                self._bdat_data += self._in[:take]
                limit = self.opt.max_message_size
                if limit and len(self._bdat_data) > limit:
                    self._discarding = True
                    self._bdat_data = bytearray()
            del self._in[:take]
            self._bdat_left -= take
        if self._bdat_left:
            return False
        self.state = CMD
        if self._bdat_refuse is not None:
            return self._error(*self._bdat_refuse)
        if self._discarding:
            if self._bdat_last:
                self.txn, self._bdat_used = None, False
                self._out.append((self._refusal or Reply(
                    552, "5.3.4",
                    f"Message size exceeds the limit of {self.opt.max_message_size} bytes")).encode())
            else:  # RFC 3030: refuse each further chunk, the transaction ends at LAST
                self._out.append((self._refusal or Reply(
                    552, "5.3.4", "Message size exceeds the limit")).encode())
            return None
        if not self._bdat_last:
            self._reply(250, "2.0.0", f"{len(self._bdat_data)} octets received")
            return None
        body = bytes(self._bdat_data)
        self._bdat_data = bytearray()
        event = self._finish(body)
        self._bdat_used = False
        return event

    def _rset(self, arg: str):
        if arg.strip():
            return self._error(501, "5.5.4", "RSET takes no arguments")
        self.txn = None
        self._bdat_used = False
        self._out.append(_OK.encode())

    def _noop(self, arg: str):
        self._out.append(_OK.encode())

    def _quit(self, arg: str):
        self._reply(221, "2.0.0", f"{self.opt.hostname} closing connection")
        self.state = CLOSED

    def _vrfy(self, arg: str):
        if not arg.strip():
            return self._error(501, "5.5.4", "Syntax: VRFY address")
        self._reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def _expn(self, arg: str):
        self._reply(502, "5.5.1", "EXPN is not available")

    def _help(self, arg: str):
        self._reply(214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY "
                                  "HELP STARTTLS AUTH")

    def _starttls(self, arg: str):
        if arg.strip():
            return self._error(501, "5.5.4", "STARTTLS takes no arguments")
        if not self.opt.tls_available:
            return self._error(502, "5.5.1", "STARTTLS is not available")
        if self.session.tls:
            return self._error(503, "5.5.1", "TLS is already active")
        self._reply(220, "2.0.0", "Ready to start TLS")
        # Anything the client pipelined after STARTTLS was sent in clear text: drop it, so no
        # command can be injected into the encrypted session (CVE-2011-0411).
        self._in.clear()
        self.state = TLS
        return START_TLS

    # --- AUTH (RFC 4954) -------------------------------------------------------------------------

    def _auth(self, arg: str):
        if not self.opt.auth_available:
            return self._error(502, "5.5.1", "AUTH is not available")
        if not self.session.tls:
            return self._error(538, "5.7.11", "Encryption required: use STARTTLS first")
        if self.session.auth_user:
            return self._error(503, "5.5.1", "Already authenticated")
        if self.txn is not None:
            return self._error(503, "5.5.1", "AUTH is not allowed during a mail transaction")
        words = arg.split()
        if not words or len(words) > 2:
            return self._error(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mech = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if mech == "PLAIN":
            if initial is None:
                self._auth_step = "plain"
                self.state = AUTH
                self._reply(334, "", "")
                return None
            return self._auth_plain(initial)
        if mech == "LOGIN":
            if initial is not None:
                return self._auth_login_user(initial)
            self._auth_step = "login-user"
            self.state = AUTH
            self._reply(334, "", "VXNlcm5hbWU6")  # "Username:"
            return None
        return self._error(504, "5.5.4", "Unrecognized authentication mechanism")

    def _read_auth(self):
        line = self._next_line()
        if line is None:
            return False
        self.state = CMD
        if line is False:
            return None
        text = line.decode("ascii", "replace").strip()
        if text == "*":
            return self._error(501, "5.0.0", "Authentication cancelled")
        step = self._auth_step
        if step == "plain":
            return self._auth_plain(text)
        if step == "login-user":
            return self._auth_login_user(text)
        return self._auth_check(self._auth_user, text, encoded=True)

    @staticmethod
    def _b64(text: str) -> str | None:
        try:
            return base64.b64decode(text, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None

    def _auth_plain(self, text: str):
        decoded = self._b64(text)
        parts = decoded.split("\0") if decoded is not None else []
        if len(parts) != 3:
            return self._error(501, "5.5.2", "Cannot decode AUTH PLAIN response")
        authzid, user, password = parts
        if authzid and authzid != user:
            return self._error(535, "5.7.8", "Authentication credentials invalid")
        return self._auth_check(user, password, encoded=False)

    def _auth_login_user(self, text: str):
        user = self._b64(text)
        if user is None:
            return self._error(501, "5.5.2", "Cannot decode user name")
        self._auth_user = user
        self._auth_step = "login-pass"
        self.state = AUTH
        self._reply(334, "", "UGFzc3dvcmQ6")  # "Password:"

    def _auth_check(self, user: str, password: str, encoded: bool):
        if encoded:
            password = self._b64(password)
            if password is None:
                return self._error(501, "5.5.2", "Cannot decode password")
        if not user:
            return self._error(535, "5.7.8", "Authentication credentials invalid")
        self._auth_user = user
        self.state = WAIT
        return AuthCheck(self.session, user, password)
