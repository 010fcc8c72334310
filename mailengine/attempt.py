"""One send attempt of one message, while its units run (delivery.py makes and ends it; the
ledger's entry holds it, ledger.py): what each unit brought back, and the body they share."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .dkim import DKIMHold
    from .envelope import Message
    from .outcome import RcptOutcome
    from .smtp.client import Body
    from .unsubscribe import HeaderMaker


@dataclass
class Attempt:
    """One send attempt of one message: its units' outcomes until the last one ends."""
    msg: Message
    outcomes: list[RcptOutcome] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    body: Body | None = None
    gone: bool = False  # its files vanished (removed by hand): nothing to send, nothing to write
    preparing: asyncio.Future | None = None  # the body being signed, awaited by every unit
    fresh_signature: bytes = b""  # DKIM signature made at this attempt (not kept in ID.dkim yet)
    dkim_hold: DKIMHold | None = None  # its domain's DKIM key is unusable and missing_key = hold
    seven_bit: asyncio.Future | None = None  # the body for servers without 8BITMIME (or None)
    # Per-recipient header fields (unsubscribe.py): `body` then only gives the size and 8-bit
    # flag, each recipient's copy is made from `data` (and `seven_data`, its 7-bit form)
    personal: HeaderMaker | None = None  # what makes the fields, for the whole attempt
    data: bytes = b""
    seven_data: asyncio.Future | None = None
    warmup_hold: float = 0.0  # a unit waits for the warm-up (sources.py) until this clock time
    process_gone: bool = False  # a delivery process ended under a unit: retry in a moment
