"""SMTP intake end to end: a real engine process, real clients (smtplib, swaks, smtp-source)."""
import os
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from mailengine.envelope import parse_inf
from mailengine.testing.engine import RunningEngine, free_port, wait_until

MSG = (b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hello\r\n\r\n"
       b"line one\r\n.leading dot\r\nlast line\r\n")


def queued_id(reply: bytes) -> str:
    m = re.search(rb"queued as (\S+)", reply)
    assert m, reply
    return m.group(1).decode()


def send(port, rcpts, data=MSG, sender="a@example.org", **kw):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail(sender, kw.get("mail_options", []))
        refused = {}
        for r in rcpts:
            code, text = s.rcpt(r)
            if code >= 400:
                refused[r] = (code, text)
        if len(refused) == len(rcpts):
            return None, refused
        code, text = s.data(data)
        return (code, text), refused


def test_relay_from_allowed_ip_is_queued_in_retry_with_its_inf(tmp_path):
    with RunningEngine(tmp_path) as eng:
        (code, text), refused = send(eng.smtp_port, ["x@dest.test", "y@dest.test"])
        assert code == 250 and not refused
        msg_id = queued_id(text)
        retry = eng.mailq / "retry"
        # DATA's dot-stuffing undone, otherwise byte for byte.
        assert (retry / f"{msg_id}.dat").read_bytes() == MSG
        inf = parse_inf((retry / f"{msg_id}.inf").read_bytes())
    assert inf.id == msg_id and inf.mail_from == "a@example.org"
    assert inf.rcpt_to_send == ["x@dest.test", "y@dest.test"]
    assert inf.received["helo"] == "client.test"
    assert inf.received["peertcpip"] == "127.0.0.1"
    assert inf.received["datasize"] == str(len(MSG))
    assert inf.retry_time is not None


def test_relay_refused_for_other_ips_and_rcpt_relay_domains_let_listed_through(tmp_path):
    settings = {"policy.relay_ips": ["10.1.2.3"], "policy.rcpt_relay_domains": ["@backup.test"]}
    with RunningEngine(tmp_path, settings) as eng:
        result, refused = send(eng.smtp_port, ["ok@backup.test", "no@elsewhere.test"])
        assert result[0] == 250
        assert refused == {"no@elsewhere.test": (554, b"5.7.1 relay not approved")}
        msg_id = queued_id(result[1])
        inf = parse_inf((eng.mailq / "retry" / f"{msg_id}.inf").read_bytes())
        assert inf.rcpt_to_send == ["ok@backup.test"]
        result, refused = send(eng.smtp_port, ["no@elsewhere.test"])
        assert result is None and refused["no@elsewhere.test"][0] == 554


def test_relay_ips_zero_is_open_relay_with_loud_warning(tmp_path):
    with RunningEngine(tmp_path, {"policy.relay_ips": ["0"]}) as eng:
        result, refused = send(eng.smtp_port, ["x@anywhere.test"])
        assert result[0] == 250
    assert "OPEN RELAY" in eng.read_output()


def test_local_mail_is_saved_when_save_incoming_and_discarded_otherwise(tmp_path):
    with RunningEngine(tmp_path / "a", {"basic.local_domains": ["here.test"],
                                        "queue.save_incoming": True}) as eng:
        (code, text), _ = send(eng.smtp_port, ["u@here.test", "v@HERE.test"])
        msg_id = queued_id(text)
        assert (eng.mailq / "incoming" / f"{msg_id}.dat").read_bytes() == MSG
        assert not list((eng.mailq / "retry").glob("*.dat"))
    with RunningEngine(tmp_path / "b", {"basic.local_domains": ["."]}) as eng:
        (code, text), _ = send(eng.smtp_port, ["anyone@anywhere.test"])
        assert code == 250
        assert not list(eng.mailq.glob("*/*.dat"))  # every domain local, nothing kept


