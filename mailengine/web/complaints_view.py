"""The complaint rates in the web admin (/gui/admin/complaints), the API (/api/v1/complaints)
and /metrics: each sender domain's complaints per delivered recipient over the last day and
week, against `complaints.rate_threshold_percent` (0.3 %, the line Gmail and Yahoo draw).

The numbers are complaint_rates.py's: the delivered counts the engine keeps (engine.notices),
the complaints of log/complaints.jsonl held in memory (ComplaintCounts). Each view first takes
in the lines appended since the last one, in a thread (`refreshed`), then reads memory only.
"""
from __future__ import annotations

import asyncio
import time

from aiohttp import web

from ..complaint_rates import WINDOWS, ComplaintCounts, rates, recent
from .admin import page
from .api import token

RECENT = 50  # complaints listed on the page


def add_routes(app: web.Application) -> None:
    app.router.add_get("/gui/admin/complaints", page(complaints_page))
    app.router.add_get("/gui/admin/complaints.json", page(complaints_json))
    app.router.add_get("/api/v1/complaints", token(complaints_json))


def state(engine, lines: ComplaintCounts | None = None) -> dict:
    """Rates per sender domain, the threshold, the newest complaints, from memory (no file is
    read: `await refreshed(engine)` first for the newest)."""
    lines = lines or counts(engine)
    threshold = engine.cfg.complaints.rate_threshold_percent
    tally = engine.notices.delivered  # None in test mode: nothing is delivered
    return {"threshold_percent": threshold, "windows": list(WINDOWS),
            "addresses": list(engine.cfg.complaints.addresses),
            "domains": rates(tally, lines, threshold),
            "recent": recent(lines, RECENT), "time": time.time()}


_cache: dict[str, ComplaintCounts] = {}


def counts(engine) -> ComplaintCounts:
    """The complaint counts of the engine's log directory, kept between views (keyed by the
    directory, not the engine object, whose id a later engine may reuse)."""
    key = str(engine.cfg.log_dir)
    if key not in _cache:
        _cache[key] = ComplaintCounts(engine.cfg.log_dir)
    return _cache[key]


async def refreshed(engine) -> dict:
    """state(), after taking in the newest lines in a thread: the first view of a run reads the
    files' tail (up to 32 MiB), the others what was appended since, off the event loop."""
    await asyncio.to_thread(counts(engine).refresh)
    return state(engine)


async def complaints_page(request: web.Request) -> web.Response:
    w = request.app["web"]
    return w.render(request, "complaints.html", title="Complaints", **await refreshed(w.engine),
                    jsonl=str(w.cfg.log_dir / "complaints.jsonl"))


async def complaints_json(request: web.Request) -> web.Response:
    return web.json_response(await refreshed(request.app["web"].engine))


async def prometheus(engine) -> str:
    """Gauges per sender domain and window: complaints, delivered, rate (percent)."""
    s = await refreshed(engine)
    out = ["# HELP mailengine_complaint_rate_percent Complaints per delivered recipient, percent.",
           "# TYPE mailengine_complaint_rate_percent gauge"]
    counts = ["# HELP mailengine_complaints Complaints received in the window.",
              "# TYPE mailengine_complaints gauge"]
    for row in s["domains"]:
        dom = row["domain"].replace("\\", "").replace('"', "")
        for w in s["windows"]:
            labels = f'{{domain="{dom}",window="{w}"}}'
            counts.append(f"mailengine_complaints{labels} {row[w]['complaints']}")
            if row[w]["rate_percent"] is not None:
                out.append(f"mailengine_complaint_rate_percent{labels} {row[w]['rate_percent']}")
    return "\n".join(out + counts) + "\n"
