"""Queue mail for MailEngine by writing it into `mailq/retry/`: the manual's `sendMessage` helper.

For programs on the same machine, with or without a running engine: the engine picks the message
up when it next scans `retry/` (or at start). The write is the safe one the manual recommends:
both files are written and synced in a private directory inside `mailq/`, then `ID.dat` is
linked into `retry/` first and `ID.inf` (the file the engine looks for) second, so the engine
never sees half a message. docs/QUEUE.md has the states this can leave behind after a crash.

    from mailengine.client import enqueue
    enqueue("/opt/mailengine/mailq", "joe@example.com", "a@example.net,b@example.org",
            ["From: joe@example.com", "Subject: hello"], "Message text")

Recipients on the home's suppression list (HOME/suppression.db, suppression.py) are left out,
with a "dropped" line in log/events.jsonl; when every one is, nothing is queued and
`AllSuppressed` is raised. `suppressed_recipients` tells beforehand.
"""
from __future__ import annotations

import email.utils
import os
import shutil
import socket
import tempfile
from pathlib import Path

from . import pool_header
from .queue_dirs import RETRY
from .envelope import InfError, Message, format_inf
from .events import EventLog
from .smtp.wire import SyntaxProblem, parse_mailbox
from .message_ids import make_id


def _crlf(data: bytes) -> bytes:
    # bare CR and bare LF both become CRLF; existing CRLF stays as it is
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return data.replace(b"\n", b"\r\n")


def _as_bytes(x: str | bytes) -> bytes:
    return x.encode("utf-8") if isinstance(x, str) else bytes(x)


def build_data(headers: str | bytes | list[str], body: str | bytes,
               add_missing: bool = True, hostname: str | None = None) -> bytes:
    """The `.dat` bytes: headers, an empty line, the body; CRLF line ends, ending in CRLF.
    With `add_missing`, `Date:` and `Message-ID:` are added when the headers have none."""
    if isinstance(headers, list):
        head = b"\n".join(_as_bytes(h).rstrip(b"\r\n") for h in headers)
    else:
        head = _as_bytes(headers)
    head = _crlf(head).rstrip(b"\r\n")
    names = {line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")
             if b":" in line and line[:1] not in (b" ", b"\t")}
    extra = []
    if add_missing and b"date" not in names:
        extra.append(b"Date: " + email.utils.formatdate(localtime=True).encode())
    if add_missing and b"message-id" not in names:
        extra.append(b"Message-ID: " + email.utils.make_msgid(domain=hostname).encode())
    lines = ([head] if head else []) + extra
    body_b = _crlf(_as_bytes(body))
    if body_b and not body_b.endswith(b"\r\n"):
        body_b += b"\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + body_b


def _rcpt_list(rcpts: str | list[str]) -> list[str]:
    items = rcpts.split(",") if isinstance(rcpts, str) else list(rcpts)
    out = [_address(a.strip()) for a in items if a and a.strip()]
    if not out:
        raise ValueError("no recipients")
    return out


def _address(text: str, allow_empty: bool = False) -> str:
    """An RFC 5321 mailbox, as SMTP intake would take it (quoted local parts included); else
    InfError saying why, before anything is written."""
    try:
        return parse_mailbox(f"<{text}>", allow_empty)
    except SyntaxProblem as e:
        raise InfError(f"{text!r} is not an address: {e}") from None


class AllSuppressed(ValueError):
    """Every recipient is on the suppression list: nothing was queued. `.entries`: address ->
    suppression.Entry."""

    def __init__(self, entries: dict) -> None:
        self.entries = entries
        super().__init__("every recipient is on the suppression list: " + ", ".join(
            f"{a} ({e.source}: {e.reason})" for a, e in entries.items()))


