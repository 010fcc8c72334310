"""The benchmark tools work: a private Postfix starts, queues, and stops leaving nothing behind;
bench/intake.py runs end to end in a tiny mode. (The figures themselves are bench/README.md's.)"""
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from common import SmtpSink  # noqa: E402
from postfix import PostfixInstance  # noqa: E402

needs_postfix = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("postfix", path="/usr/sbin:/usr/bin")
    or not shutil.which("smtp-source", path="/usr/sbin:/usr/bin"),
    reason="needs root and Debian's postfix package (postfix, smtp-source, smtp-sink)")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@needs_postfix
def test_private_postfix_queues_one_message_deferred_and_stops_leaving_nothing():
    msg = b"From: a@source.example\r\nTo: b@dest.invalid\r\nSubject: t\r\n\r\nhello\r\n"
    # In the system temp dir: pytest's tmp_path is mode 0700, closed to the postfix user.
    with PostfixInstance(mode="defer") as pf:
        assert pf.running_pids(), "master and its children run"
        base, port = pf.base, pf.port
        assert pf.queue_count() == 0
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
            assert s.ehlo()[0] == 250
            assert s.sendmail("a@source.example", ["b@dest.invalid"], msg) == {}
        # 250 means the queue file is on disk; qmgr then defers it (defer_transports = smtp).
        assert pf.queue_count() == 1
        assert pf.wait_settled(timeout=10) == 1
        assert pf.queue_count(("deferred",)) == 1
        assert "status=deferred" in pf.maillog.read_text()
    assert pf.running_pids() == []
    assert not port_open(port)
    assert not base.exists()


@needs_postfix
def test_private_postfix_relays_to_a_sink_and_is_cleaned_up_when_the_block_fails():
    with SmtpSink() as sink:
        with pytest.raises(RuntimeError, match="boom"):
            with PostfixInstance(mode="relay", relay_to=f"127.0.0.1:{sink.port}") as pf:
                with smtplib.SMTP("127.0.0.1", pf.port, timeout=10) as s:
                    s.sendmail("a@source.example", ["b@dest.invalid"], b"Subject: t\r\n\r\nhi\r\n")
                assert sink.wait_messages(1, timeout=15) == 1
                raise RuntimeError("boom")
    assert pf.running_pids() == []
    assert not pf.base.exists()


def test_relay_mode_needs_a_destination():
    with pytest.raises(ValueError):
        PostfixInstance(mode="relay")
    with pytest.raises(ValueError):
        PostfixInstance(mode="deliver")


@needs_postfix
def test_a_directory_closed_to_the_postfix_user_is_refused_clearly(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(PermissionError, match="cannot enter"):
        PostfixInstance(base_dir=closed).start()


@needs_postfix
def test_intake_benchmark_runs_end_to_end_in_tiny_mode(tmp_path):
    out = tmp_path / "intake.json"
    cmd = [sys.executable, str(BENCH / "intake.py"), "--messages", "200", "--sessions", "5",
           "--json", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)     # intake.py stops its engines and Postfix on SIGTERM
        text, _ = proc.communicate(timeout=30)
        pytest.fail(f"bench/intake.py took too long:\n{text}")
    assert proc.returncode == 0, text
    data = json.loads(out.read_text())
    assert set(data["rates"]) == {"a", "b", "c", "d"}
    assert all(rate > 0 for rate in data["rates"].values()), data["rates"]
    assert data["ratios"]["b/c"] > 0 and data["ratios"]["a/c"] > 0 and data["ratios"]["b/d"] > 0
    runs = data["runs"]
    assert runs["b"][0]["extra"]["retry_inf"] == 200          # all durable in mailq/retry
    assert runs["c"][0]["extra"]["queued_after_settling"] == 200   # all in Postfix's queue
    assert "ratios: b/c = " in text
    workdir = Path(re.search(r"workdir (\S+)", text).group(1))
    assert not workdir.exists()                               # engine homes, Postfix: gone


def run_bench(script: str, *args: str, timeout: float = 120) -> str:
    proc = subprocess.Popen([sys.executable, str(BENCH / script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the benchmarks stop their engines and Postfix
        text, _ = proc.communicate(timeout=30)
        pytest.fail(f"bench/{script} took too long:\n{text}")
    assert proc.returncode == 0, text
    return text


@needs_postfix
def test_drain_benchmark_delivers_a_held_queue_to_two_sinks_in_both_relays():
    text = run_bench("drain.py", "--messages", "200", "--sessions", "5", "--sinks", "2",
                     "--no-save")
    # each relay released a full queue, and each sink (its own recipient domain) got half
    assert re.search(r"\(a\) MailEngine drain \.\.\. [\d,]+ msg/s \(sinks counted 100\+100, "
                     r"queue empty", text), text
    assert re.search(r"\(b\) Postfix drain \.\.\. [\d,]+ msg/s \(sinks counted 100\+100", text), text
    assert re.search(r"ratio: engine/postfix \d+\.\d\d", text), text
    workdir = Path(re.search(r"workdir (\S+)", text).group(1))
    assert not workdir.exists()


@needs_postfix
def test_relay_benchmark_spreads_over_several_sources_and_sinks():
    text = run_bench("relay.py", "--messages", "200", "--sessions", "8", "--sources", "4",
                     "--sinks", "2", "--cases", "ac", "--no-save")
    assert re.search(r"\(a\) MailEngine relay, durable \.\.\. [\d,]+ msg/s \(sinks counted "
                     r"100\+100, queue empty", text), text
    assert re.search(r"\(c\) smtp-source -> smtp-sink \(ceiling\) \.\.\. [\d,]+ msg/s \(sinks "
                     r"counted 100\+100\)", text), text
