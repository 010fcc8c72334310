"""Start, stop, crash and recovery of a real engine; drop-ins picked up from mailq/retry."""
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mailengine.client import enqueue
from mailengine.envelope import parse_inf
from mailengine.testing.engine import RunningEngine, write_config, free_port, wait_for_port

MANUAL_SAMPLE_INF = (Path(__file__).parent / "fixtures" / "manual-sample.inf").read_bytes()


async def one_client(port, n, acked, stop):
    """Send n messages over one connection; record (id, bytes) of every message that got 250."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"EHLO crash.test\r\n")
        while not (await reader.readline()).startswith(b"250 "):
            pass
        for i in range(n):
            if stop.is_set():
                break
            body = (f"Subject: crash {id(writer)} {i}\r\n\r\n".encode()
                    + os.urandom(300).hex().encode() + b"\r\n")
            writer.write(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@relay.test>\r\nDATA\r\n")
            for _ in range(3):
                await reader.readline()
            writer.write(body + b".\r\n")
            line = await reader.readline()
            m = re.match(rb"250 2\.0\.0 Ok: queued as (\S+)", line)
            if m:
                acked[m.group(1).decode()] = body
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        pass  # the engine died under us: that is the test


def test_sigkill_during_load_loses_no_acknowledged_message(tmp_path):
    eng = RunningEngine(tmp_path).start()
    acked: dict[str, bytes] = {}

    async def load():
        stop = asyncio.Event()
        clients = [asyncio.create_task(one_client(eng.smtp_port, 400, acked, stop))
                   for _ in range(20)]
        while len(acked) < 300:
            await asyncio.sleep(0.01)
        eng.kill()  # mid-load: clients are still sending
        stop.set()
        await asyncio.gather(*clients)

    asyncio.run(load())
    retry = eng.mailq / "retry"
    assert len(acked) >= 300
    for msg_id, body in acked.items():
        assert (retry / f"{msg_id}.dat").read_bytes() == body, msg_id
        assert parse_inf((retry / f"{msg_id}.inf").read_bytes()).rcpt_to_send == ["x@relay.test"]
    # Restart: recovery is clean (no warnings) and counts every whole message.
    with RunningEngine(tmp_path) as again:
        time.sleep(0.5)
    out = again.read_output()
    waiting = int(re.findall(r"queue: (\d+) messages waiting", out)[-1])  # the restart's
    assert waiting >= len(acked)
    assert len(list(retry.glob("*.inf"))) == waiting
    assert "WARNING" not in out and "Traceback" not in out


def test_clean_stop_moves_working_to_retry_and_keeps_everything(tmp_path):
    with RunningEngine(tmp_path) as eng:
        pass
    working, retry = eng.mailq / "working", eng.mailq / "retry"
    mid = enqueue(eng.mailq, "a@b.test", ["x@relay.test"], "Subject: w", "body\n")
    for ext in ("dat", "inf"):
        os.rename(retry / f"{mid}.{ext}", working / f"{mid}.{ext}")
    with RunningEngine(tmp_path) as eng:
        time.sleep(0.3)
    assert (retry / f"{mid}.inf").exists() and (retry / f"{mid}.dat").exists()
    assert not list(working.iterdir())
    assert eng.proc.returncode == 0
    assert "stopped cleanly" in eng.read_output()


def test_dropins_from_enqueue_and_the_manuals_sample_are_picked_up(tmp_path):
    with RunningEngine(tmp_path, {"queue.queue_check_interval": 0.2}) as eng:
        retry = eng.mailq / "retry"
        mid = enqueue(eng.mailq, "list@example.org", "a@x.test,b@y.test",
                      ["Subject: drop", "From: list@example.org"], "hello\n")
        (retry / "P1576T1800C3@tom.lyris.com.dat").write_bytes(b"Subject: old\r\n\r\nhi\r\n")
        (retry / "P1576T1800C3@tom.lyris.com.inf").write_bytes(MANUAL_SAMPLE_INF)
        (retry / "broken@x.inf").write_bytes(b"this is not an inf file\n")
        (retry / "lonely@x.inf").write_bytes(b"mailfrom=a@b\nrcpttosend=c@d\n")
        time.sleep(1.5)
    out = eng.read_output()
    assert f"picked up dropped-in message {mid} for 2 recipients" in out
    assert "picked up dropped-in message P1576T1800C3@tom.lyris.com" in out
    # Broken ones are reported once and left in place.
    assert out.count("broken@x.inf") == 1 and out.count("lonely@x.inf") == 1
    assert (retry / "broken@x.inf").exists() and (retry / "lonely@x.inf").exists()
    data = (retry / f"{mid}.dat").read_bytes()
    assert data.startswith(b"Subject: drop\r\nFrom: list@example.org\r\n")
    assert data.endswith(b"\r\n\r\nhello\r\n") and b"\r\nDate: " in data  # CRLF, Date added


def test_shutdown_command_is_noticed_within_two_seconds(tmp_path):
    with RunningEngine(tmp_path) as eng:
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(tmp_path),
                              "shutdown"], capture_output=True, text=True, timeout=30)
        eng.proc.wait(10)
        assert time.monotonic() - started < 3.0
        assert eng.proc.returncode == 0
        assert "noticed the request" in out.stdout
    assert not (eng.mailq / "retry" / "shutdown.txt").exists()


def test_stale_shutdown_file_does_not_stop_the_next_start(tmp_path):
    (tmp_path / "mailq" / "retry").mkdir(parents=True)
    (tmp_path / "mailq" / "retry" / "shutdown.txt").write_text("old\n")
    with RunningEngine(tmp_path) as eng:
        time.sleep(1.5)
        assert eng.proc.poll() is None


def test_daemon_with_pid_file_stops_cleanly_on_sigterm(tmp_path):
    port = free_port()
    write_config(tmp_path, {"network.smtp_port": port, "network.smtp_listen_ips": ["127.0.0.1"],
                            "network.web_port": 0})
    out = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(tmp_path), "-bd"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    pid = int((tmp_path / "mailengine.pid").read_text())
    try:
        assert f"pid {pid}" in out.stdout
        wait_for_port("127.0.0.1", port, 20)
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if not (tmp_path / "mailengine.pid").exists():
                break
            time.sleep(0.1)
        assert not (tmp_path / "mailengine.pid").exists()
        assert "stopped cleanly" in (tmp_path / "log" / "daemon.out").read_text()
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_version_help_gettcpip():
    run = lambda *a: subprocess.run([sys.executable, "-m", "mailengine.cli", *a],
                                    capture_output=True, text=True, timeout=30)
    assert re.fullmatch(r"MailEngine \d+\.\d+\.\d+\n", run("version").stdout)
    helptext = run("help").stdout
    for command in ("start", "-bd", "shutdown", "test", "version", "gettcpip"):
        assert command in helptext
    ip = run("gettcpip").stdout.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", ip)


def test_bad_config_value_is_one_clear_message(tmp_path):
    (tmp_path / "mailengine.toml").write_text("[limits]\nmax_message_size = 12\n")
    out = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(tmp_path),
                          "start"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip() == ("Configuration error: limits.max_message_size = 12: "
                                  "must be at least 1024 (or 0)")
