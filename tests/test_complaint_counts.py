"""The complaint rates stay cheap and bounded (complaint_rates.ComplaintCounts, complaints.py):
the counts are held in memory and follow log/complaints.jsonl by its appended bytes, a view
reads no file, the file is rotated at complaints.MAX_BYTES, and only complaints are written to
it. The figures are those the former whole-file reading gave (`_reference` below is it)."""
from __future__ import annotations

import builtins
import json
import os
import random
import time
from pathlib import Path

import pytest

from mailengine import complaint_rates
from mailengine.complaint_rates import ComplaintCounts, DeliveredTally, rates, recent
from mailengine.complaints import COMPLAINTS_JSONL, ComplaintDesk
from mailengine.config import Config
from mailengine.lists import rotate_if_over

CORPUS = Path(__file__).parent / "fbl_corpus"
NOW = 1_800_000_000.0
DOMAINS = ["a.example", "b.example", "c.example", ""]


def _reference(paths: list[Path], tally, threshold: float, now: float) -> list[dict]:
    """The rates as the code before ComplaintCounts computed them: every complaint line of the
    files, counted per window by its time."""
    items = []
    for p in paths:
        if not p.exists():
            continue
        for line in p.read_bytes().splitlines():
            try:
                rec = json.loads(line)
                if rec.get("is_complaint"):
                    items.append((float(rec["unix"]), str(rec.get("sender_domain") or "")))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    rows: dict[str, dict] = {}
    for name, span in complaint_rates.WINDOWS.items():
        delivered = tally.since(now - span)
        counted: dict[str, int] = {}
        for t, dom in items:
            if now - span <= t <= now + 60:
                counted[dom] = counted.get(dom, 0) + 1
        for dom in set(delivered) | set(counted):
            row = rows.setdefault(dom, {"domain": dom, "over": False})
            d, c = delivered.get(dom, 0), counted.get(dom, 0)
            rate = round(100.0 * c / d, 4) if d else None
            row[name] = {"delivered": d, "complaints": c, "rate_percent": rate}
            if rate is not None and rate > threshold:
                row["over"] = True
    empty = {"delivered": 0, "complaints": 0, "rate_percent": None}
    out = [{**{w: empty for w in complaint_rates.WINDOWS}, **r} for r in rows.values()]
    out.sort(key=lambda r: (not r["over"], -(r["7d"]["rate_percent"] or 0),
                            -r["7d"]["complaints"], r["domain"]))
    return out


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _tally(tmp_path: Path) -> DeliveredTally:
    tally = DeliveredTally(tmp_path / "home", clock=Clock(NOW - 6 * 86400), save_every=1e9)
    for dom, n in (("a.example", 50000), ("b.example", 3000), ("c.example", 200)):
        tally.add(f"x@{dom}", n)
    tally.clock = Clock(NOW - 3600)
    for dom, n in (("a.example", 20000), ("b.example", 900)):
        tally.add(f"x@{dom}", n)
    return tally


def _line(t: float, dom: str, complaint: bool = True, **more) -> str:
    return json.dumps({"unix": round(t, 3), "sender_domain": dom, "is_complaint": complaint,
                       "address": f"u{int(t) % 977}@dest.example", **more}) + "\n"


def test_rates_match_the_whole_file_reading_after_many_complaints(tmp_path):
    """5,000 complaints over ten days in batches, a little out of order (several intake
    processes), with non-complaint, cut and foreign lines: after each batch the figures for
    several moments equal the former reading of the whole file."""
    rnd = random.Random(18)
    log = tmp_path / "log"
    log.mkdir()
    path = log / COMPLAINTS_JSONL
    tally = _tally(tmp_path)
    clock = Clock(NOW - 10 * 86400)
    counts = ComplaintCounts(log, clock=clock)
    t = clock.t
    for batch in range(25):
        with open(path, "a") as f:
            for _ in range(200):
                t += rnd.uniform(0, 2 * 9 * 86400 / 5000)
                f.write(_line(t - rnd.uniform(0, 2), rnd.choice(DOMAINS)))
            f.write(_line(t, "a.example", complaint=False))
            f.write('["not", "a", "record"]\n{"unix": "x", "is_complaint": true}\n')
        clock.t = t  # time goes on as the complaints come
        counts.refresh()
        for now in (t, t - 3600, t + 30):
            assert rates(tally, counts, 0.3, now) == _reference([path], tally, 0.3, now)
    clock.t = NOW
    assert NOW - 86400 < t < NOW
    ours = rates(tally, counts, 0.3, NOW)
    assert {r["domain"] for r in ours} == set(DOMAINS)
    assert any(r["over"] for r in ours) and not all(r["over"] for r in ours)
    # a line still being written waits for its end
    with open(path, "a") as f:
        f.write(_line(NOW - 10, "c.example")[:20])
    counts.refresh()
    assert rates(tally, counts, 0.3, NOW) == _reference([path], tally, 0.3, NOW)
    with open(path, "a") as f:
        f.write(_line(NOW - 10, "c.example")[20:])
    counts.refresh()
    assert counts.counts(NOW - 11, NOW)["c.example"] >= 1
    assert rates(tally, counts, 0.3, NOW) == _reference([path], tally, 0.3, NOW)
    # a fresh reader (an engine started again) gives the same from the file's tail
    again = ComplaintCounts(log, clock=Clock(NOW))
    again.refresh()
    assert rates(tally, again, 0.3, NOW) == rates(tally, counts, 0.3, NOW)
    assert recent(again, 5) == recent(counts, 5)
    assert recent(counts, 1)[0]["unix"] == round(NOW - 10, 3)


