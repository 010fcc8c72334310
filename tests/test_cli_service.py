"""`mailengine install-service` / `remove-service`: the unit written, checked by
`systemd-analyze verify` where installed, and its ExecStart run the way systemd would run it
(then stopped with its KillSignal within its TimeoutStopSec). No service is ever started."""
from __future__ import annotations

import configparser
import os
import pwd
import shlex
import shutil
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from mailengine import service
from mailengine.testing.engine import free_port, wait_for_port, write_config

from test_cli_queue import run_cli

ME = pwd.getpwuid(os.geteuid()).pw_name


def read_unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    unit.read_string(path.read_text())
    return unit


def make_home(tmp_path: Path, **settings) -> Path:
    home = tmp_path / "home"
    write_config(home, {"network.smtp_port": free_port(), "network.web_port": 0,
                        "network.smtp_listen_ips": ["127.0.0.1"], "queue.pause_sending": True,
                        "network.intake_workers": 1, "logging.stats_interval": 0, **settings})
    return home


def test_install_writes_the_unit_and_says_what_to_run(tmp_path):
    home = make_home(tmp_path)
    units = tmp_path / "units"
    code, out = run_cli(home, "install-service", "--unit-dir", str(units), "--user", ME)
    path = units / "mailengine.service"
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o644
    s = read_unit(path)["Service"]
    argv = shlex.split(s["ExecStart"])
    assert argv[-3:] == ["--home", str(home), "start"]
    assert argv[0].endswith("/mailengine") or argv[1:3] == ["-m", "mailengine.cli"]
    assert s["User"] == ME and s["WorkingDirectory"] == str(home)
    assert s["Restart"] == "on-failure" and s["KillSignal"] == "SIGTERM"
    assert int(s["TimeoutStopSec"]) >= 60 and int(s["LimitNOFILE"]) >= 65536
    assert read_unit(path)["Install"]["WantedBy"] == "multi-user.target"
    assert f"Wrote {path}: runs `" in out and f"as user {ME}" in out
    for line in ("systemctl daemon-reload", "systemctl enable --now mailengine.service",
                 "systemctl stop mailengine.service", "journalctl -u mailengine.service"):
        assert line in out
    # the same again: unchanged; a different one needs --force
    code, out = run_cli(home, "install-service", "--unit-dir", str(units), "--user", ME)
    assert code == 0 and "already installed and unchanged" in out
    path.write_text(path.read_text().replace("RestartSec=5", "RestartSec=7"))
    code, out = run_cli(home, "install-service", "--unit-dir", str(units), "--user", ME)
    assert code == 1 and "exists and differs; --force replaces it" in out
    assert "RestartSec=7" in path.read_text()
    code, out = run_cli(home, "install-service", "--unit-dir", str(units), "--user", ME,
                        "--force")
    assert "RestartSec=5" in path.read_text()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian package systemd)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    home = make_home(tmp_path)
    units = tmp_path / "units"
    code, out = run_cli(home, "install-service", "--unit-dir", str(units), "--user", ME,
                        "--name", "mailengine-test")
    assert "systemd-analyze verify: no complaints." in out
    assert code == 0
    r = subprocess.run(["systemd-analyze", "verify", str(units / "mailengine-test.service")],
                       capture_output=True, text=True, cwd=units)
    assert r.returncode == 0 and r.stdout + r.stderr == ""


