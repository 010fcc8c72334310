"""The `mailengine` command: start, -bd, shutdown, test, version, help, gettcpip, dkim, and the
operator's commands queue, config, status, send, install-service, remove-service.

    mailengine [--home DIR] [--SETTING VALUE ...] COMMAND [ARGS]

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
from pathlib import Path

from .queue_dirs import RETRY
from . import NAME, __version__, config
from .overrides import option_name, parse_override

COMMANDS = {
    "start": "run in the foreground; Ctrl-C stops cleanly",
    "-bd": "run as a background daemon with a pid file; kill -15 $(cat PIDFILE) stops it",
    "shutdown": "stop the engine running here, normal or test mode (writes its queue's "
                "retry/shutdown.txt and waits)",
    "test": "test mode: runs as normal on mailq-test/, sends RSET+QUIT instead of DATA",
    "init": "write this home's mailengine.toml (with any --SETTING VALUE given), mailq/ and "
            "log/; starts nothing",
    "version": "print name and version",
    "help": "print this list",
    "gettcpip": "print this machine's first IP address",
    "dkim": "dkim genkey DOMAIN SELECTOR: make a DKIM key pair and print the DNS record",
    "queue": "queue list [--messages] | show ID | delete|hold|release|retry ID|@domain|from:ADDR|all"
             " | flush",
    "config": "config show [KEY] | set KEY VALUE | upgrade OLD_HOME_OR_FILE",
    "status": "rates, queue size and connections of the running engine",
    "shaping": "shaping list | lift PROVIDER_OR_DOMAIN: traffic shaping's suspensions and "
               "throttles in force, or end one now",
    "send": "send --from A --to B[,C] [--subject S] [--body TEXT|-]: inject a test message",
    "suppress": "suppress add|remove|list|check|import|export: the suppression list",
    "install-service": "install-service [--user U]: write a systemd unit for this home "
                       "(the manual's -install)",
    "remove-service": "remove-service: remove that systemd unit (the manual's -remove)",
}
# The manual's spellings of commands, which argparse would read as options.
MANUAL_SPELLINGS = {"-bd": "daemon", "-install": "install-service", "-remove": "remove-service"}


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


def load_config(ns, strict: bool = True) -> config.Config:
    cfg = config.load(config.resolve_home(ns.home), strict)
    for name, text in vars(ns).items():
        if name.startswith("set:") and text is not None:
            setting = config.BY_NAME[name[4:]]
            cfg.overridden.setdefault(setting.name, cfg.values[setting.name])
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
    try:  # an exited engine its parent has not reaped yet (a zombie) is not running
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cmd_shutdown(cfg: config.Config, wait_seconds: float = 60.0) -> int:
    """Ask each engine running in this home (normal and test mode) to stop, through its queue's
    shutdown.txt, and wait until it has. Nothing is written for an engine that is not running,
    so no stale file waits for the next start."""
    engines = []  # (test mode, pid)
    for test_mode in (False, True):
        answer = engine_answer(cfg, test_mode)
        if answer:
            engines.append((test_mode, int(answer["pid"])))
    pid = read_pid(cfg.pid_file)
    if not engines and pid and pid != os.getpid() and pid_alive(pid):
        engines.append((False, pid))  # a daemon whose control socket is not up (yet)
    if not engines:
        print(f"MailEngine is not running in {cfg.home} (nothing answers on "
              f"{control_path(cfg)} or {control_path(cfg, True).name}); nothing to stop",
              file=sys.stderr)
        return 1
    deadline = time.monotonic() + wait_seconds
    failed = 0
    for test_mode, pid in engines:
        retry = cfg.mailq(test_mode) / RETRY
        retry.mkdir(parents=True, exist_ok=True)
        request = retry / "shutdown.txt"
        request.write_text("shutdown requested by mailengine shutdown\n")
        what = f"MailEngine (pid {pid}{', test mode' if test_mode else ''})"
        print(f"Asked {what} to stop; waiting...")
        while request.exists() and pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if request.exists() and pid_alive(pid):
            print(f"{what} has not noticed {request} after {wait_seconds:g}s")
            failed += 1
            continue
        print(f"{what} noticed the request and is stopping.")
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            print(f"{what} is still running after {wait_seconds:g}s")
            failed += 1
        else:
            print(f"{what} stopped.")
    return 1 if failed else 0


def overrides(ns) -> dict[str, str]:
    """The settings given as options for this run: name -> the text given."""
    return {name[4:]: text for name, text in vars(ns).items()
            if name.startswith("set:") and text is not None}


def cmd_init(ns) -> int:
    """`mailengine init`: write the home's commented mailengine.toml, with the settings given as
    options written into it, and make mailq/ and log/; nothing is started or bound."""
    import tomlkit

    from . import config_file
    from .secret_values import shown
    from .spool import Spool
    home = config.resolve_home(ns.home)
    path = home / config.CONFIG_FILE
    given = overrides(ns)
    if path.exists() and given:
        print(f"{path} exists already: change settings with `mailengine config set KEY VALUE`",
              file=sys.stderr)
        return 2
    existed = path.exists()
    try:
        if existed:
            load_config(ns)  # the file as it is must be good
        else:
            checked = config.Config(home=home)  # the options, checked before anything is written
            for name, text in given.items():
                checked.set(name, parse_override(config.BY_NAME[name], text))
            values = checked.values
            home.mkdir(parents=True, exist_ok=True)
            doc_path, doc = config_file.read_doc(home)  # writes the commented default file
            for name in given:
                config_file.set_in_doc(doc, config.BY_NAME[name], values[name])
            if given:
                config_file.write_atomically(doc_path, tomlkit.dumps(doc))
        cfg = config.load(home)
    except config.ConfigError as e:
        print(f"Configuration error: {e}", file=sys.stderr)
        return 2
    Spool(cfg.mailq(), durable=False).ensure_dirs()
    cfg.log_dir.mkdir(exist_ok=True)
    if existed:
        print(f"{path} exists already: left as it is.")
    else:
        print(f"Wrote {path}: every setting with its default and meaning"
              + "".join(f"\n  {n} = {config.toml_value(shown(config.BY_NAME[n], cfg.values[n]))}"
                        for n in given))
    first_user(cfg)
    print(f"Made {cfg.mailq()} and {cfg.log_dir}. Start it with: "
          f"mailengine --home {home} start")
    return 0


def first_user(cfg: config.Config) -> None:
    """A home without password.txt gets the web admin's first user, `admin`, with a generated
    password, stored hashed and shown this once (no well-known password to forget to change)."""
    import secrets

    from .users import PasswordFile
    if cfg.password_file.exists():
        return
    password = secrets.token_urlsafe(12)
    PasswordFile(cfg.password_file).set_password("admin", password)
    net = cfg.network
    if not net.web_port or net.web_ip == "0":
        where = "off (network.web_port, network.web_ip)"
    elif net.web_ip and "/" not in net.web_ip and "-" not in net.web_ip:
        where = f"port {net.web_port}, for {net.web_ip} (http://127.0.0.1:{net.web_port}/ " \
            "from this machine)" if net.web_ip not in ("127.0.0.1", "::1") else \
            f"http://{'[::1]' if ':' in net.web_ip else net.web_ip}:{net.web_port}/"
    else:
        where = f"port {net.web_port}, for clients in {net.web_ip or 'any address'}"
    print(f"Web admin user: admin, password: {password}  (only shown now; stored hashed in "
          f"{cfg.password_file}; change it on the Account page). The web admin: {where}")


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


def wants_help(args: list[str]) -> bool:
    """`-h`/`--help` among a command's own arguments (before a `--`)."""
    for a in args:
        if a == "--":
            return False
        if a in ("-h", "--help"):
            return True
    return False


