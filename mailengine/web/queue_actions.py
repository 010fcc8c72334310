"""Queue actions of the web admin and the API: delete, hold, release, retry now.

They are done by mailengine.queueops (shared with `mailengine queue ...`): messages are taken out
of the delivery schedule, changed (their `.inf` rewritten) and put back, so memory and disk agree;
a message being delivered at that moment is left alone and reported. Targets are message ids or
`@domain` (delete @domain removes only that domain's recipients from a message that also has
others). Without queueops or a delivery engine the pages show the queue without action buttons
and the API answers 501.
"""
from __future__ import annotations

ACTIONS = ("delete", "hold", "release", "retry")


def _ops():
    try:
        from .. import queueops
    except ImportError:
        return None
    return queueops if hasattr(queueops, "engine_apply") else None


def available(engine=None) -> bool:
    return _ops() is not None and (engine is None or getattr(engine, "delivery", None) is not None)


async def run(engine, action: str, targets: list[str]) -> tuple[list[str], dict[str, str]]:
    """Do `action` to `targets`; returns (ids changed, {id or target: why not})."""
    if action not in ACTIONS:
        return [], {action: f"no such action (one of {', '.join(ACTIONS)})"}
    ops = _ops()
    if ops is None or getattr(engine, "delivery", None) is None:
        return [], {t: "queue actions are not available in this engine" for t in targets[:1]}
    if not targets:
        return [], {}
    res = await ops.engine_apply(engine, action, targets)
    done = list(res.get("done", [])) + list(res.get("trimmed", {}))
    problems = {k: str(v) for k, v in res.get("skipped", {}).items()}
    for t in res.get("not_found", []):
        problems[t] = "not in the queue"
    for t in res.get("unchanged", []):
        problems[t] = {"hold": "already held", "release": "not held",
                       "retry": "held: release it first"}.get(action, "unchanged")
    return done, problems
