"""Traffic shaping's edges (shaping.py stays pure): its suspensions and throttles kept in
HOME/shaping-state.json across a restart (shaping_state.py) and, with `shared.redis_url`, shared
with the other engines (shared_shaping.py): what one engine starts or lifts by hand, every
engine does within CUT_POLL seconds, and a destination's message and connection rates are one
budget for all of them. Redis down: each engine goes on with its own state (what it could not
post is posted when Redis is back).

delivery.py waits here for a destination's rates, and polls here with the concurrency cuts.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from . import shaping_state
from .shaping import Override, Shaping
from .shared_shaping import SharedShaping

log = logging.getLogger("mailengine.shaping")

SAVE_STEP = 5.0  # s: an override that only lasts longer is saved and posted once it grew this


class ShapingLink:
    def __init__(self, shaping: Shaping, home: Path | str, shared=None,
                 test_mode: bool = False) -> None:
        self.shaping = shaping
        self.path = shaping_state.state_file(home, test_mode)
        self.shared = SharedShaping(shared) if shared is not None else None
        self._outbox: dict[str, dict] = {}  # records not on the board yet (Redis down)
        self._posting = asyncio.Lock()  # one flush at a time: an older record never lands last
        self._told: dict[str, float] = {}  # dest -> the expiry last saved and posted
        self._save_failed = False
        for o in shaping_state.load(self.path, shaping.clock()):
            shaping.adopt(o, "kept from before the restart")
            self._told[o.dest] = o.until
        shaping.on_change = self._changed

    # -- suspensions and throttles -------------------------------------------------------------

    def _changed(self, dest: str, o: Override | None, what: str) -> None:
        if what == "longer":  # said again by units still running: not news every time
            if o is None or o.until - self._told.get(dest, 0.0) < SAVE_STEP:
                return
        if o is not None and what != "lifted":
            self._told[dest] = o.until
        else:
            self._told.pop(dest, None)
        self._save()
        if self.shared is None or what == "over" or o is None:
            return  # over: every engine sees that on its own clock
        now = self.shaping.clock()
        self._outbox[dest] = (
            {"action": "lifted", "at": now, "end": max(o.end(), now + 60)} if what == "lifted"
            else {**o.to_dict(), "end": o.end()})
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # posted at the next poll
        self.shared.limits._background(self.flush())

    def _save(self) -> None:
        now = self.shaping.clock()
        try:
            shaping_state.save(self.path, [o for o in self.shaping.overrides.values()
                                           if not o.over(now)])
        except OSError as e:
            if not self._save_failed:  # once, not per change
                log.error("%s cannot be written (%s): suspensions and throttles would not be "
                          "kept across a restart", self.path, e)
            self._save_failed = True
        else:
            self._save_failed = False

    async def flush(self) -> None:
        """Post what waits to be posted; what Redis did not take waits for the next poll."""
        async with self._posting:
            for dest in list(self._outbox):
                rec = self._outbox.get(dest)  # the newest for dest (a change while posting)
                if rec is None:
                    continue
                if not await self.shared.post(dest, rec, self.shaping.clock()):
                    return
                if self._outbox.get(dest) is rec:
                    del self._outbox[dest]

    async def poll(self) -> list[str]:
        """Adopt the suspensions, throttles and lifts other engines posted; the destinations
        whose limits changed (the scheduler looks at them again)."""
        if self.shared is None:
            return []
        await self.flush()
        records = await self.shared.poll()
        changed = []
        for rec in records or ():
            dest = rec["dest"]
            try:
                if rec.get("action") == "lifted":
                    if self.shaping.lifted_elsewhere(dest, float(rec["at"])):
                        changed.append(dest)
                    continue
                o = Override.from_dict(rec)
            except (ValueError, KeyError, TypeError):
                continue  # not a record of ours
            if self.shaping.adopt(o, "by another engine"):
                changed.append(dest)
            self._told[dest] = max(self._told.get(dest, 0.0), o.until)
        if records:
            self._save()
        return changed

    # -- rates ---------------------------------------------------------------------------------

    async def wait_message(self, dest: str) -> None:
        """Take one message from `dest`'s message rates, waiting as long as they say."""
        await self._wait(dest, connections=False)

    async def wait_connection(self, dest: str) -> None:
        """Take one new connection from `dest`'s connection rate, waiting first if need be."""
        await self._wait(dest, connections=True)

    async def _wait(self, dest: str, connections: bool) -> None:
        if self.shared is not None:
            while rates := self.shaping.rates(dest, connections):
                delay = await self.shared.take(rates)  # every engine's budget: none taken
                if delay is None:                       # until it may go now
                    break  # Redis down: this engine's own buckets
                if delay <= 0:
                    return
                await asyncio.sleep(delay)
            else:
                return  # no such rate
        wait = (self.shaping.connect_delay(dest) if connections
                else self.shaping.rate_delay(dest))
        if wait > 0:
            await asyncio.sleep(wait)
