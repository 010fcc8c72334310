"""The event loop every MailEngine process runs on."""
from __future__ import annotations


def loop_factory():
    """uvloop's event loop when installed: its sockets and timers are several times cheaper."""
    try:
        import uvloop
        return uvloop.new_event_loop
    except ImportError:
        return None
