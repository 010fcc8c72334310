"""The queue ledger: every queued message this engine knows, in one place, changed in one way.

A queued message is, as the engine sees it, in one of three places:

- **in memory**: an `Entry`: its envelope (the Message read from `ID.inf`), the directory its
  files are in, its attempt while one runs, and the bytes of `ID.dat` intake handed over;
  at most `limits.messages_in_memory` of them (app.Engine.take decides);
- **on disk only**: the backlog (backlog.py), its id and when it is due; its files in retry/,
  or in working/ for relayed mail stored there while memory was full (`disk_where`: no
  rename out and back in for each message of a queue larger than memory);
- **unknown**: files in retry/ no scan has taken yet (drop-ins), broken ones left alone, and
  every message done or deleted.

The ledger does no I/O and keeps no time: whoever moves a message's files tells the ledger
after the move. When a message is due and which of its recipients go out next is the
scheduler's (scheduler.py); what an attempt's replies mean is verdict.py's. Every change is one
of these moves (the `TRANSITIONS` table; each method checks its own):

| method         | from                         | to                                | called by            |
|----------------|------------------------------|-----------------------------------|----------------------|
| `admit`        | unknown, on disk, in memory (not sending) | in memory, waiting or held | Engine.take (intake, the worker pipe, drop-ins, notices, the backlog loader, queue commands), queue commands putting a message back |
| `keep_on_disk` | unknown, in memory (not sending) | on disk (retry/ or working/)  | Engine.take (memory full, a stop), delivery.evict (waiting or held only) |
| `moved_on_disk`| on disk                      | (the same; its files elsewhere)   | delivery.stop: working/ -> retry/ |
| `take_out`     | in memory, waiting or held   | in memory, changing               | queue commands (out of the schedule, being changed) |
| `claim`        | in memory, waiting           | in memory, sending                | delivery: an attempt's first unit starts |
| `moved`        | in memory                    | (the same; its files elsewhere)   | delivery: retry/ -> working/ and back |
| `attempt_over` | in memory, sending           | in memory, waiting                | delivery: the attempt recorded, recipients left |
| `finish`       | in memory, on disk           | unknown                           | delivery (done, removed, gone), queue commands (deleted) |
| `stuck`        | in memory                    | known, not in memory              | delivery: an attempt that could not be recorded stays in working/ until the next start |

"Held" is the message's own flag (`msg.held`, kept in `ID.inf`): a held message is in memory
(or on disk) like any other, and never scheduled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from .backlog import Backlog
from .queue_dirs import RETRY, WORKING

if TYPE_CHECKING:
    from .attempt import Attempt
    from .envelope import Message

# a message's state in memory -> the ledger's methods that may take it from there
WAITING, HELD, CHANGING, SENDING = "waiting", "held", "changing", "sending"
TRANSITIONS: dict[str, frozenset[str]] = {
    WAITING: frozenset({"admit", "keep_on_disk", "take_out", "claim", "moved", "finish",
                        "stuck"}),
    HELD: frozenset({"admit", "keep_on_disk", "take_out", "moved", "finish", "stuck"}),
    CHANGING: frozenset({"admit", "keep_on_disk", "moved", "finish", "stuck"}),
    SENDING: frozenset({"moved", "attempt_over", "finish", "stuck"}),
}


class LedgerError(RuntimeError):
    """A change the table does not allow: a bug in the caller, never the mail's fault."""


@dataclass(slots=True, eq=False)
class Entry:
    """One queued message in memory."""
    msg: Message
    where: str = RETRY  # the directory holding ID.dat and ID.inf: RETRY or WORKING
    attempt: Attempt | None = None  # the send attempt running now (delivery.py)
    data: bytes | None = None  # ID.dat's bytes from intake, kept until the first attempt
    changing: bool = False  # taken out by a queue command, until it puts the message back

    @property
    def state(self) -> str:
        if self.attempt is not None:
            return SENDING
        if self.changing:
            return CHANGING
        return HELD if self.msg.held else WAITING


