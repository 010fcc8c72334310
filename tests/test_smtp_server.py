"""The sans-IO SMTP server core (mailengine/smtp/server.py), bytes in -> bytes out.

Every scripted session runs twice, fed in one piece and byte by byte: both runs must send the same
bytes and raise the same events. Every reply is parsed and checked for an RFC 3463 enhanced status
code whose class matches the reply code; the only replies without one are the greeting and the
replies to HELO/EHLO (RFC 2034 section 3 exempts them) and the intermediate 334 and 354 replies
(RFC 3463 has no class 3). After every step() the internal buffers are checked against their limits.
"""
from __future__ import annotations

import base64
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailengine.smtp import server as S
from mailengine.smtp import wire
from mailengine.smtp.server import (CLOSE, AcceptAll, AuthCheck, Close, MessageReceived, Reply,
                                    ServerConnection, ServerOptions, Session, StartTLS)

HOST = "mx.test"
EHLO = b"EHLO client.test\r\n"
MAIL = b"MAIL FROM:<a@example.org>\r\n"
RCPT = b"RCPT TO:<b@example.com>\r\n"
ENVELOPE = EHLO + MAIL + RCPT
TLS = object()  # marker in run(): the adapter finishes the TLS handshake here


# --- the harness ---------------------------------------------------------------------------------

class Hooks:
    """Records every question; refuses the addresses it is told to; knows one user."""

    def __init__(self, refuse_mail=(), refuse_rcpt=(), users=None):
        self.refuse_mail = set(refuse_mail)
        self.refuse_rcpt = set(refuse_rcpt)
        self.users = {"alice": "s3cret"} if users is None else users
        self.calls = []

    def on_mail(self, session, txn, address):
        self.calls.append(("mail", address))
        if address in self.refuse_mail:
            return Reply(550, "5.7.1", "sender refused")
        return None

    def on_rcpt(self, session, txn, address):
        self.calls.append(("rcpt", address))
        if address in self.refuse_rcpt:
            return Reply(554, "5.7.1", "relay not approved")
        return None

    def on_auth(self, session, user, password):
        self.calls.append(("auth", user, password))
        return self.users.get(user) == password


def check_bounds(conn: ServerConnection) -> None:
    """What the machine holds after a step() stays within its limits."""
    opt = conn.opt
    if conn.state in (S.CMD, S.AUTH):
        assert b"\n" not in conn._in, "a complete line was left unprocessed"
        assert len(conn._in) <= opt.max_command_line
    elif conn.state == S.DATA:
        if opt.max_message_size:
            assert len(conn._in) <= opt.max_message_size + 4
    elif conn.state == S.BDAT:
        assert len(conn._in) == 0, "BDAT left chunk bytes unread"
    if opt.max_message_size:
        assert len(conn._bdat_data) <= opt.max_message_size


class Driver:
    """Plays the asyncio adapter: feeds bytes, stores every message, records events."""

    def __init__(self, hooks=None, session=None, queued=Reply(250, "2.0.0", "queued"),
                 auto_tls=False, **options):
        options.setdefault("hostname", HOST)
        self.opt = ServerOptions(**options)
        self.hooks = hooks if hooks is not None else Hooks()
        self.conn = ServerConnection(self.opt, self.hooks, session)
        self.queued = queued
        self.auto_tls = auto_tls
        self.out = bytearray()
        self.events: list[str] = []
        self.messages: list[MessageReceived] = []
        self.closed = False
        self.tls_pending = False

    def pump(self) -> None:
        while True:
            out, event = self.conn.step()
            self.out += out
            check_bounds(self.conn)
            check_enhanced(out)  # a step's output is always whole replies
            if event is None:
                return
            if isinstance(event, MessageReceived):
                self.events.append("message")
                self.messages.append(event)
                self.conn.message_done(self.queued)
            elif isinstance(event, AuthCheck):
                self.events.append("auth")
                self.conn.auth_done(self.hooks.on_auth(event.session, event.user, event.password))
            elif isinstance(event, StartTLS):
                self.events.append("starttls")
                self.tls_pending = True
                if not self.auto_tls:
                    return
                self.tls_started()
                return
            elif isinstance(event, Close):
                self.events.append("close")
                self.closed = True
                return
            else:
                raise AssertionError(f"unknown event {event!r}")

    def feed(self, data: bytes, pieces=None) -> "Driver":
        """pieces: None = in one piece; an int = chunks of that size; else a list of bytes."""
        if pieces is None:
            pieces = [data]
        elif isinstance(pieces, int):
            pieces = [data[i:i + pieces] for i in range(0, len(data), pieces)]
        for piece in pieces:
            if self.closed:
                break  # the adapter closed the socket: nothing more is read
            if self.tls_pending:
                continue  # clear text read before the handshake: the adapter drops it
            self.conn.receive(piece)
            self.pump()
        return self

    def tls_started(self) -> None:
        assert self.tls_pending
        self.tls_pending = False
        self.conn.tls_started("TLSv1.3")
        self.pump()


def summary(m: MessageReceived):
    t = m.txn
    return (m.data, t.mail_from, list(t.rcpts), dict(t.mail_params), dict(t.rcpt_params),
            t.smtputf8, t.body_8bit, t.ret, t.envid)


_LINE = re.compile(rb"(\d{3})([ -])([^\r\n]*)\r\n")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3}) ")


def replies(out: bytes) -> list[tuple[int, list[str]]]:
    """Reply bytes -> [(code, [text of each line])]; asserts every line is well formed."""
    result, lines, pos = [], [], 0
    while pos < len(out):
        m = _LINE.match(out, pos)
        assert m, f"malformed reply bytes at {pos}: {out[pos:pos + 60]!r}"
        pos = m.end()
        code, sep, text = int(m[1]), m[2], m[3].decode("utf-8")
        if lines:
            assert code == result_code, "a multi-line reply changed its code"
        result_code = code
        lines.append(text)
        if sep == b" ":
            result.append((code, lines))
            lines = []
    assert not lines, "unterminated multi-line reply"
    return result


def exempt(code: int, lines: list[str]) -> bool:
    return code in (334, 354) or (code == 250 and lines[0].startswith(f"{HOST} Hello "))


def check_enhanced(out: bytes) -> None:
    for code, lines in replies(out):
        if exempt(code, lines):
            continue
        for text in lines:
            m = _ENHANCED.match(text)
            assert m, f"no enhanced status code in {code} {text!r}"
            assert m[1] == str(code)[0], f"enhanced class does not match: {code} {text!r}"


def codes(out: bytes) -> list[str]:
    """One word per reply: '250 2.1.0', or just '250' when it carries no enhanced code."""
    result = []
    for code, lines in replies(out):
        m = _ENHANCED.match(lines[-1])
        result.append(f"{code} {m[0].strip()}" if m else str(code))
    return result


def run(*parts, hooks=Hooks, session=Session, **options) -> Driver:
    """Run a session whole and byte by byte; check they agree; return the whole-fed driver.

    parts are bytes fed in turn, or TLS where the adapter completes the STARTTLS handshake.
    """
    drivers = []
    for pieces in (None, 1):
        d = Driver(hooks(), session(), **options)
        for part in parts:
            if part is TLS:
                d.tls_started()
            else:
                d.feed(part, pieces)
        drivers.append(d)
    whole, bytewise = drivers
    assert bytes(bytewise.out) == bytes(whole.out)
    assert bytewise.events == whole.events
    assert [summary(m) for m in bytewise.messages] == [summary(m) for m in whole.messages]
    check_enhanced(bytes(whole.out))
    return whole


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


# --- greeting and EHLO ---------------------------------------------------------------------------

def test_greeting():
    conn = ServerConnection(ServerOptions(hostname=HOST), AcceptAll())
    assert conn.greeting() == b"220 mx.test ESMTP MailEngine ready\r\n"
    assert conn.step() == (b"", None)


def test_ehlo_capabilities():
    d = run(EHLO)
    assert bytes(d.out) == (
        b"250-mx.test Hello client.test\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n"
        b"250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n250-CHUNKING\r\n"
        b"250-DSN\r\n250 HELP\r\n")
    assert d.conn.session.helo == "client.test" and d.conn.session.esmtp


def ehlo_keywords(out: bytes) -> list[str]:
    (code, lines), = replies(out)
    assert code == 250
    return lines[1:]


@pytest.mark.parametrize("options, session, expect, absent", [
    (dict(max_message_size=1000), {}, ["SIZE 1000"], ["STARTTLS", "AUTH PLAIN LOGIN"]),
    (dict(max_message_size=0), {}, ["SIZE"], []),
    (dict(tls_available=True), {}, ["STARTTLS"], ["AUTH PLAIN LOGIN"]),
    (dict(tls_available=True, auth_available=True), {}, ["STARTTLS"], ["AUTH PLAIN LOGIN"]),
    (dict(tls_available=True, auth_available=True), dict(tls="TLSv1.3"),
     ["AUTH PLAIN LOGIN"], ["STARTTLS"]),
    (dict(tls_available=True, auth_available=True), dict(tls="TLSv1.3", auth_user="alice"),
     [], ["STARTTLS", "AUTH PLAIN LOGIN"]),
    (dict(auth_available=True), dict(tls="TLSv1.3"), ["AUTH PLAIN LOGIN"], []),
], ids=["size-value", "size-unlimited", "starttls", "no-auth-before-tls", "auth-after-tls",
        "no-auth-when-authenticated", "auth-tls-given"])
