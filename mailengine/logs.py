"""Console and daily log files in HOME/log/ (kept `logging.log_retention_days`; 0 = no files)."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

FORMAT = "%(asctime)s %(message)s"
DATEFMT = "%Y/%m/%d %H:%M:%S"


class DailyFileHandler(logging.Handler):
    """Writes to log/mailengine-YYYY-MM-DD.log, opening a new file when the day changes and
    deleting files older than the retention."""

    def __init__(self, directory: Path, retention_days: int):
        super().__init__()
        self.directory = Path(directory)
        self.retention_days = retention_days
        self.day = ""
        self.stream = None
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, day: str) -> Path:
        return self.directory / f"mailengine-{day}.log"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            day = time.strftime("%Y-%m-%d", time.localtime(record.created))
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

    def prune(self) -> None:
        cutoff = time.time() - self.retention_days * 86400
        for f in self.directory.glob("mailengine-*.log"):
            if f.stat().st_mtime < cutoff and f != self.path_for(self.day):
                f.unlink(missing_ok=True)

    def close(self) -> None:
        if self.stream:
            self.stream.close()
            self.stream = None
        super().close()


def setup(log_dir: Path, retention_days: int, debug_any: bool = False,
          console=sys.stderr) -> None:
    root = logging.getLogger("mailengine")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.DEBUG if debug_any else logging.INFO)
    root.propagate = False
    fmt = logging.Formatter(FORMAT, DATEFMT)
    con = logging.StreamHandler(console)
    con.setFormatter(fmt)
    root.addHandler(con)
    if retention_days > 0:
        fh = DailyFileHandler(log_dir, retention_days)
        fh.setFormatter(fmt)
        root.addHandler(fh)
