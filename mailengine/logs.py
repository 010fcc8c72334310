"""Console and daily log files in HOME/log/ (kept `logging.log_retention_days`; 0 = no files).

A new file is opened when the day changes (by the time of the record); old files are pruned then,
at start, and hourly by the engine (`prune`), so a quiet engine keeps no more than it should.
`debug.program` traces the program's internal steps on the logger `mailengine.program` (PROGRAM):
each message stored or picked up, taken into memory or left on disk, every unit handed to
delivery and every attempt's end with its next try; `program_trace()` turns it on and off. The
other `debug.*` switches log their traces at INFO level where they happen (inbound, delivery,
dns, app).
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from .last_one import LastOne

PROGRAM = logging.getLogger("mailengine.program")  # debug.program: PROGRAM.debug(...) lines
FORMAT = "%(asctime)s %(message)s"
DATEFMT = "%Y/%m/%d %H:%M:%S"
# log.info(text, extra={EACH_LINE: True}): every line of a many-line message gets the time, as
# if each were a record of its own (delivery's one line per delivered recipient, written as one
# record per attempt: a record per line cost 19 us a recipient).
EACH_LINE = "each_line"
# log.info(text, extra={FILE_ONLY: True}): for the daily file only, not the console, while there
# is a file (delivery's lines, thousands a second on a busy engine: a terminal cannot follow
# them, and writing them twice cost delivery 3 % of its time in bench/relay.py).
FILE_ONLY = "file_only"


def _not_file_only(record: logging.LogRecord) -> bool:
    return not getattr(record, FILE_ONLY, False)


class Formatter(logging.Formatter):
    # The time field is made once a second, not for every record (a record per delivery
    # attempt: strftime was a tenth of logging it).
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stamp = LastOne(lambda key: time.strftime(key[1], self.converter(key[0])))

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is None or "%f" in datefmt:  # sub-second: as logging makes it
            return super().formatTime(record, datefmt)
        return self._stamp((int(record.created), datefmt))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if getattr(record, EACH_LINE, False):
            text = text.replace("\n", "\n" + record.asctime + " ")
        return text


class DailyFileHandler(logging.Handler):
    """Writes to log/mailengine-YYYY-MM-DD.log, opening a new file when the day changes and
    deleting files older than the retention."""

    def __init__(self, directory: Path, retention_days: int):
        super().__init__()
        self.directory = Path(directory)
        self.retention_days = retention_days
        self.day = ""
        self.stream = None
        self._today = (0.0, 0.0)  # [start, end) of self.day, so most records need no strftime
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, day: str) -> Path:
        return self.directory / f"mailengine-{day}.log"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            start, end = self._today
            if not start <= record.created < end:
                day, self._today = _day_of(record.created)
                if day != self.day:
                    if self.stream:
                        self.stream.close()
                    self.day = day
                    self.stream = open(self.path_for(day), "a", encoding="utf-8")
                    self.prune()
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except Exception:
            self.handleError(record)

    def prune(self, now: float | None = None) -> list[Path]:
        return prune(self.directory, self.retention_days, now, keep=self.path_for(self.day))

    def close(self) -> None:
        if self.stream:
            self.stream.close()
            self.stream = None
        super().close()


def _day_of(t: float) -> tuple[str, tuple[float, float]]:
    """The local day of `t` (YYYY-MM-DD), and when it starts and ends."""
    lt = time.localtime(t)
    start = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1))
    end = time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday + 1, 0, 0, 0, 0, 0, -1))
    return time.strftime("%Y-%m-%d", lt), (start, end)


def prune(directory: Path, retention_days: int, now: float | None = None,
          keep: Path | None = None) -> list[Path]:
    """Delete daily files older than `retention_days` days: today's file and the files of the
    `retention_days - 1` days before it stay (10 = ten days of logs). The day is read from the
    file name (mailengine-YYYY-MM-DD.log), so copying or touching a file does not keep it."""
    if retention_days <= 0:
        return []
    now = time.time() if now is None else now
    oldest = time.strftime("%Y-%m-%d", time.localtime(now - (retention_days - 1) * 86400))
    gone = []
    for f in Path(directory).glob("mailengine-*.log"):
        day = f.name[len("mailengine-"):-len(".log")]
        if len(day) == 10 and day < oldest and f != keep:
            try:
                f.unlink()
                gone.append(f)
            except OSError:
                pass
    return gone


def program_trace(on: bool) -> None:
    """`debug.program`: the internal-step lines are written (or not), whatever the others say."""
    PROGRAM.setLevel(logging.DEBUG if on else logging.INFO)


def tracing() -> bool:
    """Cheap check for hot paths: is `debug.program` on?"""
    return PROGRAM.isEnabledFor(logging.DEBUG)


def setup(log_dir: Path, retention_days: int, debug_any: bool = False,
          console=sys.stderr, program: bool = False) -> None:
    program_trace(program)
    # FORMAT names no thread, process or source line: not gathering them takes a fifth off
    # each record (a line per delivered message)
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None
    root = logging.getLogger("mailengine")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG if debug_any else logging.INFO)
    root.propagate = False
    fmt = Formatter(FORMAT, DATEFMT)
    con = logging.StreamHandler(console)
    con.setFormatter(fmt)
    root.addHandler(con)
    if retention_days > 0:
        fh = DailyFileHandler(log_dir, retention_days)
        fh.setFormatter(fmt)
        root.addHandler(fh)
        con.addFilter(_not_file_only)


def set_retention(log_dir: Path, retention_days: int) -> list[Path]:
    """`logging.log_retention_days` changed while running: the daily file handler keeps the new
    number of days (files older are removed now, returned), is added when it goes from 0 to
    more, and removed at 0 (no log files)."""
    root = logging.getLogger("mailengine")
    files = [h for h in root.handlers if isinstance(h, DailyFileHandler)]
    consoles = [h for h in root.handlers if not isinstance(h, DailyFileHandler)]
    if retention_days <= 0:
        for h in files:
            root.removeHandler(h)
            h.close()
        for h in consoles:  # no file: the console shows everything
            h.removeFilter(_not_file_only)
        return []
    if not files:
        fh = DailyFileHandler(log_dir, retention_days)
        fh.setFormatter(Formatter(FORMAT, DATEFMT))
        root.addHandler(fh)
        files = [fh]
    for h in consoles:
        h.addFilter(_not_file_only)
    for h in files:
        h.retention_days = retention_days
    return prune(log_dir, retention_days,
                 keep=files[0].path_for(files[0].day) if files[0].day else None)


def debug_any(cfg) -> bool:
    """Any trace switch of a config.Config on: the process then logs at DEBUG."""
    return any(cfg.values[f"debug.{k}"] for k in ("dns", "smtp_out", "smtp_in", "program",
                                                   "send_loop"))
