"""`mailengine install-service` / `remove-service`: the manual's Windows service, the Linux way.

install-service writes a systemd unit that runs `mailengine --home HOME start` as a given user,
restarts it when it fails, stops it with SIGTERM (the engine's clean stop: it stops accepting,
finishes messages in flight, leaves the rest in mailq/retry) and gives it TimeoutStopSec to do
so. It prints what it wrote and the `systemctl` lines to run; it starts nothing itself. Where
systemd is not running it refuses, unless `--unit-dir DIR` asks for the file somewhere else (to
copy it to a machine that has systemd, or for tests). The unit is checked with
`systemd-analyze verify` when that tool is installed.
"""
from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import NAME, config

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_UNIT = "mailengine.service"
MARKER = "# Written by mailengine install-service"
TIMEOUT_STOP_SECONDS = 90  # inbound drain (10 s) + delivery grace (5 s) + intake workers (15 s)
RESTART_SECONDS = 5


def systemd_running() -> bool:
    """sd_booted(): systemd is the init system of this machine."""
    return os.path.isdir("/run/systemd/system")


def exec_command(home: Path) -> list[str]:
    """How the unit runs the engine: the `mailengine` script of this installation, else this
    Python with `-m mailengine.cli` (same code either way)."""
    script = Path(sys.executable).parent / "mailengine"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), "--home", str(home), "start"]
    return [sys.executable, "-m", "mailengine.cli", "--home", str(home), "start"]


