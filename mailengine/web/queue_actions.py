"""Queue actions of the web admin and the API: delete, hold, release, retry now.

They are done by mailengine.queueops (shared with `mailengine queue ...`): messages are taken out
of the delivery schedule, changed (their `.inf` rewritten) and put back, so memory and disk agree;
a message being delivered at that moment is left alone and reported. Targets are message ids or
`@domain` (delete @domain removes only that domain's recipients from a message that also has
others).
"""
from __future__ import annotations

from .. import queueops

ACTIONS = ("delete", "hold", "release", "retry")


async def run(engine, action: str, targets: list[str]) -> tuple[list[str], dict[str, str]]:
    """Do `action` to `targets`; returns (ids changed, {id or target: why not})."""
    if action not in ACTIONS:
        return [], {action: f"no such action (one of {', '.join(ACTIONS)})"}
    if not targets:
        return [], {}
    res = await queueops.engine_apply(engine, action, targets)
    done = list(res.get("done", [])) + list(res.get("trimmed", {}))
    problems = {k: str(v) for k, v in res.get("skipped", {}).items()}
    for t in res.get("not_found", []):
        problems[t] = "not in the queue"
    for t in res.get("unchanged", []):
        problems[t] = {"hold": "already held", "release": "not held",
                       "retry": "held: release it first"}.get(action, "unchanged")
    return done, problems
