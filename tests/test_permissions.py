"""The queue and the logs are private to the engine's user (filemodes.py), its group only when
`basic.group_readable`; operators name messages by well-formed ids only."""
from __future__ import annotations

import json
import os
import smtplib
import stat
import subprocess
import sys

from mailengine.testing.engine import RunningEngine


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def queue_one(eng: RunningEngine) -> str:
    with smtplib.SMTP("127.0.0.1", eng.smtp_port, timeout=10) as s:
        s.sendmail("a@example.org", ["r@dest.test"], b"Subject: secret\r\n\r\nsecret\r\n")
    inf, = (eng.mailq / "retry").glob("*.inf")
    return inf.name[:-4]


def cli(home, *args):
    return subprocess.run([sys.executable, "-m", "mailengine.cli", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=30)


def test_queue_and_logs_are_the_engine_users_only(tmp_path):
    # A home of an older release: everything readable by all.
    for d in ("mailq", "mailq/retry", "log"):
        (tmp_path / d).mkdir(parents=True)
        os.chmod(tmp_path / d, 0o755)
    (tmp_path / "log" / "events.jsonl").write_text("{}\n")
    os.chmod(tmp_path / "log" / "events.jsonl", 0o644)
    with RunningEngine(tmp_path, {"network.intake_workers": 2}) as eng:  # workers store it
        msg_id = queue_one(eng)
        retry = eng.mailq / "retry"
        assert mode(eng.mailq) == 0o700
        for d in ("retry", "working", "done", "incoming", "spare"):
            assert mode(eng.mailq / d) == 0o700, d
        assert mode(retry / f"{msg_id}.dat") == 0o600
        assert mode(retry / f"{msg_id}.inf") == 0o600
        assert mode(tmp_path / "log") == 0o700
        assert mode(tmp_path / "log" / "events.jsonl") == 0o600
        for f in (tmp_path / "log").glob("mailengine-*.log"):
            assert mode(f) == 0o600
        assert mode(tmp_path / "mailengine.lock") == 0o600


def test_group_readable_opens_them_to_the_group_only(tmp_path):
    with RunningEngine(tmp_path, {"basic.group_readable": True}) as eng:
        msg_id = queue_one(eng)
        assert mode(eng.mailq) == 0o750
        assert mode(eng.mailq / "retry") == 0o750
        assert mode(eng.mailq / "retry" / f"{msg_id}.dat") == 0o640
        assert mode(tmp_path / "log") == 0o750


def test_queue_show_accepts_only_well_formed_ids(tmp_path):
    (tmp_path / "x.inf").write_text("messageid=x\nmailfrom=a@b\n")
    (tmp_path / "secret.inf").write_text("password=hunter2\n")
    with RunningEngine(tmp_path) as eng:
        msg_id = queue_one(eng)
        for bad in ("../../x", "../../secret", ".hidden", "a b"):
            out = cli(tmp_path, "queue", "show", bad)  # through the running engine
            assert out.returncode == 2, out.stdout + out.stderr
            assert "is not a message id" in out.stderr
            assert "hunter2" not in out.stdout + out.stderr
            out = cli(tmp_path, "queue", "hold", bad)
            assert out.returncode == 2 and "is not a message id" in out.stderr
        from mailengine import control
        try:
            control.request(tmp_path / "mailengine.sock", "queue.show", id="../../secret")
            raise AssertionError("the control socket showed a file outside the queue")
        except control.ControlError as e:
            assert "is not a message id" in str(e)
        shown = cli(tmp_path, "queue", "--json", "show", msg_id)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["record"]["id"] == msg_id
    # the stopped engine's files: the same rule
    out = cli(tmp_path, "queue", "show", "../../secret")
    assert out.returncode == 2 and "is not a message id" in out.stderr
    assert "hunter2" not in out.stdout
