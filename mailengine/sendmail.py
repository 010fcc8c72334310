"""`mailengine-sendmail` and `mailengine-mailq`: the habits administrators bring.

Applications, cron and PHP hand mail to `/usr/sbin/sendmail -t -i`; this entry point takes the
same options and stores the message through the same durable path as the Python API
(client.enqueue: both files synced, `.inf` linked into `mailq/retry/` last), then asks a running
engine (control socket, when the caller is the engine's user) to take it in at once; otherwise
the engine picks it up at its next scan of retry/ (`queue.queue_check_interval`).

    mailengine-sendmail [-t] [-i|-oi] [-f SENDER] [-F 'Full Name'] [-C HOME] [RECIPIENT ...]

The home is `-C HOME` (sendmail's "other configuration"), else $MAILENGINE_HOME, else
DEFAULT_HOME. Exit codes are sendmail's (sysexits.h). Run as `mailq` (a link of that name) or
with `-bp` it prints the queue as Postfix's `postqueue -p` does; `mailengine-mailq` does too.
"""
from __future__ import annotations

import email.utils
import getpass
import math
import os
import re
import socket
import sys
from datetime import datetime
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path

from . import config

DEFAULT_HOME = "/srv/mailengine"  # the home README's Operations section installs

# sysexits.h, as sendmail and Postfix's sendmail exit
EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_NOUSER, EX_SOFTWARE = 0, 64, 65, 66, 67, 70
EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 75, 77, 78

# Options that take a value in the next argument when not written together (-f addr / -faddr).
VALUE_OPTIONS = set("fFrCBNRVXLOhp")
USAGE = ("usage: mailengine-sendmail [-t] [-i|-oi] [-f SENDER] [-F 'Full Name'] [-C HOME] "
         "[RECIPIENT ...]  (message on stdin)\n"
         "       mailengine-sendmail -bp | mailengine-mailq [-C HOME]   (print the queue)")


class Usage(Exception):
    pass


def parse_args(argv: list[str]) -> dict:
    """sendmail's command line: single-letter options, possibly bundled (`-ti`), values joined
    or separate (`-fme@x` / `-f me@x`); `-o` options (`-oi`, `-oem`) and flags of no meaning
    here (`-v`, `-m`, `-U`, `-odi`, `-B 8BITMIME`, `-N never`) are accepted."""
    opts = {"t": False, "i": False, "f": None, "F": None, "C": None, "bp": False, "rcpts": []}
    args = list(argv)
    while args:
        a = args.pop(0)
        if a == "--":
            opts["rcpts"] += args
            break
        if a in ("-h", "--help"):
            raise Usage("help")
        if a == "--home":
            if not args:
                raise Usage("--home needs a directory")
            opts["C"] = args.pop(0)
            continue
        if not a.startswith("-") or a == "-":
            opts["rcpts"].append(a)
            continue
        if a.startswith("-o"):  # -oi is -i; -oem, -odb, -oQ... are sendmail tunings
            if a == "-oi":
                opts["i"] = True
            continue
        if a.startswith("-b"):  # modes: -bm deliver (the default), -bp print the queue
            if a == "-bp":
                opts["bp"] = True
            elif a != "-bm":
                raise Usage(f"{a}: only -bm (deliver) and -bp (print the queue) are supported")
            continue
        letters = a[1:]
        while letters:
            c, letters = letters[0], letters[1:]
            if c in VALUE_OPTIONS:
                value = letters or (args.pop(0) if args else None)
                if value is None:
                    raise Usage(f"-{c} needs a value")
                letters = ""
                if c in ("f", "r"):
                    opts["f"] = value
                elif c in ("F", "C"):
                    opts[c] = value
            elif c in ("t", "i"):
                opts[c] = True
            elif c in "vmUn":  # verbose, me too, initial submission, no aliasing: no effect
                pass
            elif c == "q":
                raise Usage("-q: the queue is run by the engine (mailengine queue flush)")
            else:
                raise Usage(f"-{c}: unknown option")
    return opts


def resolve_home(given: str | None) -> Path:
    return Path(given or os.environ.get("MAILENGINE_HOME") or DEFAULT_HOME).absolute()


def read_message(stream, dot_ends: bool) -> bytes:
    """The message from stdin; without -i a line holding only '.' ends it, as in sendmail."""
    if not dot_ends:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