def command_help(command: str) -> int:
    """`mailengine COMMAND --help` for the commands without their own parser: help, nothing
    else (`mailengine test --help` must not start a test engine)."""
    if command == "dkim":
        from . import dkim
        return dkim.genkey_main(["--help"])
    name = "-bd" if command == "daemon" else command
    if name not in COMMANDS:
        print(f"Unknown command {command!r}. Commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    print(f"usage: mailengine [--home DIR] [--SETTING VALUE ...] {name}\n\n{COMMANDS[name]}\n\n"
          "--home DIR is the home directory (default: $MAILENGINE_HOME or the current one);\n"
          "every setting can be given for this run as --KEY VALUE (--smtp-port 2525);\n"
          "`mailengine help` lists every command.")
    return 0


def main(argv: list[str] | None = None) -> int:
    return quiet_on_closed_pipe(run_command, argv)


def quiet_on_closed_pipe(run, argv: list[str] | None) -> int:
    """run(argv), with its output piped into a reader that may go away (`| head`)."""
    try:
        code = run(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit after main returned
        return code
    except BrokenPipeError:
        # The reader stopped reading: stop quietly, as the Python docs recommend (signal
        # module, "Note on SIGPIPE"): point stdout at devnull so the exit's flush cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def run_command(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for spelling, command in MANUAL_SPELLINGS.items():
        if spelling in argv:
            argv[argv.index(spelling)] = command
    ns = build_parser().parse_args(argv)
    command = ns.command
    if command in ("help", "-h"):
        build_parser().print_help()
        return 0
    if wants_help(ns.args) and command not in OPERATOR_COMMANDS:
        return command_help(command)
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
    if command in OPERATOR_COMMANDS:
        sub = sub_home(ns)
        if sub is not None:
            ns.home = sub
        home = config.resolve_home(ns.home)
        creates = command == "install-service" or (command == "config" and ns.args[:1] == [
            "upgrade"])  # upgrade writes this release's file when there is none
        if wants_help(ns.args):  # their own parser prints help; no home needed for that
            return OPERATOR_COMMANDS[command](config.Config(home=home), ns)
        if not creates and not (home / config.CONFIG_FILE).exists():
            print(f"No MailEngine home in {home} (no {config.CONFIG_FILE}): use --home DIR, "
                  "or make one there with `mailengine init`", file=sys.stderr)
            return 2
    if command == "init":
        return cmd_init(ns)
    upgrading = command == "config" and ns.args[:1] == ["upgrade"]
    try:
        cfg = load_config(ns, strict=not upgrading)  # upgrade reports old keys, not refuses
    except config.ConfigError as e:
        print(f"Configuration error: {e}", file=sys.stderr)
        return 2
    if command == "shutdown":
        return cmd_shutdown(cfg)
    if command in OPERATOR_COMMANDS:
        return OPERATOR_COMMANDS[command](cfg, ns)
    if command in ("start", "test", "daemon"):
        from . import app, homelock
        test_mode = command == "test"
        try:  # before anything touches the queue, and before -bd forks (its parent says why)
            lock = homelock.HomeLock.acquire(cfg.home, test_mode)
        except homelock.Held as e:
            print(e, file=sys.stderr)
            return 1
        except OSError as e:
            print(f"Cannot lock {homelock.lock_path(cfg.home, test_mode)}: {e.strerror}",
                  file=sys.stderr)
            return 1
        if command == "daemon":
            from . import filemodes
            filemodes.restrict(cfg, test_mode)  # daemon.out is made private too
            daemonize(cfg)
            lock.write_pid()  # the daemon's pid, not the parent's
        try:
            app.run(cfg, test_mode=test_mode, lock=lock)
        finally:
            if command == "daemon" and read_pid(cfg.pid_file) == os.getpid():
                cfg.pid_file.unlink(missing_ok=True)
        return 0
    print(f"Unknown command {command!r}. Commands: {', '.join(COMMANDS)}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- the operator's commands

def sub_home(ns) -> str | None:
    """`--home DIR` written after the command (`mailengine queue list --home DIR`)."""
    args = ns.args
    for i, a in enumerate(args):
        if a == "--home" and i + 1 < len(args):
            home = args[i + 1]
            del args[i:i + 2]
            return home
        if a.startswith("--home="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def control_path(cfg: config.Config, test_mode: bool = False) -> Path:
    from . import control
    return control.socket_path(cfg.home, test_mode)


def engine_answer(cfg: config.Config, test_mode: bool = False) -> dict | None:
    """The running engine's ping answer, or None when it is not running."""
    from . import control
    try:
        return control.running(control_path(cfg, test_mode))
    except control.ControlError as e:
        raise SystemExit(f"MailEngine's control socket: {e}")


def ask(cfg: config.Config, op: str, test_mode: bool = False, **args) -> dict:
    from . import control
    try:
        return control.request(control_path(cfg, test_mode), op, **args)
    except control.ControlError as e:
        raise SystemExit(f"MailEngine: {e}")


def refuse_if_alive_without_socket(cfg: config.Config, test_mode: bool) -> None:
    """Working on the files is safe only with the engine stopped."""
    from . import homelock
    holder = homelock.holder(cfg.home, test_mode)
    if holder is not None:
        raise SystemExit(f"MailEngine ({f'pid {holder}' if holder > 0 else 'another process'}) "
                         f"holds {homelock.lock_path(cfg.home, test_mode)} but does not answer "
                         f"on {control_path(cfg, test_mode)}; try again in a moment, or stop it")
    pid = read_pid(cfg.pid_file)
    if pid and pid != os.getpid() and pid_alive(pid) and not test_mode:
        raise SystemExit(f"MailEngine (pid {pid}, {cfg.pid_file}) is running but does not answer "
                         f"on {control_path(cfg)}; stop it (mailengine shutdown) or try again")


def queue_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailengine queue", description=(
        "Look at and change the queue. With the engine running the engine does it (memory and "
        "disk stay consistent); with it stopped the files in mailq/ are changed directly."))
    p.add_argument("--test", action="store_true", help="the test-mode queue (mailq-test/)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="per destination domain: counts, oldest, next retry, "
                                     "last reply")
    ls.add_argument("--messages", action="store_true", help="one line per message")
    sh = sub.add_parser("show", help="one message: its .inf and its history")
    sh.add_argument("id")
    for a, what in (("delete", "remove from the queue (@domain: those recipients only)"),
                    ("hold", "keep in the queue, never sent until released"),
                    ("release", "undo hold; due at once"), ("retry", "due at once")):
        sp = sub.add_parser(a, help=what)
        sp.add_argument("targets", nargs="+", metavar="ID|@domain|from:ADDRESS|all")
    sub.add_parser("flush", help="every message that is not held: due at once")
    return p


def cmd_queue(cfg: config.Config, ns) -> int:
    import json
    from . import queueops
    args = queue_parser().parse_args(ns.args)
    test = args.test
    alive = engine_answer(cfg, test)
    mailq = cfg.mailq(test)
    if alive:
        header = f"Queue of {mailq} (engine running, pid {alive['pid']})"
    else:
        refuse_if_alive_without_socket(cfg, test)
        header = f"Queue of {mailq} (engine not running: read from the files)"
        if not mailq.is_dir():
            print(f"No queue in {mailq}")
            return 1
        files = queueops.FileQueue(mailq, cfg.log_dir)
    out = lambda obj: print(json.dumps(obj, indent=1, default=str))  # noqa: E731
    if args.action == "list":
        records = ask(cfg, "queue.list", test)["records"] if alive else files.records()
        if args.json:
            out({"running": bool(alive), "messages": records,
                 "domains": queueops.by_domain(records)})
        elif args.messages:
            print(queueops.format_messages(records, header))
        else:
            print(queueops.format_domains(records, header))
        return 0
    if args.action == "show":
        try:
            queueops.check_id(args.id)
        except ValueError as e:
            print(f"mailengine queue show: {e}", file=sys.stderr)
            return 2
        if alive:
            info = ask(cfg, "queue.show", test, id=args.id)
        else:
            try:
                info = files.show(args.id)
            except KeyError:
                print(f"{args.id}: no such message in {mailq}/retry or working", file=sys.stderr)
                return 1
        out(info) if args.json else print(queueops.format_show(info))
        return 0
    try:
        targets = [queueops.parse_target(t) for t in getattr(args, "targets", [])]
    except ValueError as e:
        print(f"mailengine queue {args.action}: {e}", file=sys.stderr)
        return 2
    if alive:
        res = ask(cfg, "queue.apply", test, action=args.action, targets=targets)
    else:
        res = files.apply(args.action, targets)
    out(res) if args.json else print(queueops.format_result(res))
    return 1 if res["not_found"] and not res["done"] else 0


def cmd_status(cfg: config.Config, ns) -> int:
    import json
    p = argparse.ArgumentParser(prog="mailengine status")
    p.add_argument("--test", action="store_true", help="the test-mode engine")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = p.parse_args(ns.args)
    if not args.test and not engine_answer(cfg) and engine_answer(cfg, True):
        args.test = True  # only an engine in test mode runs here: that is the one to show
    if not engine_answer(cfg, args.test):
        mailq = cfg.mailq(args.test)
        pid = read_pid(cfg.pid_file)
        print(f"MailEngine is not running in {cfg.home} (nothing answers on "
              f"{control_path(cfg, args.test)})"
              + (f"; but pid {pid} from {cfg.pid_file} is alive" if pid and pid_alive(pid)
                 else ""))
        if mailq.is_dir():
            from .spool import Spool
            usage = Spool(mailq, durable=False).usage()
            print("on disk: " + ", ".join(f"{d} {n} ({_size(b)})" for d, (n, b) in usage.items()))
        return 3
    st = ask(cfg, "status", args.test)
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    print(format_status(st))
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(s: float) -> str:
    s = int(s)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + (f"{h}h " if d or h else "") + f"{m}m {s}s"


def format_status(st: dict) -> str:
    r, snt, q, c = st["received"], st["sent"], st["queue"], st["connections"]
    rates = st["rates"]
    lines = [f"{st['name']} {st['version']} running (pid {st['pid']}) in {st['home']}"
             + (" in TEST MODE" if st.get("test_mode") else "") + f", up {_duration(st['uptime'])}",
             f"received  {r['total']} messages ({r['relay']} relay, {r['local']} local); "
             f"last minute {rates['1m']['recv_per_hour']}/h, last 5 minutes "
             f"{rates['5m']['recv_per_hour']}/h, average {r['avg_per_hour']}/h",
             f"sent      {snt['total']} recipients; last minute {rates['1m']['sent_per_hour']}/h, "
             f"last 5 minutes {rates['5m']['sent_per_hour']}/h, average {snt['avg_per_hour']}/h"]
    qline = f"queue     {q['messages']} messages"
    if "recipients" in q:
        memory = (f"{q['in_memory']} in memory ({q['recipients']} recipients to send), "
                  f"{q['on_disk_only']} on disk only" if q.get("on_disk_only") else
                  f"{q['recipients']} recipients to send")
        qline += f" ({memory}), {q['held']} held, {q['sending']} being sent"
    lines.append(qline)
    disk = q.get("on_disk", {})
    lines.append("on disk   " + ", ".join(f"{d} {v['messages']} ({_size(v['bytes'])})"
                                          for d, v in disk.items()))
    if q.get("paused"):
        lines.append("          SENDING IS PAUSED (queue.pause_sending)")
    conn = []
    if "inbound" in c:
        conn.append(f"inbound {c['inbound']}/{c['inbound_max']} "
                    f"({c['inbound_sessions_total']} sessions since start, "
                    f"{c['intake_processes']} intake processes)")
    if "outbound" in c:
        conn.append(f"outbound {c['outbound']}/{c['outbound_max']} ({c['outbound_idle']} idle, "
                    f"peak {c['outbound_peak']}"
                    + (f", {c['delivery_processes']} delivery processes"
                       if c.get("delivery_processes") else "")
                    + (f", {c['delivery_process_restarts']} restarted"
                       if c.get("delivery_process_restarts") else "") + ")")
    lines.append("connections " + "; ".join(conn or ["-"]))
    if c.get("outbound_hosts"):
        lines.append("busiest    " + ", ".join(f"{h} {n}" for h, n in c["outbound_hosts"]))
    from .shaping import describe
    for i, line in enumerate(describe(st.get("shaping") or [])):
        lines.append(("shaping   " if i == 0 else "          ") + line)
    from .sources import describe as describe_sources
    for i, line in enumerate(describe_sources(st.get("sources") or [])):
        lines.append(("sources   " if i == 0 else "          ") + line)
    sh = st.get("shared")
    if sh:
        lines.append(f"shared    limits and lists through {sh['redis']} (keys {sh['prefix']}*): "
                     + (f"reachable, {sh['connections_held']} connections leased"
                        if sh["reachable"] else "NOT REACHABLE, using this engine's own limits"))
    for u in (st.get("webhooks") or {}).get("urls", []):
        lines.append(f"webhooks  {u['url']}: {u['pending']} events pending, {u['sent']} posted"
                     + (f", {u['failures']} failures in a row ({u['last_error']})"
                        if u["failures"] else ""))
    return "\n".join(lines)


def cmd_shaping(cfg: config.Config, ns) -> int:
    import json
    from .shaping import describe
    p = argparse.ArgumentParser(prog="mailengine shaping", description=(
        "Traffic shaping (HOME/shaping.toml): the suspensions and throttles in force, with "
        "their cause and expiry, and each sending source's warm-up use today; `lift` ends a "
        "suspension or throttle now."))
    p.add_argument("--test", action="store_true", help="the test-mode engine")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="what is suspended or throttled, why and until when; the "
                   "sending sources' warm-up")
    lift = sub.add_parser("lift", help="end a suspension or throttle now")
    lift.add_argument("dest", metavar="PROVIDER_OR_DOMAIN")
    args = p.parse_args(ns.args)
    if not engine_answer(cfg, args.test):
        print(f"MailEngine is not running in {cfg.home}: shaping state lives in the running "
              "engine", file=sys.stderr)
        return 3
    if args.action == "lift":  # ask() exits with the engine's error (nothing to lift...)
        res = ask(cfg, "shaping.lift", args.test, dest=args.dest)
        print(json.dumps(res, indent=1) if args.json else
              f"{res['lifted']}: {res['action']} lifted (it was for: {res['cause']})")
        return 0
    res = ask(cfg, "shaping.list", args.test)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print("\n".join(describe(res["active"])) or "nothing is suspended or throttled")
        from .sources import describe as describe_sources
        for line in describe_sources(res.get("sources") or []):
            print("source " + line)
    return 0


