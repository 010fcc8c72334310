"""Message ids: `P{pid}T{unixtime}C{microsecond}@{host}`, made here and checked here.

An id names a message's files in every queue directory (`ID.dat`, `ID.inf`), so it must never
repeat on this host and must stay one harmless file name. The spool makes the ids of the mail it
stores (`Spool.new_id`), `client.enqueue` those of drop-ins (`make_id`); what an operator names
as an id (queue commands, the control socket, the web admin) is checked by `is_message_id`
before any file is looked up.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import time


def safe_host(name: str) -> str:
    """`name` kept to harmless characters: the host ends up in a file name and in comma lists."""
    out = "".join(c if (c.isascii() and (c.isalnum() or c in ".-_")) else "-" for c in name)
    return out.strip(".") or "localhost"


class _IdClock:
    """Process-wide source of (T, C): the microsecond the id was made, strictly increasing.

    T is the unix second and C the microsecond within it, so an id never repeats one made
    earlier by any process with the same pid (a restarted container is pid 1 again), as long as
    the clock does not go back. Ids are never made ahead of the clock: a burst of more than one
    per microsecond waits for it, which caps the rate at a million a second."""

    def __init__(self) -> None:
        self.last = 0
        self.lock = threading.Lock()

    def next(self) -> int:
        with self.lock:
            now = time.time_ns() // 1000
            if now <= self.last:
                if self.last - now < 1000:  # a burst: wait for the clock (under a microsecond)
                    while now <= self.last:
                        now = time.time_ns() // 1000
                else:  # the clock was set back: keep counting up (O_EXCL still guards)
                    now = self.last + 1
            self.last = now
            return now


_clock = _IdClock()
if hasattr(os, "register_at_fork"):  # a lock held by another thread at fork would stay held
    os.register_at_fork(after_in_child=lambda: setattr(_clock, "lock", threading.Lock()))


def new_id(host: str) -> str:
    """A new id for `host`, a name already made safe (`safe_host`): the one place ids are built."""
    us = _clock.next()
    return f"P{os.getpid()}T{us // 1_000_000}C{us % 1_000_000}@{host}"


def make_id(hostname: str | None = None) -> str:
    """A new message id `P{pid}T{unixtime}C{microsecond}@{host}`, unique on this host."""
    return new_id(safe_host(hostname) if hostname else default_host())


# What an operator may name as a message id (`mailengine queue show ID`, the control socket,
# the web admin): the characters of the ids made above (and by the old product), which keep a
# name inside its directory. Anything else (`../../x`, a NUL, a space) is refused, not looked up.
_ID_RE = re.compile(r"[A-Za-z0-9_@=+-][A-Za-z0-9._@=+-]{0,199}")


def is_message_id(text: str) -> bool:
    """True when `text` is a well-formed message id: one file name in one queue directory."""
    return bool(_ID_RE.fullmatch(text))


_host_cache: list[str] = []


def default_host() -> str:
    """This machine's host name, made safe; looked up once per process."""
    if not _host_cache:
        _host_cache.append(safe_host(socket.gethostname()))
    return _host_cache[0]
