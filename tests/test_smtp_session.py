"""The outbound session adapter (mailengine/smtp_session.py) over real loopback sockets.

Two kinds of server: our scriptable sink (mailengine/testing/sink.py), which records what it saw,
and Postfix's own `smtp-sink`, a server we did not write. Every server is stopped by its test.
"""
from __future__ import annotations

import asyncio
import functools
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time

import pytest

from mailengine.smtp.client import Body, DSNRequest, SMTPClientError
from mailengine.smtp_session import ConnectError, SMTPSession
from mailengine.testing.sink import SinkScript, SMTPSink, ThreadedSink

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

MSG = b"From: s@y.test\nTo: a@x.test\nSubject: hello\n\nline one\n.leading dot\nlast\n"
WIRE = MSG.replace(b"\n", b"\r\n")  # what a server must store


def run(coro, uv: bool = False, timeout: float = 30.0):
    factory = uvloop.new_event_loop if uv else None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


def asynctest(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return run(fn(*args, **kwargs))
    return wrapper


def session(sink, **kw) -> SMTPSession:
    opts = dict(helo_name="client.test", connect_timeout=2, read_timeout=2, write_timeout=2,
                body_timeout=2)
    opts.update(kw)
    return SMTPSession(sink.host, sink.port, **opts)


def codes(result):
    return [(r.address, r.code, r.stage) for r in result.recipients]


# -- against our sink -------------------------------------------------------------------------------

LOOPS = [False, pytest.param(True, marks=pytest.mark.skipif(uvloop is None, reason="no uvloop"))]


@pytest.mark.parametrize("uv", LOOPS, ids=["asyncio", "uvloop"])
def test_happy_path_pipelined(uv):
    async def main():
        async with SMTPSink("127.0.0.2", 0) as sink:
            s = session(sink)
            await s.connect()
            assert s.capabilities.pipelining and s.is_reusable
            r = await s.send("s@y.test", ["a@x.test", "b@x.test", "c@x.test"], MSG)
            assert [c for _, c, _ in codes(r)] == [250, 250, 250] and not r.site_failure
            await s.close()
            await sink.wait_for(lambda: sink.sessions[0].closed)
            (sess,) = sink.sessions
            assert sess.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "QUIT"]
            assert sess.pipelined >= 3  # the three RCPTs came in MAIL's write
            (m,) = sink.messages
            assert (m.mail_from, m.rcpts, m.data) == ("s@y.test", ["a@x.test", "b@x.test",
                                                                  "c@x.test"], WIRE)
            assert f"SIZE={len(WIRE)}" in m.mail_params
    run(main(), uv=uv)


@asynctest
async def test_without_pipelining_one_by_one():
    async with SMTPSink("127.0.0.2", 0, SinkScript(pipelining=False)) as sink:
        async with session(sink) as s:
            r = await s.send("s@y.test", ["a@x.test", "b@x.test"], MSG)
        assert [c for _, c, _ in codes(r)] == [250, 250]
        assert sink.sessions[0].pipelined == 0


@asynctest
async def test_per_recipient_5xx_and_4xx_then_accept():
    script = SinkScript(rcpt={"bad@x.test": "550 5.1.1 No such user",
                              "later@x.test": ["451 4.7.1 Greylisted", "250 2.1.5 Ok"]})
    async with SMTPSink("127.0.0.2", 0, script) as sink:
        async with session(sink) as s:
            r = await s.send("s@y.test", ["ok@x.test", "bad@x.test", "later@x.test"], MSG)
            assert codes(r) == [("ok@x.test", 250, "body"), ("bad@x.test", 550, "rcpt"),
                                ("later@x.test", 451, "rcpt")]
            assert r.recipients[1].enhanced == "5.1.1" and r.recipients[2].temporary
            assert s.is_reusable
            r2 = await s.send("s@y.test", ["later@x.test"], MSG)
            assert codes(r2) == [("later@x.test", 250, "body")]
        assert [m.rcpts for m in sink.messages] == [["ok@x.test"], ["later@x.test"]]


