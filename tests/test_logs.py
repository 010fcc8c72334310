"""Daily log files: a new file when the day changes, pruning by the day in the file name,
`log_retention_days = 0` = no files; the debug.queue_size line of a running engine."""
from __future__ import annotations

import logging
import re
import smtplib
import time

from mailengine import logs
from mailengine.testing.engine import RunningEngine

DAY = 86400


def record(msg: str, when: float) -> logging.LogRecord:
    r = logging.LogRecord("mailengine", logging.INFO, __file__, 1, msg, None, None)
    r.created = when
    return r


def test_rotates_at_midnight_and_prunes_old_days(tmp_path):
    now = time.time()
    for days_ago in (15, 11, 10, 9, 3):
        day = time.strftime("%Y-%m-%d", time.localtime(now - days_ago * DAY))
        (tmp_path / f"mailengine-{day}.log").write_text("old\n")
    (tmp_path / "other.txt").write_text("not ours\n")
    h = logs.DailyFileHandler(tmp_path, retention_days=10)
    h.setFormatter(logging.Formatter(logs.FORMAT, logs.DATEFMT))
    h.emit(record("yesterday", now - DAY))
    h.emit(record("today", now))
    h.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    keep_days = [time.strftime("%Y-%m-%d", time.localtime(now - d * DAY)) for d in (9, 3, 1, 0)]
    assert names == sorted([f"mailengine-{d}.log" for d in keep_days] + ["other.txt"])
    y = (tmp_path / f"mailengine-{keep_days[2]}.log").read_text()
    t = (tmp_path / f"mailengine-{keep_days[3]}.log").read_text()
    assert y.endswith(" yesterday\n") and t.endswith(" today\n")


def test_prune_function_and_zero_retention(tmp_path):
    now = time.time()
    old = tmp_path / f"mailengine-{time.strftime('%Y-%m-%d', time.localtime(now - 3 * DAY))}.log"
    old.write_text("x\n")
    assert logs.prune(tmp_path, 0, now) == []  # 0: no files are written, none are touched
    assert logs.prune(tmp_path, 3, now) == [old]
    assert not old.exists()


