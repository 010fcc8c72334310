"""What the spool finds on disk that this process did not just write: start-up recovery, and
the scan for mail dropped into retry/ by other programs.

`recover()` follows the state table of docs/QUEUE.md ("Every state a message's files can be
in"): each state's number is cited where it is handled. It runs once, in one process, before
any intake process starts; it repairs what a crash left (finishes a move, deletes what was never
acknowledged, brings working/ back to retry/), deletes nothing that holds an acknowledged
message, and reports the rest as warnings, leaving those files in place. `scan_dropins()` runs
again and again while the engine lives, finding `.inf` files others put into retry/
(client.enqueue, or any program following docs/QUEUE.md). Both report a broken file once: the
spool keeps the record of what was reported. The functions take the `Spool` and use only its
paths and file operations, so spool.py holds the facade (`Spool.recover`, `Spool.scan_dropins`).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .envelope import InfError, Message
from .group_commit import unlink_quiet
from .queue_dirs import DIRS, DONE, INCOMING, RETRY, WORKING

if TYPE_CHECKING:  # type hints only: spool.py imports this module
    from .spool import Spool

SHUTDOWN_FILE = "shutdown.txt"  # retry/shutdown.txt (`mailengine shutdown`): never touched
LONE_DAT_WARN_AGE = 600  # s: a younger lone .dat in retry/ may be a drop-in being written
TMPDIR_MAX_AGE = 3600  # s: a client.enqueue() private directory older than this was abandoned
DROPIN_SETTLE = 60  # s: an .inf not ending in a newline and younger than this may be mid-write


@dataclass
class RecoveryReport:
    """What `recover()` found and did; the engine logs it and queues `messages` / `ids`."""

    messages: list[Message] = field(default_factory=list)  # valid messages now in retry/
    ids: list[str] = field(default_factory=list)  # with load=False: the ids in retry/, unread
    warnings: list[str] = field(default_factory=list)  # broken files, all left in place
    moved_from_working: int = 0
    finished_moves: int = 0
    removed_uncommitted: int = 0  # .dat / .inf.tmp files of stores that never committed
    removed_stale_tmp: int = 0  # .inf.tmp of updates that never happened
    removed_tmpdirs: int = 0


def scan_dropins(spool: Spool, known: set[str] | frozenset[str], inflight: set[str],
                 warned: set[tuple]) -> tuple[list[Message], list[str]]:
    """New messages dropped into retry/ by other programs: `.inf` files whose id is not in
    `known` nor being stored (`inflight`). Broken ones are reported once per process (`warned`:
    the spool's record of what was reported) and left in place."""
    new: list[Message] = []
    warnings: list[str] = []
    now = time.time()
    try:
        it = os.scandir(str(spool.dir(RETRY)))
    except FileNotFoundError:
        return new, warnings
    with it:
        for e in it:
            name = e.name
            if name[0] == "." or not name.endswith(".inf"):
                continue
            mid = name[:-4]
            if mid in known or mid in inflight:
                continue
            st = None
            try:
                st = e.stat()
                if now - st.st_mtime < DROPIN_SETTLE and not _ends_with_newline(e.path):
                    continue  # probably still being written in place: look next scan
                msg = spool.load(mid, RETRY)
            except FileNotFoundError:
                continue  # gone meanwhile (taken back by its writer)
            except (InfError, OSError) as ex:
                key = (name, st.st_size, st.st_mtime_ns) if st else (name,)
                if key not in warned:
                    warned.add(key)
                    warnings.append(f"retry/{name}: {_reason(ex)}; skipped, left in place")
                continue
            new.append(msg)
    return new, warnings


def recover(spool: Spool, warned: set[tuple], load: bool = True, retry_known: bool = False
            ) -> RecoveryReport:
    """Start-up recovery, per the state table of docs/QUEUE.md. Run once, before intake.
    `warned` is the spool's record of reported files (what is reported here, scans skip).

    `load=False` reads no `.inf`: the ids in retry/ are returned instead (the engine reads
    them as their turn comes, backlog.py). `retry_known`: the caller knows what retry/ held
    at the last clean stop (the backlog index, valid while retry/ is unchanged since); retry/
    is then not listed (a listing of millions of files takes seconds), only probed for the
    ids found elsewhere, and the ids returned are those that recovery put into retry/.
    Everything that needs no repair (a message whole in one directory other than working/)
    is recognised with set operations, so the cost per message is small."""
    spool.ensure_dirs()
    spool.spare.adopt_new()  # spare files given just before the last stop
    rep = RecoveryReport()
    now = time.time()
    _remove_old_tmpdirs(spool, rep, now)
    side: list[tuple[str, str]] = []  # (dir, file name) of side files (ID.dkim)
    found: dict[str, tuple[set[str], set[str], set[str]]] = {}  # dir -> inf, dat, tmp ids
    for d in DIRS:
        if d == RETRY and retry_known:
            continue
        names = [n for n in os.listdir(spool.dir(d))
                 if n[:1] != "." and n != SHUTDOWN_FILE]
        side += [(d, n) for n in names if n.endswith((".dkim", ".dkim.tmp"))]
        found[d] = ({n[:-4] for n in names if n.endswith(".inf")},
                    {n[:-4] for n in names if n.endswith(".dat")},
                    {n[:-8] for n in names if n.endswith(".inf.tmp")})
    # Ids that may need repair: anything in working/, any .inf.tmp, a .dat or .inf alone in
    # its directory, an id in more than one listed directory. With retry/ unlisted, these
    # still cover every state that involves it (a move cut in half leaves a lone piece in
    # the other directory); a message whole in done/ or incoming/ needs no look at retry/.
    odd: set[str] = set(found[WORKING][0] | found[WORKING][1] | found[WORKING][2]) \
        if WORKING in found else set()
    seen: set[str] = set()
    for d, (inf, dat, tmp) in found.items():
        here = inf | dat | tmp
        odd |= tmp | (inf ^ dat) | (here & seen)
        seen |= here
    for mid in odd:
        where: dict[str, set[str]] = {}
        for d in DIRS:
            if d in found:
                inf, dat, tmp = found[d]
                kinds = {k for k, ids in (("inf", inf), ("dat", dat), ("tmp", tmp))
                         if mid in ids}
            else:  # retry/ not listed: probe it for this id
                kinds = {k for k, path in (("inf", spool.inf_path(mid, d)),
                                           ("dat", spool.dat_path(mid, d)),
                                           ("tmp", spool.inf_path(mid, d) + ".tmp"))
                         if os.path.exists(path)}
            if kinds:
                where[d] = kinds
        _recover_one(spool, mid, where, rep, now)
    _remove_orphan_side_files(spool, side)
    # what is now in retry/: valid messages, or warnings
    ids = set() if retry_known else found[RETRY][0] - odd
    ids |= {mid for mid in odd if os.path.exists(spool.inf_path(mid, RETRY))}
    if not load:
        rep.ids = list(ids)
        return rep
    for mid in sorted(ids):
        try:
            rep.messages.append(spool.load(mid, RETRY))
        except (InfError, OSError) as ex:
            rep.warnings.append(f"retry/{mid}.inf: {_reason(ex)}; skipped, left in place")
            try:
                st = os.stat(spool.inf_path(mid, RETRY))
                warned.add((f"{mid}.inf", st.st_size, st.st_mtime_ns))  # scans quiet
            except OSError:
                pass
    return rep


def _recover_one(spool: Spool, mid: str, where: dict[str, set[str]], rep: RecoveryReport,
                 now: float) -> None:
    # One id may legitimately be whole in two directories (a message with relayed and local
    # recipients is stored in retry/ and incoming/), so each directory is judged by itself.
    # states 4, 5, 6: .inf.tmp files
    for d, kinds in where.items():
        if "tmp" not in kinds:
            continue
        unlink_quiet(spool.inf_path(mid, d) + ".tmp")
        kinds.discard("tmp")
        if "inf" in kinds:
            rep.removed_stale_tmp += 1  # state 5: an update that never happened
        else:
            rep.removed_uncommitted += 1  # states 4, 6: a store that never committed
            if "dat" in kinds:
                unlink_quiet(spool.dat_path(mid, d))
                kinds.discard("dat")
    lone_dat = [d for d in DIRS if where.get(d) == {"dat"}]
    lone_inf = [d for d in DIRS if where.get(d) == {"inf"}]
    # state 10: a move that stopped between its two renames
    if len(lone_inf) == 1 and len(lone_dat) == 1:
        x, y = lone_inf[0], lone_dat[0]
        os.rename(spool.inf_path(mid, x), spool.inf_path(mid, y))
        where[x].discard("inf")
        where[y].add("inf")
        rep.finished_moves += 1
        lone_dat, lone_inf = [], []
    # states 2, 3: .dat without its .inf
    for d in lone_dat:
        path = spool.dat_path(mid, d)
        if d != RETRY and not lone_inf:
            unlink_quiet(path)
            rep.removed_uncommitted += 1
            where[d].discard("dat")
        elif d != RETRY:
            rep.warnings.append(f"{d}/{mid}.dat has no .inf, and {mid}.inf is in more than "
                                "one other place; left in place")
        else:
            try:
                age = now - os.stat(path).st_mtime
            except FileNotFoundError:
                continue
            if age > LONE_DAT_WARN_AGE:
                rep.warnings.append(f"retry/{mid}.dat has no .inf; left in place")
    # states 8, 12: everything in working/ goes back to retry/
    kinds = where.get(WORKING, set())
    if "inf" in kinds:
        if where.get(RETRY):
            rep.warnings.append(f"{mid}: in both working/ and retry/; left in working/")
        elif "dat" in kinds:
            spool.move(mid, WORKING, RETRY)
            rep.moved_from_working += 1
        else:  # state 12: the .inf alone; the retry/ listing then reports it (state 11)
            os.rename(spool.inf_path(mid, WORKING), spool.inf_path(mid, RETRY))
            rep.moved_from_working += 1
    # state 13 (state 11 is reported by the retry/ listing in recover())
    for d in (DONE, INCOMING):
        if where.get(d) == {"inf"}:
            rep.warnings.append(f"{d}/{mid}.inf has no .dat; left in place")


def _remove_orphan_side_files(spool: Spool, side: list[tuple[str, str]]) -> None:
    """A side file whose message is gone (or of a kind no longer used) is deleted: it is
    only a cache (a message is signed again when its signature is missing)."""
    for d, name in side:
        path = f"{spool.dir(d)}/{name}"
        if name.endswith(".tmp") or not any(name.endswith(s) for s in spool.side_files):
            unlink_quiet(path)
            continue
        mid = name[:name.rindex(".")]
        if not os.path.exists(path):
            continue  # moved along with its message (working/ -> retry/)
        if not os.path.exists(spool.dat_path(mid, d)):
            unlink_quiet(path)


def _remove_old_tmpdirs(spool: Spool, rep: RecoveryReport, now: float) -> None:
    try:
        entries = list(os.scandir(spool.root))
    except FileNotFoundError:
        return
    for e in entries:
        if e.name.startswith(".tmp-") and e.is_dir(follow_symlinks=False):
            if now - e.stat(follow_symlinks=False).st_mtime > TMPDIR_MAX_AGE:
                shutil.rmtree(e.path, ignore_errors=True)
                rep.removed_tmpdirs += 1


def _ends_with_newline(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except OSError:
        return False  # empty or vanished


def _reason(ex: BaseException) -> str:
    if isinstance(ex, InfError):
        return ex.reason
    if isinstance(ex, OSError) and ex.strerror:
        return ex.strerror
    return str(ex)