def test_ehlo_optional_keywords(options, session, expect, absent):
    d = run(EHLO, session=lambda: Session(**session), **options)
    keywords = ehlo_keywords(bytes(d.out))
    for k in expect:
        assert k in keywords
    for k in absent:
        assert k not in keywords
    for k in ("PIPELINING", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "CHUNKING", "DSN"):
        assert k in keywords


# --- every command, table-driven -----------------------------------------------------------------

DATA_OK = b"DATA\r\nSubject: t\r\n\r\nhi\r\n.\r\n"

COMMANDS = [
    # HELO / EHLO
    ("helo", b"HELO client.test\r\n", ["250"]),
    ("helo-no-arg", b"HELO\r\n", ["501 5.5.4"]),
    ("helo-blank-arg", b"HELO   \r\n", ["501 5.5.4"]),
    ("ehlo-no-arg", b"EHLO\r\n", ["501 5.5.4"]),
    # a name that could not be stored in the .inf or written into a Received: header
    ("ehlo-nul", b"EHLO a\x00b\r\nMAIL FROM:<a@b.example>\r\n", ["501 5.5.2", "503 5.5.1"]),
    ("helo-nul", b"HELO a\x00b\r\n", ["501 5.5.2"]),
    ("ehlo-control", b"EHLO a\x1bb\r\n", ["501 5.5.2"]),
    ("ehlo-tab", b"EHLO a\tb\r\n", ["501 5.5.2"]),
    ("ehlo-line-separator", "EHLO a\u2028b\r\n".encode(), ["501 5.5.2"]),
    ("ehlo-utf8-name", "EHLO bücher.example\r\n".encode(), ["250"]),
    ("ehlo-after-refused-ehlo", b"EHLO a\x00\r\nEHLO c\r\n" + MAIL, ["501 5.5.2", "250", "250 2.1.0"]),
    ("lower-case-verbs", b"ehlo c\r\nmail from:<a@b.example>\r\nrcpt to:<c@d.example>\r\nrset\r\n",
     ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0"]),
    # MAIL
    ("mail-before-helo", MAIL, ["503 5.5.1"]),
    ("mail", EHLO + MAIL, ["250", "250 2.1.0"]),
    ("mail-after-helo", b"HELO c\r\n" + MAIL, ["250", "250 2.1.0"]),
    ("mail-null-sender", EHLO + b"MAIL FROM:<>\r\n", ["250", "250 2.1.0"]),
    ("mail-space-after-colon", EHLO + b"MAIL FROM: <a@b.example>\r\n", ["250", "250 2.1.0"]),
    ("mail-nested", EHLO + MAIL + MAIL, ["250", "250 2.1.0", "503 5.5.1"]),
    ("mail-no-brackets", EHLO + b"MAIL FROM:a@b.example\r\n", ["250", "501 5.5.4"]),
    ("mail-unclosed", EHLO + b"MAIL FROM:<a@b.example\r\n", ["250", "501 5.5.4"]),
    ("mail-wrong-keyword", EHLO + b"MAIL TO:<a@b.example>\r\n", ["250", "501 5.5.4"]),
    ("mail-no-arg", EHLO + b"MAIL\r\n", ["250", "501 5.5.4"]),
    ("mail-no-domain", EHLO + b"MAIL FROM:<user>\r\n", ["250", "501 5.5.4"]),
    ("mail-space-in-local", EHLO + b"MAIL FROM:<a b@c.example>\r\n", ["250", "501 5.5.4"]),
    ("mail-quoted-local", EHLO + b'MAIL FROM:<"doe, john"@c.example>\r\n', ["250", "250 2.1.0"]),
    ("mail-non-printable", EHLO + "MAIL FROM:<a\u0085b@c.example> SMTPUTF8\r\n".encode(),
     ["250", "553 5.1.7"]),
    ("mail-bad-domain", EHLO + b"MAIL FROM:<a@-b.example>\r\n", ["250", "501 5.5.4"]),
    ("mail-unknown-param", EHLO + b"MAIL FROM:<a@b.example> FOO=1\r\n", ["250", "555 5.5.4"]),
    ("mail-bad-param", EHLO + b"MAIL FROM:<a@b.example> SIZE=\r\n", ["250", "501 5.5.4"]),
    ("mail-param-twice", EHLO + b"MAIL FROM:<a@b.example> BODY=7BIT BODY=7BIT\r\n",
     ["250", "501 5.5.4"]),
    ("mail-params-after-helo", b"HELO c\r\nMAIL FROM:<a@b.example> SIZE=10\r\n",
     ["250", "555 5.5.4"]),
    ("mail-size-ok", EHLO + b"MAIL FROM:<a@b.example> SIZE=10485760\r\n", ["250", "250 2.1.0"]),
    ("mail-size-over", EHLO + b"MAIL FROM:<a@b.example> SIZE=10485761\r\n", ["250", "552 5.3.4"]),
    ("mail-size-no-value", EHLO + b"MAIL FROM:<a@b.example> SIZE\r\n", ["250", "501 5.5.4"]),
    ("mail-size-letters", EHLO + b"MAIL FROM:<a@b.example> SIZE=12k\r\n", ["250", "501 5.5.4"]),
    ("mail-size-negative", EHLO + b"MAIL FROM:<a@b.example> SIZE=-1\r\n", ["250", "501 5.5.4"]),
    ("mail-size-unicode-digit", EHLO + "MAIL FROM:<a@b.example> SIZE=\u00b2\r\n".encode(),
     ["250", "501 5.5.4"]),
    ("mail-size-arabic-digit", EHLO + "MAIL FROM:<a@b.example> SIZE=\u0661\r\n".encode(),
     ["250", "501 5.5.4"]),
    ("mail-size-huge", EHLO + b"MAIL FROM:<a@b.example> SIZE=" + b"9" * 40 + b"\r\n",
     ["250", "501 5.5.4"]),
    ("mail-body-8bit", EHLO + b"MAIL FROM:<a@b.example> BODY=8BITMIME\r\n", ["250", "250 2.1.0"]),
    ("mail-body-bad", EHLO + b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", ["250", "555 5.5.4"]),
    ("mail-body-no-value", EHLO + b"MAIL FROM:<a@b.example> BODY\r\n", ["250", "555 5.5.4"]),
    ("mail-auth-param", EHLO + b"MAIL FROM:<a@b.example> AUTH=<>\r\n", ["250", "250 2.1.0"]),
    ("mail-refused-by-policy", EHLO + b"MAIL FROM:<bad@spam.example>\r\n" + RCPT,
     ["250", "550 5.7.1", "503 5.5.1"]),
    # RCPT
    ("rcpt-before-mail", EHLO + RCPT, ["250", "503 5.5.1"]),
    ("rcpt", ENVELOPE, ["250", "250 2.1.0", "250 2.1.5"]),
    ("rcpt-twice", ENVELOPE + b"RCPT TO:<c@example.com>\r\n",
     ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5"]),
    ("rcpt-empty", EHLO + MAIL + b"RCPT TO:<>\r\n", ["250", "250 2.1.0", "501 5.5.4"]),
    ("rcpt-no-brackets", EHLO + MAIL + b"RCPT TO:b@example.com\r\n", ["250", "250 2.1.0", "501 5.5.4"]),
    ("rcpt-wrong-keyword", EHLO + MAIL + b"RCPT FROM:<b@example.com>\r\n",
     ["250", "250 2.1.0", "501 5.5.4"]),
    ("rcpt-unknown-param", EHLO + MAIL + b"RCPT TO:<b@example.com> SIZE=1\r\n",
     ["250", "250 2.1.0", "555 5.5.4"]),
    ("rcpt-postmaster", EHLO + MAIL + b"RCPT TO:<postmaster>\r\n", ["250", "250 2.1.0", "250 2.1.5"]),
    ("rcpt-Postmaster", EHLO + MAIL + b"RCPT TO:<PostMaster>\r\n", ["250", "250 2.1.0", "250 2.1.5"]),
    ("rcpt-user-without-domain", EHLO + MAIL + b"RCPT TO:<root>\r\n", ["250", "250 2.1.0", "501 5.5.4"]),
    ("rcpt-quoted-space-comma", EHLO + MAIL + b'RCPT TO:<"john doe"@x.example>\r\n'
     b'RCPT TO:<"doe,john"@x.example>\r\n', ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5"]),
    ("rcpt-non-printable", EHLO + b"MAIL FROM:<a@b.example> SMTPUTF8\r\n"
     + "RCPT TO:<a\u00a0b@x.example>\r\nRCPT TO:<\"a\u2028\"@x.example>\r\n".encode(),
     ["250", "250 2.1.0", "553 5.1.3", "553 5.1.3"]),
    ("rcpt-refused-by-policy", EHLO + MAIL + b"RCPT TO:<x@elsewhere.example>\r\n" + b"DATA\r\n",
     ["250", "250 2.1.0", "554 5.7.1", "554 5.5.1"]),
    ("rcpt-params-after-helo", b"HELO c\r\n" + MAIL + b"RCPT TO:<b@example.com> NOTIFY=NEVER\r\n",
     ["250", "250 2.1.0", "555 5.5.4"]),
    # DATA
    ("data-before-mail", EHLO + b"DATA\r\n", ["250", "503 5.5.1"]),
    ("data-before-helo", b"DATA\r\n", ["503 5.5.1"]),
    ("data-without-rcpt", EHLO + MAIL + b"DATA\r\n", ["250", "250 2.1.0", "554 5.5.1"]),
    ("data-with-arg", ENVELOPE + b"DATA now\r\n", ["250", "250 2.1.0", "250 2.1.5", "501 5.5.4"]),
    ("data", ENVELOPE + DATA_OK, ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]),
    ("data-then-rcpt", ENVELOPE + DATA_OK + RCPT,
     ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "503 5.5.1"]),
    ("two-messages", ENVELOPE + DATA_OK + MAIL + RCPT + DATA_OK,
     ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "250 2.1.0", "250 2.1.5", "354",
      "250 2.0.0"]),
    # RSET, NOOP, QUIT, VRFY, EXPN, HELP
    ("rset", b"RSET\r\n", ["250 2.0.0"]),
    ("rset-arg", b"RSET x\r\n", ["501 5.5.4"]),
    ("rset-ends-transaction", ENVELOPE + b"RSET\r\n" + RCPT + b"DATA\r\n" + MAIL,
     ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "503 5.5.1", "250 2.1.0"]),
    ("rset-keeps-helo", EHLO + b"RSET\r\n" + MAIL, ["250", "250 2.0.0", "250 2.1.0"]),
    ("ehlo-ends-transaction", ENVELOPE + EHLO + RCPT, ["250", "250 2.1.0", "250 2.1.5", "250",
                                                      "503 5.5.1"]),
    ("noop", b"NOOP\r\n", ["250 2.0.0"]),
    ("noop-arg", b"NOOP hello\r\n", ["250 2.0.0"]),
    ("quit", b"QUIT\r\n", ["221 2.0.0"]),
    ("vrfy", b"VRFY alice\r\n", ["252 2.5.0"]),
    ("vrfy-no-arg", b"VRFY\r\n", ["501 5.5.4"]),
    ("expn", b"EXPN staff\r\n", ["502 5.5.1"]),
    ("help", b"HELP\r\n", ["214 2.0.0"]),
    ("help-arg", b"HELP MAIL\r\n", ["214 2.0.0"]),
    # unknown and malformed lines
    ("unknown", b"FOO bar\r\n", ["500 5.5.1"]),
    ("empty-line", b"\r\n", ["500 5.5.2"]),
    ("leading-space", b" NOOP\r\n", ["500 5.5.1"]),
    ("tab-separator", b"NOOP\tx\r\n", ["500 5.5.1"]),
    ("bare-lf-line", b"NOOP\n", ["500 5.5.2"]),
    ("bare-cr-in-line", b"NO\rOP\r\n", ["500 5.5.2"]),
    ("cr-cr-lf", b"NOOP\r\r\n", ["500 5.5.2"]),
    ("non-utf8", b"NOOP \xff\xfe\r\n", ["500 5.5.2"]),
    ("non-utf8-address", EHLO + b"MAIL FROM:<\xe9@b.example>\r\n", ["250", "500 5.5.2"]),
    ("non-ascii-verb", "QU\u0131T\r\n".encode() + b"NOOP\r\n", ["500 5.5.1", "250 2.0.0"]),
    ("nul-in-verb", b"NO\x00OP\r\n", ["500 5.5.1"]),
    ("starttls-unavailable", b"STARTTLS\r\n", ["502 5.5.1"]),
    ("auth-unavailable", b"AUTH PLAIN\r\n", ["502 5.5.1"]),
]


