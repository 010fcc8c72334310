"""HOME/shaping-state.json: the suspensions and throttles in force, so that a restart keeps them
(shaping.py holds them in memory only; shaping_link.py calls save on each change).

Written whole, by rename (a crash leaves the old file or the new one, never half of one). At
load, the overrides that are over by now are dropped, and a file that cannot be read is logged
and ignored: it never stops the engine (its mail only goes out unshaped by a past reply).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .atomic_file import write_atomically
from .shaping import Override

log = logging.getLogger("mailengine.shaping")


def state_file(home: Path | str, test_mode: bool = False) -> Path:
    """A test-mode engine (mailq-test) keeps its own: both may run in one home at once."""
    return Path(home) / ("shaping-state-test.json" if test_mode else "shaping-state.json")


def save(path: Path, overrides: list[Override]) -> None:
    """Raises OSError (the caller logs it: delivery goes on)."""
    doc = {"version": 1, "overrides": [o.to_dict() for o in sorted(overrides,
                                                                  key=lambda o: o.dest)]}
    # 0600: the replies it keeps name our addresses; the engine's user only
    write_atomically(path, json.dumps(doc, indent=1) + "\n", mode=0o600)


def load(path: Path, now: float) -> list[Override]:
    """The overrides kept in `path` that are still in force at `now`; [] without a file."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        records = doc["overrides"]
        if not isinstance(records, list):
            raise ValueError("overrides: not a list")
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.error("%s cannot be read (%s): the suspensions and throttles of before the restart "
                  "are not kept", path, e)
        return []
    out = []
    for rec in records:
        try:
            o = Override.from_dict(rec)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("%s: a record that is not a suspension or throttle is skipped: %r", path,
                      rec)
            continue
        if not o.over(now):
            out.append(o)
    return out
