"""The record describing one setting; the table of all settings is in config.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    default: Any
    kind: str  # bool | int | float | str | list[str] | list[float]
    doc: str
    minimum: float | None = None  # numbers below it are refused (0 may be allowed separately)
    zero_ok: bool = False  # with minimum: 0 is allowed and has a special meaning
    check: Callable[[Any], str | None] | None = None  # returns a complaint, or None when fine
    restart: bool = False  # True: a change takes effect only after a restart
    # A list whose entries hold commas ('domain,hostname,MX,ip'): on the command line plain
    # text is one entry, several are written as a TOML array.
    comma_entries: bool = False

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"