@pytest.mark.parametrize("data, expect", [pytest.param(d, e, id=i) for i, d, e in COMMANDS])
def test_command(data, expect):
    d = run(data, hooks=lambda: Hooks(refuse_mail={"bad@spam.example"},
                                      refuse_rcpt={"x@elsewhere.example"}))
    assert codes(bytes(d.out)) == expect
    assert d.events == (["message"] * expect.count("354") + (["close"] if "221 2.0.0" in expect else []))


def test_quit_closes_and_nothing_after_is_processed():
    d = run(b"NOOP\r\nQUIT\r\nNOOP\r\nMAIL FROM:<a@b.example>\r\n")
    assert codes(bytes(d.out)) == ["250 2.0.0", "221 2.0.0"]
    assert d.events == ["close"]
    conn = d.conn
    conn.receive(b"NOOP\r\nHELP\r\n")
    assert conn.step() == (b"", CLOSE)
    assert conn.step() == (b"", CLOSE)


def test_message_and_transaction():
    d = run(ENVELOPE + b"RCPT TO:<c@example.net>\r\n" + DATA_OK)
    (m,) = d.messages
    assert m.data == b"Subject: t\r\n\r\nhi\r\n"
    assert m.txn.mail_from == "a@example.org"
    assert m.txn.rcpts == ["b@example.com", "c@example.net"]
    assert m.session is d.conn.session and m.session.helo == "client.test"
    assert d.conn.txn is None  # message_done ended the transaction


def test_hook_sees_transaction_and_may_answer_with_its_own_success():
    class Polite(Hooks):
        def on_rcpt(self, session, txn, address):
            assert txn.mail_from == "a@example.org"
            return Reply(250, "2.1.5", f"{address} is local")
    d = run(ENVELOPE, hooks=Polite)
    assert bytes(d.out).endswith(b"250 2.1.5 b@example.com is local\r\n")


def test_message_done_reply_goes_out_in_order():
    d = Driver(queued=Reply(451, "4.3.0", "try later"))
    d.feed(ENVELOPE + DATA_OK + b"NOOP\r\n")
    assert codes(bytes(d.out))[-2:] == ["451 4.3.0", "250 2.0.0"]


def test_nothing_is_read_while_the_message_is_stored():
    conn = ServerConnection(ServerOptions(hostname=HOST), AcceptAll())
    conn.receive(ENVELOPE + DATA_OK + b"NOOP\r\nQUIT\r\n")
    out, ev = conn.step()
    assert codes(out) == ["250", "250 2.1.0", "250 2.1.5", "354"]
    assert isinstance(ev, MessageReceived)
    assert conn.step() == (b"", None)  # the pipelined NOOP waits for message_done
    conn.message_done(Reply(250, "2.0.0", "queued as X"))
    out, ev = conn.step()
    assert codes(out) == ["250 2.0.0", "250 2.0.0", "221 2.0.0"] and ev is CLOSE


# --- pipelining ----------------------------------------------------------------------------------

def test_pipelined_group_answered_in_order_in_one_output():
    conn = ServerConnection(ServerOptions(hostname=HOST), AcceptAll())
    conn.receive(EHLO)
    conn.step()
    conn.receive(MAIL + RCPT + b"RCPT TO:<c@example.com>\r\nDATA\r\n")
    out, ev = conn.step()
    assert ev is None
    assert codes(out) == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
    conn.receive(b"body\r\n.\r\n")
    out, ev = conn.step()
    assert out == b"" and isinstance(ev, MessageReceived)


def test_pipelined_errors_keep_order():
    d = run(EHLO + b"MAIL FROM:<bad@spam.example>\r\n" + RCPT + b"DATA\r\nNOOP\r\n",
            hooks=lambda: Hooks(refuse_mail={"bad@spam.example"}))
    assert codes(bytes(d.out)) == ["250", "550 5.7.1", "503 5.5.1", "503 5.5.1", "250 2.0.0"]


def test_pipelined_session_in_random_pieces():
    stream = (ENVELOPE + DATA_OK + MAIL + RCPT + b"BDAT 5 LAST\r\nhello" + b"QUIT\r\n")
    reference = Driver().feed(stream)
    for size in (2, 3, 5, 7, 11, 64):
        d = Driver().feed(stream, size)
        assert d.out == reference.out and d.events == reference.events
    assert reference.events == ["message", "message", "close"]


# --- DSN, SMTPUTF8, addresses --------------------------------------------------------------------