def test_refused_mail_from(tmp_path):
    with RunningEngine(tmp_path, {"policy.refused_mail_from": ["spammer.test"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port) as s:
            s.ehlo("c")
            code, text = s.mail("bad@SPAMMER.test")
            assert (code, text) == (550, b"5.7.1 Sender refused by policy")
            assert s.mail("good@ok.test")[0] == 250


def test_size_is_advertised_and_enforced(tmp_path):
    with RunningEngine(tmp_path, {"limits.max_message_size": 2000}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port) as s:
            s.ehlo("c")
            assert s.esmtp_features["size"] == "2000"
            assert s.mail("a@b.test", ["SIZE=5000"])[0] == 552
            s.rset()
            s.mail("a@b.test")
            s.rcpt("x@dest.test")
            code, text = s.data(b"Subject: small\r\n\r\n" + b"x" * 70 + b"\r\n")
            assert code == 250
            s.mail("a@b.test")
            s.rcpt("x@dest.test")
            code, text = s.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 40)
            assert (code, text[:5]) == (552, b"5.3.4")


def test_starttls_then_auth_lets_a_user_relay(tmp_path):
    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "password.txt").write_text("alice:opensesame\n")
    with RunningEngine(tmp_path, {"policy.relay_ips": ["10.1.2.3"]}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port) as s:
            s.ehlo("c")
            assert s.has_extn("starttls") and not s.has_extn("auth")
            assert s.docmd("AUTH PLAIN AGFsaWNlAG9wZW5zZXNhbWU=")[0] == 538
            s.starttls(context=ssl._create_unverified_context())
            s.ehlo("c")
            assert "PLAIN" in s.esmtp_features["auth"]
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice", "wrong")
            time.sleep(0.6)  # a failure makes the address wait 0.5 s (test_intake_defences.py)
            s.login("alice", "opensesame")
            s.mail("alice@here.test")
            assert s.rcpt("friend@far.test")[0] == 250
            code, text = s.data(MSG)
            assert code == 250
        msg_id = queued_id(text)
        inf = parse_inf((eng.mailq / "retry" / f"{msg_id}.inf").read_bytes())
        assert inf.auth_user == "alice"
        # Without AUTH the same client may not relay.
        result, refused = send(eng.smtp_port, ["friend@far.test"])
        assert refused["friend@far.test"][0] == 554


def test_pipelined_group_gets_replies_in_order(tmp_path):
    with RunningEngine(tmp_path) as eng:
        with socket.create_connection(("127.0.0.1", eng.smtp_port)) as s:
            f = s.makefile("rb")
            assert f.readline().startswith(b"220 ")
            s.sendall(b"EHLO c\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            s.sendall(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<bad>\r\n"
                      b"RCPT TO:<y@d.test>\r\nDATA\r\n")
            replies = [f.readline() for _ in range(5)]
            assert [r[:3] for r in replies] == [b"250", b"250", b"501", b"250", b"354"]
            s.sendall(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<c@b.test>\r\nQUIT\r\n")
            rest = [f.readline() for _ in range(3)]
            assert rest[0].startswith(b"250 2.0.0 Ok: queued as ")
            assert rest[1].startswith(b"250 2.1.0") and rest[2].startswith(b"221 2.0.0")


def test_connection_limit_and_priority_ips(tmp_path):
    settings = {"limits.max_inbound_connections": 2,
                "network.smtp_listen_ips": ["127.0.0.1", "127.0.0.2"],
                "limits.inbound_priority_ips": ["127.0.0.2"]}
    with RunningEngine(tmp_path, settings) as eng:
        held = [socket.create_connection(("127.0.0.1", eng.smtp_port)) for _ in range(2)]
        for h in held:
            assert h.recv(100).startswith(b"220")
        extra = socket.create_connection(("127.0.0.1", eng.smtp_port))
        assert extra.recv(100).startswith(b"421 4.7.0")
        # A priority address is let in beyond the cap.
        vip = socket.create_connection(("127.0.0.1", eng.smtp_port), source_address=("127.0.0.2", 0))
        assert vip.recv(100).startswith(b"220")
        for s in held + [extra, vip]:
            s.close()


def test_idle_session_is_dropped_after_receive_timeout(tmp_path):
    with RunningEngine(tmp_path, {"limits.smtp_receive_timeout": 5}) as eng:
        with socket.create_connection(("127.0.0.1", eng.smtp_port)) as s:
            s.settimeout(15)
            assert s.recv(100).startswith(b"220")
            started = time.monotonic()
            data = s.recv(100)
            assert data.startswith(b"421 4.4.2")
            assert 4.5 < time.monotonic() - started < 8


def test_listen_on_range_and_ipv6(tmp_path):
    port = free_port()
    settings = {"network.smtp_port": port,
                "network.smtp_listen_ips": ["127.0.0.2-127.0.0.3", "::1"],
                "policy.relay_ips": ["127.0.0.0/8", "::1"]}
    with RunningEngine(tmp_path, settings, ready_host="127.0.0.2"):
        for host in ("127.0.0.2", "127.0.0.3", "::1"):
            with smtplib.SMTP(host, port, timeout=5) as s:
                s.ehlo("c")
                s.mail("a@b.test")
                assert s.rcpt("x@d.test")[0] == 250
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2)


