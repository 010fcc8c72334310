"""The suppression list on the web: the API (/api/v1/suppressions, bearer tokens) and the admin
page (/gui/admin/suppressions: list, search, add, remove, import and export as CSV).

Both use the engine's own store (Policy.suppression, suppression.py), the one its intake checks;
calls that read or write many entries run in a thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import io
import json
from urllib.parse import urlencode

from aiohttp import web

from ..suppression import SOURCES, Entry, SuppressionStore

MAX_LIST = 1000  # entries per API page
PAGE = 100  # entries per admin page
MAX_IMPORT = 64 << 20  # bytes of CSV one request may bring


def store_of(request: web.Request) -> SuppressionStore:
    return request.app["web"].engine.policy.suppression


def as_json(e: Entry) -> dict:
    return e.as_json()


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def _int(value, default: int, top: int) -> int:
    try:
        return max(0, min(top, int(value if value not in (None, "") else default)))
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"not a number: {value!r}"}),
                                 content_type="application/json")


def _filters(query) -> dict:
    source = query.get("source") or None
    if source is not None and source not in SOURCES:
        raise web.HTTPBadRequest(text=json.dumps(
            {"error": f"source: one of {', '.join(SOURCES)}"}), content_type="application/json")
    return {"search": query.get("search", ""),
            "sender_domain": query.get("sender_domain"),  # absent: every domain
            "source": source,
            "include_expired": query.get("expired", "") in ("1", "true", "yes")}


# --- API -------------------------------------------------------------------------------------------

def add_api_routes(app: web.Application, token) -> None:
    r = app.router
    r.add_get("/api/v1/suppressions", token(api_list))
    r.add_post("/api/v1/suppressions", token(api_add))
    r.add_get("/api/v1/suppressions/export", token(api_export))
    r.add_post("/api/v1/suppressions/import", token(api_import))
    r.add_get("/api/v1/suppressions/{address}", token(api_get))
    r.add_delete("/api/v1/suppressions/{address}", token(api_delete))


async def api_list(request: web.Request) -> web.Response:
    store = store_of(request)
    try:
        f = _filters(request.query)
        offset = _int(request.query.get("offset"), 0, 1 << 40)
        limit = _int(request.query.get("limit"), 100, MAX_LIST)
        total = await asyncio.to_thread(store.count, **f)
        rows = await asyncio.to_thread(store.entries, **f, limit=limit, offset=offset)
    except ValueError as e:
        return _error(400, str(e))
    return web.json_response({"total": total, "offset": offset,
                              "entries": [as_json(e) for e in rows]})


async def api_get(request: web.Request) -> web.Response:
    """Every entry for one address (all sender domains, expired ones too)."""
    store = store_of(request)
    address = request.match_info["address"].strip().lower()
    rows = [e for e in await asyncio.to_thread(store.entries, address, include_expired=True,
                                               limit=None) if e.address == address]
    domain = request.query.get("sender_domain")
    active = store.lookup(address, domain or "")
    if not rows:
        return _error(404, f"{address}: not on the suppression list")
    return web.json_response({"address": address, "entries": [as_json(e) for e in rows],
                              "suppressed": active is not None,
                              "active": as_json(active) if active else None})


async def api_add(request: web.Request) -> web.Response:
    """One entry {"address", "reason", "source"?, "sender_domain"?, "expires"?} or several
    {"entries": [...]}; all or none are added."""
    store = store_of(request)
    try:
        doc = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as e:
        return _error(400, f"the request body is not JSON: {e}")
    items = doc.get("entries") if isinstance(doc, dict) and "entries" in doc else [doc]
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        return _error(400, "send an object {address, reason, ...} or {entries: [...]}")
    from ..suppression import make_entry
    checked = []
    for n, item in enumerate(items):
        unknown = set(item) - {"address", "reason", "source", "sender_domain", "expires"}
        if unknown:
            return _error(400, f"entries[{n}]: unknown fields: {', '.join(sorted(unknown))}")
        if "address" not in item:
            return _error(400, f"entries[{n}]: address is required")
        try:
            checked.append(make_entry(item["address"], reason=item.get("reason") or "",
                                      source=item.get("source") or "manual",
                                      sender_domain=item.get("sender_domain") or "",
                                      expires=item.get("expires")))
        except (ValueError, TypeError) as e:
            return _error(400, f"entries[{n}]: {e}")
    added = []
    for e in checked:
        added.append(await asyncio.to_thread(
            store.add, e.address, reason=e.reason, source=e.source,
            sender_domain=e.sender_domain, expires=e.expires))
    return web.json_response({"entries": [as_json(e) for e in added]}, status=201)


async def api_delete(request: web.Request) -> web.Response:
    store = store_of(request)
    address = request.match_info["address"]
    domain = request.query.get("sender_domain", "")
    try:
        gone = await asyncio.to_thread(store.remove, address, domain)
    except ValueError as e:
        return _error(400, str(e))
    if not gone:
        return _error(404, f"{address}: no entry for "
                           f"{'sender domain ' + domain if domain else 'all senders'}")
    return web.json_response({"removed": True, "address": address.strip().lower(),
                              "sender_domain": domain.strip().lower()})


async def _csv_text(store: SuppressionStore) -> str:
    def run() -> str:
        out = io.StringIO()
        store.export_csv(out)
        return out.getvalue()
    return await asyncio.to_thread(run)


async def api_export(request: web.Request) -> web.Response:
    return web.Response(text=await _csv_text(store_of(request)), content_type="text/csv",
                        headers={"Content-Disposition":
                                 'attachment; filename="suppressions.csv"'})


async def api_import(request: web.Request) -> web.Response:
    store = store_of(request)
    if request.content_length and request.content_length > MAX_IMPORT:
        return _error(413, f"at most {MAX_IMPORT} bytes of CSV per request")
    body = await request.read()
    try:
        n = await asyncio.to_thread(store.import_csv, io.StringIO(body.decode("utf-8-sig")))
    except UnicodeDecodeError:
        return _error(400, "the CSV must be UTF-8")
    except ValueError as e:
        return _error(400, f"nothing imported: {e}")
    return web.json_response({"imported": n})


# --- the admin page ------------------------------------------------------------------------------

def add_admin_routes(app: web.Application, page) -> None:
    r = app.router
    r.add_get("/gui/admin/suppressions", page(admin_list))
    r.add_post("/gui/admin/suppressions/add", page(admin_add))
    r.add_post("/gui/admin/suppressions/remove", page(admin_remove))
    r.add_post("/gui/admin/suppressions/import", page(admin_import))
    r.add_get("/gui/admin/suppressions/export", page(admin_export))


def _back(request, text: str, kind: str = "ok", query: str = ""):
    request["session"].flash.append((kind, text))
    raise web.HTTPSeeOther("/gui/admin/suppressions" + (f"?{query}" if query else ""))


async def admin_list(request: web.Request) -> web.Response:
    w = request.app["web"]
    store = store_of(request)
    q = request.query
    try:
        f = _filters(q)
    except web.HTTPBadRequest:
        f = _filters({})
    if not f["sender_domain"]:  # the form's empty field: any sender domain
        f["sender_domain"] = None
    offset = _int(q.get("offset"), 0, 1 << 40)
    try:
        total = await asyncio.to_thread(store.count, **f)
        rows = await asyncio.to_thread(store.entries, **f, limit=PAGE, offset=offset)
    except ValueError:
        total, rows = 0, []
    keep = {k: v for k, v in q.items() if k != "offset" and v}

    def page_link(at: int) -> str:
        return "/gui/admin/suppressions?" + urlencode({**keep, "offset": at})
    return w.render(request, "suppressions.html", title="Suppression list", rows=rows,
                    total=total, offset=offset, page=PAGE, search=q.get("search", ""),
                    sender_domain=q.get("sender_domain", ""), source=q.get("source", ""),
                    expired=f["include_expired"], sources=SOURCES,
                    prev=page_link(max(0, offset - PAGE)) if offset else "",
                    next=page_link(offset + PAGE) if offset + PAGE < total else "",
                    fmt=_when)


def _when(t: float | None) -> str:
    import time
    return time.strftime("%Y/%m/%d %H:%M", time.localtime(t)) if t is not None else "never"


async def admin_add(request: web.Request) -> web.Response:
    form = request["form"]
    store = store_of(request)
    days = (form.get("days") or "").strip()
    try:
        expires = None
        if days:
            import time
            expires = time.time() + float(days) * 86400
            if float(days) <= 0:
                raise ValueError("days: give a number above 0, or nothing for 'for good'")
        e = await asyncio.to_thread(store.add, form.get("address", ""),
                                    reason=form.get("reason", "") or "added by hand",
                                    source="manual", sender_domain=form.get("sender_domain", ""),
                                    expires=expires)
    except ValueError as ex:
        _back(request, f"Not added: {ex}", "error")
    who = f" for mail from {e.sender_domain}" if e.sender_domain else ""
    _back(request, f"{e.address} is suppressed{who}.")


async def admin_remove(request: web.Request) -> web.Response:
    form = request["form"]
    store = store_of(request)
    address, domain = form.get("address", ""), form.get("sender_domain", "")
    try:
        gone = await asyncio.to_thread(store.remove, address, domain)
    except ValueError as ex:
        _back(request, f"Not removed: {ex}", "error")
    if gone:
        _back(request, f"{address} removed from the suppression list.")
    _back(request, f"{address} was not on the list.", "error")


async def admin_import(request: web.Request) -> web.Response:
    form = request["form"]
    store = store_of(request)
    f = form.get("file")
    data = f.file.read() if hasattr(f, "file") else (f or "").encode()
    try:
        n = await asyncio.to_thread(store.import_csv, io.StringIO(data.decode("utf-8-sig")))
    except UnicodeDecodeError:
        _back(request, "Nothing imported: the file is not UTF-8 text.", "error")
    except ValueError as ex:
        _back(request, f"Nothing imported: {ex}", "error")
    _back(request, f"{n} entries imported.")


async def admin_export(request: web.Request) -> web.Response:
    return web.Response(text=await _csv_text(store_of(request)), content_type="text/csv",
                        headers={"Content-Disposition":
                                 'attachment; filename="suppressions.csv"'})