def suppressed_recipients(mailq_dir: str | os.PathLike, mail_from: str,
                          rcpts: str | list[str]) -> dict:
    """Those of `rcpts` on the suppression list of the home `mailq_dir` is in, for mail from
    `mail_from`'s domain: address -> suppression.Entry. Nothing when the home has no list yet
    (this never creates one: the caller may not be the engine's user) or it cannot be read."""
    import sqlite3
    from .suppression import FILE, SuppressionStore
    home = Path(mailq_dir).absolute().parent
    if not (home / FILE).exists():
        return {}
    domain = mail_from.rpartition("@")[2] if "@" in mail_from else ""
    try:
        store = SuppressionStore(home)
    except (sqlite3.Error, OSError):
        return {}  # not readable by this user: the engine's intake still checks SMTP mail
    try:
        out = {}
        for r in _rcpt_list(rcpts):
            e = store.lookup(r, domain)
            if e is not None:
                out[r] = e
        return out
    finally:
        store.close()


def enqueue(mailq_dir: str | os.PathLike, mail_from: str, rcpts: str | list[str],
            headers: str | bytes | list[str], body: str | bytes, *, priority: int = 0,
            durable: bool = True, hostname: str | None = None,
            add_missing_headers: bool = True, skip_suppressed: bool = True) -> str:
    """Drop one message into `mailq_dir/retry/` and return its id.

    `rcpts` is a list or a comma string; `headers` a string or a list of header lines; `body` a
    str (sent as UTF-8) or bytes. Line ends become CRLF. With `durable` (the default) the
    message is on stable storage when this returns. Raises ValueError (InfError) for an
    address the queue format cannot hold, OSError for file trouble, AllSuppressed when every
    recipient is on the suppression list (with `skip_suppressed`, suppressed recipients are left
    out); then nothing is queued.
    """
    mailq = Path(mailq_dir)
    retry = mailq / RETRY
    os.makedirs(retry, exist_ok=True)
    to_send = _rcpt_list(rcpts)
    sender = _address(mail_from.strip(), allow_empty=True)
    dropped = suppressed_recipients(mailq, sender, to_send) if skip_suppressed else {}
    if dropped:
        to_send = [r for r in to_send if r not in dropped]
        if not to_send:
            raise AllSuppressed(dropped)
    msg_id = _enqueue(mailq, retry, sender, to_send, headers, body, priority, durable,
                      hostname, add_missing_headers)
    if dropped:
        from .suppression import dropped_records
        events = EventLog(mailq.absolute().parent / "log")
        events.write(dropped_records(msg_id, sender, dropped))
        events.close()
    return msg_id


def _enqueue(mailq: Path, retry: Path, sender: str, to_send: list[str], headers, body,
             priority: int, durable: bool, hostname: str | None,
             add_missing_headers: bool) -> str:
    host = hostname or socket.gethostname()
    data = build_data(headers, body, add_missing_headers, host)
    data, pool = pool_header.take(data)  # as intake does: the choice goes in the .inf
    private = tempfile.mkdtemp(prefix=".tmp-", dir=mailq)
    try:
        for _ in range(100):
            msg = Message(id=make_id(host), mail_from=sender, rcpt_to_send=to_send,
                          priority=priority, extra={pool_header.INF_KEY: pool} if pool else {})
            msg.add_log("Queued by mailengine.client.enqueue")
            inf = format_inf(msg)  # InfError (a ValueError) for an address it cannot hold
            p_dat = os.path.join(private, msg.id + ".dat")
            p_inf = os.path.join(private, msg.id + ".inf")
            _write(p_dat, data, durable)
            _write(p_inf, inf, durable)
            r_dat = os.path.join(retry, msg.id + ".dat")
            r_inf = os.path.join(retry, msg.id + ".inf")
            if not _place(p_dat, r_dat):
                continue  # that id exists in retry/: take another
            if not _place(p_inf, r_inf):  # the commit point
                os.unlink(r_dat)
                continue
            if durable:
                _fsync_dir(retry)
            return msg.id
        raise OSError(f"could not find a free message id in {retry}")
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _write(path: str, data: bytes, durable: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            getattr(os, "fdatasync", os.fsync)(f.fileno())


def _place(src: str, dst: str) -> bool:
    """Put `src` at `dst` without ever replacing an existing file: False when `dst` exists."""
    try:
        os.link(src, dst)  # fails with EEXIST instead of overwriting, unlike rename
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: check, then rename
        if os.path.lexists(dst):
            return False
        os.rename(src, dst)
    return True


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not possible on every platform (Windows): the files themselves are synced
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["enqueue", "build_data", "InfError", "AllSuppressed", "suppressed_recipients"]