HEADER_LINE = re.compile(rb"^[!-9;-~]+:")


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block, body); a message that does not start with a header is all body."""
    data = data.replace(b"\r\n", b"\n")
    if not HEADER_LINE.match(data):
        return b"", data
    head, sep, body = data.partition(b"\n\n")
    if not sep and not head.endswith(b"\n"):
        return head, b""
    return head.rstrip(b"\n"), body


def without_header(head: bytes, name: bytes) -> bytes:
    """The header block without the fields called `name` (and their continuation lines)."""
    out, skipping = [], False
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == name
        if not skipping:
            out.append(line)
    return b"\n".join(out)


def qualify(address: str, host: str) -> str:
    """`root` -> `root@host`, as sendmail appends the local host to a bare user name."""
    address = address.strip().strip("<>").strip()
    return address if "@" in address or not address else f"{address}@{host}"


def sendmail_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if Path(sys.argv[0]).name == "mailq":
        return mailq_main(argv)
    try:
        opts = parse_args(argv)
    except Usage as e:
        print(USAGE if str(e) == "help" else f"mailengine-sendmail: {e}\n{USAGE}",
              file=sys.stdout if str(e) == "help" else sys.stderr)
        return EX_OK if str(e) == "help" else EX_USAGE
    home = resolve_home(opts["C"])
    if opts["bp"]:
        from .cli import quiet_on_closed_pipe
        return quiet_on_closed_pipe(lambda _: print_queue(home), None)
    if not (home / config.CONFIG_FILE).exists():
        print(f"mailengine-sendmail: no MailEngine home in {home} (no {config.CONFIG_FILE}): "
              "use -C HOME or set MAILENGINE_HOME", file=sys.stderr)
        return EX_CONFIG
    try:
        cfg = config.load(home)
    except config.ConfigError as e:
        print(f"mailengine-sendmail: {e}", file=sys.stderr)
        return EX_CONFIG
    host = socket.getfqdn()
    if not opts["t"] and not opts["rcpts"]:
        print(f"mailengine-sendmail: no recipients (name them, or use -t)\n{USAGE}",
              file=sys.stderr)
        return EX_USAGE
    data = read_message(sys.stdin.buffer, dot_ends=not opts["i"])
    limit = cfg.limits.max_message_size
    if limit and len(data) > limit:
        print(f"mailengine-sendmail: the message is {len(data)} bytes, more than "
              f"limits.max_message_size ({limit})", file=sys.stderr)
        return EX_DATAERR
    head, body = split_message(data)
    fields = BytesHeaderParser(policy=compat32).parsebytes(head + b"\n\n")
    rcpts = [qualify(a, host) for arg in opts["rcpts"] for a in arg.split(",") if a.strip()]
    if opts["t"]:
        found = email.utils.getaddresses(
            [str(v) for k in ("to", "cc", "bcc") for v in fields.get_all(k, [])])
        rcpts += [qualify(addr, host) for _, addr in found if addr]
        head = without_header(head, b"bcc")  # the blind copies' names are not sent
    rcpts = list(dict.fromkeys(r for r in rcpts if r))
    if not rcpts:
        print("mailengine-sendmail: no recipients found"
              + (" in To:, Cc: or Bcc:" if opts["t"] else ""), file=sys.stderr)
        return EX_USAGE
    sender = qualify(opts["f"] if opts["f"] is not None else getpass.getuser(), host)
    if fields.get("from") is None:
        name = opts["F"]
        head = (f"From: {email.utils.formataddr((name, sender)) if name else sender}".encode()
                + (b"\n" + head if head else b""))
    from .client import InfError, enqueue
    try:
        if cfg.suppression.enabled:
            rcpts, left_out = _unsuppressed(cfg, sender, rcpts)
            if not rcpts:
                return left_out
        msg_id = enqueue(cfg.mailq(), sender, rcpts, head, body, hostname=host,
                         skip_suppressed=cfg.suppression.enabled)
    except (InfError, ValueError) as e:
        print(f"mailengine-sendmail: {e}", file=sys.stderr)
        return EX_DATAERR
    except PermissionError as e:
        print(f"mailengine-sendmail: cannot write into {cfg.mailq()}: {e}", file=sys.stderr)
        return EX_NOPERM
    except OSError as e:
        print(f"mailengine-sendmail: cannot queue the message in {cfg.mailq()}: {e}",
              file=sys.stderr)
        return EX_TEMPFAIL
    tell_engine(home)
    if os.environ.get("MAILENGINE_SENDMAIL_VERBOSE"):
        print(f"queued as {msg_id}")
    return EX_OK


def _unsuppressed(cfg, sender: str, rcpts: list[str]) -> tuple[list[str], int]:
    """The recipients not on the suppression list, and the exit code when there are none.
    As at SMTP intake: with suppression.action = reject each suppressed one is named on stderr
    (and none left is EX_NOUSER), with drop they go silently (the event log says it)."""
    from .client import suppressed_recipients
    found = suppressed_recipients(cfg.mailq(), sender, rcpts)
    if not found:
        return rcpts, EX_OK
    reject = cfg.suppression.action == "reject"
    if reject:
        for a, e in found.items():
            print(f"mailengine-sendmail: {a} is on the suppression list ({e.source}: "
                  f"{e.reason}); not sent to it", file=sys.stderr)
    left = [r for r in rcpts if r not in found]
    if not left and not reject:  # as SMTP's drop: accepted, nothing stored; say it in the log
        from .events import EventLog
        from .suppression import dropped_records
        events = EventLog(cfg.log_dir)
        events.write(dropped_records("", sender, found))
        events.close()
    return left, (EX_NOUSER if reject else EX_OK)


def tell_engine(home: Path) -> None:
    """Ask a running engine to take the new message in now; without one (or as another user)
    it is picked up at the next scan, so any trouble here is no error."""
    from . import control
    try:
        control.request(control.socket_path(home), "queue.scan", timeout=5.0)
    except (control.ControlError, OSError):
        pass


# ---------------------------------------------------------------- mailq

def mailq_main(argv: list[str] | None = None) -> int:
    from .cli import quiet_on_closed_pipe
    return quiet_on_closed_pipe(_mailq, argv)


def _mailq(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    home = None
    while argv:
        a = argv.pop(0)
        if a in ("-C", "--home") and argv:
            home = argv.pop(0)
        elif a.startswith("-C") and len(a) > 2:
            home = a[2:]
        elif a in ("-h", "--help"):
            print("usage: mailengine-mailq [-C HOME]: the queue, as postqueue -p prints it")
            return EX_OK
        else:
            print(f"mailengine-mailq: {a}: unknown argument", file=sys.stderr)
            return EX_USAGE
    return print_queue(resolve_home(home))


def queue_records(home: Path) -> list[dict] | None:
    """The queue's records from a running engine, else from the files; None: no queue."""
    from . import control, queueops
    try:
        return control.request(control.socket_path(home), "queue.list")["records"]
    except (control.ControlError, OSError):
        pass
    mailq = home / "mailq"
    if not mailq.is_dir():
        return [] if (home / config.CONFIG_FILE).exists() else None
    return queueops.FileQueue(mailq, home / "log").records()


