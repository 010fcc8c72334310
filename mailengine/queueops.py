"""Queue operations of `mailengine queue`: list, show, delete, hold, release, retry, flush.

Two places do the work, with the same rules (the functions in the middle of this file):

- **A running engine** (`engine_*`, called by control.py inside the engine): messages are taken
  out of the schedule (delivery.take_for_change), changed, their `.inf` rewritten, and put back,
  so memory and disk never disagree and a held message is never sent. A message being delivered
  at that moment is left alone and reported ("being delivered now").
- **A stopped engine** (`FileQueue`): the same changes made directly on `mailq/retry/` and
  `mailq/working/`; the next start reads them (a held message stays held, a released one is due
  at once).

Targets: a message id, `@domain` (the messages with recipients left at that domain),
`from:ADDRESS` (the messages of one sender: a mailing) or `all`.
`delete @domain` removes only that domain's recipients from a message that also has others.
Held = the `.inf` key `held=1` (envelope.Message.held).

The "last reply" of a message comes from the delivery log lines `ID: address deferred|failed:
reply` (delivery.py): a running engine keeps the latest per recipient in memory (`ReplyTracker`,
installed by control.py); for a stopped engine the tails of the newest log files are read. The
`.inf` key `lastreply` (one deferred reply per destination domain, written by delivery) is the
fallback that survives a restart and rotated logs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Iterable

from .queue_dirs import RETRY, WORKING
from .envelope import InfError, Message, format_log_entry, last_replies
from .message_ids import is_message_id
from .spool import Spool

ACTIONS = ("delete", "hold", "release", "retry")
TIME_FMT = "%Y/%m/%d %H:%M:%S"
LOG_TAIL_BYTES = 8 << 20  # bytes read from the end of each of the newest log files
REPLY_LINE = re.compile(
    r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) (\S+): (\S+) (deferred|failed): (.*)$")


# ---------------------------------------------------------------- targets and records

def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def check_id(text: str) -> str:
    """A message id as given, or ValueError when it is not well formed (message_ids.is_message_id):
    a name such as `../../x` must never reach a path."""
    if not is_message_id(text):
        raise ValueError(f"{text!r} is not a message id (such as P123T1700000000C1@host)")
    return text


def parse_target(text: str) -> str:
    """'all', '@domain' (lowercased), 'from:ADDRESS' or a well-formed message id; ValueError
    for anything else."""
    text = text.strip()
    if not text:
        raise ValueError("an empty target")
    if text.lower() == "all":
        return "all"
    if text.startswith("@"):
        if len(text) < 2:
            raise ValueError("'@' needs a domain: @example.com")
        return text.lower()
    if text[:5].lower() == "from:":
        return "from:" + text[5:].strip().strip("<>").lower()
    return check_id(text)


def is_group(target: str) -> bool:
    """A target naming a group of messages (may match none) rather than one id."""
    return target == "all" or target.startswith("@") or target.startswith("from:")


def matches(msg: Message, target: str) -> bool:
    if target == "all":
        return True
    if target.startswith("@"):
        return any(domain_of(a) == target[1:] for a in msg.rcpt_to_send)
    if target.startswith("from:"):
        return msg.mail_from.lower() == target[5:]
    return msg.id == target


def fmt_time(t: datetime | float | None) -> str:
    if t is None:
        return ""
    if isinstance(t, (int, float)):
        t = datetime.fromtimestamp(t)
    return t.strftime(TIME_FMT)


def record(msg: Message, where: str, state: str, due: float | None = None,
           replies: dict[str, tuple[str, str]] | None = None) -> dict:
    """What `queue list` shows of one message (JSON-ready; times as local 'Y/m/d H:M:S')."""
    if due is not None:
        nxt = fmt_time(due)
    elif state in ("held", "sending"):
        nxt = ""
    else:
        nxt = fmt_time(msg.retry_time) or fmt_time(msg.time_created)
    left = set(msg.rcpt_to_send)
    known = last_replies(msg)  # kept in the .inf: survives a restart
    for a, r in (replies or {}).items():
        if a not in known or tuple(r)[0] >= known[a][0]:
            known[a] = tuple(r)
    reps = {a: list(r) for a, r in known.items() if a in left}
    return {
        "id": msg.id, "where": where, "state": state, "from": msg.mail_from,
        "rcpts": list(msg.rcpt_to_send), "sent": len(msg.rcpt_sent),
        "failed": len(msg.rcpt_failed), "created": fmt_time(msg.time_created), "next": nxt,
        "tries": msg.send_tries, "size": msg.size, "priority": msg.priority,
        "history": msg.log[-1] if msg.log else "", "replies": reps,
    }


def last_reply(rec: dict, domain: str | None = None) -> tuple[str, str]:
    """(when, 'address: reply') of the latest reply of a record, for one domain or any."""
    best = ("", "")
    for addr, (when, text) in rec.get("replies", {}).items():
        if domain is not None and domain_of(addr) != domain:
            continue
        if when >= best[0]:
            best = (when, f"{addr}: {text}")
    return best


def by_domain(records: list[dict]) -> list[dict]:
    """Per destination domain: messages, recipients, held, oldest, next retry, last reply."""
    out: dict[str, dict] = {}
    for rec in records:
        counts: dict[str, int] = {}
        for a in rec["rcpts"]:
            d = domain_of(a)
            counts[d] = counts.get(d, 0) + 1
        for d, n in counts.items():
            s = out.get(d)
            if s is None:
                s = out[d] = {"domain": d, "messages": 0, "rcpts": 0, "held": 0, "sending": 0,
                              "oldest": rec["created"], "next": "", "last_reply": "",
                              "last_reply_at": ""}
            s["messages"] += 1
            s["rcpts"] += n
            s["held"] += rec["state"] == "held"
            s["sending"] += rec["state"] == "sending"
            s["oldest"] = min(s["oldest"], rec["created"])
            if rec["next"] and (not s["next"] or rec["next"] < s["next"]):
                s["next"] = rec["next"]
            when, text = last_reply(rec, d)
            if text and when >= s["last_reply_at"]:
                s["last_reply_at"], s["last_reply"] = when, text
    return sorted(out.values(), key=lambda s: (-s["rcpts"], s["domain"]))


def drop_domain(msg: Message, domain: str, now: datetime | None = None) -> list[str]:
    """Remove the recipients left at `domain` from a message (delete @domain of a message that
    also has others); the history says so. Returns the addresses removed."""
    gone = [a for a in msg.rcpt_to_send if domain_of(a) == domain]
    if gone:
        msg.rcpt_to_send = [a for a in msg.rcpt_to_send if domain_of(a) != domain]
        msg.rcpt_transient = [a for a in msg.rcpt_transient if domain_of(a) != domain]
        msg.log.append(format_log_entry(now or datetime.now(),
                                        f"{len(gone)} recipients at {domain} deleted by "
                                        "the administrator (mailengine queue delete)"))
    return gone


def change(msg: Message, action: str, now: datetime) -> bool:
    """Hold, release or retry one message in memory; False when there is nothing to do."""
    if action == "hold":
        if msg.held:
            return False
        msg.held = True
    elif action == "release":
        if not msg.held:
            return False
        msg.held = False
        msg.retry_time = now
    elif action == "retry":
        if msg.held:
            return False
        msg.retry_time = now
    else:
        raise ValueError(action)
    return True


def new_result(where: str, action: str) -> dict:
    return {"where": where, "action": action, "done": [], "unchanged": [], "trimmed": {},
            "skipped": {}, "not_found": []}


# ---------------------------------------------------------------- the running engine

class ReplyTracker(logging.Handler):
    """Keeps the latest reply per (message, recipient) from delivery's log lines, in memory."""

    def __init__(self, limit: int = 200_000):
        super().__init__(logging.INFO)
        self.replies: dict[str, dict[str, tuple[str, str]]] = {}
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if record.msg != "%s: %s %s: %s" or not isinstance(args, tuple) or len(args) != 4:
            return
        if args[2] not in ("deferred", "failed"):
            return
        msg_id, addr, _, reply = args
        if len(self.replies) >= self.limit and msg_id not in self.replies:
            self.replies.pop(next(iter(self.replies)))
        self.replies.setdefault(str(msg_id), {})[str(addr)] = (
            time.strftime(TIME_FMT, time.localtime(record.created)), str(reply))

    def prune(self, known: Iterable[str] | dict) -> None:
        for mid in [m for m in self.replies if m not in known]:
            del self.replies[mid]


