"""Free space on the queue's volume (SPEC 6, alerts): refuse new mail before the disk is full.

Every CHECK_SECONDS the watcher reads the free space of the file system holding `mailq/`. Below
`basic.min_free_disk_mb` (0 = never) it

- sets `policy.refuse_new_mail`, so every new MAIL FROM gets `452 4.3.1 Insufficient system
  storage` (a temporary refusal: the client keeps the message and tries again later);
- logs one warning line;
- mails `basic.admin_email` once (from `<>`, queued like any mail; the threshold leaves room),
  also when the space is already low at start;

and when the space is back (HYSTERESIS above the threshold, so it does not flap) it clears the
refusal, logs it, and mails the admin again. Mail already accepted is never at risk: it is on
disk before its `250`, and a store that fails for lack of space answers `452 4.3.1`, not `250`
(intake.py), even between two checks.

Intake worker processes run their own watcher (no mail, no log line): each process has its own
policy object.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Awaitable, Callable

from .smtp.server import Reply

log = logging.getLogger("mailengine.diskwatch")

CHECK_SECONDS = 1.0
HYSTERESIS = 0.05  # resume at threshold * 1.05
REFUSAL = Reply(452, "4.3.1", "Insufficient system storage, try again later")

Alert = Callable[[bool, int, int], Awaitable[None]]  # (low, free bytes, threshold bytes)


def free_bytes(path: Path | str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskWatch:
    def __init__(self, path: Path | str, policy, min_free_mb: float,
                 alert: Alert | None = None, quiet: bool = False,
                 interval: float = CHECK_SECONDS) -> None:
        self.path = Path(path)
        self.policy = policy
        self.threshold = int(min_free_mb * 1024 * 1024)
        self.alert = alert
        self.quiet = quiet
        self.interval = interval
        self.low = False
        self.free = -1

    def set_threshold(self, min_free_mb: float) -> None:
        """`basic.min_free_disk_mb` changed while running: look again at once with the new
        threshold; 0 lifts a refusal in force (no check any more)."""
        self.threshold = int(min_free_mb * 1024 * 1024)
        if self.threshold <= 0 and self.low:
            self.low = False
            self.policy.refuse_new_mail = None
            if not self.quiet:
                log.warning("basic.min_free_disk_mb = 0: the free space check is off; accepting "
                            "new mail again")
            return
        self.check()

    def check(self) -> bool | None:
        """Look once; returns True/False when the state changed (now low / now fine), else None."""
        if self.threshold <= 0:
            return None
        try:
            self.free = free = free_bytes(self.path)
        except OSError as e:
            if not self.quiet:
                log.warning("cannot read the free space of %s: %s", self.path, e)
            return None
        if not self.low and free < self.threshold:
            self.low = True
            self.policy.refuse_new_mail = REFUSAL
            if not self.quiet:
                log.warning("LOW DISK SPACE: %s has %.1f MB free, less than "
                            "basic.min_free_disk_mb = %g; new mail is refused with 452 4.3.1 "
                            "until space returns", self.path, free / 1048576,
                            self.threshold / 1048576)
            return True
        if self.low and free >= self.threshold * (1 + HYSTERESIS):
            self.low = False
            self.policy.refuse_new_mail = None
            if not self.quiet:
                log.warning("disk space is back: %s has %.1f MB free; accepting new mail again",
                            self.path, free / 1048576)
            return False
        return None

    async def run(self) -> None:
        told = False  # the state the admin last heard of: fine, until told otherwise
        while True:
            self.check()
            # a state change, or a disk already low at start (the engine's first check came
            # before this loop): the admin is told once per change
            if self.low != told and self.alert is not None:
                try:
                    await self.alert(self.low, self.free, self.threshold)
                    told = self.low
                except Exception as e:  # no space for the alert itself: the log line stands
                    log.error("cannot queue the disk space alert: %s", e)
                    told = self.low  # said in the log; not retried every second
            await asyncio.sleep(self.interval)


def alert_message(admin: str, hostname: str, path: Path, low: bool, free: int,
                  threshold: int, now: datetime | None = None) -> bytes:
    now = now or datetime.now()
    if low:
        subject = f"MailEngine on {hostname}: low disk space, new mail refused"
        text = (f"The file system holding {path} has {free / 1048576:.1f} MB free, less than "
                f"basic.min_free_disk_mb = {threshold / 1048576:g} MB.\n\n"
                "New mail is refused with '452 4.3.1 Insufficient system storage' until space "
                "returns; senders keep their mail and try again later. Mail already accepted is "
                "safe in the queue and is still being delivered.\n\n"
                "Free some space (old log files, mailq/done, mailq/incoming) or enlarge the "
                "volume.\n")
    else:
        subject = f"MailEngine on {hostname}: disk space is back, accepting mail again"
        text = (f"The file system holding {path} has {free / 1048576:.1f} MB free again "
                f"(threshold {threshold / 1048576:g} MB). New mail is accepted again.\n")
    head = (f"From: MailEngine <MAILER-DAEMON@{hostname}>\nTo: <{admin}>\n"
            f"Subject: {subject}\nDate: {email.utils.format_datetime(now.astimezone())}\n"
            f"Message-ID: <{uuid.uuid4().hex}.alert@{hostname}>\n"
            "Auto-Submitted: auto-generated\nMIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=us-ascii\n\n")
    return (head + text).replace("\n", "\r\n").encode("ascii", "replace")


def for_engine(engine) -> DiskWatch:
    """The engine's watcher: log lines, and mail to basic.admin_email through notices.py."""
    cfg = engine.cfg
    root = engine.spool.root

    async def alert(low: bool, free: int, threshold: int) -> None:
        admin = cfg.basic.admin_email
        if not admin:
            return
        data = alert_message(admin, engine.hostname, root, low, free, threshold)
        await engine.notices.send([admin], data, "alert",
                                  "low disk space alert" if low else "disk space back notice")

    return DiskWatch(root, engine.policy, cfg.basic.min_free_disk_mb, alert)