def _quote(arg: str) -> str:
    """One ExecStart argument, quoted the way systemd reads it."""
    if arg and not re.search(r'[\s"\'\\$%;]', arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$") \
        .replace("%", "%%") + '"'


def unit_text(cfg: config.Config, user: str, group: str) -> str:
    home = cfg.home
    privileged = [p for p in (cfg.network.smtp_port, cfg.network.web_port) if 1 < p < 1024]
    caps = ""
    if privileged and user != "root":
        caps = ("# lets the engine bind port(s) "
                + ", ".join(str(p) for p in privileged) + " without being root\n"
                "AmbientCapabilities=CAP_NET_BIND_SERVICE\n"
                "CapabilityBoundingSet=CAP_NET_BIND_SERVICE\n")
    need_fds = cfg.limits.max_outbound_connections + cfg.limits.max_inbound_connections + 64
    nofile = max(65536, need_fds)
    return f"""{MARKER} ({NAME}); remove it with mailengine remove-service.
[Unit]
Description={NAME} mail transfer agent ({home})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={group}
WorkingDirectory={str(home).replace("%", "%%")}
ExecStart={" ".join(_quote(a) for a in exec_command(home))}
Restart=on-failure
RestartSec={RESTART_SECONDS}
# A clean stop: SIGTERM to the engine, which stops its intake worker processes itself; what is
# still running after TimeoutStopSec gets SIGKILL (queued mail is on disk either way).
KillSignal=SIGTERM
KillMode=mixed
TimeoutStopSec={TIMEOUT_STOP_SECONDS}
LimitNOFILE={nofile}
{caps}
[Install]
WantedBy=multi-user.target
"""


def verify(path: Path) -> tuple[bool | None, str]:
    """`systemd-analyze verify` on the unit: (True/False, what it said), or (None, why not)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return None, "systemd-analyze is not installed (Debian: apt-get install systemd)"
    r = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True,
                       timeout=60, cwd=path.parent)
    said = (r.stdout + r.stderr).strip()
    return r.returncode == 0 and not said, said


def _parser(prog: str, install: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog)
    if install:
        p.add_argument("--user", help="run the engine as this user (default: the owner of the "
                                      "home directory when run as root, else you)")
        p.add_argument("--force", action="store_true", help="replace a different unit file")
    p.add_argument("--unit-dir", help=f"where the unit goes (default {SYSTEM_UNIT_DIR}); allows "
                                      "writing it where systemd is not running")
    p.add_argument("--name", default=DEFAULT_UNIT,
                   help=f"unit name (default {DEFAULT_UNIT}; one per home directory)")
    return p


def _unit_path(args, what: str) -> Path:
    name = args.name if args.name.endswith(".service") else args.name + ".service"
    if "/" in name or not re.fullmatch(r"[A-Za-z0-9:_.@\\-]+", name):
        raise SystemExit(f"{what}: {name!r} is not a unit name")
    if args.unit_dir:
        return Path(args.unit_dir).absolute() / name
    if not systemd_running():
        raise SystemExit(
            f"{what}: systemd is not running on this machine (no /run/systemd/system), so there "
            "is no service manager to install into. Run the engine with `mailengine -bd` (pid "
            "file) or under your own supervisor, or write the unit elsewhere with --unit-dir DIR.")
    return SYSTEM_UNIT_DIR / name


def install_main(cfg: config.Config, argv: list[str]) -> int:
    args = _parser("mailengine install-service", True).parse_args(argv)
    path = _unit_path(args, "install-service")
    user = args.user
    if user is None:
        user = (pwd.getpwuid(os.stat(cfg.home).st_uid).pw_name if os.geteuid() == 0
                else pwd.getpwuid(os.geteuid()).pw_name)
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        print(f"install-service: there is no user {user!r} on this machine", file=sys.stderr)
        return 2
    group = grp.getgrgid(pw.pw_gid).gr_name
    text = unit_text(cfg, user, group)
    if path.exists():
        old = path.read_text(errors="replace")
        if old == text:
            print(f"{path} is already installed and unchanged.")
            print_next_steps(path, cfg, user, fresh=False)
            return 0
        if not args.force:
            print(f"install-service: {path} exists and differs"
                  + ("" if MARKER in old else " (and was not written by mailengine)")
                  + "; --force replaces it", file=sys.stderr)
            return 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except PermissionError:
        print(f"install-service: cannot write {path}: permission denied (run it as root, or "
              "choose --unit-dir)", file=sys.stderr)
        return 1
    print(f"Wrote {path}: runs `{' '.join(exec_command(cfg.home))}` as user {user}, "
          f"restarts it on failure, stops it with SIGTERM and waits up to "
          f"{TIMEOUT_STOP_SECONDS} s for the clean stop.")
    if pw.pw_uid != 0 and not _writable_by(cfg.home, pw):
        print(f"warning: {cfg.home} is not writable by {user}: the engine must write mailq/ and "
              f"log/ there (chown -R {user}: {cfg.home})")
    ok, said = verify(path)
    if ok is None:
        print(f"(not checked: {said})")
    elif ok:
        print("systemd-analyze verify: no complaints.")
    else:
        print(f"systemd-analyze verify says:\n{said}")
    print_next_steps(path, cfg, user, fresh=True)
    return 0 if ok is not False else 1


def _writable_by(home: Path, pw) -> bool:
    st = os.stat(home)
    if st.st_uid == pw.pw_uid:
        return bool(st.st_mode & 0o200)
    if st.st_gid == pw.pw_gid:
        return bool(st.st_mode & 0o020)
    return bool(st.st_mode & 0o002)


def print_next_steps(path: Path, cfg: config.Config, user: str, fresh: bool) -> None:
    name = path.name
    if path.parent != SYSTEM_UNIT_DIR:
        print(f"Copy it to {SYSTEM_UNIT_DIR}/ on the machine that runs the engine, then:")
    else:
        print("Then, to start it now and at every boot:")
    print("  systemctl daemon-reload")
    print(f"  systemctl enable --now {name}")
    print(f"  systemctl status {name}")
    print(f"  journalctl -u {name} -f          # its console; daily logs in {cfg.log_dir}")
    print(f"  systemctl stop {name}            # the clean stop (SIGTERM)")


def remove_main(cfg: config.Config, argv: list[str]) -> int:
    args = _parser("mailengine remove-service", False).parse_args(argv)
    path = _unit_path(args, "remove-service")
    if not path.exists():
        print(f"remove-service: there is no {path}", file=sys.stderr)
        return 1
    if MARKER not in path.read_text(errors="replace"):
        print(f"remove-service: {path} was not written by mailengine install-service; "
              "left alone", file=sys.stderr)
        return 1
    name = path.name
    if not args.unit_dir and shutil.which("systemctl"):
        active = subprocess.run(["systemctl", "is-active", "--quiet", name]).returncode == 0
        if active:
            print(f"remove-service: {name} is running; stop it first:\n"
                  f"  systemctl disable --now {name}", file=sys.stderr)
            return 1
    wants = path.parent / "multi-user.target.wants" / name
    if wants.is_symlink():
        wants.unlink()  # what `systemctl disable` would remove
        print(f"Removed {wants}")
    path.unlink()
    print(f"Removed {path}.")
    if path.parent == SYSTEM_UNIT_DIR:
        print("Then:\n  systemctl daemon-reload")
    return 0
