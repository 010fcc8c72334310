"""The name this engine goes by: `network.helo_text`, or else the host's fully qualified name.

That name is said in the SMTP greeting, in EHLO to other servers, in Received: and in message ids.
Servers and filters refuse an unqualified EHLO name (`EHLO vm`), so an empty `helo_text` means
the fully qualified name (socket.getfqdn: /etc/hosts or DNS for the host name, as Postfix's
myhostname), and the engine warns at start when the host has none.
"""
from __future__ import annotations

import functools
import socket


@functools.lru_cache(maxsize=1)
def fqdn() -> tuple[str, bool]:
    """(the host's fully qualified name, True), or (its short name, False) when it has none."""
    name = socket.gethostname()
    if "." in name:
        return name, True
    try:
        full = socket.getfqdn(name)
    except (OSError, UnicodeError):
        full = ""
    # getfqdn falls back to what the address maps to first, often plain "localhost"
    if "." in full and not full.lower().startswith("localhost"):
        return full, True
    return name, False


def host_name(cfg) -> str:
    """`network.helo_text`, or the fully qualified host name (the short one when there is none)."""
    return cfg.network.helo_text or fqdn()[0]


def unqualified_warning(cfg) -> str | None:
    """The start-up warning when the engine would go by a name without a domain."""
    name = host_name(cfg)
    if "." in name or name.startswith("["):
        return None
    return (f"this engine's name {name!r} is not fully qualified (network.helo_text is "
            f"{'empty and the host has no domain name' if not cfg.network.helo_text else 'so'}"
            f"): other servers may refuse 'EHLO {name}'; set network.helo_text to the name of "
            "this server's public address")
