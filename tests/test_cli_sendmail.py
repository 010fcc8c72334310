"""`mailengine-sendmail` and `mailengine-mailq` as applications, cron and PHP call them
(`sendmail -t -i`), run as separate processes with the message on stdin: what lands in the
queue, sendmail's exit codes, delivery through a running engine, and postqueue -p's layout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mailengine import config
from mailengine.envelope import parse_inf
from mailengine.testing.engine import RunningEngine, wait_until

from test_cli_queue import Sink, run_cli

REPO = Path(__file__).resolve().parent.parent


def sendmail(home: Path | None, *args: str, stdin: bytes = b"", module: str = "sendmail",
             env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    env.pop("MAILENGINE_HOME", None)
    return subprocess.run([sys.executable, "-c", f"import sys; from mailengine.sendmail import "
                           f"{module}_main as m; sys.exit(m())",
                           *(["-C", str(home)] if home else []), *args],
                          input=stdin, capture_output=True, timeout=60, env=env)


def queued(home: Path) -> list[tuple]:
    """(.inf record, .dat bytes) of every message in mailq/retry."""
    retry = home / "mailq" / "retry"
    return [(parse_inf(p.read_bytes(), p.name[:-4]), p.with_suffix(".dat").read_bytes())
            for p in sorted(retry.glob("*.inf"))]


MESSAGE = (b"To: Ann <ann@dst.test>, bob@dst.test\n"
           b"Cc: carl@dst.test\n"
           b"Bcc: secret@dst.test\n"
           b"Subject: from cron\n"
           b"\n"
           b"first line\n"
           b".\n"
           b"after the dot\n")


def test_t_i_f_F_take_recipients_from_the_headers_and_store_durably(tmp_path):
    config.load(tmp_path)
    out = sendmail(tmp_path, "-t", "-i", "-f", "cron@src.test", "-F", "Cron Daemon",
                   stdin=MESSAGE)
    assert out.returncode == 0, out.stderr
    [(msg, data)] = queued(tmp_path)
    assert msg.mail_from == "cron@src.test"
    assert msg.rcpt_to_send == ["ann@dst.test", "bob@dst.test", "carl@dst.test",
                                "secret@dst.test"]
    assert b"Bcc" not in data and b"secret" not in data  # blind copies stay blind
    assert data.startswith(b"From: Cron Daemon <cron@src.test>\r\nTo: Ann <ann@dst.test>")
    assert b"\r\nDate: " in data and b"\r\nMessage-ID: <" in data
    assert data.endswith(b"\r\n\r\nfirst line\r\n.\r\nafter the dot\r\n")  # -i: '.' is text


def test_recipients_as_arguments_and_a_lone_dot_ending_the_message(tmp_path):
    config.load(tmp_path)
    out = sendmail(tmp_path, "-oi", "-fme@src.test", "x@dst.test,y@dst.test", "root",
                   stdin=b"Subject: s\nFrom: Me <me@src.test>\n\nbody\n")
    assert out.returncode == 0, out.stderr
    out = sendmail(tmp_path, "z@dst.test", stdin=b"Subject: dot\n\nbefore\n.\nnever seen\n")
    assert out.returncode == 0, out.stderr
    (first, data1), (second, data2) = sorted(queued(tmp_path), key=lambda q: q[0].rcpt_to_send)
    assert first.rcpt_to_send[:2] == ["x@dst.test", "y@dst.test"]
    assert first.rcpt_to_send[2].startswith("root@")  # a bare user name gets the host
    assert data1.count(b"From:") == 1  # the message's own From is kept
    assert data2.endswith(b"before\r\n") and b"never seen" not in data2
    assert "@" in second.mail_from  # the calling user at this host


def test_sendmail_exit_codes(tmp_path):
    config.load(tmp_path)
    assert sendmail(tmp_path, "-x", "a@dst.test").returncode == 64  # EX_USAGE
    assert sendmail(tmp_path, stdin=b"Subject: x\n\n").returncode == 64  # no recipients
    assert sendmail(tmp_path, "-t", stdin=b"Subject: x\n\nno To\n").returncode == 64
    assert sendmail(tmp_path, "-f").returncode == 64
    bad = sendmail(tmp_path, "a b@dst.test", stdin=b"Subject: x\n\n")
    assert bad.returncode == 65 and b"not an address" in bad.stderr  # EX_DATAERR
    assert sendmail(tmp_path / "nowhere", "a@dst.test", stdin=b"x\n").returncode == 78
    (tmp_path / "mailengine.toml").write_text("[limits]\nmax_message_size = 1024\n")
    big = sendmail(tmp_path, "a@dst.test", stdin=b"Subject: x\n\n" + b"y" * 2000)
    assert big.returncode == 65 and b"max_message_size" in big.stderr
    (tmp_path / "mailengine.toml").write_text("")
    (tmp_path / "mailq").rename(tmp_path / "mailq.away")
    (tmp_path / "mailq").write_text("a file where the queue should be\n")
    out = sendmail(tmp_path, "a@dst.test", stdin=b"Subject: x\n\nbody\n")
    assert out.returncode == 75 and b"cannot queue" in out.stderr  # EX_TEMPFAIL
    help_ = sendmail(None, "--help")
    assert help_.returncode == 0 and b"usage: mailengine-sendmail" in help_.stdout


def test_a_running_engine_delivers_it_at_once(tmp_path):
    sink = Sink()
    try:
        settings = {"queue.pause_sending": False, "queue.queue_check_interval": 600,
                    "basic.dns_servers": [sink.pin("dst.test")]}
        with RunningEngine(tmp_path, settings):
            out = sendmail(tmp_path, "-t", "-i", stdin=MESSAGE)
            assert out.returncode == 0, out.stderr
            # told through the control socket, not found 600 s later by the scan
            wait_until(lambda: sink.rcpts == ["ann@dst.test", "bob@dst.test", "carl@dst.test",
                                              "secret@dst.test"], timeout=15,
                       what="delivery of the sendmail message")
        assert b"Bcc" not in sink.sink.messages[0].data
    finally:
        sink.close()


def test_mailq_prints_the_queue_as_postqueue_does(tmp_path):
    config.load(tmp_path)
    out = sendmail(tmp_path, module="mailq")
    assert out.returncode == 0 and out.stdout.decode().strip() == "Mail queue is empty"
    sendmail(tmp_path, "-f", "list@src.test", "ann@dst.test", "bob@dst.test",
             stdin=b"Subject: one\n\n" + b"x" * 1500 + b"\n")
    sendmail(tmp_path, "-f", "", "carl@dst.test", stdin=b"Subject: two\n\nbody\n")
    held = queued(tmp_path)[-1][0].id
    code, _ = run_cli(tmp_path, "queue", "hold", held)
    assert code == 0
    for args in ((), ("-bp",)):
        out = sendmail(tmp_path, *args, module="mailq" if not args else "sendmail")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.decode().splitlines()
        assert lines[0].startswith("-Queue ID-") and lines[0].endswith(
            "--Size-- ----Arrival Time---- -Sender/Recipient-------")
        text = "\n".join(lines)
        assert f"{held}!" in text  # held, as postqueue marks it
        assert "MAILER-DAEMON" in text  # the null sender
        sender_col = next(ln for ln in lines if "list@src.test" in ln).index("list@src.test")
        assert next(ln for ln in lines if ln.strip() == "ann@dst.test").index("ann") == \
            sender_col
        assert lines[-1] == "-- 2 Kbytes in 2 Requests."


def test_mailq_into_a_reader_that_stops_is_no_traceback(tmp_path):
    config.load(tmp_path)
    for _ in range(3):
        sendmail(tmp_path, "a@dst.test", stdin=b"Subject: x\n\nbody\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from mailengine.sendmail import "
                             "mailq_main; sys.exit(mailq_main())", "-C", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # gone before mailq writes
    err = proc.stderr.read().decode()
    proc.wait(60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
