"""SMTP intake against hostile clients (issue 14): AUTH guessing, slowloris, many sessions from one
address, sessions that hold big unfinished messages. A real engine, real sockets."""
import asyncio
import base64
import re
import socket
import smtplib
import ssl
import time

from mailengine.auth_checks import BUSY, THROTTLED, PasswordChecks, SharedThrottle
from mailengine.smtp.server import Session
from mailengine.testing.engine import RunningEngine, wait_until
from mailengine.users import hash_password

from test_intake import worker_pids

TLS = ssl._create_unverified_context()


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def tls_session(port: int, source: str = "127.0.0.1") -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=(source, 0))
    s.ehlo("guesser.test")
    s.starttls(context=TLS)
    s.ehlo("guesser.test")
    return s


def read_reply(f) -> bytes:
    line = f.readline()
    while line[3:4] == b"-":
        line = f.readline()
    return line


# --- AUTH ----------------------------------------------------------------------------------------

def test_failed_auth_slows_the_address_down_across_sessions(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "password.txt").write_text("alice:opensesame\n")
    with RunningEngine(tmp_path, {"policy.relay_ips": ["10.1.2.3"]}) as eng:
        with tls_session(eng.smtp_port) as s:
            assert s.docmd(plain("alice", "guess1"))[0] == 535
            failed = time.monotonic()
            code, text = s.docmd(plain("alice", "opensesame"))  # right, but too soon
            assert (code, text[:5]) == (454, b"4.7.0"), text
        with tls_session(eng.smtp_port) as s:  # a new session changes nothing
            assert s.docmd(plain("alice", "opensesame"))[0] == 454
            time.sleep(max(0.0, failed + 0.6 - time.monotonic()))
            assert s.docmd(plain("alice", "opensesame"))[0] == 235  # the wait is over
        with tls_session(eng.smtp_port) as s:  # success cleared the address: no wait
            assert s.docmd(plain("alice", "guess2"))[0] == 535
        with tls_session(eng.smtp_port, "127.0.0.2") as s:  # other addresses never waited
            assert s.docmd(plain("alice", "opensesame"))[0] == 235
    assert (tmp_path / "auth-failures.db").stat().st_mode & 0o077 == 0


def test_auth_throttle_is_shared_by_the_intake_processes(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "password.txt").write_text("alice:opensesame\n")
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as eng:
        workers = worker_pids(eng, 2)
        for wait in (0.5, 1.0):  # three failures in a row: the address now waits 2 s
            with tls_session(eng.smtp_port) as s:
                assert s.docmd(plain("alice", "wrong"))[0] == 535
            time.sleep(wait + 0.05)
        with tls_session(eng.smtp_port) as s:
            assert s.docmd(plain("alice", "wrong"))[0] == 535
        blocked_until = time.monotonic() + 2.0
        answers = []
        while len(answers) < 12 and time.monotonic() < blocked_until - 0.3:
            with tls_session(eng.smtp_port) as s:
                answers.append(s.docmd(plain("alice", "opensesame"))[0])
                # which process answered: it names the spool file of a message after itself
                s.sendmail("a@example.org", ["b@dest.test"], b"Subject: x\r\n\r\nx\r\n")
        infs = list((eng.mailq / "retry").glob("*.inf"))
        pids = {re.match(r"P(\d+)T", f.name).group(1) for f in infs}
    assert len(answers) >= 4 and set(answers) == {454}, answers
    assert pids == {str(p) for p in workers}  # both processes refused the right password


def guessers(port: int, count: int) -> list[smtplib.SMTP]:
    """`count` TLS sessions from as many addresses (127.0.0.2, ...): none is throttled yet."""
    return [tls_session(port, f"127.0.0.{2 + i}") for i in range(count)]


def test_password_checks_run_off_the_event_loop(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "password.txt").write_text(f"alice:{hash_password('right')}\n")  # scrypt
    with RunningEngine(tmp_path, {"limits.max_auth_checks": 32}) as eng:
        sessions = guessers(eng.smtp_port, 24)
        with socket.create_connection(("127.0.0.1", eng.smtp_port), timeout=20) as other:
            f = other.makefile("rb")
            read_reply(f)
            for s in sessions:  # 24 wrong passwords at once, each a scrypt hash to check
                s.sock.sendall(plain("alice", "wrong").encode() + b"\r\n")
            started = time.monotonic()
            other.sendall(b"NOOP\r\n")
            assert read_reply(f).startswith(b"250")
            noop = time.monotonic() - started
        answers = [s.getreply()[0] for s in sessions]
        for s in sessions:
            s.close()
    assert answers == [535] * 24
    # on the event loop, 24 checks of ~35 ms each kept the NOOP waiting for most of a second
    assert noop < 0.4, noop