async def engine_records(engine, tracker: ReplyTracker | None = None) -> list[dict]:
    """Every queued message: those in memory, and those in the backlog (read from disk)."""
    d = engine.delivery
    backlog = list((await engine.read_backlog()).items())
    if tracker is not None:
        tracker.prune(set(engine.ledger.entries) | {mid for mid, _ in backlog})
    out = []
    files_in = d.files_in
    for msg in engine.ledger.messages():
        mid = msg.id
        state, due = d.queue_state(mid)
        reps = tracker.replies.get(mid) if tracker is not None else None
        out.append(record(msg, files_in(mid), state or "waiting", due, reps))
    for mid, msg in backlog:
        reps = tracker.replies.get(mid) if tracker is not None else None
        out.append(record(msg, engine.ledger.disk_where(mid), "held" if msg.held else "waiting",
                          None, reps))
    return out


async def engine_show(engine, msg_id: str, tracker: ReplyTracker | None = None) -> dict:
    check_id(msg_id)
    d = engine.delivery
    await engine.rescan()
    msg = engine.ledger.message(msg_id)
    if msg is None:
        # In the backlog, or not known to the engine (perhaps a broken drop-in): from its files.
        return FileQueue(engine.spool.root).show(msg_id)
    state, due = d.queue_state(msg_id)
    where = d.files_in(msg_id)
    reps = tracker.replies.get(msg_id) if tracker is not None else None
    return {"record": record(msg, where, state, due, reps), "inf": _read_inf(engine.spool, msg_id,
                                                                               where),
            "where": where, "log": list(msg.log)}


