"""Low disk space on a real small volume (a 4 MB tmpfs): new mail is refused with 452 4.3.1
while space is low, the admin is told, mail is accepted again when space returns, and a disk
that fills between two checks makes a 452, never a 250 for a message that was not stored."""
from __future__ import annotations

import os
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from mailengine.diskwatch import DiskWatch, free_bytes
from mailengine.envelope import parse_inf
from mailengine.testing.engine import RunningEngine


@pytest.fixture
def small_volume(tmp_path):
    """A 4 MB tmpfs mounted on tmp_path/vol (needs root), unmounted afterwards."""
    vol = tmp_path / "vol"
    vol.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(vol)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield vol
    finally:
        subprocess.run(["umount", "-l", str(vol)], check=False)


def fill(vol: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about `leave_bytes` free."""
    ballast = vol / "ballast"
    size = max(0, free_bytes(vol) - leave_bytes)
    with open(ballast, "wb") as f:
        f.write(b"\0" * size)
    return ballast


def wait(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class FakePolicy:
    refuse_new_mail = None


def test_watch_sets_and_clears_the_refusal(small_volume):
    p = FakePolicy()
    w = DiskWatch(small_volume, p, 1.0, quiet=True)
    assert w.check() is None and p.refuse_new_mail is None
    ballast = fill(small_volume, 512 * 1024)
    assert w.check() is True
    assert (p.refuse_new_mail.code, p.refuse_new_mail.enhanced) == (452, "4.3.1")
    assert w.check() is None  # said once
    ballast.unlink()
    assert w.check() is False and p.refuse_new_mail is None
    assert DiskWatch(small_volume, p, 0).check() is None  # 0 = off


def mail_status(port: int, data: bytes = b"Subject: t\r\n\r\nhello\r\n") -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        try:
            s.sendmail("app@src.test", ["x@dest.test"], data)
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            return code, text.decode()
    return 250, "ok"


def test_engine_refuses_while_low_and_tells_the_admin(small_volume):
    home = small_volume / "home"
    with RunningEngine(home, {"basic.min_free_disk_mb": 1.5,
                              "basic.admin_email": "admin@ops.test",
                              "logging.log_retention_days": 0}) as eng:
        assert mail_status(eng.smtp_port)[0] == 250
        ballast = fill(small_volume, 1024 * 1024)
        time.sleep(1.5)  # the watcher looks every second
        code, text = mail_status(eng.smtp_port)
        assert code == 452 and text.startswith("4.3.1 ")
        # the admin's alert waits in the queue (delivery is paused in tests), from <>
        def alerts():
            out = []
            for p in (eng.mailq / "retry").glob("*.inf"):
                m = parse_inf(p.read_bytes(), p.name[:-4])
                if m.extra.get("generated") == "alert":
                    out.append(m)
            return out
        wait(lambda: len(alerts()) == 1, what="the alert")
        alert, = alerts()
        assert alert.mail_from == "" and alert.rcpt_to_send == ["admin@ops.test"]
        body = (eng.mailq / "retry" / f"{alert.id}.dat").read_text()
        assert "Subject: MailEngine on " in body and "low disk space" in body
        assert "452 4.3.1" in body
        ballast.unlink()
        wait(lambda: mail_status(eng.smtp_port)[0] == 250, what="accepting again")
        wait(lambda: len(alerts()) == 2, what="the all-clear")
        relayed = [p for p in (eng.mailq / "retry").glob("*.inf")
                   if "generated" not in p.read_text()]
        assert len(relayed) == 2  # the two accepted messages; the refused one is not there
    out = eng.output.decode()
    assert "LOW DISK SPACE" in out and "accepting new mail again" in out


def test_a_disk_already_low_at_start_tells_the_admin(tmp_path):
    """Issue 15.9: low at start (a threshold above any disk's free space) is a state the admin
    must hear of, not only a change while running; once, not every second."""
    with RunningEngine(tmp_path, {"basic.min_free_disk_mb": 10 ** 9,
                                  "basic.admin_email": "admin@ops.test"}) as eng:
        assert mail_status(eng.smtp_port)[0] == 452

        def alerts():
            return [p for p in (eng.mailq / "retry").glob("*.inf")
                    if parse_inf(p.read_bytes(), p.name[:-4]).extra.get("generated") == "alert"]
        wait(lambda: alerts(), what="the alert")
        time.sleep(2.5)  # the watcher looks every second: no second alert
        alert, = alerts()
        assert "low disk space" in alert.with_suffix(".dat").read_text()


def test_a_disk_that_fills_between_checks_gets_452_not_250(small_volume):
    """No watcher (threshold 0): the store itself fails for lack of space and the client is told
    to try again; nothing half-written is left in the queue."""
    home = small_volume / "home"
    with RunningEngine(home, {"basic.min_free_disk_mb": 0,
                              "logging.log_retention_days": 0}) as eng:
        ballast = fill(small_volume, 64 * 1024)
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 300  # 300 KB
        code, text = mail_status(eng.smtp_port, big)
        assert code == 452 and text.startswith("4.3.1 "), (code, text)
        assert not list((eng.mailq / "retry").iterdir())
        ballast.unlink()
        assert mail_status(eng.smtp_port, big)[0] == 250
        assert len(list((eng.mailq / "retry").glob("*.dat"))) == 1