def test_too_many_password_checks_at_once_get_454(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "password.txt").write_text(f"alice:{hash_password('right')}\n")
    with RunningEngine(tmp_path, {"limits.max_auth_checks": 2}) as eng:
        sessions = guessers(eng.smtp_port, 12)
        for s in sessions:
            s.sock.sendall(plain("alice", "wrong").encode() + b"\r\n")
        answers = [s.getreply() for s in sessions]
        for s in sessions:
            s.close()
    codes = [code for code, _ in answers]
    assert set(codes) == {535, 454} and codes.count(535) >= 2, answers
    assert all(text.startswith(b"4.7.0 Too many authentications in progress")
               for code, text in answers if code == 454)


def test_the_shared_throttle_file_is_one_state_for_every_process(tmp_path):
    now = [1000.0]
    one = SharedThrottle(tmp_path / "t.db", clock=lambda: now[0])
    two = SharedThrottle(tmp_path / "t.db", clock=lambda: now[0])  # as another process
    assert [one.failed("192.0.2.1") for _ in range(3)] == [0.5, 1.0, 2.0]
    assert two.failures("192.0.2.1") == 3 and two.wait_left("192.0.2.1") == 2.0
    assert two.wait_left("192.0.2.2") == 0.0
    assert [two.failed("192.0.2.1") for _ in range(7)][-1] == 30.0  # at most 30 s
    now[0] += 10
    assert one.wait_left("192.0.2.1") == 20.0
    one.succeeded("192.0.2.1")
    assert two.wait_left("192.0.2.1") == 0.0 and two.failures("192.0.2.1") == 0
    two.failed("192.0.2.3")
    now[0] += 901  # failures older than FAILURE_MEMORY are forgotten
    assert one.failures("192.0.2.3") == 0 and one.failed("192.0.2.3") == 0.5
    one.close()
    two.close()


def test_a_throttled_address_gets_454_without_its_password_being_checked(tmp_path):
    asked = []

    def verify(session, user, password):
        asked.append(password)
        return password == "right"

    async def main():
        checks = PasswordChecks(verify, SharedThrottle(tmp_path / "t.db"), limit=1)
        guesser, other = Session(peer_ip="192.0.2.7"), Session(peer_ip="192.0.2.8")
        first = await checks.check(guesser, "alice", "wrong")
        second = await checks.check(guesser, "alice", "right")
        elsewhere = await checks.check(other, "alice", "right")
        both = await asyncio.gather(checks.check(other, "alice", "a"),
                                    checks.check(other, "alice", "b"))
        checks.close()
        return first, second, elsewhere, both

    first, second, elsewhere, both = asyncio.run(main())
    assert (first, second, elsewhere) == (False, THROTTLED, True)
    assert BUSY in both  # one check at a time: the other was refused, not queued
    # the throttled "right" was never looked at: only the other address's was
    assert asked[:2] == ["wrong", "right"] and len(asked) == 3


def test_an_unusable_failure_file_still_lets_passwords_be_checked(tmp_path, caplog):
    checks = PasswordChecks(lambda s, u, p: p == "right",
                            SharedThrottle(tmp_path / "missing-dir" / "t.db"))
    guesser = Session(peer_ip="192.0.2.7")
    assert asyncio.run(checks.check(guesser, "alice", "wrong")) is False
    assert asyncio.run(checks.check(guesser, "alice", "right")) is True
    checks.close()
    assert "failed SMTP AUTH is not slowed down" in caplog.text


# --- slowloris -----------------------------------------------------------------------------------

def trickle(sock: socket.socket, data: bytes, every: float, until: float) -> bytes:
    """Send one byte every `every` s until the server answers (returns that) or `until` s pass."""
    sock.settimeout(every)
    started = time.monotonic()
    for byte in data:
        if time.monotonic() - started > until:
            return b""
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            break
        try:
            got = sock.recv(200)
        except TimeoutError:
            continue
        return got
    sock.settimeout(2)
    try:
        return sock.recv(200)
    except (TimeoutError, OSError):
        return b""


DEADLINES = {"limits.smtp_command_deadline": 1, "limits.smtp_min_data_rate": 1000}


def test_a_command_line_trickled_in_byte_by_byte_is_cut_off(tmp_path):
    with RunningEngine(tmp_path, DEADLINES) as eng:
        with socket.create_connection(("127.0.0.1", eng.smtp_port)) as s:
            assert s.recv(200).startswith(b"220")
            started = time.monotonic()
            got = trickle(s, b"NOOP" + b" x" * 100 + b"\r\n", 0.25, 6)
            took = time.monotonic() - started
        assert got.startswith(b"421 4.4.2"), got
        assert took < 3.5, took
        # whole commands, however slow between them, are a client thinking, not a slowloris
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            for _ in range(3):
                assert s.noop()[0] == 250
                time.sleep(1.2)
            assert s.noop()[0] == 250