async def engine_apply(engine, action: str, targets: list[str]) -> dict:
    """delete / hold / release / retry / flush on a running engine (control.py and the web
    admin call it): one command at a time, so two never take and change the same message."""
    async with engine.queue_commands:
        return await _engine_apply(engine, action, targets)


async def _engine_apply(engine, action: str, targets: list[str]) -> dict:
    d = engine.delivery
    res = new_result("engine", action)
    targets = [parse_target(t) for t in targets if str(t).strip()]
    await engine.rescan()  # mail dropped in since the last scan is part of "all" and "@domain"
    if action == "flush":
        action, targets = "retry", ["all"]
    ids: dict[str, str] = {}  # id -> the target that chose it
    on_disk: dict[str, Message] = {}  # backlog messages the targets choose, read from disk
    if any(is_group(t) for t in targets):
        on_disk = await engine.read_backlog(lambda m: any(matches(m, t) for t in targets))
    for t in targets:
        if not is_group(t) and t in engine.ledger.backlog and t not in on_disk:
            try:
                on_disk[t] = engine.spool.load(t, engine.ledger.disk_where(t))
            except (OSError, InfError):
                pass
        found = [m.id for m in engine.ledger.messages() if matches(m, t)]
        found += [mid for mid, m in on_disk.items() if matches(m, t)]
        if not found and not is_group(t):
            if action == "delete" and _remove_unknown(engine.spool, t):
                res["done"].append(t)  # a broken drop-in the engine never took
            else:
                res["not_found"].append(t)
        for mid in found:
            ids.setdefault(mid, t)
    # Backlog messages are on disk only: nothing delivers them, so they are taken as they are.
    for mid in ids:
        if mid in on_disk:
            engine.withdraw_from_backlog(on_disk[mid])
    taken, skipped = d.take_for_change([mid for mid in ids if mid not in on_disk])
    taken += [on_disk[mid] for mid in ids if mid in on_disk]
    res["skipped"].update(skipped)
    now = datetime.now().replace(microsecond=0)
    left = {msg.id: msg for msg in taken}  # taken out and not yet put back or deleted
    try:
        for msg in taken:
            back = await _change_one(engine, action, ids[msg.id], msg, now, res)
            left.pop(msg.id)
            if back is not None:
                _put_back(engine, msg.id in on_disk, back)
    finally:
        for msg in left.values():  # an unexpected error: back as they are, never left out
            _put_back(engine, msg.id in on_disk, msg)
    res["paused"] = d.sched.paused
    return res