def test_dsn_parameters_parsed_into_the_transaction():
    d = run(EHLO + b"MAIL FROM:<a@example.org> RET=HDRS ENVID=QQ+2B1+3Dx\r\n"
            b"RCPT TO:<b@example.com> NOTIFY=success,Failure ORCPT=rfc822;b+40example.com\r\n"
            b"RCPT TO:<c@example.com> NOTIFY=NEVER\r\n"
            b"RCPT TO:<d@example.com>\r\n" + DATA_OK)
    assert codes(bytes(d.out))[:5] == ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5"]
    (m,) = d.messages
    t = m.txn
    assert t.ret == "HDRS" and t.envid == "QQ+1=x"
    assert t.mail_params == {"RET": "HDRS", "ENVID": "QQ+2B1+3Dx"}
    assert t.rcpt_params == {
        "b@example.com": {"notify": "SUCCESS,FAILURE", "orcpt": "rfc822;b@example.com"},
        "c@example.com": {"notify": "NEVER"},
    }


@pytest.mark.parametrize("line, expect", [
    (b"MAIL FROM:<a@b.example> RET=FULL", "250 2.1.0"),
    (b"MAIL FROM:<a@b.example> RET=ALL", "555 5.5.4"),
    (b"MAIL FROM:<a@b.example> RET", "555 5.5.4"),
    (b"MAIL FROM:<a@b.example> ENVID=abc+2", "501 5.5.4"),
    (b"MAIL FROM:<a@b.example> ENVID=abc+2b", "501 5.5.4"),  # xtext hex is upper case
    (b"MAIL FROM:<a@b.example> ENVID=a=b", "501 5.5.4"),
    (b"MAIL FROM:<a@b.example> ENVID", "501 5.5.4"),
    (b"MAIL FROM:<a@b.example> ENVID=" + b"x" * 101, "501 5.5.4"),
    ("MAIL FROM:<a@b.example> ENVID=\u00e9".encode(), "501 5.5.4"),
    (b"MAIL FROM:<a@b.example> ENVID=+00", "501 5.5.4"),  # NUL
    (b"MAIL FROM:<a@b.example> ENVID=a+0Ab", "501 5.5.4"),  # a line break
    (b"MAIL FROM:<a@b.example> ENVID=a+7Fb", "501 5.5.4"),  # DEL
    (b"MAIL FROM:<a@b.example> ENVID=a+20b+2C", "250 2.1.0"),  # space and comma are fine
    (b"MAIL FROM:<a@b.example> BODY=7BIT", "250 2.1.0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_mail_dsn_and_body_params(line, expect):
    d = run(EHLO + line + b"\r\n")
    assert codes(bytes(d.out)) == ["250", expect]


@pytest.mark.parametrize("param, expect", [
    (b"NOTIFY=NEVER", "250 2.1.5"),
    (b"NOTIFY=DELAY", "250 2.1.5"),
    (b"NOTIFY=NEVER,SUCCESS", "501 5.5.4"),
    (b"NOTIFY=SOMETIMES", "501 5.5.4"),
    (b"NOTIFY", "501 5.5.4"),
    (b"ORCPT=rfc822;x+40y", "250 2.1.5"),
    (b"ORCPT=rfc822", "501 5.5.4"),
    (b"ORCPT=;x@y", "501 5.5.4"),
    (b"ORCPT=rfc822;", "501 5.5.4"),
    (b"ORCPT=rfc822;x+4", "501 5.5.4"),
    (b"ORCPT=rfc822;x+00@y", "501 5.5.4"),
    (b"ORCPT=rfc822;x+0D+0A@y", "501 5.5.4"),
    (b"RET=FULL", "555 5.5.4"),
])
def test_rcpt_dsn_params(param, expect):
    d = run(EHLO + MAIL + b"RCPT TO:<b@example.com> " + param + b"\r\n")
    assert codes(bytes(d.out)) == ["250", "250 2.1.0", expect]


def test_body_and_smtputf8_flags():
    d = run(EHLO + "MAIL FROM:<j\u00f6rg@b\u00fccher.example> BODY=8BITMIME SMTPUTF8\r\n"
            "RCPT TO:<\u5f20\u4e09@\u4f8b\u5b50.example>\r\n".encode() + DATA_OK)
    (m,) = d.messages
    assert m.txn.body_8bit and m.txn.smtputf8
    assert m.txn.mail_from == "j\u00f6rg@b\u00fccher.example"
    assert m.txn.rcpts == ["\u5f20\u4e09@\u4f8b\u5b50.example"]


@pytest.mark.parametrize("data, expect", [
    ("MAIL FROM:<j\u00f6rg@b.example>\r\n", ["250", "553 5.6.7"]),
    ("MAIL FROM:<jorg@b\u00fccher.example>\r\n", ["250", "553 5.6.7"]),
    ("MAIL FROM:<a@b.example>\r\nRCPT TO:<\u00fc@c.example>\r\n", ["250", "250 2.1.0", "553 5.6.7"]),
    ("MAIL FROM:<a@b.example> SMTPUTF8\r\nRCPT TO:<\u00fc@c.example>\r\n",
     ["250", "250 2.1.0", "250 2.1.5"]),
    ("MAIL FROM:<a@b.example> SMTPUTF8=yes\r\n", ["250", "555 5.5.4"]),
])
def test_non_ascii_addresses(data, expect):
    d = run(EHLO + data.encode())
    assert codes(bytes(d.out)) == expect


@pytest.mark.parametrize("path, address", [
    ("<@relay.example:a@b.example>", "a@b.example"),
    ("<@r1.example,@r2.example:a@b.example>", "a@b.example"),
    ('<"a>b@c"@b.example>', '"a>b@c"@b.example'),
    ('<"a\\"b"@b.example>', '"a\\"b"@b.example'),
    ('<"@x:y"@b.example>', '"@x:y"@b.example'),
    ("<a.b+tag@[192.0.2.1]>", "a.b+tag@[192.0.2.1]"),
    ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    ("<postmaster>", "postmaster@mx.test"),
])
def test_recipient_address_forms(path, address):
    hooks = []
    d = run(EHLO + MAIL + f"RCPT TO:{path} NOTIFY=NEVER\r\n".encode() + DATA_OK,
            hooks=lambda: hooks.append(Hooks()) or hooks[-1])
    (m,) = d.messages
    assert m.txn.rcpts == [address]
    assert ("rcpt", address) in hooks[0].calls  # the policy decides on the final mailbox
    assert wire.domain_of(address) in (wire.domain_of(path[:-1]), HOST)


def test_source_route_in_mail_from():
    d = run(EHLO + b"MAIL FROM:<@a.example,@b.example:x@y.example>\r\n" + RCPT + DATA_OK)
    assert d.messages[0].txn.mail_from == "x@y.example"


# --- message data --------------------------------------------------------------------------------

@pytest.mark.parametrize("sent, stored", [
    (b".\r\n", b""),                                             # empty message
    (b"\r\n.\r\n", b"\r\n"),                                     # one empty line
    (b"..\r\n.\r\n", b".\r\n"),                                  # a line holding one dot
    (b"..leading\r\n.\r\n", b".leading\r\n"),
    (b"a\r\n..b\r\n...\r\n.\r\n", b"a\r\n.b\r\n..\r\n"),
    (b".x\r\n.\r\n", b"x\r\n"),                                  # unstuffed anyway (RFC 5321 4.5.2)
    (b"a. b .\r\n.\r\n", b"a. b .\r\n"),                         # dots inside a line stay
    (b"x\r\n.\r\n", b"x\r\n"),
    (b"ends with a dot.\r\n.\r\n", b"ends with a dot.\r\n"),
    (b"a\r\n.\r\n\r\n.\r\n", b"a\r\n"),                          # the first terminator wins
    (b"\x00\x01\xff\r\n.\r\n", b"\x00\x01\xff\r\n"),             # 8-bit data kept as is
])
def test_data_dot_unstuffing(sent, stored):
    d = run(ENVELOPE + b"DATA\r\n" + sent)
    assert [m.data for m in d.messages] == [stored]


def test_data_in_pieces_across_the_terminator():
    body = b"line one\r\n..two\r\n"
    for cut in range(len(body) + 5):
        stream = body + b".\r\n"
        d = Driver().feed(ENVELOPE + b"DATA\r\n")
        d.feed(stream, [stream[:cut], stream[cut:]])
        assert [m.data for m in d.messages] == [b"line one\r\n.two\r\n"]


# --- SMTP smuggling ------------------------------------------------------------------------------

INJECTED = (b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.com>\r\n"
            b"DATA\r\nFrom: ceo@example.com\r\n\r\nsmuggled\r\n")


@pytest.mark.parametrize("fake_end", [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r", b"\r.\n",
    b"\r\n.\r\r\n", b"\r\n.\n\r\n", b"\n\n.\n\n", b"\r\r.\r\r", b"\n.\n.\r\n",
], ids=repr)
def test_smuggling_refused(fake_end):
    """A fake end of data never ends DATA; the bare CR/LF makes the whole message refused."""
    stream = (ENVELOPE + b"DATA\r\nSubject: hi\r\n\r\ntext" + fake_end + INJECTED
              + b".\r\nNOOP\r\n")
    d = run(stream)
    assert codes(bytes(d.out)) == ["250", "250 2.1.0", "250 2.1.5", "354", "550 5.6.0", "250 2.0.0"]
    assert d.messages == [] and d.events == []
    assert ("mail", "evil@attacker.example") not in d.hooks.calls
    assert d.conn.txn is None


@pytest.mark.parametrize("fake_end", [b".\n", b".\r", b".\n.\r\n"], ids=repr)
def test_smuggling_on_the_first_line(fake_end):
    d = run(ENVELOPE + b"DATA\r\n" + fake_end + INJECTED + b".\r\n")
    assert codes(bytes(d.out))[3:] == ["354", "550 5.6.0"]
    assert d.messages == []


@pytest.mark.parametrize("fake_end", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n \r\n.x\r\n"],
                         ids=repr)
def test_smuggling_without_bare_line_ends_stays_one_message(fake_end):
    """No bare CR/LF: the message is accepted, and the injected commands are only its text."""
    d = run(ENVELOPE + b"DATA\r\ntext" + fake_end + INJECTED + b".\r\nNOOP\r\n")
    assert codes(bytes(d.out))[3:] == ["354", "250 2.0.0", "250 2.0.0"]
    (m,) = d.messages
    assert INJECTED in m.data and m.txn.rcpts == ["b@example.com"]
    assert ("mail", "evil@attacker.example") not in d.hooks.calls


def test_smuggling_in_bdat_is_refused_too():
    chunk = b"text\n.\n" + INJECTED
    d = run(ENVELOPE + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert codes(bytes(d.out))[3:] == ["550 5.6.0", "250 2.0.0"]
    assert d.messages == []


def test_bare_lf_only_message_refused():
    d = run(ENVELOPE + b"DATA\r\nSubject: x\n\nbody\n\r\n.\r\n")
    assert codes(bytes(d.out))[3:] == ["354", "550 5.6.0"]


# --- BDAT (RFC 3030) -----------------------------------------------------------------------------

@pytest.mark.parametrize("chunks, expect, stored", [
    (b"BDAT 5 LAST\r\nhello", ["250 2.0.0"], [b"hello"]),
    (b"bdat 5 last\r\nhello", ["250 2.0.0"], [b"hello"]),
    (b"BDAT 7\r\nhello\r\nBDAT 7 LAST\r\nworld\r\n", ["250 2.0.0", "250 2.0.0"],
     [b"hello\r\nworld\r\n"]),
    (b"BDAT 3\r\nabcBDAT 3\r\ndefBDAT 0 LAST\r\n", ["250 2.0.0"] * 3, [b"abcdef"]),
    (b"BDAT 0 LAST\r\n", ["250 2.0.0"], [b""]),
    (b"BDAT 0\r\nBDAT 0 LAST\r\n", ["250 2.0.0"] * 2, [b""]),
    (b"BDAT 12 LAST\r\nQUIT\r\nRSET\r\n", ["250 2.0.0"], [b"QUIT\r\nRSET\r\n"]),  # data, not commands
    (b"BDAT 4 LAST\r\n.\r\n\r", ["550 5.6.0"], []),                 # bare CR in a chunk
    (b"BDAT 6\r\n..\r\n\r\nBDAT 0 LAST\r\n", ["250 2.0.0"] * 2, [b"..\r\n\r\n"]),  # no unstuffing
    (b"BDAT 2\r\nabDATA\r\n", ["250 2.0.0", "503 5.5.1"], []),          # DATA after BDAT
    (b"BDAT 2\r\nabRSET\r\nDATA\r\n", ["250 2.0.0", "250 2.0.0", "503 5.5.1"], []),
    (b"BDAT 2\r\nabMAIL FROM:<x@y.example>\r\n", ["250 2.0.0", "503 5.5.1"], []),
    (b"BDAT 3 LAST\r\nabcBDAT 1 LAST\r\nz", ["250 2.0.0", "503 5.5.1"], [b"abc"]),
])
def test_bdat(chunks, expect, stored):
    d = run(ENVELOPE + chunks)
    assert codes(bytes(d.out)) == ["250", "250 2.1.0", "250 2.1.5"] + expect
    assert [m.data for m in d.messages] == stored


def test_bdat_after_data_message_uses_a_new_transaction():
    d = run(ENVELOPE + DATA_OK + MAIL + RCPT + b"BDAT 2 LAST\r\nok")
    assert [m.data for m in d.messages] == [b"Subject: t\r\n\r\nhi\r\n", b"ok"]


@pytest.mark.parametrize("prefix, expect", [
    (EHLO, "503 5.5.1"),
    (b"", "503 5.5.1"),
    (EHLO + MAIL, "554 5.5.1"),
    (EHLO + MAIL + b"RCPT TO:<x@elsewhere.example>\r\n", "554 5.5.1"),
])
def test_bdat_refused_still_consumes_the_chunk(prefix, expect):
    chunk = b"RSET\r\nQUIT\r\n"  # must be read as data and dropped, never run as commands
    d = run(prefix + b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n",
            hooks=lambda: Hooks(refuse_rcpt={"x@elsewhere.example"}))
    assert codes(bytes(d.out))[-2:] == [expect, "250 2.0.0"]
    assert d.messages == [] and "close" not in d.events


@pytest.mark.parametrize("line", [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 5 FIRST\r\n",
                                  b"BDAT 5 LAST x\r\n", b"BDAT -1\r\n",
                                  "BDAT \u00b2\r\n".encode(), "BDAT \u0661 LAST\r\n".encode(),
                                  b"BDAT " + b"9" * 19 + b"\r\n"],
                         ids=repr)
def test_bdat_bad_syntax_closes(line):
    d = run(ENVELOPE + line + b"NOOP\r\n")
    assert codes(bytes(d.out)) == ["250", "250 2.1.0", "250 2.1.5", "501 5.5.4"]
    assert d.events == ["close"]


# --- limits --------------------------------------------------------------------------------------

def test_max_recipients():
    rcpts = b"".join(b"RCPT TO:<r%d@example.com>\r\n" % i for i in range(4))
    d = run(EHLO + MAIL + rcpts + DATA_OK, max_recipients=2)
    assert codes(bytes(d.out)) == ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3",
                                   "452 4.5.3", "354", "250 2.0.0"]
    assert d.messages[0].txn.rcpts == ["r0@example.com", "r1@example.com"]
    assert d.conn.errors == 0  # a full message is not the client's error


@pytest.mark.parametrize("length, expect", [
    (62, ["250 2.0.0"]),             # 64 bytes with CRLF: at the limit
    (63, ["500 5.5.2"]),
    (1000, ["500 5.5.2"]),
    (100_000, ["500 5.5.2"]),
])
def test_command_line_length(length, expect):
    line = b"NOOP " + b"x" * (length - 5) + b"\r\n"
    d = run(line + b"NOOP\r\n", max_command_line=64)
    assert codes(bytes(d.out)) == expect + ["250 2.0.0"]


def test_long_line_buffer_stays_bounded():
    d = Driver(max_command_line=64)
    for _ in range(1000):
        d.feed(b"x" * 97)  # check_bounds runs after every step
        assert d.conn.pending_input <= 64
    d.feed(b"\r\nNOOP\r\n")
    assert codes(bytes(d.out)) == ["500 5.5.2", "250 2.0.0"]


def test_long_auth_line_bounded():
    d = Driver(max_command_line=64, auth_available=True, session=Session(tls="TLSv1.3"))
    d.feed(b"AUTH LOGIN\r\n" + b"A" * 10_000, 100)
    assert d.conn.pending_input <= 64
    d.feed(b"\r\nNOOP\r\n")
    assert codes(bytes(d.out)) == ["334", "500 5.5.2", "250 2.0.0"]


def test_too_many_errors_closes_with_421():
    d = run(b"FOO\r\nNOOP\r\nBAR\r\nBAZ\r\nNOOP\r\n", max_errors=3)
    assert codes(bytes(d.out)) == ["500 5.5.1", "250 2.0.0", "500 5.5.1", "500 5.5.1", "421 4.7.0"]
    assert d.events == ["close"]
    d.conn.receive(b"NOOP\r\n")
    assert d.conn.step() == (b"", CLOSE)


@pytest.mark.parametrize("errors", [
    [b"RCPT TO:<a@b.example>\r\n"] * 3,
    [b"MAIL FROM:<a>\r\n"] * 3,
    [b"\xff\r\n", b"x" * 100 + b"\r\n", b"NOOP\n"],
    [b"BDAT 1\r\nx"] * 3,                            # a refused BDAT chunk is an error too
    [b"BDAT 1 LAST\r\nx", b"DATA\r\n", b"VRFY\r\n"],
])
def test_every_kind_of_error_counts(errors):
    d = run(EHLO + b"".join(errors) + b"NOOP\r\n", max_errors=3, max_command_line=64)
    assert codes(bytes(d.out))[-1] == "421 4.7.0"
    assert d.events == ["close"]


def test_auth_errors_count():
    d = run(b"AUTH PLAIN !!!\r\nAUTH LOGIN\r\n*\r\nAUTH PLAIN " + b64("\0alice\0nope") + b"\r\n",
            max_errors=3, auth_available=True, session=lambda: Session(tls="TLSv1.3"))
    assert codes(bytes(d.out)) == ["501 5.5.2", "334", "501 5.0.0", "535 5.7.8", "421 4.7.0"]


LIMIT = 1000


@pytest.mark.parametrize("size, accepted", [
    (LIMIT - 3, True), (LIMIT - 2, True), (LIMIT - 1, True), (LIMIT, True),
    (LIMIT + 1, False), (LIMIT + 2, False), (10 * LIMIT, False),
])
def test_data_size_limit(size, accepted):
    body = b"x" * (size - 2) + b"\r\n"
    d = run(ENVELOPE + b"DATA\r\n" + body + b".\r\nNOOP\r\n", max_message_size=LIMIT)
    assert codes(bytes(d.out))[3:] == ["354", "250 2.0.0" if accepted else "552 5.3.4", "250 2.0.0"]
    assert [m.data for m in d.messages] == ([body] if accepted else [])


@pytest.mark.parametrize("size, accepted", [(LIMIT, True), (LIMIT + 1, False)])
def test_bdat_size_limit(size, accepted):
    d = run(ENVELOPE + b"BDAT %d LAST\r\n" % size + b"x" * size + b"NOOP\r\n", max_message_size=LIMIT)
    assert codes(bytes(d.out))[3:] == ["250 2.0.0" if accepted else "552 5.3.4", "250 2.0.0"]


@pytest.mark.parametrize("piece", [1, 7, 100, 999, 1000, 1001, 4096])
def test_data_over_limit_memory_bounded(piece):
    d = Driver(max_message_size=LIMIT)
    d.feed(ENVELOPE + b"DATA\r\n")
    line = b"y" * 70 + b"\r\n"
    body = line * (10 * LIMIT // len(line) + 1)
    for i in range(0, len(body), piece):
        d.feed(body[i:i + piece])  # check_bounds runs after every step
        assert d.conn.pending_input <= LIMIT + 4
    d.feed(b".\r\nNOOP\r\n")
    assert codes(bytes(d.out))[-3:] == ["354", "552 5.3.4", "250 2.0.0"]
    assert d.messages == [] and d.conn.txn is None


@pytest.mark.parametrize("piece", [1, 100, 1001, 4096])
def test_bdat_over_limit_memory_bounded(piece):
    d = Driver(max_message_size=LIMIT)
    d.feed(ENVELOPE)
    for n in range(4):
        d.feed(b"BDAT %d\r\n" % (3 * LIMIT), 50)
        chunk = b"z" * (3 * LIMIT)
        for i in range(0, len(chunk), piece):
            d.feed(chunk[i:i + piece])
            assert len(d.conn._bdat_data) <= LIMIT
    d.feed(b"BDAT 10 LAST\r\n" + b"z" * 10 + b"RSET\r\n")
    assert codes(bytes(d.out))[3:] == ["552 5.3.4"] * 5 + ["250 2.0.0"]
    assert d.messages == []
    d.feed(MAIL + RCPT + b"BDAT 2 LAST\r\nok")  # the next transaction starts clean
    assert [m.data for m in d.messages] == [b"ok"]


def test_no_size_limit():
    body = b"q" * 100_000 + b"\r\n"
    d = run(ENVELOPE + b"DATA\r\n" + body + b".\r\n", max_message_size=0)
    assert [m.data for m in d.messages] == [body]


# --- STARTTLS (RFC 3207) -------------------------------------------------------------------------

def tls_opts(**kw):
    return dict(tls_available=True, auth_available=True, **kw)


def test_starttls_then_ehlo():
    d = run(EHLO + b"STARTTLS\r\n", TLS, EHLO, **tls_opts())
    (r1, r2, r3) = replies(bytes(d.out))
    assert "STARTTLS" in r1[1] and "AUTH PLAIN LOGIN" not in r1[1]
    assert r2 == (220, ["2.0.0 Ready to start TLS"])
    assert "STARTTLS" not in r3[1] and "AUTH PLAIN LOGIN" in r3[1]
    assert d.events == ["starttls"] and d.conn.session.tls == "TLSv1.3"


def test_starttls_drops_pipelined_cleartext():
    """CVE-2011-0411: commands sent in clear text after STARTTLS must not run inside TLS."""
    injected = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<v@example.com>\r\n"
    d = run(EHLO + b"STARTTLS\r\n" + injected, TLS, RCPT + b"NOOP\r\n", **tls_opts())
    assert codes(bytes(d.out)) == ["250", "220 2.0.0", "503 5.5.1", "250 2.0.0"]
    assert ("mail", "evil@attacker.example") not in d.hooks.calls


def test_bytes_received_before_tls_started_are_kept():
    """asyncio delivers the first decrypted bytes before start_tls() returns, so before the
    adapter can call tls_started(): they must be kept and run once TLS is declared up. (Dropping
    clear text read before the handshake began is the adapter's job: see receive().)"""
    conn = ServerConnection(ServerOptions(hostname=HOST, tls_available=True), AcceptAll())
    conn.receive(EHLO + b"STARTTLS\r\nNOOP\r\n")  # NOOP: pipelined clear text, dropped
    out, ev = conn.step()
    assert codes(out) == ["250", "220 2.0.0"] and isinstance(ev, StartTLS)
    conn.receive(b"EHLO again.test\r\n")  # decrypted, delivered early
    assert conn.step() == (b"", None)
    conn.tls_started("TLSv1.3")
    out, ev = conn.step()
    assert out.startswith(b"250-mx.test Hello again.test\r\n") and ev is None
    assert conn.session.helo == "again.test"


def test_tls_started_resets_helo_and_transaction():
    d = run(ENVELOPE + b"STARTTLS\r\n", TLS, MAIL + RCPT + EHLO + MAIL + RCPT, **tls_opts())
    assert codes(bytes(d.out)) == ["250", "250 2.1.0", "250 2.1.5", "220 2.0.0", "503 5.5.1",
                                   "503 5.5.1", "250", "250 2.1.0", "250 2.1.5"]
    assert d.conn.session.helo == "client.test" and d.conn.session.esmtp


@pytest.mark.parametrize("data, expect", [
    (b"STARTTLS now\r\n", ["501 5.5.4"]),
    (b"starttls\r\n", ["220 2.0.0"]),
])
def test_starttls_syntax(data, expect):
    d = run(data, **tls_opts())
    assert codes(bytes(d.out)) == expect


def test_starttls_twice():
    d = run(EHLO + b"STARTTLS\r\n", TLS, EHLO + b"STARTTLS\r\n", **tls_opts())
    assert codes(bytes(d.out))[-1] == "503 5.5.1"
    assert d.events == ["starttls"]


def test_nothing_processed_until_tls_started():
    conn = ServerConnection(ServerOptions(hostname=HOST, tls_available=True), AcceptAll())
    conn.receive(b"STARTTLS\r\n")
    out, ev = conn.step()
    assert out == b"220 2.0.0 Ready to start TLS\r\n" and isinstance(ev, StartTLS)
    conn.receive(b"NOOP\r\n")
    assert conn.step() == (b"", None)


# --- AUTH (RFC 4954) -----------------------------------------------------------------------------

def run_auth(data, **kw):
    return run(EHLO + data, session=lambda: Session(tls="TLSv1.3"), **tls_opts(**kw))


PLAIN_OK = b64("\0alice\0s3cret")
USER = b64("alice")
PASSWORD = b64("s3cret")


@pytest.mark.parametrize("data, expect, user", [
    (b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["235 2.7.0"], "alice"),
    (b"auth plain " + PLAIN_OK + b"\r\n", ["235 2.7.0"], "alice"),
    (b"AUTH PLAIN\r\n" + PLAIN_OK + b"\r\n", ["334", "235 2.7.0"], "alice"),
    (b"AUTH PLAIN " + b64("alice\0alice\0s3cret") + b"\r\n", ["235 2.7.0"], "alice"),
    (b"AUTH LOGIN\r\n" + USER + b"\r\n" + PASSWORD + b"\r\n", ["334", "334", "235 2.7.0"], "alice"),
    (b"AUTH LOGIN " + USER + b"\r\n" + PASSWORD + b"\r\n", ["334", "235 2.7.0"], "alice"),
    # refused
    (b"AUTH PLAIN " + b64("\0alice\0wrong") + b"\r\n", ["535 5.7.8"], ""),
    (b"AUTH PLAIN " + b64("\0bob\0s3cret") + b"\r\n", ["535 5.7.8"], ""),
    (b"AUTH PLAIN " + b64("bob\0alice\0s3cret") + b"\r\n", ["535 5.7.8"], ""),   # authzid != user
    (b"AUTH PLAIN " + b64("\0\0s3cret") + b"\r\n", ["535 5.7.8"], ""),
    (b"AUTH PLAIN " + b64("alice\0s3cret") + b"\r\n", ["501 5.5.2"], ""),
    (b"AUTH PLAIN " + b64("\0alice\0s3\0cret") + b"\r\n", ["501 5.5.2"], ""),
    (b"AUTH PLAIN not*base64\r\n", ["501 5.5.2"], ""),
    (b"AUTH PLAIN AGFsaWNl=\r\n", ["501 5.5.2"], ""),                              # bad padding
    (b"AUTH PLAIN " + base64.b64encode(b"\0\xff\0x") + b"\r\n", ["501 5.5.2"], ""),  # not UTF-8
    (b"AUTH PLAIN\r\n*\r\n", ["334", "501 5.0.0"], ""),
    (b"AUTH PLAIN\r\n!!\r\n", ["334", "501 5.5.2"], ""),
    (b"AUTH LOGIN\r\n*\r\n", ["334", "501 5.0.0"], ""),
    (b"AUTH LOGIN\r\n" + USER + b"\r\n*\r\n", ["334", "334", "501 5.0.0"], ""),
    (b"AUTH LOGIN\r\n" + USER + b"\r\n" + b64("wrong") + b"\r\n", ["334", "334", "535 5.7.8"], ""),
    (b"AUTH LOGIN\r\n%%%\r\n", ["334", "501 5.5.2"], ""),
    (b"AUTH LOGIN\r\n" + USER + b"\r\n%%%\r\n", ["334", "334", "501 5.5.2"], ""),
    (b"AUTH LOGIN\r\n" + USER + b"\n", ["334", "500 5.5.2"], ""),
    (b"AUTH CRAM-MD5\r\n", ["504 5.5.4"], ""),
    (b"AUTH\r\n", ["501 5.5.4"], ""),
    (b"AUTH PLAIN a b\r\n", ["501 5.5.4"], ""),
    (MAIL + b"AUTH PLAIN " + PLAIN_OK + b"\r\n", ["250 2.1.0", "503 5.5.1"], ""),
    (b"AUTH PLAIN " + PLAIN_OK + b"\r\nAUTH PLAIN " + PLAIN_OK + b"\r\n",
     ["235 2.7.0", "503 5.5.1"], "alice"),
])
def test_auth(data, expect, user):
    d = run_auth(data)
    assert codes(bytes(d.out)) == ["250"] + expect
    assert d.conn.session.auth_user == user
    assert d.conn.state == S.CMD


def test_auth_challenges_exact():
    d = run_auth(b"AUTH LOGIN\r\n" + USER + b"\r\n" + PASSWORD + b"\r\n")
    assert bytes(d.out).split(b"\r\n")[-4:] == [b"334 VXNlcm5hbWU6", b"334 UGFzc3dvcmQ6",
                                               b"235 2.7.0 Authentication succeeded", b""]
    d = run_auth(b"AUTH PLAIN\r\n*\r\n")
    assert b"\r\n334 \r\n" in bytes(d.out)


def test_auth_hook_gets_decoded_credentials():
    d = run_auth(b"AUTH PLAIN " + b64("\0alice\0p\u00e4ss w\u00f6rd") + b"\r\n")
    assert ("auth", "alice", "p\u00e4ss w\u00f6rd") in d.hooks.calls


def test_auth_needs_tls():
    d = run(EHLO + b"AUTH PLAIN " + PLAIN_OK + b"\r\n", **tls_opts())
    assert codes(bytes(d.out)) == ["250", "538 5.7.11"]
    assert d.hooks.calls == []


def test_auth_after_real_starttls():
    d = run(EHLO + b"STARTTLS\r\n", TLS, EHLO + b"AUTH PLAIN " + PLAIN_OK + b"\r\n" + MAIL,
            **tls_opts())
    assert codes(bytes(d.out)) == ["250", "220 2.0.0", "250", "235 2.7.0", "250 2.1.0"]
    assert d.conn.session.auth_user == "alice"


def test_auth_pipelined_after_challenge():
    d = run_auth(b"AUTH PLAIN\r\n" + PLAIN_OK + b"\r\n" + MAIL + RCPT + DATA_OK)
    assert codes(bytes(d.out)) == ["250", "334", "235 2.7.0", "250 2.1.0", "250 2.1.5", "354",
                                   "250 2.0.0"]


# --- properties (hypothesis) ---------------------------------------------------------------------

FUZZ = settings(max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "300")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

OPTIONS = st.fixed_dictionaries({
    "max_message_size": st.sampled_from([0, 40, 200]),
    "max_command_line": st.sampled_from([16, 64, 512]),
    "max_recipients": st.sampled_from([1, 3, 100]),
    "max_errors": st.sampled_from([1, 3, 1000]),
    "tls_available": st.booleans(),
    "auth_available": st.booleans(),
})

ADDRESSES = st.sampled_from([
    "<a@example.org>", "<>", "<postmaster>", "<@r.example:a@b.example>", '<"q>@"@x.example>',
    "<\u00fc@x.example>", "<bad>", "<a@b", "", "<a@b.example>>", "< a@b.example>",
])
PARAMS = st.lists(st.sampled_from([
    "SIZE=10", "SIZE=999999999", "SIZE=\u00b2", "BODY=8BITMIME", "BODY=7BIT", "SMTPUTF8",
    "RET=FULL", "ENVID=a+2Bb", "ENVID=+zz", "NOTIFY=SUCCESS,DELAY", "NOTIFY=NEVER",
    "ORCPT=rfc822;a+40b", "AUTH=<>", "FOO=1", "X",
]), max_size=3).map(lambda ps: "".join(" " + p for p in ps))

TEXT_LINE = st.text(st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=30)

COMMAND_LINE = st.one_of(
    st.sampled_from(["HELO c", "EHLO c", "RSET", "NOOP", "VRFY x", "EXPN x", "HELP", "", "FOO",
                     "HELO", "RSET x", "DATA x", "mail", "rcpt", " ", "ehlo \u00e9"]),
    st.builds(lambda a, p: f"MAIL FROM:{a}{p}", ADDRESSES, PARAMS),
    st.builds(lambda a, p: f"RCPT TO:{a}{p}", ADDRESSES, PARAMS),
    st.builds(lambda v, t: f"{v} {t}", st.sampled_from(["MAIL", "RCPT", "NOOP", "VRFY", "HELO"]),
              TEXT_LINE),
    TEXT_LINE,
).map(lambda s: s.encode("utf-8"))

LINE_END = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r\r\n"])

# Lines that never change the state away from CMD (no DATA, BDAT, AUTH, STARTTLS, QUIT).
_LEAVES_CMD = {b"DATA", b"BDAT", b"AUTH", b"STARTTLS", b"QUIT"}
CMD_LINES = st.lists(st.tuples(
    st.one_of(COMMAND_LINE, st.binary(max_size=40)).filter(
        lambda b: b"\n" not in b and b.split(b" ")[0].upper() not in _LEAVES_CMD),
    LINE_END), max_size=30).map(lambda ls: b"".join(a + e for a, e in ls))


def random_pieces(draw, data: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=12))))
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


@FUZZ
@given(st.data(), CMD_LINES, OPTIONS)
def test_every_command_line_gets_exactly_one_reply(data, stream, options):
    options = dict(options, max_errors=10 ** 6)
    d = Driver(**options)
    d.feed(stream, random_pieces(data.draw, stream))
    rs = replies(bytes(d.out))
    assert len(rs) == stream.count(b"\n")
    check_enhanced(bytes(d.out))
    assert d.events == []


SEGMENT = st.one_of(
    st.tuples(COMMAND_LINE, LINE_END).map(lambda t: t[0] + t[1]),
    st.just(EHLO), st.just(MAIL), st.just(RCPT), st.just(b"RSET\r\n"),
    st.builds(lambda body, end: b"DATA\r\n" + body + end,
              st.binary(max_size=80), st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\n.\n", b""])),
    st.builds(lambda body, last: b"BDAT %d%s\r\n" % (len(body), b" LAST" if last else b"") + body,
              st.binary(max_size=60), st.booleans()),
    st.builds(lambda body: b"BDAT %d LAST\r\n" % (len(body) + 3) + body, st.binary(max_size=10)),
    st.sampled_from([b"AUTH PLAIN " + PLAIN_OK + b"\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
                     USER + b"\r\n", PASSWORD + b"\r\n", b"*\r\n", b"QUIT\r\n", b"BDAT x\r\n"]),
)
SESSION = st.lists(SEGMENT, max_size=25).map(b"".join)


@FUZZ
@given(st.data(), SESSION, OPTIONS, st.booleans())
def test_sessions_agree_whole_and_in_pieces(data, stream, options, tls_on):
    """No STARTTLS here: after it, what counts as clear text depends on the read boundaries."""
    runs = []
    for pieces in (None, random_pieces(data.draw, stream)):
        d = Driver(session=Session(tls="TLSv1.3" if tls_on else ""), **options)
        d.feed(stream, pieces)
        runs.append(d)
    whole, split = runs
    assert bytes(split.out) == bytes(whole.out)
    assert split.events == whole.events
    assert [summary(m) for m in split.messages] == [summary(m) for m in whole.messages]
    check_enhanced(bytes(whole.out))
    if options["max_message_size"]:
        assert all(len(m.data) <= options["max_message_size"] for m in whole.messages)
    for m in whole.messages:
        assert not wire.has_bare_line_ending(m.data)


@FUZZ
@given(st.data(), st.sampled_from([b"", EHLO, ENVELOPE, ENVELOPE + b"DATA\r\n",
                                   ENVELOPE + b"BDAT 30\r\n", EHLO + b"AUTH LOGIN\r\n",
                                   EHLO + b"STARTTLS\r\n"]),
       st.binary(max_size=600), OPTIONS, st.booleans())
def test_random_bytes_never_raise(data, prefix, noise, options, tls_on):
    stream = prefix + noise
    d = Driver(session=Session(tls="TLSv1.3" if tls_on else ""), auto_tls=True, **options)
    d.feed(stream, random_pieces(data.draw, stream))  # check_bounds runs after every step
    replies(bytes(d.out))  # well-formed
    check_enhanced(bytes(d.out))
    if d.closed:
        before = len(d.out)
        d.conn.receive(b"NOOP\r\n" + noise)
        assert d.conn.step() == (b"", CLOSE)
        assert len(d.out) == before


@FUZZ
@given(st.data(), st.lists(st.sampled_from([b"\r\n", b".", b"..", b"\r", b"\n", b"x", b"\x00",
                                            b"\r\n.\r", b"\n.\n"]), max_size=40).map(b"".join))
def test_data_state_terminator_and_smuggling_property(data, body):
    """Whatever the body, DATA ends at the first CRLF.CRLF only; bare CR/LF means 550."""
    stream = ENVELOPE + b"DATA\r\n" + body + b"\r\n.\r\nNOOP\r\n"
    d = Driver()
    d.feed(stream, random_pieces(data.draw, stream))
    raw = b"\r\n" + body + b"\r\n.\r\n"
    end = raw.find(b"\r\n.\r\n")
    content = wire.dot_unstuff(raw[2:end + 2])
    rs = codes(bytes(d.out))
    if wire.has_bare_line_ending(content):
        assert rs[3:5] == ["354", "550 5.6.0"] and d.messages == []
    else:
        assert rs[3:5] == ["354", "250 2.0.0"] and [m.data for m in d.messages] == [content]
    # whatever followed the first terminator was read as commands
    assert len(d.messages) <= 1


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                          st.sampled_from([b".", b"..", b". ", b""])), max_size=20))
def test_dot_stuffed_message_comes_back_unchanged(lines):
    message = b"".join(line + b"\r\n" for line in lines)
    d = run(ENVELOPE + b"DATA\r\n" + wire.dot_stuff(message))
    assert [m.data for m in d.messages] == [message]


