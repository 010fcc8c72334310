"""The record describing one setting; the table of all settings is in config.py.

`scope` says which processes read a setting: the intake processes (SMTP in: inbound, policy,
intake; with `network.intake_workers` > 1 these are separate worker processes), the delivering
engine, or both. A setting that is not `restart` is applied at once to every process of its scope
(app.Engine.apply_settings; intake worker processes are replaced by ones started with the new
values, workers.py), so `workers.worker_values` leaves out the DELIVERY ones: changing them
restarts no worker.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

INTAKE = "intake"  # read by the processes that take SMTP (the worker processes, if any)
DELIVERY = "delivery"  # read by the engine process only (delivery, notices, housekeeping)
BOTH = "both"
SCOPES = (INTAKE, DELIVERY, BOTH)
READ_BY = {INTAKE: "the SMTP intake processes", DELIVERY: "the engine process (delivery)",
           BOTH: "the SMTP intake processes and the engine process"}  # for `config show`


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
    scope: str = BOTH  # INTAKE | DELIVERY | BOTH: which processes read it (see above)
    secret: bool = False  # shown masked (secret_values.py; keys like *password* are anyway)

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"