async def _change_one(engine, action: str, t: str, msg: Message, now: datetime,
                      res: dict) -> Message | None:
    """Carry out `action` (chosen by target `t`) on one taken message. Returns the message to
    put back (changed, or as its files say when they could not be written), None when it is
    gone."""
    d, spool = engine.delivery, engine.spool
    where = d.files_in(msg.id)
    try:
        if action == "delete":
            if t.startswith("@") and any(domain_of(a) != t[1:] for a in msg.rcpt_to_send):
                gone = drop_domain(msg, t[1:], now)
                await spool.update_inf(msg, where)
                res["trimmed"][msg.id] = len(gone)
            else:
                spool.remove(msg.id, where)
                d.forget_message(msg.id)
                logging.getLogger("mailengine").info(
                    "%s: deleted from the queue by the administrator", msg.id)
                res["done"].append(msg.id)
                return None
        elif change(msg, action, now):
            await spool.update_inf(msg, where)
            res["done"].append(msg.id)
        else:
            res["unchanged"].append(msg.id)
    except (OSError, InfError) as e:
        res["skipped"][msg.id] = f"cannot write its .inf: {e}"
        # memory must say what the disk says: read it back as it is
        try:
            return spool.load(msg.id, where)
        except (OSError, InfError):
            d.forget_message(msg.id)
            return None
    return msg


def _put_back(engine, from_backlog: bool, msg: Message) -> None:
    if from_backlog:  # into memory when there is room, else the backlog
        engine.take(msg, engine.delivery.files_in(msg.id))
    else:
        engine.delivery.put_back(msg)


def _read_inf(spool: Spool, msg_id: str, where: str) -> str:
    for w in (where, RETRY, WORKING):
        try:
            with open(spool.inf_path(msg_id, w), "rb") as f:
                return f.read().decode("utf-8", "replace")
        except (FileNotFoundError, KeyError):
            continue
    return ""


def _remove_unknown(spool: Spool, msg_id: str) -> bool:
    """Delete the files of an id in retry/ that the engine does not hold (a broken drop-in)."""
    if "/" in msg_id or msg_id.startswith("."):
        return False
    if not os.path.exists(spool.inf_path(msg_id, RETRY)):
        return False
    spool.remove(msg_id, RETRY)
    return True


# ---------------------------------------------------------------- a stopped engine