class Ledger:
    def __init__(self, cache_limit: int = 0) -> None:
        self.entries: dict[str, Entry] = {}  # in memory, by id
        self.backlog = Backlog()  # on disk only
        self.sending = 0  # entries with an attempt running
        self.cache_limit = cache_limit  # bytes of ID.dat kept from intake (max_queue_memory_kb)
        self.cached_bytes = 0
        self._stuck: set[str] = set()  # left in working/ until the next start: never taken again
        self._disk_working: set[str] = set()  # on disk only with their files in working/

    # -- what is known --------------------------------------------------------------------------

    def __contains__(self, msg_id: object) -> bool:
        """Known to this engine: in memory, on disk only, or stuck (the drop-in scan and the
        worker pipe take nothing known)."""
        return msg_id in self.entries or msg_id in self.backlog or msg_id in self._stuck

    def get(self, msg_id: str) -> Entry | None:
        return self.entries.get(msg_id)

    def message(self, msg_id: str) -> Message | None:
        e = self.entries.get(msg_id)
        return None if e is None else e.msg

    def messages(self) -> Iterator[Message]:
        """The messages in memory (a snapshot: safe while the ledger changes)."""
        return iter([e.msg for e in self.entries.values()])

    @property
    def in_memory(self) -> int:
        return len(self.entries)

    @property
    def total(self) -> int:
        """Every message this engine knows: in memory and on disk only."""
        return len(self.entries) + len(self.backlog)

    def disk_where(self, msg_id: str) -> str:
        """The directory of a backlog message's files."""
        return WORKING if msg_id in self._disk_working else RETRY

    def on_disk_in_working(self) -> list[str]:
        """Backlog messages whose files are in working/ (a stop moves them to retry/)."""
        return list(self._disk_working)

    def held(self) -> int:
        return sum(1 for e in self.entries.values() if e.msg.held) + self.backlog.held()

    # -- changes --------------------------------------------------------------------------------

    def admit(self, msg: Message, where: str | None = None) -> Entry:
        """Into memory, waiting (or held). A message in memory already gets its new envelope
        (a queue command changed it) and keeps its files' place unless `where` says."""
        e = self.entries.get(msg.id)
        if e is None:
            self.backlog.discard(msg.id)
            self._stuck.discard(msg.id)
            self._disk_working.discard(msg.id)
            e = self.entries[msg.id] = Entry(msg, where or RETRY)
        else:
            self._check(e, "admit")
            e.msg = msg
            e.changing = False
            if where is not None:
                e.where = where
        if e.where not in (RETRY, WORKING):
            raise LedgerError(f"{msg.id}: queued mail waits in retry/ or working/, "
                              f"not {e.where}/")
        return e

    def keep_on_disk(self, msg_id: str, due: float, where: str = RETRY) -> None:
        """On disk only from now on, its files in `where`, loaded again when `due` comes."""
        e = self.entries.get(msg_id)
        if e is not None:
            self._check(e, "keep_on_disk")
            self._drop(msg_id)
        self._stuck.discard(msg_id)
        if where == WORKING:
            self._disk_working.add(msg_id)
        else:
            self._disk_working.discard(msg_id)
        self.backlog.add(msg_id, due)

    def moved_on_disk(self, msg_id: str, where: str) -> None:
        """A backlog message's files are in `where` now (the caller moved them)."""
        if where == WORKING:
            self._disk_working.add(msg_id)
        else:
            self._disk_working.discard(msg_id)

    def take_out(self, e: Entry) -> None:
        """A queue command takes the message out of the schedule to change it: nothing sends,
        evicts or takes it again until the command puts it back (admit, keep_on_disk) or
        deletes it (finish)."""
        self._check(e, "take_out")
        e.changing = True

    def claim(self, e: Entry, attempt: Attempt) -> None:
        """A send attempt starts (its first unit): the entry is the attempt's until it ends."""
        self._check(e, "claim")
        e.attempt = attempt
        self.sending += 1

    def moved(self, e: Entry, where: str) -> None:
        """Its files are in `where` now (the caller moved them)."""
        self._check(e, "moved")
        e.where = where

    def attempt_over(self, e: Entry) -> None:
        """The attempt is recorded and recipients are left: waiting again."""
        self._check(e, "attempt_over")
        e.attempt = None
        self.sending -= 1

    def finish(self, msg_id: str) -> None:
        """Done, removed, deleted or gone: the engine forgets it."""
        e = self.entries.get(msg_id)
        if e is not None:
            self._check(e, "finish")
            self._drop(msg_id)
        self.backlog.discard(msg_id)
        self._disk_working.discard(msg_id)

    def stuck(self, msg_id: str) -> None:
        """Its files stay where they are (working/) until the next start's recovery: known, so
        nothing takes it again meanwhile, and out of memory."""
        e = self.entries.get(msg_id)
        if e is not None:
            self._check(e, "stuck")
            self._drop(msg_id)
        self.backlog.discard(msg_id)
        self._disk_working.discard(msg_id)
        self._stuck.add(msg_id)

    # -- ID.dat's bytes from intake (limits.max_queue_memory_kb) --------------------------------

    def keep_data(self, e: Entry, data: bytes) -> None:
        """Keep the bytes intake just stored, within the limit (beyond it the file is read)."""
        self.take_data(e)
        if self.cached_bytes + len(data) <= self.cache_limit:
            e.data = data
            self.cached_bytes += len(data)

    def take_data(self, e: Entry | None) -> bytes | None:
        """The kept bytes, handed over once (None: read the file)."""
        if e is None or e.data is None:
            return None
        data, e.data = e.data, None
        self.cached_bytes -= len(data)
        return data

    # -------------------------------------------------------------------------------------------

    def _drop(self, msg_id: str) -> None:
        e = self.entries.pop(msg_id)
        self.take_data(e)
        if e.attempt is not None:
            e.attempt = None
            self.sending -= 1

    @staticmethod
    def _check(e: Entry, change: str) -> None:
        if change not in TRANSITIONS[e.state]:
            raise LedgerError(f"{e.msg.id}: cannot {change} a message that is {e.state}")