@asynctest
async def test_421_greeting_is_a_connect_error():
    async with SMTPSink("127.0.0.2", 0, SinkScript(greeting="421 4.3.2 Too busy")) as sink:
        s = session(sink)
        with pytest.raises(ConnectError) as err:
            await s.connect()
        assert (err.value.reply.code, err.value.reply.enhanced) == (421, "4.3.2")
        assert "<-- 421 4.3.2 Too busy" in err.value.transcript
        assert not s.is_reusable


@asynctest
async def test_connection_refused_is_a_temporary_connect_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.2", 0))
        port = probe.getsockname()[1]
    s = SMTPSession("127.0.0.2", port, helo_name="client.test", connect_timeout=2)
    with pytest.raises(ConnectError) as err:
        await s.connect()
    assert (err.value.reply.code, err.value.reply.enhanced) == (451, "4.4.1")


@asynctest
async def test_helo_fallback():
    async with SMTPSink("127.0.0.2", 0, SinkScript(ehlo=False)) as sink:
        async with session(sink) as s:
            assert not s.capabilities.esmtp
            r = await s.send("s@y.test", ["a@x.test"], MSG)
        assert r.delivered
        await sink.wait_for(lambda: sink.sessions[0].closed)
        assert sink.verbs == ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "QUIT"]
        assert sink.sessions[0].helo == "client.test"


@pytest.mark.parametrize("uv", LOOPS, ids=["asyncio", "uvloop"])
def test_starttls_opportunistic(uv):
    async def main():
        async with SMTPSink("127.0.0.2", 0, SinkScript(starttls=True)) as sink:
            async with session(sink, host_name="sink.test") as s:
                assert s.tls_version and s.tls_version.startswith("TLS")
                r = await s.send("s@y.test", ["a@x.test"], MSG)
            assert r.delivered and sink.messages[0].tls
            assert sink.verbs[:3] == ["EHLO", "STARTTLS", "EHLO"]
            assert any(line.startswith("<-- TLS established") for line in r.session_transcript)
    run(main(), uv=uv)


@asynctest
async def test_starttls_can_be_turned_off():
    async with SMTPSink("127.0.0.2", 0, SinkScript(starttls=True)) as sink:
        async with session(sink, starttls=False) as s:
            await s.send("s@y.test", ["a@x.test"], MSG)
        assert "STARTTLS" not in sink.verbs and not sink.messages[0].tls


@pytest.mark.parametrize("uv", LOOPS, ids=["asyncio", "uvloop"])
def test_failed_tls_handshake_falls_back_to_plain_text(uv):
    async def main():
        bad = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)  # no certificate: every handshake fails
        async with SMTPSink("127.0.0.2", 0, SinkScript(starttls=True, tls_context=bad)) as sink:
            async with session(sink) as s:
                r = await s.send("s@y.test", ["a@x.test"], MSG)
            assert r.delivered and not sink.messages[0].tls and s.tls_version is None
            assert len(sink.sessions) == 2 and "STARTTLS" not in sink.sessions[1].verbs
            assert any("TLS handshake failed" in line for line in r.session_transcript)
    run(main(), uv=uv)


@asynctest
async def test_connection_reused_for_three_messages():
    async with SMTPSink("127.0.0.2", 0) as sink:
        async with session(sink) as s:
            for n in range(3):
                r = await s.send("s@y.test", [f"r{n}@x.test"], MSG)
                assert r.delivered and s.is_reusable
            assert s.messages_sent == 3
        assert len(sink.sessions) == 1 and len(sink.messages) == 3
        assert sink.peak_connections == 1


@asynctest
async def test_dropped_connection_mid_data_fails_every_recipient_temporarily():
    script = SinkScript(drop_after_body_bytes=1000)
    async with SMTPSink("127.0.0.2", 0, script) as sink:
        s = session(sink)
        await s.connect()
        r = await s.send("s@y.test", ["a@x.test", "b@x.test"], MSG + b"x" * 200_000 + b"\n")
        assert [(x.code, x.enhanced, x.stage) for x in r.recipients] == \
            [(451, "4.4.2", "connection")] * 2
        assert r.site_failure and not s.is_reusable and not sink.messages
        with pytest.raises(SMTPClientError):
            await s.send("s@y.test", ["a@x.test"], MSG)
        await s.close()  # harmless on a dead session


