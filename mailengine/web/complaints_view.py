"""The complaint rates in the web admin (/gui/admin/complaints), the API (/api/v1/complaints)
and /metrics: each sender domain's complaints per delivered recipient over the last day and
week, against `complaints.rate_threshold_percent` (0.3 %, the line Gmail and Yahoo draw).

The numbers are complaint_rates.py's: the delivered counts the engine keeps (engine.notices),
the complaints of log/complaints.jsonl (read again only when it changed).
"""
from __future__ import annotations

import time

from aiohttp import web

from ..complaint_rates import WINDOWS, ComplaintLines, rates, recent
from .admin import page
from .api import token

RECENT = 50  # complaints listed on the page


def add_routes(app: web.Application) -> None:
    app.router.add_get("/gui/admin/complaints", page(complaints_page))
    app.router.add_get("/gui/admin/complaints.json", page(complaints_json))
    app.router.add_get("/api/v1/complaints", token(complaints_json))


def state(engine, lines: ComplaintLines | None = None) -> dict:
    """Rates per sender domain, the threshold, the newest complaints."""
    lines = lines or _lines(engine)
    threshold = engine.cfg.complaints.rate_threshold_percent
    tally = engine.notices.delivered  # None in test mode: nothing is delivered
    return {"threshold_percent": threshold, "windows": list(WINDOWS),
            "addresses": list(engine.cfg.complaints.addresses),
            "domains": rates(tally, lines, threshold),
            "recent": recent(lines, RECENT), "time": time.time()}


_cache: dict[int, ComplaintLines] = {}


def _lines(engine) -> ComplaintLines:
    key = id(engine)
    if key not in _cache:
        _cache[key] = ComplaintLines(engine.cfg.log_dir)
    return _cache[key]


async def complaints_page(request: web.Request) -> web.Response:
    w = request.app["web"]
    return w.render(request, "complaints.html", title="Complaints", **state(w.engine),
                    jsonl=str(w.cfg.log_dir / "complaints.jsonl"))


async def complaints_json(request: web.Request) -> web.Response:
    return web.json_response(state(request.app["web"].engine))


def prometheus(engine) -> str:
    """Gauges per sender domain and window: complaints, delivered, rate (percent)."""
    s = state(engine)
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
