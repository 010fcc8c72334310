"""Delivery on several cores (issue 12): the engine decides, delivery processes run the SMTP
sessions (deliverers.py, deliverer.py, frames.py).

The frames are tested alone; the processes through RemoteSession against a real sink, with one
killed by SIGKILL mid-transaction; the engine end to end with `network.delivery_processes` = 3
against real sinks: every connection cap holds for all processes together, nothing is lost when
a delivery process is killed, and status counts them."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailengine import deliverers
from mailengine.deliverer import Deliverer, pack_result
from mailengine.deliverers import Deliverers, ProcessGone, RemoteSession, _Process
from mailengine.envelope import parse_inf
from mailengine.frames import FrameError, FrameReader, encode
from mailengine.smtp.client import Body, RecipientResult, TransactionResult
from mailengine.smtp_session import ConnectError
from mailengine.testing.engine import RunningEngine, free_port, wait_until as wait
from mailengine.testing.sink import SinkScript, SMTPSink, ThreadedSink

BODY = b"Subject: t\r\n\r\nhello\r\n"


# --- frames ----------------------------------------------------------------------------------------

def test_frames_come_out_whole_however_the_pipe_cuts_them():
    frames = [("send", 1, "a@b", ["c@d"], Body.from_bytes(BODY * 50), None, False),
              ("up", 2, None, "TLSv1.3"), ("lost", 3)]
    wire = b"".join(encode(f) for f in frames)
    for cut in (1, 3, 4, 5, 17, len(wire) // 2, len(wire)):
        r = FrameReader()
        got = []
        for i in range(0, len(wire), cut):
            got += r.feed(wire[i:i + cut])
        assert got == frames and r.pending == 0


def test_a_bad_frame_is_an_error_not_a_guess():
    with pytest.raises(FrameError):
        FrameReader().feed(b"\xff\xff\xff\xff" + b"x" * 10)  # longer than any frame may be
    with pytest.raises(FrameError):
        FrameReader().feed(b"\x00\x00\x00\x03abc")  # not a pickle


# --- the processes, through RemoteSession ---------------------------------------------------------

def run(coro):
    return asyncio.run(coro)


def test_remote_sessions_send_reuse_and_spread_over_the_processes(tmp_path):
    async def main():
        sink = SMTPSink("127.0.0.1", 0)
        await sink.start()
        d = Deliverers(2, tmp_path, 0)
        await d.start()
        try:
            a = RemoteSession(d, "127.0.0.1", sink.port, helo_name="one.test")
            b = RemoteSession(d, "127.0.0.1", sink.port, helo_name="two.test")
            await a.connect()
            await b.connect()
            assert a._proc is not b._proc  # the new connection went to the idle process
            assert a.capabilities.pipelining and a.is_reusable
            for i in range(3):
                r = await a.send("s@src.test", [f"r{i}@dst.test"], BODY)
                assert [x.code for x in r.recipients] == [250] and not r.site_failure
            r = await b.send("s@src.test", ["x@dst.test", "y@dst.test"], Body.from_bytes(BODY))
            assert [x.code for x in r.recipients] == [250, 250]
            assert a.messages_sent == 3 and a.is_reusable
            await a.close()
            await b.close()
            assert d.counts()["connections"] == 0
        finally:
            await d.stop()
            await sink.stop()
        assert [s.helo for s in sink.sessions] == ["one.test", "two.test"]  # one connection each
        assert len(sink.messages) == 4

    run(main())


def test_a_refused_connection_is_a_connect_error_with_its_transcript(tmp_path):
    async def main():
        d = Deliverers(2, tmp_path, 0)
        await d.start()
        try:
            s = RemoteSession(d, "127.0.0.1", free_port(), helo_name="h.test", connect_timeout=5)
            with pytest.raises(ConnectError) as e:
                await s.connect()
            assert e.value.reply.code == 451 and any("refused" in line.lower() or
                                                      "failed" in line.lower()
                                                      for line in e.value.transcript)
            assert not s.is_reusable and d.counts()["connections"] == 0
        finally:
            await d.stop()

    run(main())


def test_killed_process_ends_its_transaction_with_process_gone_and_comes_back(tmp_path):
    async def main():
        sink = SMTPSink("127.0.0.1", 0, SinkScript(delays={"BODY": 30}))  # never answers in time
        await sink.start()
        d = Deliverers(1, tmp_path, 0)
        await d.start()
        try:
            s = RemoteSession(d, "127.0.0.1", sink.port, helo_name="h.test")
            await s.connect()
            sending = asyncio.create_task(s.send("s@src.test", ["a@dst.test", "b@dst.test"], BODY))
            await asyncio.sleep(0.5)  # the data is out, the reply awaited
            victim = d.pids()[0]
            os.kill(victim, signal.SIGKILL)
            with pytest.raises(ProcessGone):  # not the server's doing: no window cut, no try
                await asyncio.wait_for(sending, 10)
            assert not s.is_reusable
            # started again: a new connection works
            for _ in range(100):
                if d.pick() is not None and d.pids() and d.pids()[0] != victim:
                    break
                await asyncio.sleep(0.1)
            assert d.counts()["restarts"] == 1
            fast = SMTPSink("127.0.0.1", 0)
            await fast.start()
            t = RemoteSession(d, "127.0.0.1", fast.port, helo_name="h.test")
            await t.connect()
            r = await t.send("s@src.test", ["c@dst.test"], BODY)
            assert r.recipients[0].code == 250
            await t.close()
            await fast.stop()
        finally:
            await d.stop()
            await sink.stop()

    run(main())


def test_an_idle_connection_the_server_closes_is_not_reused(tmp_path):
    async def main():
        sink = SMTPSink("127.0.0.1", 0, SinkScript(replies={"BODY": "250 2.0.0 ok"}))
        await sink.start()
        d = Deliverers(1, tmp_path, 0)
        await d.start()
        try:
            s = RemoteSession(d, "127.0.0.1", sink.port, helo_name="h.test")
            await s.connect()
            await s.send("s@src.test", ["a@dst.test"], BODY)
            assert s.is_reusable
            await sink.stop()  # the server hangs up on its idle connections
            for _ in range(50):
                if not s.is_reusable:
                    break
                await asyncio.sleep(0.1)
            assert not s.is_reusable and d.counts()["connections"] == 0
        finally:
            await d.stop()

    run(main())


def test_a_lost_notice_read_with_the_last_answer_ends_the_connection(tmp_path):
    """The server says 250 and hangs up; the process's "sent" and "lost" reach the engine in one
    read, before the sending task resumes: the connection must not be offered again."""
    class Proc:
        pid = 0

    async def main():
        d = Deliverers(1, tmp_path, 0)
        p = _Process(0, Proc())
        p.ready.set_result(True)
        d.current[0] = p
        s = RemoteSession(d, "192.0.2.1", 25)
        connecting = asyncio.create_task(s.connect())
        await asyncio.sleep(0)
        p.answered(("up", s._cid, None, None))
        await connecting
        sending = asyncio.create_task(s.send("a@src.test", ["b@dst.test"], BODY))
        await asyncio.sleep(0)
        done = TransactionResult("a@src.test", [RecipientResult("b@dst.test", 250, "2.0.0", "ok",
                                                                "body")],
                                 None, False, False, [], [])
        p.answered(("sent", s._cid, pack_result(done, []), True))
        p.answered(("lost", s._cid))
        r = await sending
        assert r.recipients[0].code == 250
        assert not s.is_reusable and not p.sessions

    run(main())


def test_the_process_forgets_a_connection_its_server_closed(tmp_path):
    async def main():
        sink = SMTPSink("127.0.0.1", 0)
        await sink.start()
        read_fd, write_fd = os.pipe()
        worker = Deliverer(write_fd)
        await worker.attach()
        try:
            worker.handle(("open", 7, {"ip": "127.0.0.1", "port": sink.port,
                                       "helo_name": "h.test"}))
            for _ in range(50):
                if 7 in worker.sessions and worker.sessions[7].is_reusable:
                    break
                await asyncio.sleep(0.05)
            assert worker.sessions[7].is_reusable
            await sink.stop()  # hangs up on its idle connections
            for _ in range(50):
                if 7 not in worker.sessions:
                    break
                await asyncio.sleep(0.05)
            assert 7 not in worker.sessions
            await asyncio.sleep(0.1)
            told = os.read(read_fd, 1 << 16)
            assert told.count(b"lost") == 1  # told once, though the socket reports its end twice
        finally:
            os.close(read_fd)

    run(main())


def test_a_quit_that_takes_too_long_leaves_no_connection_open(tmp_path):
    """The pool gives QUIT 2 s; cancelled, the process must drop the socket at once, else the
    server sees a connection the engine no longer counts."""
    async def main():
        sink = SMTPSink("127.0.0.1", 0, SinkScript(delays={"QUIT": 30}))
        await sink.start()
        d = Deliverers(1, tmp_path, 0)
        await d.start()
        try:
            child = d.pids()[0]

            def sockets() -> int:  # the process's TCP sockets (the sink is busy sleeping)
                fds = Path(f"/proc/{child}/fd")
                return sum(os.readlink(f).startswith("socket:") for f in fds.iterdir())

            before = sockets()
            s = RemoteSession(d, "127.0.0.1", sink.port, helo_name="h.test")
            await s.connect()
            assert sockets() == before + 1
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await s.close()
            for _ in range(40):
                if sockets() == before:
                    break
                await asyncio.sleep(0.05)
            assert sockets() == before
        finally:
            await d.stop()
            await sink.stop()

    run(main())


def test_a_process_that_stops_answering_is_killed_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(deliverers, "HUNG_MARGIN", 0.5)

    async def main():
        sink = SMTPSink("127.0.0.1", 0)
        await sink.start()
        d = Deliverers(1, tmp_path, 0)
        await d.start()
        try:
            s = RemoteSession(d, "127.0.0.1", sink.port, helo_name="h.test", read_timeout=0.3,
                              write_timeout=0.3, body_timeout=0.3, connect_timeout=0.3)
            await s.connect()
            stuck = d.pids()[0]
            os.kill(stuck, signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(ProcessGone):
                await s.send("a@src.test", ["b@dst.test"], BODY)
            assert time.monotonic() - t0 < 5
            for _ in range(100):
                if d.pick() is not None:
                    break
                await asyncio.sleep(0.1)
            assert d.pids() and d.pids()[0] != stuck and d.counts()["restarts"] == 1
        finally:
            await d.stop()
            await sink.stop()

    run(main())


class _FakeProc:
    pid = 4242
    killed = False

    def kill(self):
        self.killed = True


def test_one_timer_per_process_watches_its_calls_and_kills_it_when_one_is_late(monkeypatch):
    """deliverers._Process: no timer per call; a call past its limit gets the process killed
    and every call answered None."""
    monkeypatch.setattr(deliverers, "WATCH_EVERY", 0.05)

    async def main():
        loop = asyncio.get_running_loop()
        made = []
        real = loop.call_later
        monkeypatch.setattr(loop, "call_later", lambda *a: made.append(a) or real(*a))
        p = _Process(0, _FakeProc())
        slow = [p.call(cid, ("send", cid), 60.0) for cid in range(1, 20)]
        late = p.call(20, ("send", 20), 0.1)
        assert len(made) == 1  # one watch for all twenty
        await asyncio.wait_for(late, 2)
        assert late.result() is None and p.proc.killed and not p.alive
        assert all(f.done() and f.result() is None for f in slow)

    run(main())


def test_answered_or_given_up_calls_never_get_the_process_killed(monkeypatch):
    monkeypatch.setattr(deliverers, "WATCH_EVERY", 0.05)

    async def main():
        p = _Process(0, _FakeProc())
        answered = p.call(1, ("send", 1), 0.1)
        given_up = p.call(2, ("send", 2), 0.1)
        p.answered(("sent", 1, None, True))
        p.calls.pop(2).set_result(None)  # as RemoteSession.abort does
        await asyncio.sleep(0.4)
        assert answered.result() == ("sent", 1, None, True) and given_up.result() is None
        assert not p.proc.killed and p.alive
        assert not p.deadlines and p._watching is None  # nothing to watch: no timer

    run(main())


# --- the engine with delivery processes ----------------------------------------------------------

FAST = {"queue.pause_sending": False, "queue.retry_intervals": [0.02, 0.02],
        "queue.save_done": False, "network.helo_text": "engine.test",
        "network.delivery_processes": 3}


def send_many(eng: RunningEngine, rcpts: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=30) as s:
        for r in rcpts:
            s.sendmail("sender@src.test", [r], BODY)


def empty_queue(eng: RunningEngine) -> bool:
    return not list((eng.mailq / "working").iterdir()) and \
        not list((eng.mailq / "retry").glob("*.inf"))


def status(eng: RunningEngine) -> dict:
    out = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(eng.home),
                          "status", "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_connection_caps_hold_for_all_delivery_processes_together(tmp_path):
    """max_connections_per_host 2 and max_outbound_connections 3, three slow servers, three
    processes: never more than 2 connections to a server nor 3 in all, however the processes
    share them."""
    slow = SinkScript(delays={"BODY": 0.05})
    sinks = [ThreadedSink(f"127.0.0.{81 + i}", 25, slow).start() for i in range(3)]
    try:
        with RunningEngine(tmp_path, {
                **FAST, "limits.max_connections_per_host": 2,
                "limits.max_outbound_connections": 3,
                "basic.dns_servers": [f"d{i}.test,mx.d{i}.test,MX,127.0.0.{81 + i}:25"
                                      for i in range(3)]}) as eng:
            rcpts = [f"u{n}@d{n % 3}.test" for n in range(90)]
            send_many(eng, rcpts)
            wait(lambda: sum(len(s.messages) for s in sinks) == 90, timeout=60,
                 what="90 messages at the sinks")
            wait(lambda: empty_queue(eng), what="an empty queue")
            st = status(eng)
        assert st["connections"]["delivery_processes"] == 3
        assert st["connections"]["outbound_peak"] <= 3
        for s in sinks:
            assert s.peak_connections <= 2, s.host
        got = sorted(r for s in sinks for m in s.messages for r in m.rcpts)
        assert got == sorted(rcpts)
        assert all(sess.helo == "engine.test" for s in sinks for sess in s.sessions)
    finally:
        for s in sinks:
            s.stop()


@pytest.mark.parametrize("killed", ["one", "all"])
def test_sigkill_of_delivery_processes_loses_no_message_and_costs_no_try(tmp_path, killed):
    """Kill one delivery process, or all, while they hold transactions waiting for their reply:
    they are started again, and every message reaches its recipient (a transaction that was
    waiting for its 250 may arrive twice, nothing is missing). Not the server's doing: no
    message has a second try counted for it."""
    sink = ThreadedSink("127.0.0.86", 25, SinkScript(delays={"BODY": 0.3})).start()
    try:
        with RunningEngine(tmp_path, {**FAST, "queue.save_done": True, "basic.dns_servers": [
                "k.test,mx.k.test,MX,127.0.0.86:25"]}) as eng:
            rcpts = [f"u{n}@k.test" for n in range(40)]
            send_many(eng, rcpts)
            wait(lambda: len(sink.messages) >= 3, what="the first deliveries")
            kids = subprocess.run(["pgrep", "-P", str(eng.proc.pid), "-f", "mailengine.deliverer import"],
                                  capture_output=True, text=True).stdout.split()
            assert len(kids) == 3
            for pid in kids[:1] if killed == "one" else kids:
                os.kill(int(pid), signal.SIGKILL)
            wait(lambda: set(r for m in sink.messages for r in m.rcpts) == set(rcpts),
                 timeout=60, what="every recipient delivered")
            wait(lambda: empty_queue(eng), what="an empty queue")
            st = status(eng)
            assert st["connections"]["delivery_process_restarts"] == (1 if killed == "one" else 3)
            assert st["connections"]["delivery_processes"] == 3
            done = [parse_inf(p.read_bytes(), p.name[:-4])
                    for p in (eng.mailq / "done").glob("*.inf")]
        assert len(done) == 40 and {m.send_tries for m in done} == {1}
        out = eng.output.decode()
        assert "exited with" in out and "starting it again" in out
        assert "to be tried again" in out
    finally:
        sink.stop()


def test_settings_changed_while_running_reach_the_delivery_processes(tmp_path):
    """The EHLO name and the timeouts travel with each new connection: after `config set`, the
    next connection any process opens says the new name."""
    one = ThreadedSink("127.0.0.87", 25).start()
    two = ThreadedSink("127.0.0.88", 25).start()
    try:
        with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
                "one.test,mx.one.test,MX,127.0.0.87:25",
                "two.test,mx.two.test,MX,127.0.0.88:25"]}) as eng:
            send_many(eng, ["a@one.test"])
            wait(lambda: len(one.messages) == 1, what="the first message")
            out = subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(eng.home),
                                  "config", "set", "network.helo_text", "renamed.test"],
                                 capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            send_many(eng, ["b@two.test"])
            wait(lambda: len(two.messages) == 1, what="the second message")
        assert [s.helo for s in one.sessions] == ["engine.test"]
        assert [s.helo for s in two.sessions] == ["renamed.test"]
    finally:
        one.stop()
        two.stop()


def test_max_send_rate_holds_for_all_delivery_processes_together(tmp_path):
    """limits.max_send_rate 360 an hour lets a minute's worth (6) go at once, then one every
    10 s: with three processes still 6 in the first seconds, not 6 each."""
    sink = ThreadedSink("127.0.0.89", 25).start()
    try:
        with RunningEngine(tmp_path, {**FAST, "limits.max_send_rate": 360, "basic.dns_servers": [
                "r.test,mx.r.test,MX,127.0.0.89:25"]}) as eng:
            send_many(eng, [f"u{n}@r.test" for n in range(12)])
            wait(lambda: len(sink.messages) >= 6, what="the first six")
            time.sleep(3)
            assert len(sink.messages) == 6
            assert status(eng)["connections"]["delivery_processes"] == 3
    finally:
        sink.stop()


def test_with_delivery_processes_a_recycler_process_removes_delivered_mail(tmp_path):
    """The engine hands delivered mail to its recycler process (recycler.py), which turns the
    files into spare files; a clean stop waits for it, so nothing is left in working/."""
    sink = ThreadedSink("127.0.0.87", 25).start()
    try:
        with RunningEngine(tmp_path, {**FAST, "basic.dns_servers": [
                "rc.test,mx.rc.test,MX,127.0.0.87:25"]}) as eng:
            recyclers = subprocess.run(
                ["pgrep", "-P", str(eng.proc.pid), "-f", "mailengine.recycler import"],
                capture_output=True, text=True).stdout.split()
            assert len(recyclers) == 1
            send_many(eng, [f"r{n}@rc.test" for n in range(10)])
            wait(lambda: len(sink.messages) == 10, what="10 deliveries")
            wait(lambda: empty_queue(eng), what="working/ emptied by the recycler")
            spare = [p for p in (eng.mailq / "spare").iterdir() if not p.name.startswith(".")]
            assert spare  # the files kept for reuse, as the remover thread kept them
    finally:
        sink.stop()