def test_smtp_port_one_disables_intake(tmp_path):
    eng = RunningEngine(tmp_path, {"network.smtp_port": 1})
    with eng:
        time.sleep(1.5)
        assert eng.proc.poll() is None
    assert "SMTP intake is off" in eng.read_output()


def test_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        out = subprocess.run(
            ["python3", "-m", "mailengine.cli", "--home", str(tmp_path), "--smtp-port", str(port),
             "--smtp-listen-ips", "127.0.0.1", "--web-port", "0", "start"],
            capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert f"Cannot listen for SMTP on 127.0.0.1 port {port}" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.skipif(not shutil.which("swaks"), reason="swaks is installed by .ci/run")
def test_swaks_pipelined_session(tmp_path):
    with RunningEngine(tmp_path) as eng:
        out = subprocess.run(
            ["swaks", "--server", f"127.0.0.1:{eng.smtp_port}", "--from", "s@example.org",
             "--to", "r@dest.test,r2@dest.test", "--pipeline", "--header", "Subject: swaks"],
            capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        msg_id = re.search(r"queued as (\S+)", out.stdout).group(1)
        data = (eng.mailq / "retry" / f"{msg_id}.dat").read_bytes()
        assert b"Subject: swaks" in data
        inf = parse_inf((eng.mailq / "retry" / f"{msg_id}.inf").read_bytes())
        assert inf.rcpt_to_send == ["r@dest.test", "r2@dest.test"]


@pytest.mark.skipif(not shutil.which("smtp-source"), reason="postfix is installed by .ci/run")
def test_smtp_source_load_all_queued(tmp_path):
    with RunningEngine(tmp_path) as eng:
        out = subprocess.run(
            ["smtp-source", "-s", "10", "-m", "300", "-l", "4096", "-f", "s@example.org",
             "-t", "r@dest.test", f"127.0.0.1:{eng.smtp_port}"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert len(list((eng.mailq / "retry").glob("*.inf"))) == 300
        assert len(list((eng.mailq / "retry").glob("*.dat"))) == 300


def test_stats_line_in_the_manuals_format(tmp_path):
    with RunningEngine(tmp_path, {"logging.stats_interval": 1,
                                  "basic.local_domains": ["local.test"]}) as eng:
        send(eng.smtp_port, ["a@local.test"])
        send(eng.smtp_port, ["b@relay.test"])
        time.sleep(2.5)
    lines = re.findall(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\d+) recv \[(\d+) inbound, (\d+) relay\] "
                       r"\((\d+)/h avg, (\d+) total\)$", eng.read_output(), re.M)
    assert lines and lines[0][:3] == ("2", "1", "1") and lines[0][4] == "2"


def worker_pids(eng: RunningEngine, n: int) -> list[int]:
    """The pids of the `n` intake workers serving now (the latest started per index), once
    they all listen (the engine says so when its start is done)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = eng.read_output()
        found = dict(re.findall(r"intake worker (\d+) started, pid (\d+)", out))
        if len(found) == n and f"in {n} intake processes" in out:
            return [int(found[str(i)]) for i in range(n)]
        time.sleep(0.1)
    raise AssertionError(f"not {n} intake workers in:\n{eng.read_output()}")


@pytest.mark.skipif(not shutil.which("smtp-source"), reason="postfix is installed by .ci/run")
def test_two_intake_processes_share_the_port_and_report_to_the_engine(tmp_path):
    settings = {"network.intake_workers": 2, "logging.stats_interval": 0.5}
    with RunningEngine(tmp_path, settings) as eng:
        workers = worker_pids(eng, 2)
        out = subprocess.run(
            ["smtp-source", "-s", "20", "-m", "400", "-l", "2048", "-f", "s@example.org",
             "-t", "r@dest.test", f"127.0.0.1:{eng.smtp_port}"],
            capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        time.sleep(1.2)
        infs = list((eng.mailq / "retry").glob("*.inf"))
        pids = {re.match(r"P(\d+)T", f.name).group(1) for f in infs}
    assert len(infs) == 400
    # both workers took mail; the engine process, which delivers, takes no SMTP itself
    assert pids == {str(p) for p in workers}
    assert "in 2 intake processes" in eng.read_output()
    totals = re.findall(r"recv \[\d+ inbound, \d+ relay\] \(\d+/h avg, (\d+) total\)", eng.read_output())
    assert totals[-1] == "400"  # the workers' messages reached the engine's count
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # stopped with the engine


def test_debug_smtp_in_traces_the_sessions_of_the_intake_processes(tmp_path):
    """Issue 15.6: with the default intake processes, debug.smtp_in shows each session on the
    console and in the daily log (the workers' logging took no debug switch before)."""
    with RunningEngine(tmp_path, {"network.intake_workers": 2, "debug.smtp_in": True}) as eng:
        worker_pids(eng, 2)
        (code, _), _ = send(eng.smtp_port, ["x@dest.test"], sender="trace-me@example.org")
        assert code == 250
        wait_until(lambda: "FROM:<trace-me@example.org>" in eng.read_output(), 10,
                   "the session traced")
    logged = "".join(p.read_text() for p in (tmp_path / "log").glob("mailengine-*.log"))
    assert re.search(r"127\.0\.0\.1 <<< b'ehlo client.test", logged, re.I)
    assert re.search(r"127\.0\.0\.1 >>> b'250 2.0.0 Ok: queued as ", logged)


def test_settings_changed_while_running_reach_new_intake_processes(tmp_path):
    from mailengine import control
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as eng:
        old = worker_pids(eng, 2)
        # a session opened before the change keeps the old limit to its end
        early = smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10)
        early.ehlo()
        a = control.request(tmp_path / "mailengine.sock", "config.set",
                            name="limits.max_recipients", value=2)
        assert a["applied"] and any("intake processes are restarted" in n for n in a["notes"])
        deadline = time.monotonic() + 20
        while "intake processes restarted" not in eng.read_output():
            assert time.monotonic() < deadline, eng.read_output()
            time.sleep(0.1)
        new = worker_pids(eng, 2)
        assert not set(new) & set(old)
        for _ in range(6):  # the kernel spreads connections over both new workers
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.ehlo()
                s.mail("a@src.test")
                assert [s.rcpt(f"r{i}@x.test")[0] for i in range(3)] == [250, 250, 452]
        early.mail("a@src.test")
        assert [early.rcpt(f"r{i}@x.test")[0] for i in range(3)] == [250, 250, 250]
        early.quit()
        for pid in old:  # the old workers are gone once their sessions ended
            deadline = time.monotonic() + 15
            while True:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                assert time.monotonic() < deadline, f"old worker {pid} still running"
                time.sleep(0.1)


def test_a_replacement_worker_that_cannot_start_leaves_the_old_one_serving(tmp_path):
    """A certificate broken on disk (a renewal gone wrong) after the workers loaded it: the new
    workers of a settings change die before listening, and the old ones keep the port."""
    from mailengine import control
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as eng:
        old = worker_pids(eng, 2)
        (tmp_path / "tls" / "key.pem").write_text("not a key\n")
        a = control.request(tmp_path / "mailengine.sock", "config.set",
                            name="limits.max_recipients", value=2)
        assert a["applied"]
        deadline = time.monotonic() + 20
        while "did not start listening" not in eng.read_output():
            assert time.monotonic() < deadline, eng.read_output()
            time.sleep(0.1)
        for pid in old:
            os.kill(pid, 0)  # still running: not retired
        out = eng.read_output()  # the new ones said why in one line each, not a traceback
        assert "cannot serve:" in out and "Traceback" not in out, out
        for _ in range(4):  # and still taking mail, with the settings they had
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.ehlo()
                s.mail("a@src.test")
                assert [s.rcpt(f"r{i}@x.test")[0] for i in range(3)] == [250, 250, 250]


def test_a_delivery_setting_changed_while_running_leaves_the_intake_processes_alone(tmp_path):
    from mailengine import control
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as eng:
        before = worker_pids(eng, 2)
        a = control.request(tmp_path / "mailengine.sock", "config.set",
                            name="limits.max_send_rate", value=5000)
        assert a["applied"] and not a["notes"]
        time.sleep(1.0)
        assert worker_pids(eng, 2) == before
        assert eng.read_output().count("started, pid") == 2


def test_status_counts_the_sessions_of_the_intake_processes(tmp_path):
    from mailengine import control
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as eng:
        worker_pids(eng, 2)
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.ehlo()
            deadline = time.monotonic() + 5
            while True:
                conns = control.request(tmp_path / "mailengine.sock", "status")["connections"]
                if conns["inbound"] == 1:
                    break
                assert time.monotonic() < deadline, conns
                time.sleep(0.2)
        assert conns["intake_processes"] == 2 and conns["inbound_sessions_total"] >= 1


def test_helo_text_names_the_engine_and_max_recipients_is_enforced(tmp_path):
    settings = {"network.helo_text": "mx.example.org", "limits.max_recipients": 2}
    with RunningEngine(tmp_path, settings) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port) as s:
            code, banner = s.ehlo("c")
            assert banner.startswith(b"mx.example.org")
            s.mail("a@b.test")
            assert s.rcpt("x1@d.test")[0] == 250 and s.rcpt("x2@d.test")[0] == 250
            assert s.rcpt("x3@d.test") == (452, b"4.5.3 Too many recipients")


def test_memory_mode_still_queues_relayed_mail(tmp_path):
    with RunningEngine(tmp_path, {"queue.relay_via_disk": False}) as eng:
        (code, text), _ = send(eng.smtp_port, ["x@dest.test"])
        assert code == 250
        assert (eng.mailq / "retry" / f"{queued_id(text)}.dat").read_bytes() == MSG


def test_postmaster_is_accepted_from_anyone_and_kept_local(tmp_path):
    settings = {"policy.relay_ips": ["10.1.2.3"], "network.helo_text": "mx.example.org",
                "queue.save_incoming": True}
    with RunningEngine(tmp_path, settings) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port) as s:
            s.ehlo("c")
            s.mail("a@b.test")
            assert s.rcpt("<postmaster>")[0] == 250
            assert s.rcpt("someone@mx.example.org")[0] == 554  # not local, not relayable
            code, text = s.data(MSG)
        assert code == 250
        assert (eng.mailq / "incoming" / f"{queued_id(text)}.dat").exists()


def test_intake_worker_does_not_outlive_a_killed_engine(tmp_path):
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as eng:
        worker_pid = worker_pids(eng, 2)[0]
        eng.kill()
    for _ in range(50):
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker_pid, 9)
        pytest.fail("the intake worker survived its engine")


