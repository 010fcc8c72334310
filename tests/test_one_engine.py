"""One engine per queue (homelock.py) and per SMTP port: a second engine on the same home stops
at once and names the holder; a port someone else listens on is never shared."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from mailengine.testing.engine import RunningEngine, free_port, wait_for_port, write_config

SETTINGS = {"network.web_port": 0, "logging.stats_interval": 0, "queue.pause_sending": True,
            "network.smtp_listen_ips": ["127.0.0.1"], "network.intake_workers": 1}


def cli(home, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_a_second_start_or_test_on_the_same_queue_names_the_holder_and_exits(tmp_path):
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as first:
        # Another port, so only the lock can stop it (today it ran and took mail too).
        for cmd in (["start"], ["-bd"]):
            out = cli(tmp_path, "--smtp-port", str(free_port()), *cmd)
            assert out.returncode != 0, out.stdout + out.stderr
            assert f"already running on this queue (pid {first.proc.pid} holds" in out.stderr
            assert "Traceback" not in out.stderr
        assert first.proc.poll() is None
        # the first one still takes and keeps mail as before
        with socket.create_connection(("127.0.0.1", first.smtp_port), timeout=5) as s:
            assert s.recv(100).startswith(b"220")
    with RunningEngine(tmp_path, command="test") as tester:
        out = cli(tmp_path, "--smtp-port", str(free_port()), "test")
        assert out.returncode != 0
        assert f"(pid {tester.proc.pid} holds" in out.stderr
        assert str(tmp_path / "mailengine-test.lock") in out.stderr


def test_a_lock_left_by_a_killed_engine_is_taken_over(tmp_path):
    eng = RunningEngine(tmp_path).start()
    dead = eng.proc.pid
    eng.kill()
    assert (tmp_path / "mailengine.lock").read_text().strip() == str(dead)
    with RunningEngine(tmp_path) as again:  # starts: the kernel dropped the dead one's lock
        assert (tmp_path / "mailengine.lock").read_text().strip() == str(again.proc.pid)


def test_the_queue_command_does_not_edit_files_under_a_running_engine_without_socket(tmp_path):
    with RunningEngine(tmp_path) as eng:
        (tmp_path / "mailengine.sock").unlink()  # the control socket gone (removed by hand)
        out = cli(tmp_path, "queue", "hold", "all")
        assert out.returncode != 0
        assert f"MailEngine (pid {eng.proc.pid}) holds" in out.stderr + out.stdout


def test_an_engine_from_another_home_on_the_same_port_is_refused(tmp_path):
    port = free_port()
    settings = {**SETTINGS, "network.smtp_port": port, "network.intake_workers": 2}
    with RunningEngine(tmp_path / "one", settings):
        write_config(tmp_path / "two", settings)
        out = cli(tmp_path / "two", "start")
    # Today it started: both engines shared the port through SO_REUSEPORT.
    assert out.returncode != 0, out.stdout + out.stderr
    assert f"Cannot listen for SMTP on 127.0.0.1 port {port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_foreign_listener_with_so_reuseport_is_not_shared(tmp_path):
    with socket.socket() as foreign:  # as smtp-sink or any other server that sets it
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        port = foreign.getsockname()[1]
        write_config(tmp_path, {**SETTINGS, "network.smtp_port": port,
                                "network.intake_workers": 2})
        proc = subprocess.Popen([sys.executable, "-m", "mailengine.cli", "--home", str(tmp_path),
                                 "start"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0, out + err
    assert f"Cannot listen for SMTP on 127.0.0.1 port {port}" in err
    # nothing of the queue was touched by workers: none was started
    assert "intake worker" not in out + err


def test_the_daemon_writes_its_own_pid_into_the_lock(tmp_path):
    port = free_port()
    write_config(tmp_path, {**SETTINGS, "network.smtp_port": port})
    out = cli(tmp_path, "-bd")
    assert out.returncode == 0, out.stdout + out.stderr
    pid = int((tmp_path / "mailengine.pid").read_text())
    try:
        wait_for_port("127.0.0.1", port, 20)
        assert (tmp_path / "mailengine.lock").read_text().strip() == str(pid)
        again = cli(tmp_path, "--smtp-port", str(free_port()), "start")
        assert again.returncode != 0 and f"(pid {pid} holds" in again.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