# --- what the adapter's defences need from the machine (issue 14) --------------------------------

def test_auth_asks_the_adapter_and_reads_nothing_until_it_answers():
    conn = ServerConnection(ServerOptions(hostname=HOST, auth_available=True),
                            Hooks(), Session(tls="TLSv1.3"))
    conn.receive(EHLO + b"AUTH PLAIN " + PLAIN_OK + b"\r\nNOOP\r\n")
    out, ev = conn.step()
    assert isinstance(ev, AuthCheck) and (ev.user, ev.password) == ("alice", "s3cret")
    assert conn.hooks.calls == []  # the machine checks no password itself
    assert conn.step() == (b"", None)  # the NOOP waits for the answer
    conn.auth_done(True)
    out, ev = conn.step()
    assert codes(out) == ["235 2.7.0", "250 2.0.0"] and conn.session.auth_user == "alice"


def test_auth_refused_unchecked_is_answered_and_counts_as_an_error():
    throttled = Reply(454, "4.7.0", "Too many failed authentications, try later")
    conn = ServerConnection(ServerOptions(hostname=HOST, auth_available=True, max_errors=2),
                            Hooks(), Session(tls="TLSv1.3"))
    conn.receive(b"AUTH LOGIN " + USER + b"\r\n" + PASSWORD + b"\r\n")
    out, ev = conn.step()
    assert codes(out) == ["334"] and isinstance(ev, AuthCheck)
    conn.auth_done(throttled)
    conn.receive(b"AUTH PLAIN " + PLAIN_OK + b"\r\n")
    out, ev = conn.step()
    assert bytes(out).startswith(b"454 4.7.0 Too many failed")
    conn.auth_done(False)
    out, ev = conn.step()
    assert codes(out) == ["535 5.7.8", "421 4.7.0"] and ev is CLOSE
    assert conn.session.auth_user == ""


