"""The `mailengine` command: start, -bd, shutdown, test, version, help, gettcpip, dkim.

    mailengine [--home DIR] [--SETTING VALUE ...] COMMAND

The home directory (config, mailq/, log/, password.txt) is --home, else $MAILENGINE_HOME, else the
current directory. Every setting can be overridden for one run by an option named after it:
`--smtp-port 2525`, `--relay-ips 0`, `--relay-via-disk false`.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import socket
import struct
import sys
import time
import tomllib
from pathlib import Path

from . import NAME, __version__, config

COMMANDS = {
    "start": "run in the foreground; Ctrl-C stops cleanly",
    "-bd": "run as a background daemon with a pid file; kill -15 $(cat PIDFILE) stops it",
    "shutdown": "stop a running engine (writes mailq/retry/shutdown.txt and waits)",
    "test": "test mode: runs as normal on mailq-test/, sends RSET+QUIT instead of DATA",
    "version": "print name and version",
    "help": "print this list",
    "gettcpip": "print this machine's first IP address",
    "dkim": "dkim genkey DOMAIN SELECTOR: make a DKIM key pair and print the DNS record",
}


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def parse_override(setting: config.Setting, text: str):
    """Command-line text -> a value for the setting (TOML syntax, or plain words)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    if setting.kind.startswith("list"):
        return [p.strip() for p in text.split(",") if p.strip()]
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mailengine", description=f"{NAME} {__version__}: a high-volume mail transfer agent",
        epilog="commands:\n" + "\n".join(f"  {c:<10} {d}" for c, d in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", help="home directory (default: $MAILENGINE_HOME or the current one)")
    settings = p.add_argument_group("settings (override mailengine.toml for this run)")
    for s in config.SETTINGS:
        settings.add_argument(option_name(s.key), dest=f"set:{s.name}", metavar="VALUE",
                              help=argparse.SUPPRESS)
    p.add_argument("command", nargs="?", default="help")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p


def load_config(ns) -> config.Config:
    cfg = config.load(config.resolve_home(ns.home))
    for name, text in vars(ns).items():
        if name.startswith("set:") and text is not None:
            setting = config.BY_NAME[name[4:]]
            cfg.set(setting.name, parse_override(setting, text))
    return cfg


def first_ip() -> str:
    """The first non-loopback IPv4 address of this machine's interfaces (no network traffic)."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr,
                                     struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            ip = socket.inet_ntoa(packed[20:24])
            if not ip.startswith("127."):
                return ip
    return "127.0.0.1"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cmd_shutdown(cfg: config.Config, wait_seconds: float = 60.0) -> int:
    pid = read_pid(cfg.pid_file)
    touched = []
    for test_mode in (False, True):
        retry = cfg.mailq(test_mode) / "retry"
        if retry.is_dir():
            (retry / "shutdown.txt").write_text("shutdown requested by mailengine shutdown\n")
            touched.append(retry / "shutdown.txt")
    if not touched:
        print(f"No queue in {cfg.home}: is MailEngine installed here? (use --home)")
        return 1
    deadline = time.monotonic() + wait_seconds
    if pid and pid_alive(pid):
        print(f"Asked MailEngine (pid {pid}) to stop; waiting...")
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            print(f"MailEngine (pid {pid}) is still running after {wait_seconds:g}s")
            return 1
        print("MailEngine stopped.")
        return 0
    # A foreground engine has no pid file: it deletes shutdown.txt once it has noticed it.
    noticed_by = time.monotonic() + 5
    while time.monotonic() < noticed_by:
        if all(not t.exists() for t in touched if t.parent.parent.name == "mailq"):
            print("MailEngine noticed the request and is stopping.")
            return 0
        time.sleep(0.1)
    print(f"Wrote {touched[0]}; no running engine noticed it yet "
          f"(it will stop as soon as one starts checking, or this file is removed at next start)")
    return 0


def daemonize(cfg: config.Config) -> None:
    """Classic double fork; the grandchild writes the pid file and runs the engine."""
    pid_path = cfg.pid_file
    old = read_pid(pid_path)
    if old and pid_alive(old):
        sys.exit(f"MailEngine is already running (pid {old}, {pid_path})")
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    if os.fork():
        # Parent: wait until the daemon has written its pid file, then report it.
        for _ in range(100):
            pid = read_pid(pid_path)
            if pid and pid != old and pid_alive(pid):
                print(f"MailEngine started in the background, pid {pid} ({pid_path})")
                os._exit(0)
            time.sleep(0.05)
        print(f"MailEngine did not start; see {cfg.log_dir / 'daemon.out'}")
        os._exit(1)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir(cfg.home)
    out = os.open(cfg.log_dir / "daemon.out", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    pid_path.write_text(f"{os.getpid()}\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-bd" in argv:  # the manual's spelling; argparse would read it as an option
        argv[argv.index("-bd")] = "daemon"
    ns = build_parser().parse_args(argv)
    command = ns.command
    if command in ("help", "-h"):
        build_parser().print_help()
        return 0
    if command == "version":
        print(f"{NAME} {__version__}")
        return 0
    if command == "gettcpip":
        print(first_ip())
        return 0
    if command == "dkim":
        from . import dkim
        if ns.args[:1] != ["genkey"]:
            print("Usage: mailengine dkim genkey DOMAIN SELECTOR [--algorithm rsa|ed25519]",
                  file=sys.stderr)
            return 2
        return dkim.genkey_main(ns.args[1:] + (["--home", ns.home] if ns.home else []))
    try:
        cfg = load_config(ns)
    except config.ConfigError as e:
        print(f"Configuration error: {e}", file=sys.stderr)
        return 2
    if command == "shutdown":
        return cmd_shutdown(cfg)
    if command in ("start", "test", "daemon"):
        from . import app
        if command == "daemon":
            daemonize(cfg)
        try:
            app.run(cfg, test_mode=command == "test")
        finally:
            if command == "daemon" and read_pid(cfg.pid_file) == os.getpid():
                cfg.pid_file.unlink(missing_ok=True)
        return 0
    print(f"Unknown command {command!r}. Commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