@asynctest
async def test_read_timeout():
    async with SMTPSink("127.0.0.2", 0, SinkScript(delays={"RCPT": 1.0})) as sink:
        s = session(sink, read_timeout=0.3)
        await s.connect()
        t = time.monotonic()
        r = await s.send("s@y.test", ["a@x.test", "b@x.test"], MSG)
        assert 0.25 < time.monotonic() - t < 0.9
        assert [(x.code, x.stage) for x in r.recipients] == [(451, "connection")] * 2
        assert "Timed out waiting for the reply to RCPT" in r.reply.text
        assert not s.is_reusable


@asynctest
async def test_body_timeout_is_separate_from_read_timeout():
    async with SMTPSink("127.0.0.2", 0, SinkScript(delays={"BODY": 0.6})) as sink:
        async with session(sink, read_timeout=0.3, body_timeout=2) as s:  # slow is fine here
            assert (await s.send("s@y.test", ["a@x.test"], MSG)).delivered
        s = session(sink, read_timeout=5, body_timeout=0.3)
        await s.connect()
        r = await s.send("s@y.test", ["a@x.test"], MSG)
        assert "Timed out waiting for the reply to BODY" in r.reply.text
        assert r.recipients[0].temporary


@asynctest
async def test_greeting_timeout():
    async with SMTPSink("127.0.0.2", 0, SinkScript(delays={"GREETING": 1.0})) as sink:
        with pytest.raises(ConnectError) as err:
            await session(sink, read_timeout=0.3).connect()
        assert "Timed out waiting for the reply to GREETING" in err.value.reply.text