def format_postqueue(records: list[dict]) -> str:
    """`postqueue -p`'s layout: id (`*` being sent, `!` held), size, arrival, sender; the
    reason it waits in parentheses; one recipient a line; a total."""
    if not records:
        return "Mail queue is empty"
    width = max(10, *(len(r["id"]) + 1 for r in records))
    lines = [f"{'-Queue ID-':<{width}}  --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for r in sorted(records, key=lambda r: r["created"]):
        mark = {"sending": "*", "held": "!"}.get(r["state"], "")
        try:
            when = datetime.strptime(r["created"], "%Y/%m/%d %H:%M:%S").strftime(
                "%a %b %e %H:%M:%S")
        except ValueError:
            when = r["created"]
        total += r.get("size") or 0
        lines.append(f"{r['id'] + mark:<{width}}  {r.get('size') or 0:>8} {when:<20}  "
                     f"{r['from'] or 'MAILER-DAEMON'}")
        replies = r.get("replies") or {}
        shown = set()
        for rcpt in r["rcpts"]:
            reply = replies.get(rcpt)
            if reply and reply[1] not in shown:
                shown.add(reply[1])
                lines.append(f"({reply[1]})")
            lines.append(" " * (width + 33) + rcpt)
        lines.append("")
    n = len(records)
    lines.append(f"-- {math.ceil(total / 1024)} Kbytes in {n} Request{'s' if n != 1 else ''}.")
    return "\n".join(lines)


def print_queue(home: Path) -> int:
    records = queue_records(home)
    if records is None:
        print(f"mailengine-mailq: no queue in {home / 'mailq'}: use -C HOME or set "
              "MAILENGINE_HOME", file=sys.stderr)
        return EX_CONFIG
    print(format_postqueue(records))
    return EX_OK


if __name__ == "__main__":
    sys.exit(sendmail_main())