def test_port_25_as_an_ordinary_user_gets_the_bind_capability(tmp_path):
    home = make_home(tmp_path, **{"network.smtp_port": 25})
    user = next((u for u in ("daemon", "mail", "bin") if _exists(u)), None)
    if user is None:
        pytest.skip("no ordinary system user here")
    code, out = run_cli(home, "install-service", "--unit-dir", str(tmp_path), "--user", user)
    s = read_unit(tmp_path / "mailengine.service")["Service"]
    assert s["User"] == user
    assert s["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert f"is not writable by {user}" in out  # the home belongs to someone else
    # as root the capability is not needed
    run_cli(home, "install-service", "--unit-dir", str(tmp_path / "r"), "--user", "root")
    assert "AmbientCapabilities" not in (tmp_path / "r" / "mailengine.service").read_text()


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def test_exec_start_runs_the_engine_and_the_kill_signal_stops_it_cleanly(tmp_path):
    home = make_home(tmp_path)
    run_cli(home, "install-service", "--unit-dir", str(tmp_path), "--user", ME)
    s = read_unit(tmp_path / "mailengine.service")["Service"]
    port = int((home / "mailengine.toml").read_text().split("smtp_port = ")[1].split()[0])
    with open(tmp_path / "console.txt", "wb") as console:
        proc = subprocess.Popen(shlex.split(s["ExecStart"]), cwd=s["WorkingDirectory"],
                                stdout=console, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", port, 20, proc)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
                assert smtp.sendmail("a@src.test", ["b@dst.test"], b"Subject: x\r\n\r\ny\r\n") == {}
            t0 = time.monotonic()
            proc.send_signal(getattr(signal, s["KillSignal"]))
            rc = proc.wait(int(s["TimeoutStopSec"]))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert rc == 0 and time.monotonic() - t0 < 15  # Restart=on-failure: a clean stop stays down
    assert len(list((home / "mailq" / "retry").glob("*.inf"))) == 1
    assert "stopped cleanly" in (tmp_path / "console.txt").read_text()


def test_refusals(tmp_path):
    home = make_home(tmp_path)
    if not service.systemd_running():
        code, out = run_cli(home, "install-service")
        assert code == 1 and "systemd is not running on this machine" in out
        assert "--unit-dir" in out
        code, out = run_cli(home, "remove-service")
        assert code == 1 and "systemd is not running on this machine" in out
    code, out = run_cli(home, "install-service", "--unit-dir", str(tmp_path), "--user",
                        "no-such-user-here")
    assert code == 2 and "there is no user 'no-such-user-here'" in out
    code, out = run_cli(home, "install-service", "--unit-dir", str(tmp_path), "--name", "a/b")
    assert code == 1 and "is not a unit name" in out
    assert not list(tmp_path.glob("*.service"))


def test_remove_service(tmp_path):
    home = make_home(tmp_path)
    units = tmp_path / "units"
    run_cli(home, "install-service", "--unit-dir", str(units), "--user", ME)
    wants = units / "multi-user.target.wants"
    wants.mkdir()
    (wants / "mailengine.service").symlink_to(units / "mailengine.service")
    code, out = run_cli(home, "remove-service", "--unit-dir", str(units))
    assert code == 0 and f"Removed {units / 'mailengine.service'}" in out
    assert not (units / "mailengine.service").exists()
    assert not (wants / "mailengine.service").is_symlink()
    code, out = run_cli(home, "remove-service", "--unit-dir", str(units))
    assert code == 1 and "there is no" in out
    (units / "mailengine.service").write_text("[Service]\nExecStart=/bin/true\n")
    code, out = run_cli(home, "remove-service", "--unit-dir", str(units))
    assert code == 1 and "not written by mailengine install-service" in out
    assert (units / "mailengine.service").exists()


def test_the_manuals_install_and_remove_spellings(tmp_path):
    """Issue 15.9: `mailengine -install` / `-remove` (the manual's words) are install-service and
    remove-service."""
    home = make_home(tmp_path)
    units = tmp_path / "units"
    code, out = run_cli(home, "-install", "--unit-dir", str(units), "--user", ME)
    assert code == 0 and f"Wrote {units / 'mailengine.service'}" in out
    code, out = run_cli(home, "-remove", "--unit-dir", str(units))
    assert code == 0 and f"Removed {units / 'mailengine.service'}" in out
    assert not (units / "mailengine.service").exists()