class FileQueue:
    """The queue of a stopped engine, read and changed on its files (retry/ and working/;
    recovery moves working/ back to retry/ at the next start)."""

    DIRS = (RETRY, WORKING)

    def __init__(self, mailq: Path | str, log_dir: Path | str | None = None):
        self.spool = Spool(mailq, durable=False)
        self.root = Path(mailq)
        self.log_dir = Path(log_dir) if log_dir else None

    def scan(self) -> tuple[list[tuple[Message, str]], list[tuple[str, str, str]]]:
        """([(message, dir)], [(id, dir, why broken)])."""
        good, bad = [], []
        seen = set()
        for where in self.DIRS:
            try:
                names = sorted(os.listdir(self.root / where))
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith(".") or not name.endswith(".inf"):
                    continue
                mid = name[:-4]
                if mid in seen:
                    continue
                seen.add(mid)
                try:
                    good.append((self.spool.load(mid, where), where))
                except (InfError, OSError) as e:
                    bad.append((mid, where, getattr(e, "reason", None) or str(e)))
        return good, bad

    def records(self) -> list[dict]:
        good, bad = self.scan()
        replies = last_replies_from_logs(self.log_dir, {m.id for m, _ in good})
        out = [record(m, w, "held" if m.held else "waiting", None, replies.get(m.id))
               for m, w in good]
        for mid, where, why in bad:
            out.append({"id": mid, "where": where, "state": "broken", "from": "", "rcpts": [],
                        "sent": 0, "failed": 0, "created": "", "next": "", "tries": 0,
                        "size": 0, "priority": 0, "history": why, "replies": {}})
        return out

    def show(self, msg_id: str) -> dict:
        check_id(msg_id)
        for where in self.DIRS:
            if not os.path.exists(self.spool.inf_path(msg_id, where)):
                continue
            inf = _read_inf(self.spool, msg_id, where)
            try:
                msg = self.spool.load(msg_id, where)
            except (InfError, OSError) as e:
                return {"record": None, "inf": inf, "where": where, "log": [],
                        "broken": getattr(e, "reason", None) or str(e)}
            reps = last_replies_from_logs(self.log_dir, {msg_id}).get(msg_id)
            return {"record": record(msg, where, "held" if msg.held else "waiting", None, reps),
                    "inf": inf, "where": where, "log": list(msg.log)}
        raise KeyError(msg_id)

    def apply(self, action: str, targets: list[str]) -> dict:
        res = new_result("files", action)
        targets = [parse_target(t) for t in targets if str(t).strip()]
        if action == "flush":
            action, targets = "retry", ["all"]
        good, bad = self.scan()
        chosen: dict[str, tuple[Message, str, str]] = {}
        for t in targets:
            found = [(m, w) for m, w in good if matches(m, t)]
            if not found and not is_group(t):
                broken = [(mid, w) for mid, w, _ in bad if mid == t]
                if broken and action == "delete":
                    self.spool.remove(t, broken[0][1])
                    res["done"].append(t)
                elif broken:
                    res["skipped"][t] = "its .inf cannot be read; fix or delete it"
                else:
                    res["not_found"].append(t)
            for m, w in found:
                chosen.setdefault(m.id, (m, w, t))
        now = datetime.now().replace(microsecond=0)
        writes: list[tuple[Message, str]] = []
        for mid, (msg, where, t) in chosen.items():
            if action == "delete":
                if t.startswith("@") and any(domain_of(a) != t[1:] for a in msg.rcpt_to_send):
                    res["trimmed"][mid] = len(drop_domain(msg, t[1:], now))
                    writes.append((msg, where))
                else:
                    self.spool.remove(mid, where)
                    res["done"].append(mid)
            elif change(msg, action, now):
                writes.append((msg, where))
                res["done"].append(mid)
            else:
                res["unchanged"].append(mid)

        async def write_all() -> None:
            for msg, where in writes:
                await self.spool.update_inf(msg, where)

        if writes:
            asyncio.run(write_all())
        res["paused"] = False
        return res


