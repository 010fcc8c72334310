"""`mailengine queue` against a real running engine (through its control socket) and against a
stopped one (on the files), with real deliveries to SMTP sinks: held mail is never sent, released
and retried mail goes out at once, deleted mail never does."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import smtplib
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mailengine import cli
from mailengine.envelope import Message, format_inf, parse_inf
from mailengine.testing.engine import RunningEngine, wait_until as wait
from mailengine.testing.sink import SinkScript, SMTPSink

FAST = {
    "queue.retry_intervals": [0.02, 0.02],
    "queue.queue_check_interval": 0.5,
    "queue.save_done": True,
    "network.helo_text": "engine.test",
}


def run_cli(home: Path, *args: str) -> tuple[int, str]:
    """Run `mailengine --home HOME ARGS` in this process; (exit code, stdout + stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = cli.main(["--home", str(home), *args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (print(e.code) or 1)
    return code, out.getvalue()


class Sink:
    """One SMTP sink on a free loopback port, served from a thread."""

    def __init__(self, script: SinkScript | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.sink = SMTPSink("127.0.0.1", 0, script)
        asyncio.run_coroutine_threadsafe(self.sink.start(), self.loop).result(10)

    def pin(self, domain: str) -> str:
        """A basic.dns_servers entry sending `domain`'s mail to this sink."""
        return f"{domain},mx.{domain},MX,127.0.0.1:{self.sink.port}"

    @property
    def rcpts(self) -> list[str]:
        return sorted(r for m in self.sink.messages for r in m.rcpts)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.sink.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def sink():
    s = Sink()
    yield s
    s.close()


def send(eng: RunningEngine, rcpts: list[str], body: bytes = b"Subject: q\r\n\r\nhello\r\n"
         ) -> str:
    with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
        s.ehlo()
        s.mail("sender@src.test")
        for r in rcpts:
            s.rcpt(r)
        code, text = s.data(body)
    assert code == 250
    return text.decode().rsplit(" ", 1)[-1]  # "Ok: queued as ID"


def inf(home: Path, msg_id: str, where: str = "retry") -> Message:
    return parse_inf((home / "mailq" / where / f"{msg_id}.inf").read_bytes(), msg_id)


def ids_in(home: Path, where: str) -> set[str]:
    return {p.name[:-4] for p in (home / "mailq" / where).glob("*.inf")}


# ---------------------------------------------------------------- list and show

def test_list_by_domain_and_by_message_running_then_stopped(tmp_path):
    with RunningEngine(tmp_path) as eng:  # sending paused: everything stays queued
        a = send(eng, ["x@one.test", "y@two.test", "z@ONE.test"])
        b = send(eng, ["w@one.test"])
        code, out = run_cli(tmp_path, "queue", "list")
        assert code == 0
        assert f"engine running, pid {eng.proc.pid}" in out
        assert "2 messages, 4 recipients to send" in out
        rows = {line.split()[0]: line.split()[1:4] for line in out.splitlines()[2:]}
        assert rows == {"one.test": ["2", "3", "0"], "two.test": ["1", "1", "0"]}
        code, out = run_cli(tmp_path, "queue", "list", "--messages")
        assert a in out and b in out and "x@one.test, y@two.test, z@ONE.test" in out
        code, out = run_cli(tmp_path, "queue", "--json", "list")
        data = json.loads(out)
        assert data["running"] and {m["id"] for m in data["messages"]} == {a, b}
        code, out = run_cli(tmp_path, "queue", "show", a)
        assert code == 0 and f"messageid={a}" in out and "rcpttosend=x@one.test" in out
        assert "Received from 127.0.0.1 for 3 recipients" in out
    code, out = run_cli(tmp_path, "queue", "list")
    assert code == 0 and "engine not running: read from the files" in out
    assert "2 messages, 4 recipients to send" in out
    code, out = run_cli(tmp_path, "queue", "show", b)
    assert code == 0 and "rcpttosend=w@one.test" in out
    code, out = run_cli(tmp_path, "queue", "show", "P1T1C1@nowhere")
    assert code == 1 and "no such message" in out


def test_last_reply_next_retry_and_retry_now(tmp_path, sink):
    """A 451 defers the mail for 10 minutes; the list shows the reply and the retry time;
    `queue retry` sends it at once."""
    sink.sink.script = SinkScript(rcpt={"later@slow.test": ["451 4.3.0 Come back later",
                                                            "250 2.1.5 Ok"]})
    with RunningEngine(tmp_path, {**FAST, "queue.pause_sending": False,
                                  "queue.retry_intervals": [10],
                                  "basic.dns_servers": [sink.pin("slow.test")]}) as eng:
        mid = send(eng, ["later@slow.test"])
        wait(lambda: mid in ids_in(tmp_path, "retry") and inf(tmp_path, mid).send_tries == 1,
             what="the first attempt")
        code, out = run_cli(tmp_path, "queue", "list")
        row = next(line for line in out.splitlines() if line.startswith("slow.test"))
        assert "later@slow.test: 451 4.3.0 Come back later" in row
        nxt = inf(tmp_path, mid).retry_time
        assert nxt > datetime.now() + timedelta(minutes=9)
        assert nxt.strftime("%Y/%m/%d %H:%M:%S") in row
        code, out = run_cli(tmp_path, "queue", "retry", mid)
        assert code == 0 and "1 message due now by the running engine" in out
        wait(lambda: sink.rcpts == ["later@slow.test"], what="the retry")
        wait(lambda: mid in ids_in(tmp_path, "done"), what="done")
    assert inf(tmp_path, mid, "done").send_tries == 2
    # A stopped engine's list reads the last reply from the log file.
    code, out = run_cli(tmp_path, "queue", "list")
    assert "Mail queue is empty" in out


def test_last_reply_from_the_log_when_stopped(tmp_path, sink):
    sink.sink.script = SinkScript(rcpt={"@slow.test": "452 4.2.2 Mailbox full"})
    with RunningEngine(tmp_path, {**FAST, "queue.pause_sending": False,
                                  "queue.retry_intervals": [10],
                                  "basic.dns_servers": [sink.pin("slow.test")]}) as eng:
        mid = send(eng, ["a@slow.test"])
        wait(lambda: mid in ids_in(tmp_path, "retry") and inf(tmp_path, mid).send_tries == 1,
             what="the first attempt")
    code, out = run_cli(tmp_path, "queue", "list", "--messages")
    assert "engine not running" in out
    assert "a@slow.test: 452 4.2.2 Mailbox full" in out


# ---------------------------------------------------------------- hold, release, delete

def test_hold_release_delete_on_a_running_engine(tmp_path, sink):
    settings = {**FAST, "queue.pause_sending": True,
                "basic.dns_servers": [sink.pin("d.test"), sink.pin("e.test")]}
    with RunningEngine(tmp_path, settings) as eng:
        held = send(eng, ["held@d.test"])
        gone = send(eng, ["gone@d.test"])
        mixed = send(eng, ["keep@e.test", "drop@d.test"])
        send(eng, ["free@e.test"])
        code, out = run_cli(tmp_path, "queue", "hold", held)
        assert code == 0 and "1 message held by the running engine" in out
        assert inf(tmp_path, held).held
        code, out = run_cli(tmp_path, "queue", "delete", gone)
        assert "1 message deleted by the running engine" in out
        assert gone not in ids_in(tmp_path, "retry")
        assert not (tmp_path / "mailq" / "retry" / f"{gone}.dat").exists()
        code, out = run_cli(tmp_path, "queue", "list", "--messages")
        assert f"{held}" in out and gone not in out
        code, out = run_cli(tmp_path, "queue", "hold", held)
        assert "already held" in out
        code, out = run_cli(tmp_path, "config", "set", "queue.pause_sending", "false")
        assert "Applied to the running engine" in out
        wait(lambda: "free@e.test" in sink.rcpts and "drop@d.test" in sink.rcpts,
             what="unpaused delivery")
        time.sleep(1.5)  # the held one must not go, even given time
        assert "held@d.test" not in sink.rcpts and "gone@d.test" not in sink.rcpts
        assert ids_in(tmp_path, "retry") == {held}
        code, out = run_cli(tmp_path, "queue", "release", "@d.test")
        assert code == 0 and "1 message released by the running engine" in out
        wait(lambda: "held@d.test" in sink.rcpts, what="the released message")
        wait(lambda: not ids_in(tmp_path, "retry"), what="an empty queue")
    assert sink.rcpts == ["drop@d.test", "free@e.test", "held@d.test", "keep@e.test"]
    assert not inf(tmp_path, held, "done").held
    assert "deleted from the queue by the administrator" in eng.read_output()
    assert mixed in ids_in(tmp_path, "done")


def test_delete_domain_keeps_other_recipients(tmp_path, sink):
    with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [sink.pin("e.test")]}) as eng:
        mixed = send(eng, ["keep@e.test", "drop@d.test", "drop2@D.test"])
        only = send(eng, ["only@d.test"])
        code, out = run_cli(tmp_path, "queue", "delete", "@d.test")
        assert "1 message deleted" in out
        assert "2 recipients removed from 1 message" in out
        msg = inf(tmp_path, mixed)
        assert msg.rcpt_to_send == ["keep@e.test"]
        assert "2 recipients at d.test deleted by the administrator" in msg.log[-1]
        assert only not in ids_in(tmp_path, "retry")
        code, out = run_cli(tmp_path, "config", "set", "queue.pause_sending", "false")
        wait(lambda: mixed in ids_in(tmp_path, "done"), what="delivery of the rest")
    assert sink.rcpts == ["keep@e.test"]


def test_cancel_a_mailing_by_its_sender(tmp_path):
    with RunningEngine(tmp_path) as eng:
        for i in range(5):
            with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                s.sendmail("List@News.test", [f"m{i}@a.test", f"n{i}@b.test"], b"Subject: n\r\n\r\nx\r\n")
        other = send(eng, ["m0@a.test"])
        mailing = ids_in(tmp_path, "retry") - {other}
        code, out = run_cli(tmp_path, "queue", "delete", "from:<list@news.test>")
        assert code == 0 and "5 messages deleted by the running engine" in out
        assert ids_in(tmp_path, "retry") == {other}
        code, out = run_cli(tmp_path, "queue", "list", "--messages")
        assert "1 message" in out and other in out and not any(m in out for m in mailing)
        code, out = run_cli(tmp_path, "queue", "delete", "from:nobody@news.test")
        assert code == 0 and "0 messages deleted" in out and "no such message" not in out


def test_a_message_being_delivered_is_left_alone(tmp_path, sink):
    sink.sink.script = SinkScript(delays={"BODY": 4})
    with RunningEngine(tmp_path, {**FAST, "queue.pause_sending": False,
                                  "basic.dns_servers": [sink.pin("slow.test")]}) as eng:
        mid = send(eng, ["a@slow.test"])
        wait(lambda: mid in ids_in(tmp_path, "working"), what="delivery to start")
        code, out = run_cli(tmp_path, "queue", "hold", mid)
        assert "0 messages held" in out and "being delivered now" in out
        code, out = run_cli(tmp_path, "queue", "list", "--messages")
        assert "sending" in out
        wait(lambda: mid in ids_in(tmp_path, "done"), what="the delivery to end")
        wait(lambda: sink.rcpts == ["a@slow.test"], what="the sink to record it")


def test_unknown_targets_and_bad_arguments(tmp_path):
    with RunningEngine(tmp_path):
        code, out = run_cli(tmp_path, "queue", "hold", "P9T9C9@nowhere")
        assert code == 1 and "P9T9C9@nowhere: no such message" in out
        code, out = run_cli(tmp_path, "queue", "retry", "@")
        assert code == 2 and "needs a domain" in out
    code, out = run_cli(tmp_path, "queue", "delete", "P9T9C9@nowhere")
    assert code == 1 and "no such message" in out


# ---------------------------------------------------------------- a stopped engine

def test_stopped_engine_hold_delete_then_start_then_release(tmp_path, sink):
    settings = {**FAST, "queue.pause_sending": True,
                "basic.dns_servers": [sink.pin("d.test")]}
    with RunningEngine(tmp_path, settings) as eng:
        held = send(eng, ["held@d.test"])
        gone = send(eng, ["gone@d.test"])
        free = send(eng, ["free@d.test"])
    code, out = run_cli(tmp_path, "queue", "hold", held)
    assert code == 0 and "1 message held on the files (the engine is not running)" in out
    assert inf(tmp_path, held).held
    code, out = run_cli(tmp_path, "queue", "delete", gone)
    assert "1 message deleted on the files" in out
    assert not list((tmp_path / "mailq" / "retry").glob(f"{gone}.*"))
    settings["queue.pause_sending"] = False
    with RunningEngine(tmp_path, settings) as eng:
        wait(lambda: free in ids_in(tmp_path, "done"), what="the free message")
        time.sleep(1.0)
        assert sink.rcpts == ["free@d.test"] and ids_in(tmp_path, "retry") == {held}
        code, out = run_cli(tmp_path, "queue", "list")
        assert "1 held" in out
    code, out = run_cli(tmp_path, "queue", "release", "all")
    assert "1 message released on the files" in out and "as soon as the engine starts" in out
    msg = inf(tmp_path, held)
    assert not msg.held and msg.retry_time <= datetime.now()
    with RunningEngine(tmp_path, settings) as eng:
        wait(lambda: held in ids_in(tmp_path, "done"), what="the released message")
    assert sink.rcpts == ["free@d.test", "held@d.test"]


def test_stopped_engine_flush_makes_future_mail_due(tmp_path, sink):
    retry = tmp_path / "mailq" / "retry"
    with RunningEngine(tmp_path):
        pass
    later = datetime.now().replace(microsecond=0) + timedelta(hours=5)
    msg = Message(id="P1T1C1@dropper", mail_from="app@src.test", rcpt_to_send=["x@f.test"],
                  retry_time=later, send_tries=1)
    (retry / f"{msg.id}.dat").write_bytes(b"Subject: later\r\n\r\nbody\r\n")
    (retry / f"{msg.id}.inf").write_bytes(format_inf(msg))
    (retry / "P2T2C2@broken.inf").write_bytes(b"this is not an inf\n")
    code, out = run_cli(tmp_path, "queue", "list", "--messages")
    assert "1 unreadable" not in out and "P2T2C2@broken" in out and "unreadable" in out
    code, out = run_cli(tmp_path, "queue", "flush")
    assert code == 0 and "1 message due now on the files" in out
    assert parse_inf((retry / f"{msg.id}.inf").read_bytes()).retry_time <= datetime.now()
    code, out = run_cli(tmp_path, "queue", "delete", "P2T2C2@broken")
    assert "1 message deleted" in out and not (retry / "P2T2C2@broken.inf").exists()
    with RunningEngine(tmp_path, {**FAST, "queue.pause_sending": False,
                                  "basic.dns_servers": [sink.pin("f.test")]}):
        wait(lambda: sink.rcpts == ["x@f.test"], timeout=10, what="the flushed message")


def test_running_engine_flush_sends_deferred_mail(tmp_path, sink):
    sink.sink.script = SinkScript(rcpt={"@g.test": ["450 4.2.0 Greylisted", "250 2.1.5 Ok"]})
    with RunningEngine(tmp_path, {**FAST, "queue.pause_sending": False,
                                  "queue.retry_intervals": [30],
                                  "basic.dns_servers": [sink.pin("g.test")]}) as eng:
        ids = [send(eng, [f"u{i}@g.test"]) for i in range(3)]
        wait(lambda: all(i in ids_in(tmp_path, "retry") and inf(tmp_path, i).send_tries == 1
                         for i in ids), what="first attempts")
        code, out = run_cli(tmp_path, "queue", "flush")
        assert "3 messages due now by the running engine" in out
        wait(lambda: len(ids_in(tmp_path, "done")) == 3, what="the flush")
    assert sink.rcpts == ["u0@g.test", "u1@g.test", "u2@g.test"]


def test_files_are_left_alone_while_a_pid_file_names_a_live_process(tmp_path):
    import subprocess
    import sys
    with RunningEngine(tmp_path) as eng:
        mid = send(eng, ["a@x.test"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "mailengine.pid").write_text(f"{other.pid}\n")
        code, out = run_cli(tmp_path, "queue", "delete", "all")
        assert code == 1 and f"pid {other.pid}" in out and "does not answer" in out
        assert mid in ids_in(tmp_path, "retry")
    finally:
        other.kill()
        other.wait()
    code, out = run_cli(tmp_path, "queue", "delete", "all")
    assert "1 message deleted on the files" in out and not ids_in(tmp_path, "retry")