def test_a_view_reads_no_file(tmp_path, monkeypatch):
    """Once refreshed, rates() and recent() touch no file; a refresh of an unchanged file is a
    stat; one after a line was added reads that line's bytes only, however long the file."""
    log = tmp_path / "log"
    log.mkdir()
    path = log / COMPLAINTS_JSONL
    with open(path, "w") as f:
        for i in range(60000):  # about 6 MB
            f.write(_line(NOW - 86400 + i, DOMAINS[i % 3]))
    counts = ComplaintCounts(log, clock=Clock(NOW))
    counts.refresh()
    loaded = counts.bytes_read
    assert loaded == path.stat().st_size
    tally = _tally(tmp_path)

    def no_reading(*a, **k):
        raise AssertionError("a view read a file")

    with monkeypatch.context() as m:
        m.setattr(builtins, "open", no_reading)
        m.setattr(os, "stat", no_reading)
        rows = rates(tally, counts, 0.3, NOW)  # bisections in memory, not 60,000 lines
        assert recent(counts, 50)[0]["unix"] == NOW - 86400 + 59999
    assert rows == _reference([path], tally, 0.3, NOW)
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", no_reading)
        counts.refresh()  # unchanged: a stat, no read
    assert counts.bytes_read == loaded
    line = _line(NOW - 5, "b.example")
    with open(path, "a") as f:
        f.write(line)
    counts.refresh()
    assert counts.bytes_read == loaded + len(line)
    assert rates(tally, counts, 0.3, NOW) == _reference([path], tally, 0.3, NOW)


def test_the_web_view_takes_new_lines_in_a_thread(tmp_path):
    """complaints_view.refreshed runs the refresh off the event loop."""
    import asyncio
    import threading
    from types import SimpleNamespace
    from mailengine.web import complaints_view
    log = tmp_path / "log"
    log.mkdir()
    (log / COMPLAINTS_JSONL).write_text(_line(time.time() - 60, "a.example"))
    cfg = Config(home=tmp_path)
    engine = SimpleNamespace(cfg=cfg, notices=SimpleNamespace(delivered=None))
    counts = complaints_view.counts(engine)
    where = []
    real = counts.refresh
    counts.refresh = lambda: (where.append(threading.current_thread()), real())[1]
    state = asyncio.run(complaints_view.refreshed(engine))
    assert where and where[0] is not threading.main_thread()
    assert state["domains"][0]["domain"] == "a.example"
    assert state["domains"][0]["1d"]["complaints"] == 1
    text = asyncio.run(complaints_view.prometheus(engine))
    assert 'mailengine_complaints{domain="a.example",window="1d"} 1' in text