def _greeting(s: socket.socket) -> bytes:
    s.settimeout(10)
    return s.recv(100)


def test_the_inbound_cap_counts_the_sessions_of_every_intake_process(tmp_path):
    """max_inbound_connections = 8 over 4 processes admits 8 sessions whichever processes the
    kernel picks (an equal share of 2 each refused most such spreads), and not a ninth; a
    worker killed with SIGKILL takes its sessions with it, and their places come free."""
    settings = {"network.intake_workers": 4, "limits.max_inbound_connections": 8}
    with RunningEngine(tmp_path, settings) as eng:
        pids = worker_pids(eng, 4)
        held = [socket.create_connection(("127.0.0.1", eng.smtp_port)) for _ in range(8)]
        assert [_greeting(s)[:3] for s in held] == [b"220"] * 8
        with socket.create_connection(("127.0.0.1", eng.smtp_port)) as extra:
            assert _greeting(extra).startswith(b"421 4.7.0 Too many connections")
        victim = pids[0]
        os.kill(victim, 9)
        wait_until(lambda: f"(pid {victim}) exited" in eng.read_output(), what="the restart")
        alive = []
        for s in held:
            s.settimeout(0.5)
            try:
                if s.recv(100) == b"":
                    s.close()
                    continue
            except TimeoutError:
                pass
            except OSError:
                s.close()
                continue
            alive.append(s)
        room = 8 - len(alive)
        # the killed worker's places are free again (its replacement may take some of them)
        more = []
        deadline = time.monotonic() + 10
        while len(more) < room:
            assert time.monotonic() < deadline, f"{len(more)} of {room} places came free"
            s = socket.create_connection(("127.0.0.1", eng.smtp_port))
            if _greeting(s).startswith(b"220"):
                more.append(s)
            else:
                s.close()
                time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", eng.smtp_port)) as extra:
            assert _greeting(extra).startswith(b"421 4.7.0")
        for s in alive + more:
            s.close()
