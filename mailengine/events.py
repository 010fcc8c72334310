"""The JSON-lines event log `HOME/log/events.jsonl`: one line per delivery attempt per recipient,
and one per change of an address's standing (sender reputation, issue 18).

Other programs follow it (`tail -F`, a log shipper) to learn what happened to each address
without reading the queue. Every line is one JSON object whose `event` says what it is:
`attempt` (below), `suppressed` (an address put on the suppression list: suppression.py, with
`source` bounce / complaint / unsubscribe / manual; `suppressions-imported` for a CSV import),
`dropped` (a suppressed recipient accepted
and not delivered, `suppression.action = "drop"`), `complaint` (a feedback-loop report:
complaints.py), `unsubscribed` (one-click or mailto: unsubscribe.py). A reader that wants only
deliveries keeps the `attempt` lines. An attempt line:

    {"time": "2026-03-03T10:12:31.402+0000", "event": "attempt", "id": "P17000T1C3@host",
     "from": "news@sender.test", "rcpt": "alice@dest.test", "attempt": 1,
     "result": "hard", "final": true, "mx": "mx.dest.test", "ip": "10.0.0.7", "port": 25,
     "code": 550, "enhanced": "5.1.1", "text": "User unknown", "stage": "rcpt",
     "class": "address", "category": "bad-mailbox", "duration": 0.084}

`result` is sent / hard / soft; `final` says the recipient is finished (sent, failed for good, or
given up after the last retry) rather than waiting for a retry. `category` names the kind of
failure (categories.py: bad-mailbox, quota-issues, spam-related, ...; "message-expired" for a
recipient given up after the last retry; "" when sent); `class` is the older, coarser word kept
for the programs that read it. `duration` is the seconds the
attempt took for that recipient (DNS, connection and transaction). `mx`/`ip` are empty when no
server was reached (a DNS failure). The file is append-only and may be truncated or rotated by
other programs at any time (lists.AppendFile); the engine writes each attempt's lines at once.
After renaming it away, wait a second before reading the old file: lines written in that second
may still land in it (and if it is deleted rather than renamed, lines of that second are lost).

An engine in test mode (`mailengine test`: RSET and QUIT instead of DATA) writes its lines to
`log/events-test.jsonl` instead, each with `"test": true`, and a recipient the server accepted
has `"result": "tested"`, never `sent`: nothing was delivered, so nothing following
events.jsonl may count it.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterable

from .categories import EXPIRED, categorize
from .envelope import Message
from .last_one import LastOne
from .lists import AppendFile
from .outcome import AttemptResult, Kind, RcptOutcome, bounce_class

log = logging.getLogger("mailengine.events")

# one encoder for every line: json.dumps with options makes a new one per call
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

EVENTS_JSONL = "events.jsonl"
TEST_EVENTS_JSONL = "events-test.jsonl"  # test mode's attempts, kept apart


def _second_text(whole: int) -> tuple[str, str]:
    lt = time.localtime(whole)
    return time.strftime("%Y-%m-%dT%H:%M:%S", lt), time.strftime("%z", lt)


# The second's text and its offset, made once a second (an attempt's lines need the time: two
# strftime calls were a fifth of making them).
_second = LastOne(_second_text)


def iso_time(t: float | None = None) -> str:
    """Local time with milliseconds and offset: 2026-03-03T10:12:31.402+0000."""
    t = time.time() if t is None else t
    text, offset = _second(int(t // 1))
    return f"{text}.{int(t % 1 * 1000):03d}{offset}"


def attempt_events(msg: Message, outcomes: Iterable[RcptOutcome], res: AttemptResult | None,
                   now: float | None = None) -> list[dict]:
    """The event records of one finished send attempt of `msg`."""
    stamp = iso_time(now)
    deferred = set(res.deferred) if res is not None else set()
    gave_up = set(res.gave_up) if res is not None else set()
    out = []
    for o in outcomes:
        rec = {"time": stamp, "event": "attempt", "id": msg.id, "from": msg.mail_from,
               "rcpt": o.address, "attempt": msg.send_tries, "result": o.kind.value,
               "final": o.address not in deferred,
               "mx": o.host, "ip": getattr(o, "ip", ""), "port": getattr(o, "port", 0),
               "code": o.code, "enhanced": o.enhanced, "text": o.text, "stage": o.stage,
               "class": "" if o.kind is Kind.SENT else bounce_class(o.code, o.enhanced),
               "category": category(o, gave_up),
               "duration": round(float(getattr(o, "duration", 0.0)), 3)}
        out.append(rec)
    return out


def category(o: RcptOutcome, gave_up: set[str] = frozenset()) -> str:
    """The failure's category (categories.py); "" for a recipient sent."""
    if o.kind is Kind.SENT:
        return ""
    if o.address in gave_up:  # whatever the last reply said, time ran out
        return EXPIRED
    return categorize(o.code, o.enhanced, o.text)


class EventLog:
    def __init__(self, log_dir: Path | str, test_mode: bool = False) -> None:
        # A stat per line cost the event loop 9 % of its time in bench/relay (py-spy); a line
        # written within a second of a rotation still lands in the rotated file.
        self.test_mode = test_mode
        name = TEST_EVENTS_JSONL if test_mode else EVENTS_JSONL
        self.file = AppendFile(Path(log_dir) / name, recheck=1.0)

    def attempt(self, msg: Message, outcomes: Iterable[RcptOutcome],
                res: AttemptResult | None = None) -> list[tuple[dict, str]]:
        """Write the attempt's records; returns each with its JSON line (webhooks.py posts
        them too, without encoding them again)."""
        records = attempt_events(msg, outcomes, res)
        if self.test_mode:
            for r in records:
                r["test"] = True
                if r["result"] == Kind.SENT.value:
                    r["result"] = "tested"
        return list(zip(records, self.write(records)))

    def write(self, records: list[dict]) -> list[str]:
        """Append the records; returns their lines."""
        if not records:
            return []
        lines = [_encode(r) for r in records]
        try:
            self.file.append_lines(lines)
        except OSError as e:
            log.warning("cannot append to %s: %s", self.file.path, e)
        return lines

    def close(self) -> None:
        self.file.close()