def test_engine_writes_daily_file_and_queue_size_line(tmp_path):
    with RunningEngine(tmp_path, {"logging.stats_interval": 0.5,
                                  "logging.log_retention_days": 2}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.sendmail("a@src.test", ["b@dest.test"], b"Subject: t\r\n\r\nhi\r\n")
        deadline = time.monotonic() + 10
        while "queue: 1 messages queued" not in eng.read_output():
            assert time.monotonic() < deadline, eng.read_output()
            time.sleep(0.1)
    files = list((tmp_path / "log").glob("mailengine-*.log"))
    assert len(files) == 1 and "queue: 1 messages queued, 0 being delivered" in \
        files[0].read_text()


def test_no_log_files_with_zero_retention(tmp_path):
    with RunningEngine(tmp_path, {"logging.log_retention_days": 0}):
        pass
    assert not list((tmp_path / "log").glob("mailengine-*.log"))


def test_debug_program_traces_each_message_through_the_engine(tmp_path):
    """debug.program: stored, handed to delivery, attempt over, with ids; off: none of it."""
    from mailengine.testing.engine import wait_until
    from mailengine.testing.sink import ThreadedSink
    sink = ThreadedSink().start()
    outs = {}
    try:
        for on in (True, False):
            home = tmp_path / str(on)
            with RunningEngine(home, {
                    "debug.program": on, "queue.pause_sending": False,
                    "policy.relay_ips": ["127.0.0.1"],
                    "basic.dns_servers": [f"dest.test,mx.dest.test,MX,127.0.0.1:{sink.port}"]}
                    ) as eng:
                with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
                    s.sendmail("a@src.test", ["x@dest.test", "y@dest.test"], b"Subject: t\r\n\r\nhi\r\n")
                n = 1 if on else 2
                wait_until(lambda: len(sink.messages) == n, 20, "delivery")
                time.sleep(0.3)
                outs[on] = eng.read_output()
    finally:
        sink.stop()
    on = outs[True]
    mid = re.search(r"stored (\S+) in working/: 2 recipients, \d+ bytes", on).group(1)
    assert f"sending {mid} to dest.test: 2 recipients, priority 0, try 1" in on
    assert f"{mid} attempt over: 2 sent, 0 failed, 0 to retry" in on
    assert "stored " not in outs[False] and "attempt over" not in outs[False]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_stats_rate_is_over_the_last_interval_as_in_the_manual():
    """Issue 15.8: the manual's `(N/h avg)` is N over the interval since the last line (773 sent
    in 7 s = 397542/h; 401 received in 7 s = 206228/h), not the average since the first."""
    from mailengine.stats import Stats
    clock = FakeClock(1000.0)
    st = Stats(clock=clock)
    clock.now += 60
    st.delivered(10)  # a slow minute first: it must not drag the next line's rate down
    assert st.lines() == ["10 sent (600/h avg, 10 total)"]
    clock.now += 7
    st.delivered(773)
    for _ in range(401):
        st.received(local=True)
    assert st.lines() == ["401 recv [401 inbound, 0 relay] (206228/h avg, 401 total)",
                          "773 sent (397542/h avg, 783 total)"]
    clock.now += 30
    assert st.lines() == []  # nothing moved: no line


def test_stats_lines_reach_the_daily_log_file(tmp_path):
    """Issue 15.8: README says the statistics lines are in log/mailengine-DAY.log: they are."""
    with RunningEngine(tmp_path, {"logging.stats_interval": 1}) as eng:
        with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
            s.sendmail("a@example.org", ["b@relay.test"], b"Subject: s\r\n\r\nx\r\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and " recv [" not in eng.read_output():
            time.sleep(0.1)
    logged = "".join(p.read_text() for p in (tmp_path / "log").glob("mailengine-*.log"))
    assert re.search(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d 1 recv \[0 inbound, 1 relay\] "
                     r"\(\d+/h avg, 1 total\)$", logged, re.M)


def test_retention_changed_while_running_adds_keeps_or_removes_the_daily_files(tmp_path):
    """logging.log_retention_days set while running (logs.set_retention): 0 -> 3 starts the
    daily file, 3 -> 0 stops it (no log files), as at start."""
    import io
    root = logging.getLogger("mailengine")
    saved = (list(root.handlers), root.level, root.propagate)
    try:
        logs.setup(tmp_path, 0, console=io.StringIO())
        logging.getLogger("mailengine.test").info("before")
        assert list(tmp_path.glob("mailengine-*.log")) == []
        logs.set_retention(tmp_path, 3)
        logging.getLogger("mailengine.test").info("with files")
        today, = tmp_path.glob("mailengine-*.log")
        assert today.read_text().endswith(" with files\n")
        logs.set_retention(tmp_path, 0)
        logging.getLogger("mailengine.test").info("without")
        assert "without" not in today.read_text()
        assert not any(isinstance(h, logs.DailyFileHandler) for h in root.handlers)
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        root.propagate = saved[2]


def test_file_only_lines_go_to_the_daily_file_and_to_the_console_only_without_one(tmp_path):
    import io
    import logging
    from mailengine import logs as L
    console = io.StringIO()
    root = logging.getLogger("mailengine")
    saved = root.handlers[:], root.propagate, root.level
    L.setup(tmp_path / "log", 10, console=console)
    log = logging.getLogger("mailengine.test")
    log.info("for both")
    log.info("delivered line", extra={L.FILE_ONLY: True})
    for h in logging.getLogger("mailengine").handlers:
        h.flush()
    text = "".join(p.read_text() for p in (tmp_path / "log").glob("*.log"))
    assert "for both" in text and "delivered line" in text
    assert "for both" in console.getvalue() and "delivered line" not in console.getvalue()
    L.set_retention(tmp_path / "log", 0)  # no files any more: the console shows everything
    log.info("delivered again", extra={L.FILE_ONLY: True})
    assert "delivered again" in console.getvalue()
    for h in root.handlers[:]:  # as it was: other tests read records through the root logger
        root.removeHandler(h)
        h.close()
    root.handlers[:], root.propagate = saved[0], saved[1]
    root.setLevel(saved[2])


def test_the_day_is_checked_by_its_bounds_and_each_second_has_its_own_time(tmp_path,
                                                                          monkeypatch):
    """The handler and the formatter keep the day's bounds and the current second's text
    (logs.py: strftime per record was a tenth of logging it); midnight and a new second still
    show at once, going back in time too."""
    lt = time.localtime()
    midnight = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))
    h = logs.DailyFileHandler(tmp_path, retention_days=10)
    h.setFormatter(logs.Formatter(logs.FORMAT, logs.DATEFMT))
    for text, when in (("before", midnight - 0.5), ("after", midnight), ("later", midnight + 1.5),
                       ("late again", midnight - 0.25)):
        h.emit(record(text, when))
    h.close()
    day = {t: time.strftime("%Y-%m-%d", time.localtime(t)) for t in (midnight - 1, midnight)}
    stamp = {t: time.strftime(logs.DATEFMT, time.localtime(t))
             for t in (midnight - 1, midnight, midnight + 1)}
    assert (tmp_path / f"mailengine-{day[midnight - 1]}.log").read_text() == \
        f"{stamp[midnight - 1]} before\n{stamp[midnight - 1]} late again\n"
    assert (tmp_path / f"mailengine-{day[midnight]}.log").read_text() == \
        f"{stamp[midnight]} after\n{stamp[midnight + 1]} later\n"
    h = logs.DailyFileHandler(tmp_path, retention_days=10)
    h.setFormatter(logs.Formatter(logs.FORMAT, logs.DATEFMT))
    calls = []
    strftime = time.strftime
    monkeypatch.setattr(time, "strftime", lambda *a: calls.append(a) or strftime(*a))
    for n in range(100):  # one second: its day (and pruning) once, its time once
        h.emit(record(f"line {n}", midnight + 7.25 + n / 1000))
    h.close()
    assert len(calls) <= 3