def test_release_message_in_data_drops_its_bytes_and_answers_452():
    d = Driver()
    d.feed(ENVELOPE + b"DATA\r\n" + b"x" * 5000)
    assert d.conn.receiving_message and d.conn.held > 5000
    assert d.conn.release_message(S.NO_STORAGE) and not d.conn.release_message(S.NO_STORAGE)
    d.pump()
    assert d.conn.held <= 4
    d.feed(b"y" * 5000 + b"\r\n.\r\n", 700)
    assert d.conn.held <= 4 or not d.conn.receiving_message
    d.feed(MAIL + RCPT + b"DATA\r\nsmall\r\n.\r\n")
    assert codes(bytes(d.out))[3:] == ["354", "452 4.3.1", "250 2.1.0", "250 2.1.5", "354",
                                       "250 2.0.0"]
    assert [m.data for m in d.messages] == [b"small\r\n"]
    assert not d.conn.receiving_message


def test_release_message_in_bdat_refuses_each_chunk_and_the_transaction():
    d = Driver()
    d.feed(ENVELOPE + b"BDAT 100\r\n" + b"a" * 60)
    assert d.conn.release_message(S.NO_STORAGE)
    assert d.conn.held == 0
    d.feed(b"a" * 40 + b"BDAT 10\r\n" + b"b" * 10)
    assert d.conn.receiving_message  # between chunks of the same message
    d.feed(b"BDAT 3 LAST\r\nend" + MAIL)
    assert codes(bytes(d.out))[3:] == ["452 4.3.1", "452 4.3.1", "452 4.3.1", "250 2.1.0"]
    assert d.messages == [] and d.conn.held == 0