@asynctest
async def test_connect_timeout():
    # A listener whose accept queue is full drops further SYNs: the connect hangs.
    lsock = socket.socket()
    lsock.bind(("127.0.0.2", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.2", port))
            fillers.append(c)
        s = SMTPSession("127.0.0.2", port, helo_name="client.test", connect_timeout=0.3)
        t = time.monotonic()
        with pytest.raises(ConnectError) as err:
            await s.connect()
        assert time.monotonic() - t < 1.5
        assert err.value.reply.code == 451 and "timed out" in err.value.reply.text
    finally:
        for c in fillers:
            c.close()
        lsock.close()


@asynctest
async def test_write_timeout_when_the_server_stops_reading():
    stalled = asyncio.Event()
    handlers = set()

    async def handler(reader, writer):
        handlers.add(asyncio.current_task())
        try:
            writer.write(b"220 stall.test\r\n")
            while True:
                line = await reader.readline()
                if line[:4].upper() == b"DATA":
                    writer.write(b"354 go\r\n")
                    stalled.set()
                    await asyncio.Event().wait()  # never read the body
                writer.write(b"250 ok\r\n")
        except asyncio.CancelledError:
            pass
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handler, "127.0.0.2", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        s = SMTPSession("127.0.0.2", port, helo_name="client.test", read_timeout=5,
                        write_timeout=0.3, body_timeout=5)
        await s.connect()
        body = Body.from_bytes(b"x" * (32 << 20))  # more than both kernel buffers hold
        t = time.monotonic()
        r = await s.send("s@y.test", ["a@x.test"], body)
        assert stalled.is_set() and time.monotonic() - t < 2
        assert r.recipients[0].temporary and "Timed out" in r.reply.text
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@asynctest
async def test_test_mode_sends_rset_and_quit_instead_of_data():
    async with SMTPSink("127.0.0.2", 0, SinkScript(rcpt={"bad@x.test": "550 5.1.1 no"})) as sink:
        s = session(sink)
        await s.connect()
        r = await s.send("s@y.test", ["a@x.test", "bad@x.test"], MSG, test_mode=True)
        assert codes(r) == [("a@x.test", 250, "test"), ("bad@x.test", 550, "rcpt")]
        assert not s.is_reusable
        await sink.wait_for(lambda: sink.sessions[0].closed)
        assert sink.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET", "QUIT"]
        assert not sink.messages
        assert r.transcript[-4:] == ["--> RSET", "<-- 250 2.0.0 Ok", "--> QUIT",
                                     "<-- 221 2.0.0 Bye"]


@asynctest
async def test_size_too_big_refused_before_sending():
    async with SMTPSink("127.0.0.2", 0, SinkScript(size=1000)) as sink:
        async with session(sink) as s:
            assert s.capabilities.size == 1000
            r = await s.send("s@y.test", ["a@x.test"], b"x" * 2000)
            assert codes(r) == [("a@x.test", 552, "local")] and r.recipients[0].enhanced == "5.3.4"
            assert s.is_reusable  # the connection is fine for smaller mail
            assert (await s.send("s@y.test", ["a@x.test"], MSG)).delivered
        assert sink.verbs.count("MAIL") == 1


@asynctest
async def test_8bit_message_to_server_without_8bitmime():
    async with SMTPSink("127.0.0.2", 0, SinkScript(eightbitmime=False)) as sink:
        async with session(sink) as s:
            r = await s.send("s@y.test", ["a@x.test"], "Subject: é\n\nça\n".encode())
        assert codes(r) == [("a@x.test", 554, "local")] and r.recipients[0].enhanced == "5.6.3"
        assert "MAIL" not in sink.verbs
    async with SMTPSink("127.0.0.2", 0) as sink:
        async with session(sink) as s:
            assert (await s.send("s@y.test", ["a@x.test"], "é\n".encode())).delivered
        assert "BODY=8BITMIME" in sink.messages[0].mail_params


@asynctest
async def test_smtputf8_and_dsn_parameters_reach_the_server():
    async with SMTPSink("127.0.0.2", 0) as sink:
        async with session(sink) as s:
            r = await s.send("s@y.test", ["jörg@x.test"], MSG,
                             dsn=DSNRequest(ret="HDRS", envid="E1", notify="FAILURE",
                                            orcpt={"jörg@x.test": "jörg@x.test"}))
        assert r.delivered
        mail = next(c for c in sink.commands if c.startswith("MAIL"))
        rcpt = next(c for c in sink.commands if c.startswith("RCPT"))
        assert mail == f"MAIL FROM:<s@y.test> SIZE={len(WIRE)} SMTPUTF8 RET=HDRS ENVID=E1"
        assert rcpt == "RCPT TO:<jörg@x.test> NOTIFY=FAILURE ORCPT=rfc822;j+C3+B6rg@x.test"


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
@asynctest
async def test_ipv6():
    try:
        sink = await SMTPSink("::1", 0).start()
    except OSError:
        pytest.skip("::1 not available")
    try:
        async with session(sink) as s:
            assert (await s.send("s@y.test", ["a@x.test"], MSG)).delivered
        assert sink.sessions[0].peer[0] == "::1"
    finally:
        await sink.stop()


@asynctest
async def test_source_ip():
    async with SMTPSink("127.0.0.2", 0) as sink:
        async with session(sink, source_ip="127.0.0.3") as s:
            await s.send("s@y.test", ["a@x.test"], MSG)
        assert sink.sessions[0].peer[0] == "127.0.0.3"


@asynctest
async def test_sink_counts_concurrent_connections():
    async with SMTPSink("127.0.0.4", 0, SinkScript(delays={"BODY": 0.2})) as sink:
        sessions = [session(sink) for _ in range(5)]
        await asyncio.gather(*(s.connect() for s in sessions))
        await asyncio.gather(*(s.send("s@y.test", ["a@x.test"], MSG) for s in sessions))
        await asyncio.gather(*(s.close() for s in sessions))
        assert sink.peak_connections == 5 and len(sink.messages) == 5
        await sink.wait_for(lambda: sink.active_connections == 0)


@asynctest
async def test_sink_scripting_features():
    seen = []

    def hook(sess, verb, arg):
        seen.append(verb)
        return "550 5.7.1 Sender blocked" if verb == "MAIL" and "spam@" in arg else None

    script = SinkScript(on_command=hook, replies={"BODY": ["451 4.3.0 Queue full", "250 ok"]})
    async with SMTPSink("127.0.0.2", 0, script) as sink:
        async with session(sink) as s:
            r = await s.send("spam@y.test", ["a@x.test"], MSG)
            assert codes(r) == [("a@x.test", 550, "mail")]
            r = await s.send("s@y.test", ["a@x.test"], MSG)
            assert codes(r) == [("a@x.test", 451, "body")]
            r = await s.send("s@y.test", ["a@x.test"], MSG)
            assert codes(r) == [("a@x.test", 250, "body")]
        assert seen[:2] == ["GREETING", "EHLO"] and "BODY" in seen
        assert len(sink.messages) == 1

    script = SinkScript(replies={"MAIL": "DROP"})  # hang up instead of answering
    async with SMTPSink("127.0.0.2", 0, script) as sink:
        async with session(sink) as s:
            r = await s.send("s@y.test", ["a@x.test"], MSG)
        assert codes(r) == [("a@x.test", 451, "connection")] and r.site_failure

    async with SMTPSink("127.0.0.2", 0, SinkScript(greeting="554 5.7.1 No service")) as sink:
        with pytest.raises(ConnectError) as err:
            await session(sink).connect()
        assert err.value.reply.code == 554
        await sink.wait_for(lambda: sink.sessions[0].closed)
        assert sink.verbs == ["QUIT"]  # the client said goodbye properly


@asynctest
async def test_sink_max_connections_and_greeting_list():
    script = SinkScript(max_connections=2)
    async with SMTPSink("127.0.0.2", 0, script) as sink:
        first = [session(sink) for _ in range(2)]
        await asyncio.gather(*(s.connect() for s in first))
        with pytest.raises(ConnectError) as err:
            await session(sink).connect()
        assert err.value.reply.code == 421
        await asyncio.gather(*(s.close() for s in first))
        await sink.wait_for(lambda: sink.active_connections == 0)
        assert sink.peak_connections == 3
    script = SinkScript(replies={"GREETING": ["421 4.3.2 Busy", "220 ok"]})
    async with SMTPSink("127.0.0.2", 0, script) as sink:
        with pytest.raises(ConnectError):
            await session(sink).connect()
        async with session(sink) as s:
            assert s.is_reusable


@asynctest
async def test_close_does_not_wait_forever_for_the_quit_reply():
    async with SMTPSink("127.0.0.2", 0, SinkScript(delays={"QUIT": 5})) as sink:
        s = session(sink, read_timeout=10)
        await s.connect()
        t = time.monotonic()
        await s.close(timeout=0.2)
        assert time.monotonic() - t < 1 and not s.is_reusable


def test_threaded_sink_with_swaks():
    """A client we did not write (swaks) against the sink, pipelining."""
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks not installed")
    with ThreadedSink("127.0.0.5", 0) as sink:
        proc = subprocess.run([swaks, "--server", f"127.0.0.5:{sink.port}", "--to", "a@x.test",
                               "--from", "s@y.test", "--pipeline", "--silent", "2"],
                              capture_output=True, timeout=30)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        sink.wait_messages(1)
        assert sink.messages[0].rcpts == ["a@x.test"] and sink.sessions[0].pipelined >= 2


def test_sink_starttls_with_openssl_client():
    """The sink's STARTTLS against another TLS stack's client (openssl s_client)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    with ThreadedSink("127.0.0.5", 0, SinkScript(starttls=True)) as sink:
        proc = subprocess.run(
            [openssl, "s_client", "-starttls", "smtp", "-connect", f"127.0.0.5:{sink.port}",
             "-quiet"], input=b"EHLO me.test\r\nQUIT\r\n", capture_output=True, timeout=30)
        assert b"250-sink.test Hello me.test" in proc.stdout, proc.stdout + proc.stderr
        assert b"221 2.0.0 Bye" in proc.stdout
        assert sink.sessions[0].tls


# -- against Postfix's smtp-sink ------------------------------------------------------------------

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"


class PostfixSink:
    """`smtp-sink` in the foreground on 127.0.0.1, each message dumped to its own file."""

    def __init__(self, *options: str) -> None:
        self.options = options

    def __enter__(self) -> "PostfixSink":
        self.dir = tempfile.mkdtemp(prefix="smtp-sink-")
        os.chmod(self.dir, 0o777)  # smtp-sink drops to nobody when started as root
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, *user, "-d", os.path.join(self.dir, "msg."), *self.options,
             f"127.0.0.1:{self.port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("smtp-sink did not start")
                time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dumps(self) -> list[bytes]:
        out = []
        for name in sorted(os.listdir(self.dir)):
            with open(os.path.join(self.dir, name), "rb") as f:
                out.append(f.read())
        return out


needs_smtp_sink = pytest.mark.skipif(not os.path.exists(SMTP_SINK), reason="no smtp-sink")


def wait_dumps(pf: PostfixSink, n: int) -> list[bytes]:
    deadline = time.monotonic() + 5
    while len(pf.dumps()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return pf.dumps()


@needs_smtp_sink
def test_postfix_sink_pipelined_and_reused_for_three_messages():
    with PostfixSink() as pf:
        async def main():
            async with session(pf) as s:
                assert s.capabilities.pipelining
                return [await s.send("s@y.test", [f"a{n}@x.test", f"b{n}@x.test"], MSG)
                        for n in range(3)]
        results = run(main())
        assert all(len(r.delivered) == 2 for r in results)
        dumps = wait_dumps(pf, 3)
        assert len(dumps) == 3
        assert all(MSG in d for d in dumps)  # smtp-sink stores it unstuffed, with LF endings
        assert b"X-Rcpt-Args: <a0@x.test>" in b"".join(dumps)


@needs_smtp_sink
def test_postfix_sink_soft_rejects_every_rcpt():
    with PostfixSink("-r", "RCPT") as pf:
        async def main():
            async with session(pf) as s:
                assert not s.capabilities.pipelining  # -r implies -p
                return await s.send("s@y.test", ["a@x.test", "b@x.test"], MSG)
        r = run(main())
        assert [(x.code, x.enhanced, x.stage) for x in r.recipients] == [(450, "4.3.0", "rcpt")] * 2
        assert not pf.dumps()


@needs_smtp_sink
def test_postfix_sink_hard_rejects_every_rcpt():
    with PostfixSink("-f", "RCPT") as pf:
        async def main():
            async with session(pf) as s:
                return await s.send("s@y.test", ["a@x.test"], MSG)
        r = run(main())
        assert r.recipients[0].permanent and r.recipients[0].stage == "rcpt"


@needs_smtp_sink
def test_postfix_sink_421_greeting():
    with PostfixSink("-Q", "CONNECT") as pf:
        async def main():
            with pytest.raises(ConnectError) as err:
                await session(pf).connect()
            return err.value.reply
        assert run(main()).code == 421


@needs_smtp_sink
def test_postfix_sink_without_esmtp_helo_fallback():
    with PostfixSink("-e") as pf:
        async def main():
            async with session(pf) as s:
                assert not s.capabilities.esmtp
                return await s.send("s@y.test", ["a@x.test"], MSG)
        assert run(main()).delivered
        assert len(wait_dumps(pf, 1)) == 1


@needs_smtp_sink
def test_postfix_sink_drops_after_the_body():
    with PostfixSink("-q", ".") as pf:
        async def main():
            async with session(pf) as s:
                r = await s.send("s@y.test", ["a@x.test", "b@x.test"], MSG)
                assert not s.is_reusable
                return r
        r = run(main())
        assert [(x.code, x.stage) for x in r.recipients] == [(451, "connection")] * 2


@needs_smtp_sink
def test_postfix_sink_without_8bitmime():
    with PostfixSink("-8") as pf:
        async def main():
            async with session(pf) as s:
                return await s.send("s@y.test", ["a@x.test"], "é\n".encode())
        r = run(main())
        assert (r.recipients[0].code, r.recipients[0].stage) == (554, "local")


@needs_smtp_sink
def test_postfix_sink_slow_rcpt_read_timeout():
    # -p: no PIPELINING. smtp-sink's -W answers the commands pipelined behind a delayed one
    # before it (a 503 to our DATA while the RCPT reply waits), which no real server does.
    with PostfixSink("-p", "-W", "RCPT:2") as pf:
        async def main():
            s = session(pf, read_timeout=0.3)
            await s.connect()
            return await s.send("s@y.test", ["a@x.test"], MSG)
        r = run(main())
        assert r.recipients[0].temporary and "Timed out" in r.reply.text


@needs_smtp_sink
def test_postfix_sink_test_mode():
    with PostfixSink() as pf:
        async def main():
            s = session(pf)
            await s.connect()
            r = await s.send("s@y.test", ["a@x.test"], MSG, test_mode=True)
            await s.close()
            return r
        r = run(main())
        assert codes(r) == [("a@x.test", 250, "test")]
        assert [line for line in r.transcript if line.startswith("-->")][-2:] == \
            ["--> RSET", "--> QUIT"]
        time.sleep(0.2)
        assert not pf.dumps()