def last_replies_from_logs(log_dir: Path | None, ids: set[str]
                           ) -> dict[str, dict[str, tuple[str, str]]]:
    """{id: {address: (when, reply)}} from the tails of the two newest daily log files."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    if log_dir is None or not ids:
        return out
    try:
        files = sorted(Path(log_dir).glob("mailengine-*.log"))[-2:]
    except OSError:
        return out
    for path in files:
        try:
            with open(path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - LOG_TAIL_BYTES))
                data = f.read()
        except OSError:
            continue
        for raw in data.decode("utf-8", "replace").splitlines():
            m = REPLY_LINE.match(raw)
            if m and m.group(2) in ids:
                out.setdefault(m.group(2), {})[m.group(3)] = (m.group(1), m.group(5))
    return out


# ---------------------------------------------------------------- printing

def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_domains(records: list[dict], header: str) -> str:
    rows = by_domain(records)
    n_msgs = len(records)
    n_rcpts = sum(len(r["rcpts"]) for r in records)
    held = sum(r["state"] == "held" for r in records)
    broken = sum(r["state"] == "broken" for r in records)
    lines = [f"{header}: {_plural(n_msgs, 'message')}, {_plural(n_rcpts, 'recipient')} to send"
             + (f", {held} held" if held else "") + (f", {broken} unreadable" if broken else "")]
    if not rows:
        return "\n".join(lines + ["Mail queue is empty." if not n_msgs else ""]).rstrip()
    w = max(12, *(len(r["domain"]) for r in rows))
    lines.append(f"{'domain':<{w}} {'msgs':>6} {'rcpts':>6} {'held':>5}  {'oldest':<19}  "
                 f"{'next retry':<19}  last reply")
    for r in rows:
        lines.append(f"{r['domain']:<{w}} {r['messages']:>6} {r['rcpts']:>6} {r['held']:>5}  "
                     f"{r['oldest']:<19}  {r['next'] or '-':<19}  {r['last_reply'] or '-'}")
    return "\n".join(lines)


def format_messages(records: list[dict], header: str) -> str:
    lines = [f"{header}: {_plural(len(records), 'message')}"]
    if not records:
        return "\n".join(lines + ["Mail queue is empty."])
    lines.append(f"{'id':<40} {'size':>8} {'state':<8} {'created':<19}  {'next retry':<19} "
                 f"{'tries':>5}  sender -> recipients")
    for r in sorted(records, key=lambda r: (r["created"], r["id"])):
        rc = r["rcpts"]
        to = ", ".join(rc[:3]) + (f" (+{len(rc) - 3} more)" if len(rc) > 3 else "")
        lines.append(f"{r['id']:<40} {r['size']:>8} {r['state']:<8} {r['created']:<19}  "
                     f"{r['next'] or '-':<19} {r['tries']:>5}  {r['from'] or '<>'} -> {to}")
        when, text = last_reply(r)
        if text:
            lines.append(f"    last reply {when}: {text}")
        elif r["state"] == "broken":
            lines.append(f"    unreadable: {r['history']}")
    return "\n".join(lines)


def format_show(info: dict) -> str:
    rec = info.get("record")
    lines = []
    if rec is None:
        lines.append(f"{info['where']}/: the .inf cannot be read: {info.get('broken', '')}")
    else:
        lines.append(f"{rec['id']}  in {info['where']}/  {rec['state']}"
                     + (f", next try {rec['next']}" if rec["next"] else ""))
        lines.append(f"from {rec['from'] or '<>'}; {len(rec['rcpts'])} to send, {rec['sent']} "
                     f"sent, {rec['failed']} failed; {rec['tries']} tries; {rec['size']} bytes")
        for addr, (when, text) in sorted(rec["replies"].items()):
            lines.append(f"  last reply for {addr} ({when}): {text}")
    lines.append(f"--- {info['where']}/{(rec or {}).get('id', '')}.inf")
    lines.append(info["inf"].rstrip("\n"))
    if info.get("log"):
        lines.append("--- history")
        lines += [f"  {e}" for e in info["log"]]
    return "\n".join(lines)


def format_result(res: dict) -> str:
    verb = {"delete": "deleted", "hold": "held", "release": "released",
            "retry": "due now", "flush": "due now"}[res["action"]]
    where = ("by the running engine" if res["where"] == "engine"
             else "on the files (the engine is not running)")
    lines = [f"{_plural(len(res['done']), 'message')} {verb} {where}"]
    if res["trimmed"]:
        n = sum(res["trimmed"].values())
        lines.append(f"{_plural(n, 'recipient')} removed from "
                     f"{_plural(len(res['trimmed']), 'message')} that also go elsewhere")
    if res["unchanged"]:
        lines.append(f"{_plural(len(res['unchanged']), 'message')} already "
                     + ("held" if res["action"] == "hold" else
                        "not held" if res["action"] == "release" else "held (release them)"))
    for mid, why in sorted(res["skipped"].items()):
        lines.append(f"  {mid}: {why}")
    for t in res["not_found"]:
        lines.append(f"  {t}: no such message in the queue")
    if res.get("paused") and res["action"] in ("release", "retry", "flush"):
        lines.append("Sending is paused (queue.pause_sending): nothing goes out until it is "
                     "turned off.")
    if res["where"] == "files" and res["action"] in ("release", "retry", "flush") and res["done"]:
        lines.append("They go out as soon as the engine starts.")
    return "\n".join(lines)