def test_release_outside_a_message_changes_nothing():
    d = Driver()
    d.feed(ENVELOPE + b"NOO")
    assert not d.conn.release_message(S.NO_STORAGE)
    d.feed(b"P\r\nDATA\r\nhi\r\n.\r\n")
    assert codes(bytes(d.out))[3:] == ["250 2.0.0", "354", "250 2.0.0"]


def test_no_room_refuses_size_data_and_bdat_with_452():
    d = Driver()
    d.conn.room = 1000
    d.feed(EHLO + b"MAIL FROM:<a@example.org> SIZE=5000\r\nMAIL FROM:<a@example.org> SIZE=900\r\n")
    assert codes(bytes(d.out))[1:] == ["452 4.3.1", "250 2.1.0"]
    d.conn.room = 0
    d.feed(RCPT + b"DATA\r\nBDAT 5 LAST\r\nhello")
    assert codes(bytes(d.out))[3:] == ["250 2.1.5", "452 4.3.1", "452 4.3.1"]
    assert d.messages == []
    d.conn.room = None  # no budget: as before
    d.feed(MAIL + RCPT + b"DATA\r\nok\r\n.\r\n")
    assert codes(bytes(d.out))[-1] == "250 2.0.0" and len(d.messages) == 1


def test_the_machine_counts_lines_and_says_what_it_reads():
    d = Driver()
    assert d.conn.lines_read == 0 and d.conn.reading_line
    d.feed(ENVELOPE + b"NO")
    assert d.conn.lines_read == 3 and d.conn.reading_line and d.conn.pending_input == 2
    d.feed(b"OP\r\nDATA\r\nabc")
    assert d.conn.lines_read == 5 and d.conn.receiving_message and not d.conn.reading_line
    d.feed(b"\r\n.\r\n")
    assert not d.conn.receiving_message and d.conn.reading_line


def test_released_data_still_ends_at_a_terminator_already_received():
    d = Driver()
    d.feed(ENVELOPE + b"DATA\r\n" + b"x" * 100)
    d.conn.receive(b"x" * 100 + b"\r\n.\r\nNOOP\r\n")  # the adapter releases before stepping
    d.conn.release_message(S.NO_STORAGE)
    d.pump()
    assert codes(bytes(d.out))[3:] == ["354", "452 4.3.1", "250 2.0.0"] and d.conn.held == 0
