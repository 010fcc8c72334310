"""Who may read the queue and the logs: the engine's user only, or its group too when the
operator asks (`basic.group_readable`).

Queued mail (`mailq/*/ID.dat`) and the logs (`log/`, `log/events.jsonl`) hold every message and
every address the engine handles. The engine therefore runs under a umask that keeps what it
creates private (directories 0700, files 0600; 0750 and 0640 with `group_readable`): the spool,
the logs, the lists and the daemon's output all inherit it, and so do the intake worker
processes. At start the existing queue and log directories are set to the same mode, so a home
made by an older release (mailq/ 0755, .dat 0644) is closed too: a file in a directory others
may not enter cannot be opened by them, whatever its own mode.
"""
from __future__ import annotations

import logging
import os

from .config import Config
from .queue_dirs import DIRS
from .spool import SPARE_DIR
from .spare import NEW as SPARE_NEW

log = logging.getLogger("mailengine")


def modes(cfg: Config) -> tuple[int, int]:
    """(umask, directory mode) for this engine's settings."""
    if cfg.basic.group_readable:
        return 0o027, 0o750
    return 0o077, 0o700


def restrict(cfg: Config, test_mode: bool = False) -> None:
    """Set the process's umask and the modes of the queue and log directories (made if
    missing), and of the log files already there. Errors (a directory of another owner) are
    logged, never fatal: the engine still runs."""
    umask, dir_mode = modes(cfg)
    os.umask(umask)
    file_mode = 0o666 & ~umask
    mailq = cfg.mailq(test_mode)
    dirs = [mailq, *(mailq / d for d in DIRS), mailq / SPARE_DIR, mailq / SPARE_DIR / SPARE_NEW,
            cfg.log_dir]
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, dir_mode)
        except OSError as e:
            log.warning("cannot set the mode of %s to %o: %s", d, dir_mode, e)
    try:
        entries = list(os.scandir(cfg.log_dir))
    except OSError:
        entries = []
    for e in entries:  # a few daily files and the JSON-lines logs
        try:
            if e.is_file(follow_symlinks=False):
                os.chmod(e.path, file_mode)
        except OSError as ex:
            log.warning("cannot set the mode of %s to %o: %s", e.path, file_mode, ex)