def test_a_message_slower_than_the_minimum_rate_is_cut_off(tmp_path):
    with RunningEngine(tmp_path, DEADLINES) as eng:
        for head in (b"", b"x" * 100_000 + b"\r\n"):  # fast at first buys no more than 1 s
            with socket.create_connection(("127.0.0.1", eng.smtp_port)) as s:
                f = s.makefile("rb")
                read_reply(f)
                s.sendall(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
                while not read_reply(f).startswith(b"354"):
                    pass
                s.sendall(head)
                started = time.monotonic()
                got = trickle(s, b"Subject: slow\r\n" * 40, 0.25, 6)
                took = time.monotonic() - started
            assert got.startswith(b"421 4.4.2 Message data too slow"), got
            assert took < 3.5, took
        # a message that keeps the rate is taken, however long it is
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.ehlo("c")
            s.mail("a@example.org")
            s.rcpt("b@dest.test")
            assert s.data(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 2000)[0] == 250
        assert len(list((eng.mailq / "retry").glob("*.inf"))) == 1


# --- sessions per client address -----------------------------------------------------------------

def test_sessions_per_address_are_limited_at_the_greeting(tmp_path):
    settings = {"limits.max_connections_per_ip": 2, "policy.relay_ips": ["10.1.2.3"],
                "limits.inbound_priority_ips": ["127.0.0.3"]}
    with RunningEngine(tmp_path, settings) as eng:
        def connect(source="127.0.0.1"):
            return socket.create_connection(("127.0.0.1", eng.smtp_port),
                                            source_address=(source, 0))
        held = [connect(), connect()]
        for h in held:
            assert h.recv(200).startswith(b"220")
        extra = connect()
        assert extra.recv(200).startswith(b"421 4.7.0 Too many connections from your address")
        other = connect("127.0.0.2")  # another address has its own count
        assert other.recv(200).startswith(b"220")
        vip = [connect("127.0.0.3") for _ in range(3)]  # inbound_priority_ips are exempt
        assert all(v.recv(200).startswith(b"220") for v in vip)
        held.pop().close()  # a session that ends gives its place back

        def admitted():
            with connect() as s:
                return s.recv(200).startswith(b"220")
        wait_until(admitted, 5, "a place for 127.0.0.1 again")
        for s in held + [extra, other] + vip:
            s.close()


# --- memory held by unfinished messages ----------------------------------------------------------

def open_data(port: int):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    read_reply(f)
    s.sendall(b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
    while not read_reply(f).startswith(b"354"):
        pass
    return s, f


def test_unfinished_messages_share_one_memory_budget(tmp_path):
    body = (b"z" * 998 + b"\r\n") * 600  # 600 kB, budget 1 MB
    with RunningEngine(tmp_path, {"limits.max_intake_memory_mb": 1}) as eng:
        a, fa = open_data(eng.smtp_port)
        a.sendall(body)
        time.sleep(0.5)  # the engine holds A's 600 kB
        b, fb = open_data(eng.smtp_port)
        b.sendall(body)  # 1.2 MB together: B's message is released
        b.sendall(b".\r\n")
        assert read_reply(fb).startswith(b"452 4.3.1 Insufficient system storage")
        # A declared SIZE beyond what is left is refused before its bytes come
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.ehlo("c")
            code, text = s.mail("a@example.org", ["SIZE=500000"])
            assert (code, text[:5]) == (452, b"4.3.1")
        # B's bytes were given back: 300 kB more next to A's 600 kB fit
        c, fc = open_data(eng.smtp_port)
        c.sendall(body[:300_000] + b"\r\n.\r\n")
        assert read_reply(fc).startswith(b"250 2.0.0")
        a.sendall(b".\r\n")
        assert read_reply(fa).startswith(b"250 2.0.0")  # A was never at fault
        for s in (a, b, c):
            s.close()
        assert len(list((eng.mailq / "retry").glob("*.inf"))) == 2
        assert "intake memory budget (1 MB) spent" in eng.read_output()


def test_sessions_per_address_count_over_every_intake_process(tmp_path):
    """6 per address over 4 intake processes: 6 are admitted whichever processes the kernel
    picks (an equal share of 2 each refused most spreads), not a seventh; another address has
    its own count."""
    settings = {"limits.max_connections_per_ip": 6, "policy.relay_ips": ["10.1.2.3"],
                "network.intake_workers": 4}
    with RunningEngine(tmp_path, settings) as eng:
        wait_until(lambda: "in 4 intake processes" in eng.read_output(), 20, "4 workers")

        def connect(source="127.0.0.1"):
            s = socket.create_connection(("127.0.0.1", eng.smtp_port), source_address=(source, 0))
            s.settimeout(10)
            return s
        held = [connect() for _ in range(6)]
        assert [h.recv(200)[:3] for h in held] == [b"220"] * 6
        with connect() as extra:
            assert extra.recv(200).startswith(b"421 4.7.0 Too many connections from your address")
        with connect("127.0.0.2") as other:
            assert other.recv(200).startswith(b"220")
        held.pop().close()

        def admitted():
            with connect() as s:
                return s.recv(200).startswith(b"220")
        wait_until(admitted, 5, "a place for 127.0.0.1 again")
        for s in held:
            s.close()