def cmd_send(cfg: config.Config, ns) -> int:
    import email.utils
    import smtplib
    from email.message import EmailMessage
    p = argparse.ArgumentParser(prog="mailengine send", description=(
        "Inject one message by SMTP into the running engine (or --server), like a small swaks."))
    p.add_argument("--from", dest="sender", required=True, help="envelope sender and From:")
    p.add_argument("--to", required=True, action="append",
                   help="recipients, comma-separated (may be repeated)")
    p.add_argument("--subject", default="MailEngine test message")
    p.add_argument("--body", default=None, help="the body text; '-' reads it from stdin")
    p.add_argument("--header", action="append", default=[], metavar="'Name: value'",
                   help="an extra header (may be repeated)")
    p.add_argument("--server", help="host:port (default: this engine's SMTP port on 127.0.0.1)")
    p.add_argument("--helo", default=None, help="name to say in EHLO (default: this host)")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(ns.args)
    rcpts = [a.strip() for t in args.to for a in t.split(",") if a.strip()]
    if not rcpts:
        print("mailengine send: --to names no recipient", file=sys.stderr)
        return 2
    if args.server:
        host, _, port = args.server.rpartition(":")
        if not host or not port.isdigit():
            host, port = args.server, "25"
        host = host.strip("[]")
    else:
        ips = [i for i in cfg.network.smtp_listen_ips if "/" not in i and "-" not in i]
        host, port = (ips[0] if ips else "127.0.0.1"), str(cfg.network.smtp_port)
        if cfg.network.smtp_port == 1:
            print("This engine has no SMTP intake (network.smtp_port = 1); use --server",
                  file=sys.stderr)
            return 2
    body = args.body
    if body == "-":
        body = sys.stdin.read()
    elif body is None:
        body = f"A test message sent by mailengine send at {time.strftime('%Y/%m/%d %H:%M:%S')}.\n"
    msg = EmailMessage()
    msg["From"] = args.sender
    msg["To"] = ", ".join(rcpts)
    msg["Subject"] = args.subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=args.sender.rpartition("@")[2] or None)
    for h in args.header:
        name, colon, value = h.partition(":")
        if not colon or not name.strip():
            print(f"mailengine send: --header {h!r} is not 'Name: value'", file=sys.stderr)
            return 2
        msg[name.strip()] = value.strip()
    msg.set_content(body)
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    try:
        with smtplib.SMTP(host, int(port), local_hostname=args.helo,
                          timeout=args.timeout) as s:
            code, text = s.ehlo()
            if code != 250:
                code, text = s.helo()
            print(f"connected to {host}:{port}: {s.sock.getpeername()[0] if s.sock else host}")
            code, text = s.mail(args.sender, ["BODY=8BITMIME"] if
                                s.has_extn("8bitmime") and not body.isascii() else [])
            print(f"MAIL FROM:<{args.sender}> -> {code} {text.decode(errors='replace')}")
            if code != 250:
                return 1
            accepted = 0
            for a in rcpts:
                code, text = s.rcpt(a)
                print(f"RCPT TO:<{a}> -> {code} {text.decode(errors='replace')}")
                accepted += 200 <= code < 300
            if not accepted:
                s.rset()
                return 1
            code, text = s.data(data)
            print(f"DATA ({len(data)} bytes) -> {code} {text.decode(errors='replace')}")
            return 0 if code == 250 and accepted == len(rcpts) else 1
    except (OSError, smtplib.SMTPException) as e:
        print(f"mailengine send: {host}:{port}: {e}", file=sys.stderr)
        return 1


def cmd_config(cfg: config.Config, ns) -> int:
    from . import upgrade
    return upgrade.config_main(cfg, ns.args, engine_answer=engine_answer, ask=ask)


def cmd_suppress(cfg: config.Config, ns) -> int:
    from . import suppression_cli
    return suppression_cli.suppress_main(cfg, ns.args)


def cmd_install_service(cfg: config.Config, ns) -> int:
    from . import service
    return service.install_main(cfg, ns.args)


def cmd_remove_service(cfg: config.Config, ns) -> int:
    from . import service
    return service.remove_main(cfg, ns.args)


OPERATOR_COMMANDS = {
    "queue": cmd_queue,
    "config": cmd_config,
    "status": cmd_status,
    "shaping": cmd_shaping,
    "send": cmd_send,
    "suppress": cmd_suppress,
    "install-service": cmd_install_service,
    "remove-service": cmd_remove_service,
}


if __name__ == "__main__":
    sys.exit(main())