def test_rotation_keeps_the_file_bounded_and_the_figures(tmp_path):
    """The desk rotates complaints.jsonl to complaints.jsonl.1 past its size; the counts follow
    through the rotations, and equal the former reading of both files."""
    cfg = Config(home=tmp_path)
    cfg.set("complaints.addresses", ["fbl@news.example"])
    cfg.set("complaints.trust_unsigned", True)
    desk = ComplaintDesk(cfg)
    desk.max_bytes = 8000
    log = cfg.log_dir
    path, old = log / COMPLAINTS_JSONL, log / (COMPLAINTS_JSONL + ".1")
    counts = ComplaintCounts(log)
    reports = [(CORPUS / n).read_bytes() for n in
               ("arf_jmrp_microsoft.eml", "arf_headers_only_verp.eml", "arf_redacted.eml")]
    tally = DeliveredTally(tmp_path, save_every=1e9)
    tally.add("x@shop.example", 1000)
    tally.add("x@news.example", 1000)
    written = 0
    rotations = 0
    for i in range(60):
        size = path.stat().st_size if path.exists() else 0
        desk.handle(["fbl@news.example"], reports[i % 3], "", f"R{i}")
        written += 1
        if path.stat().st_size < size:
            rotations += 1
        if i % 7 == 0:
            counts.refresh()
            now = time.time()
            assert rates(tally, counts, 0.3, now) == _reference([old, path], tally, 0.3, now)
    desk.close()
    assert rotations >= 3 and old.exists()
    assert path.stat().st_size < 8000 + 4000 and old.stat().st_size < 8000 + 4000
    counts.refresh()
    now = time.time()
    assert rates(tally, counts, 0.3, now) == _reference([old, path], tally, 0.3, now)
    kept = len(path.read_text().splitlines()) + len(old.read_text().splitlines())
    assert sum(r["7d"]["complaints"] for r in rates(tally, counts, 0.3, now)) == kept < written


def test_rotate_if_over(tmp_path):
    f = tmp_path / "x.jsonl"
    assert rotate_if_over(f, 10) is False  # no file
    f.write_text("12345\n")
    assert rotate_if_over(f, 10) is False and f.exists()
    f.write_text("1234567890\n")
    assert rotate_if_over(f, 10) is True
    assert not f.exists() and (tmp_path / "x.jsonl.1").read_text() == "1234567890\n"
    f.write_text("abcdefghijk\n")
    assert rotate_if_over(f, 10) is True  # replaces the one before
    assert (tmp_path / "x.jsonl.1").read_text() == "abcdefghijk\n"


def test_a_non_complaint_does_not_grow_the_file(tmp_path):
    cfg = Config(home=tmp_path)
    cfg.set("complaints.addresses", ["fbl@news.example"])
    desk = ComplaintDesk(cfg)
    for name in ("plain_question.eml", "arf_not_spam.eml", "garbage.bin"):
        for _ in range(20):
            c = desk.handle(["fbl@news.example"], (CORPUS / name).read_bytes(), "x@y.example")
            assert not c.is_complaint
    desk.close()
    assert not (cfg.log_dir / COMPLAINTS_JSONL).exists()


@pytest.mark.parametrize("cut", ["truncated", "deleted"])
def test_a_file_emptied_or_removed_by_hand_is_read_again(tmp_path, cut):
    log = tmp_path / "log"
    log.mkdir()
    path = log / COMPLAINTS_JSONL
    path.write_text(_line(NOW - 60, "a.example") * 3)
    counts = ComplaintCounts(log, clock=Clock(NOW))
    counts.refresh()
    assert counts.counts(NOW - 86400, NOW) == {"a.example": 3}
    if cut == "truncated":
        path.write_text(_line(NOW - 30, "b.example"))
    else:
        path.unlink()
    counts.refresh()
    assert counts.counts(NOW - 86400, NOW) == ({"b.example": 1} if cut == "truncated" else {})
    read = counts.bytes_read
    counts.refresh()  # nothing changed since: nothing read again
    assert counts.bytes_read == read


def test_a_line_landing_in_the_rotated_file_is_counted(tmp_path):
    """A writer in another process may put one line into complaints.jsonl.1 just after the
    rotation (its check came before the rename): the next refresh sees .1 changed."""
    log = tmp_path / "log"
    log.mkdir()
    path, old = log / COMPLAINTS_JSONL, log / (COMPLAINTS_JSONL + ".1")
    path.write_text(_line(NOW - 60, "a.example") * 2)
    counts = ComplaintCounts(log, clock=Clock(NOW))
    counts.refresh()
    assert rotate_if_over(path, 10)
    path.write_text(_line(NOW - 20, "b.example"))
    counts.refresh()
    assert counts.counts(NOW - 86400, NOW) == {"a.example": 2, "b.example": 1}
    with open(old, "a") as f:  # the late line
        f.write(_line(NOW - 10, "a.example"))
    counts.refresh()
    assert counts.counts(NOW - 86400, NOW) == {"a.example": 3, "b.example": 1}
