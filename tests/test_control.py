"""The control socket of a running engine (mailengine/control.py), `mailengine status`, and the
scheduler's queue-control hook (withdraw)."""
from __future__ import annotations

import json
import os
import smtplib
import socket
import stat
from pathlib import Path

from mailengine import control
from mailengine.scheduler import Scheduler
from mailengine.testing.engine import RunningEngine

from test_cli_queue import run_cli


def raw(path: Path, *lines: bytes) -> list[dict]:
    """Send raw request lines on one connection; the answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(b"".join(lines))
        f = s.makefile("rb")
        return [json.loads(f.readline()) for _ in lines]


def test_socket_mode_ping_errors_and_several_requests(tmp_path):
    path = tmp_path / "mailengine.sock"
    with RunningEngine(tmp_path) as eng:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        pong = control.request(path, "ping")
        assert pong["pid"] == eng.proc.pid and pong["home"] == str(tmp_path)
        assert pong["test_mode"] is False and pong["mailq"] == str(tmp_path / "mailq")
        answers = raw(path, b'{"op": "ping"}\n', b"not json\n", b'{"op": "nope"}\n',
                      b'["op"]\n', b'{"op": "queue.apply", "action": "explode"}\n',
                      b'{"op": "queue.apply", "action": "hold"}\n')
        assert answers[0]["ok"] and answers[0]["pid"] == eng.proc.pid
        assert [a["ok"] for a in answers[1:]] == [False] * 5
        assert "unknown operation 'nope'" in answers[2]["error"]
        assert "unknown queue action" in answers[4]["error"]
        assert "name a message id" in answers[5]["error"]
        try:
            control.request(path, "queue.show", id="P1T1C1@none")
        except control.ControlError as e:
            assert "no such message" in str(e)
        else:
            raise AssertionError("an unknown id must be an error")
        assert control.request(path, "ping")["ok"]  # the engine is still fine
    assert not path.exists()  # removed at a clean stop
    assert "Traceback" not in eng.read_output()


def test_stale_socket_is_replaced_and_not_running_is_clear(tmp_path):
    path = tmp_path / "mailengine.sock"
    eng = RunningEngine(tmp_path).start()
    eng.kill()  # SIGKILL: the socket file stays behind
    assert path.exists()
    try:
        control.request(path, "ping")
    except control.NotRunning:
        pass
    else:
        raise AssertionError("a dead engine's socket must say NotRunning")
    code, out = run_cli(tmp_path, "status")
    assert code == 3 and f"MailEngine is not running in {tmp_path}" in out
    assert "on disk: retry 0" in out
    with RunningEngine(tmp_path) as eng:
        assert control.request(path, "ping")["pid"] == eng.proc.pid


def test_long_home_path(tmp_path):
    home = tmp_path / ("h" * 60) / ("o" * 60)
    assert len(str(home / "mailengine.sock")) > 108
    with RunningEngine(home) as eng:
        assert control.request(home / "mailengine.sock", "ping")["pid"] == eng.proc.pid
        code, out = run_cli(home, "queue", "list")
        assert code == 0 and "engine running" in out


def test_test_mode_engine_has_its_own_socket(tmp_path):
    with RunningEngine(tmp_path, command="test") as eng:
        pong = control.request(tmp_path / "mailengine-test.sock", "ping")
        assert pong["test_mode"] and pong["mailq"] == str(tmp_path / "mailq-test")
        assert not (tmp_path / "mailengine.sock").exists()
        code, out = run_cli(tmp_path, "queue", "--test", "list")
        assert f"{tmp_path / 'mailq-test'} (engine running, pid {eng.proc.pid})" in out


def test_status_counts_rates_queue_and_connections(tmp_path):
    with RunningEngine(tmp_path) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            for i in range(3):
                s.sendmail("a@src.test", [f"r{i}@x.test", f"q{i}@y.test"], b"Subject: s\r\n\r\nb\r\n")
            st = control.request(tmp_path / "mailengine.sock", "status")
            assert st["connections"]["inbound"] == 1  # this session, still open
        assert st["received"]["total"] == 3 and st["received"]["relay"] == 3
        q = st["queue"]
        assert q["messages"] == 3 and q["recipients"] == 6 and q["paused"] is True
        assert q["on_disk"]["retry"]["messages"] == 3
        assert st["connections"]["outbound"] == 0
        code, out = run_cli(tmp_path, "status")
        assert code == 0
        assert f"running (pid {eng.proc.pid}) in {tmp_path}" in out
        assert "received  3 messages (3 relay, 0 local)" in out
        assert "queue     3 messages (6 recipients to send), 0 held, 0 being sent" in out
        assert "SENDING IS PAUSED" in out
        code, out = run_cli(tmp_path, "status", "--json")
        assert json.loads(out)["queue"]["messages"] == 3


def test_config_set_over_the_socket(tmp_path):
    path = tmp_path / "mailengine.sock"
    with RunningEngine(tmp_path) as eng:
        a = control.request(path, "config.set", name="network.smtp_port", value=2600)
        assert a["applied"] is False and "after restart" in a["why"]
        a = control.request(path, "config.set", name="limits.max_recipients", value=2)
        assert a["applied"] and a["value"] == 2
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.ehlo()
            s.mail("a@src.test")
            codes = [s.rcpt(f"r{i}@x.test")[0] for i in range(3)]
        assert codes == [250, 250, 452]  # the running intake took the new limit
        try:
            control.request(path, "config.set", name="limits.max_recipients", value=-5)
        except control.ControlError as e:
            assert "must be at least 1" in str(e)
        else:
            raise AssertionError("a bad value must be refused")


def test_scheduler_withdraw():
    now = [100.0]
    s = Scheduler(lambda: now[0], limit=lambda d: 1)
    s.add("a", ["x@d1", "y@d2"], due=50)
    s.add("b", ["z@d1"], due=50)
    s.add("c", ["q@d3"], due=500)
    s.release_due()
    first = s.next_unit()  # a@d1 runs; b is released but waits behind d1's limit
    assert first.msg_id == "a"
    assert s.withdraw(["a", "b", "c", "unknown"]) == {"b", "c"}  # a has a unit running
    assert "b" not in s and "c" not in s and "a" in s
    assert s.ready == 1  # a@d2 only
    assert s.next_unit().msg_id == "a"
    assert s.next_due() is None  # c's timer is stale


# ---------------------------------------------------------------- mailengine send

def test_send_injects_into_the_running_engine(tmp_path, monkeypatch):
    import io
    from mailengine.envelope import parse_inf
    with RunningEngine(tmp_path):
        code, out = run_cli(tmp_path, "send", "--from", "me@src.test", "--to",
                            "a@x.test,b@y.test", "--to", "c@z.test", "--subject", "Hi there",
                            "--body", "first line\nsecond line", "--header", "X-Test: 1")
        assert code == 0, out
        assert "RCPT TO:<c@z.test> -> 250" in out
        queued = out.split("queued as ")[1].split()[0]
        monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\n"))
        code, out = run_cli(tmp_path, "send", "--from", "me@src.test", "--to", "d@x.test",
                            "--body", "-")
        assert code == 0
        stdin_id = out.split("queued as ")[1].split()[0]
    retry = tmp_path / "mailq" / "retry"
    msg = parse_inf((retry / f"{queued}.inf").read_bytes(), queued)
    assert msg.mail_from == "me@src.test"
    assert msg.rcpt_to_send == ["a@x.test", "b@y.test", "c@z.test"]
    data = (retry / f"{queued}.dat").read_bytes()
    assert b"Subject: Hi there\r\n" in data and b"X-Test: 1\r\n" in data
    assert b"To: a@x.test, b@y.test, c@z.test\r\n" in data and b"Message-ID: <" in data
    assert data.endswith(b"\r\n\r\nfirst line\r\nsecond line\r\n")
    assert (retry / f"{stdin_id}.dat").read_bytes().endswith(b"\r\n\r\nfrom stdin\r\n")


def test_send_reports_refusals_and_a_stopped_engine(tmp_path):
    with RunningEngine(tmp_path, {"policy.relay_ips": ["10.1.1.1"],
                                  "basic.local_domains": ["here.test"]}) as eng:
        code, out = run_cli(tmp_path, "send", "--from", "me@src.test", "--to",
                            "far@away.test")
        assert code == 1 and "RCPT TO:<far@away.test> -> 554 5.7.1 relay not approved" in out
        code, out = run_cli(tmp_path, "send", "--from", "me@src.test", "--to",
                            "far@away.test,u@here.test", "--server", f"127.0.0.1:{eng.smtp_port}")
        assert code == 1 and "DATA" in out and "-> 250" in out  # one of two taken
    code, out = run_cli(tmp_path, "send", "--from", "me@src.test", "--to", "u@here.test")
    assert code == 1 and "Connection refused" in out
