"""The web admin's pages (SPEC 8): login, live status, settings, queue, bounce lists, DKIM,
tokens.

Every page under /gui/admin needs a logged-in session; every POST needs the session's CSRF token
in the form field `csrf`. Pages are Jinja2 templates in templates/; the charts are drawn by
static/status.js from /gui/admin/status.json.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import secrets
import time
from urllib.parse import quote

from aiohttp import web

from ..bounces import BOUNCES_JSONL
from ..categories import CATEGORIES, categorize, categorize_reply, override_problem
from ..config import SECTION_TITLES, SETTINGS, AddressSet, coerce, toml_value
from ..secret_values import is_secret
from ..secret_values import shown as masked
from ..users import hash_password
from . import queue_actions, queue_view, settings_edit, sources_view, suppressions
from .auth import LOGIN_COOKIE, SESSION_COOKIE, same
from .metrics import snapshot

LISTS = ("hard-bounces.txt", "soft-bounces.txt", "hard-undeliverable.txt",
         "soft-undeliverable.txt")
LIST_VIEW_LINES = 2000
RECENT_BOUNCES = 50  # lines of log/bounces.jsonl on the lists page
PAGE = 200  # messages per queue page
COOKIE = {"httponly": True, "samesite": "Strict", "path": "/"}


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/gui/login", login_page)
    r.add_post("/gui/login", login_post)
    r.add_post("/gui/logout", page(logout))
    r.add_get("/gui/admin", page(status))
    r.add_get("/gui/admin/", page(status))
    r.add_get("/gui/admin/status.json", page(status_json))
    r.add_get("/gui/admin/settings", page(settings))
    r.add_post("/gui/admin/settings", page(settings_post))  # the page's one form: all sections
    r.add_post("/gui/admin/settings/{section}", page(settings_post))
    r.add_get("/gui/admin/queue", page(queue_domains))
    r.add_post("/gui/admin/queue/domain/{domain}/{action}", page(domain_action))
    r.add_get("/gui/admin/queue/domain/{domain}", page(queue_messages))
    r.add_get("/gui/admin/queue/messages", page(queue_messages))
    r.add_get("/gui/admin/queue/message/{id}", page(message))
    r.add_post("/gui/admin/queue/message/{id}/{action}", page(message_action))
    r.add_get("/gui/admin/lists", page(lists))
    r.add_get("/gui/admin/lists/{name}", page(list_view))
    r.add_get("/gui/admin/lists/{name}/download", page(list_download))
    r.add_get("/gui/admin/dkim", page(dkim_page))
    r.add_get("/gui/admin/dkim.json", page(dkim_json))
    r.add_post("/gui/admin/dkim/reload", page(dkim_reload))
    r.add_get("/gui/admin/tokens", page(tokens))
    r.add_post("/gui/admin/tokens", page(tokens_post))
    r.add_get("/gui/admin/account", page(account))
    r.add_post("/gui/admin/account", page(account_post))
    suppressions.add_admin_routes(app, page)


def _web(request):
    return request.app["web"]


def page(handler):
    """Require a logged-in session (else go to the login page); POSTs also need its CSRF token."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        w = _web(request)
        session = w.sessions.get(request.cookies.get(SESSION_COOKIE))
        if session is None:
            if request.method != "GET" or request.path.endswith(".json"):
                raise web.HTTPUnauthorized(text="Not logged in (or the session expired).")
            raise web.HTTPFound("/gui/login?next=" + quote(request.path_qs, safe=""))
        request["session"] = session
        if request.method == "POST":
            form = await request.post()
            if not same(form.get("csrf"), session.csrf):
                raise web.HTTPForbidden(text="The form's security token is missing or stale "
                                             "(CSRF check). Reload the page and try again.")
            request["form"] = form
        return await handler(request)
    return wrapped


def _back(request, location: str, kind: str = "", text: str = "") -> web.Response:
    if text:
        request["session"].flash.append((kind, text))
    raise web.HTTPSeeOther(location)


# --- login ----------------------------------------------------------------------------------------

def _safe_next(value: str | None) -> str:
    if value and value.startswith("/gui/admin") and "//" not in value and "\\" not in value:
        return value
    return "/gui/admin"


def _login_form(request, status: int = 200, error: str = "", wait: float = 0.0):
    w = _web(request)
    token = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
    resp = w.render(request, "login.html", status=status, login_csrf=token, error=error,
                    wait=wait, next=_safe_next(request.query.get("next")),
                    no_users=not w.engine.users, password_file=str(w.cfg.password_file),
                    home=str(w.cfg.home))
    resp.set_cookie(LOGIN_COOKIE, token, max_age=3600, secure=request.secure, **COOKIE)
    return resp


async def login_page(request: web.Request) -> web.Response:
    w = _web(request)
    if w.sessions.get(request.cookies.get(SESSION_COOKIE)) is not None:
        raise web.HTTPFound(_safe_next(request.query.get("next")))
    return _login_form(request)


async def login_post(request: web.Request) -> web.Response:
    w = _web(request)
    ip = request.remote or ""
    form = await request.post()
    left = w.login_throttle.wait_left(ip)
    if left > 0:
        return _login_form(request, 429, f"Too many failed logins from {ip}: wait {left:.1f} s "
                                         f"before the next try.", wait=left)
    if not same(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
        return _login_form(request, 403, "The login form expired (CSRF check): try again.")
    if not w.engine.users:
        return _login_form(request, 401, f"Nobody can log in: {w.cfg.password_file} is missing "
                                         f"or has no users: make the first one with "
                                         f"mailengine --home {w.cfg.home} init.")
    user = str(form.get("user", "")).strip()
    password = str(form.get("password", ""))
    known = user in w.engine.users.users()
    if not known:
        hash_password(password)  # as long as checking a real user's hash: names do not leak
    if not (known and w.engine.users.check(user, password)):
        delay = w.login_throttle.failed(ip)
        return _login_form(request, 401, f"Wrong user name or password. The next try is possible "
                                         f"in {delay:.1f} s.", wait=delay)
    w.login_throttle.succeeded(ip)
    session = w.sessions.create(user)
    resp = web.HTTPSeeOther(_safe_next(form.get("next")))
    resp.set_cookie(SESSION_COOKIE, session.id, secure=request.secure, **COOKIE)
    resp.del_cookie(LOGIN_COOKIE, path="/")
    raise resp


async def logout(request: web.Request) -> web.Response:
    w = _web(request)
    w.sessions.end(request["session"].id)
    resp = web.HTTPSeeOther("/gui/login")
    resp.del_cookie(SESSION_COOKIE, path="/")
    raise resp


# --- status ---------------------------------------------------------------------------------------

STATUS_SCAN_LIMIT = 20000  # above this many queued messages the status page skips the walk
DEST_TTL = 3.0  # s: status.json polls share one computation of the destinations


def destinations(engine, limit: int = 20, counter=None) -> list[dict]:
    """The busiest destinations and their state, from the delivery engine's scheduler; the
    last reply from the delivery log lines (metrics.OutcomeCounter). Per-domain message counts
    need a walk over the queue, done only while it is small (the Queue page always does it)."""
    delivery, ledger = engine.delivery, engine.ledger
    # the messages in memory only: the backlog's would be read from disk every poll
    msgs = list(ledger.messages()) if ledger.in_memory <= STATUS_SCAN_LIMIT else []
    rows = {r.domain: r for r in queue_view.by_domain(engine, msgs)}
    out = []
    active = delivery.sched.destinations()
    windows = delivery.windows._w
    for dom in set(active) | set(rows):
        ready, running = active.get(dom, (0, 0))
        row = rows.get(dom)
        state, why = "idle", ""
        win = windows.get(dom)
        if running:
            state = "sending"
        elif engine.cfg.queue.pause_sending:
            state, why = "paused", "queue.pause_sending is on"
        elif row is not None and row.held == row.messages:
            state = "held"
        elif ready:
            state = "ready"
        elif row is not None and row.waiting:
            state = "waiting for retry"
        if win is not None and win.limit < win.maximum and win.cuts:
            state = "throttled" if state in ("sending", "ready", "idle") else state
            why = (f"sending more slowly: at most {win.limit} of {win.maximum} connections, "
                   f"after temporary failures there (busy replies or failed connections, "
                   f"{'once' if win.cuts == 1 else f'{win.cuts} times'}); back up step by step "
                   f"as mail gets through")
        held_back = delivery.shaping.explain(dom)
        if held_back is not None:  # a provider's suspension or throttle (shaping.py)
            state, why = held_back
        rate = delivery.rate
        if state == "ready" and not rate.unlimited and \
                engine.cfg.limits.max_send_rate:
            why = why or f"limits.max_send_rate = {engine.cfg.limits.max_send_rate}/h"
        last = row.last_log if row else ""
        reply = counter.last_reply.get(dom) if counter is not None else None
        if reply is not None:
            last = time.strftime("%Y/%m/%d %H:%M:%S ", time.localtime(reply[0])) + reply[1]
        out.append({
            "domain": dom, "state": state, "why": why, "ready": ready, "running": running,
            "messages": row.messages if row else None,
            "recipients": row.recipients if row else None,
            "held": row.held if row else None,
            "next_retry": row.next_retry.strftime("%Y/%m/%d %H:%M:%S")
            if row and row.next_retry else "",
            "last": last,
        })
    out.sort(key=lambda d: (-(d["running"] + d["ready"]), -(d["recipients"] or 0), d["domain"]))
    return out[:limit]


def cached_destinations(w) -> list[dict]:
    now = time.monotonic()
    hit = getattr(w, "_dest_cache", None)
    if hit is None or now - hit[0] > DEST_TTL:
        hit = w._dest_cache = (now, destinations(w.engine, counter=w.outcomes))
    return hit[1]


async def status(request: web.Request) -> web.Response:
    w = _web(request)
    return w.render(request, "status.html", snap=snapshot(w.engine, w.outcomes),
                    dests=cached_destinations(w), title="Status",
                    categories=_category_rows(w.outcomes),
                    sources=sources_view.rows(w.engine))  # sending sources, from memory


def _category_rows(counter) -> list[dict]:
    """Failures since the start by category, the most first, with what each means."""
    rows = [{"category": c, "failed": n.get("failed", 0), "deferred": n.get("deferred", 0),
             "meaning": CATEGORIES.get(c, "")}
            for c, n in (counter.by_category.items() if counter is not None else ())]
    return sorted(rows, key=lambda r: (-(r["failed"] + r["deferred"]), r["category"]))


async def status_json(request: web.Request) -> web.Response:
    w = _web(request)
    return web.json_response({"now": snapshot(w.engine, w.outcomes),
                              "history": w.history.as_json(),
                              "destinations": cached_destinations(w),
                              "sources": sources_view.rows(w.engine)})


# --- settings -------------------------------------------------------------------------------------

def _settings_groups(engine, errors: dict[str, str], submitted) -> list[dict]:
    saved = settings_edit.read_file_values(engine.cfg.home)
    groups = []
    for sec, title in SECTION_TITLES.items():
        items = []
        for s in SETTINGS:
            if s.section != sec:
                continue
            running = engine.cfg.values[s.name]
            shown = saved[s.name] if s.restart else running
            # secrets masked (secret_values.py); a mask sent back unchanged keeps the value
            value = (submitted.get(s.name, "") if s.kind != "bool" else s.name in submitted) \
                if s.name in errors else (shown if s.kind == "bool"
                                          else settings_edit.form_text(s, masked(s, shown)))
            items.append({"s": s, "value": value, "error": errors.get(s.name, ""),
                          "pending": s.restart and saved[s.name] != running,
                          "running": settings_edit.form_text(s, masked(s, running)),
                          "default": toml_value(masked(s, s.default)),  # as the file writes it
                          "changed": shown != coerce(s, s.default),
                          "multiline": s.kind.startswith("list"), "secret": is_secret(s)})
        if items:
            groups.append({"section": sec, "title": title, "rows": items})
    return groups


async def settings(request: web.Request, errors=None, submitted=None, status=200):
    w = _web(request)
    return w.render(request, "settings.html", status=status, title="Settings",
                    groups=_settings_groups(w.engine, errors or {}, submitted or {}),
                    config_file=str(w.cfg.home / "mailengine.toml"))


async def settings_post(request: web.Request) -> web.Response:
    w = _web(request)
    section = request.match_info.get("section")  # None: the whole page's form
    if section is not None and section not in SECTION_TITLES:
        raise web.HTTPNotFound(text=f"No settings section {section!r}.")
    form = request["form"]
    web_ip = str(form.get("network.web_ip", w.cfg.network.web_ip)).strip()
    if section in (None, "network") and web_ip != w.cfg.network.web_ip and (
            web_ip == "0" or (web_ip and not _admits(web_ip, request.remote))):
        request["session"].flash.append(("error", (
            f"Nothing was saved: network.web_ip = {web_ip!r} would shut out your own address "
            f"{request.remote}. Change it from an address it admits, or in the file.")))
        return await settings(request, {"network.web_ip": "would lock you out"}, form,
                              status=400)
    try:
        errors, live, later = settings_edit.submit(w.engine, section, form)
    except OSError as e:
        errors, live, later = {"": f"Cannot write the config file: {e}"}, [], []
    if errors:
        request["session"].flash.append(
            ("error", "Nothing was saved: " + "; ".join(errors.values())))
        resp = await settings(request, errors, form, status=400)
        return resp
    parts = []
    if live:
        parts.append("applied now: " + ", ".join(live))
    if later:
        parts.append("saved, takes effect after restart: " + ", ".join(later))
    if live and w.engine.workers is not None:
        parts.append("the intake processes restart with the new values (sessions in progress "
                     "finish under the old ones)")
    _back(request, "/gui/admin/settings", "ok",  # the page's top, where the banner is
          ("Saved to mailengine.toml; " + "; ".join(parts)) if parts else "Nothing changed.")


def _admits(web_ip: str, ip: str | None) -> bool:
    try:
        return ip is not None and ip in AddressSet([web_ip])
    except ValueError:
        return True  # not an address: settings_edit reports it


# --- queue ----------------------------------------------------------------------------------------

async def queue_domains(request: web.Request) -> web.Response:
    w = _web(request)
    msgs = await queue_view.messages(w.engine)
    rows = await queue_view.off_loop(queue_view.by_domain, w.engine, msgs)
    replies = {d: time.strftime("%Y/%m/%d %H:%M:%S ", time.localtime(t)) + text
               for d, (t, text) in w.outcomes.last_reply.items()}
    return w.render(request, "queue.html", title="Queue", rows=rows,
                    total=queue_view.queued_total(w.engine, msgs),
                    partial=queue_view.partial(w.engine), scan_limit=queue_view.SCAN_LIMIT,
                    replies=replies)


async def queue_messages(request: web.Request) -> web.Response:
    w = _web(request)
    domain = request.match_info.get("domain") or request.query.get("domain", "")
    msgs = await queue_view.messages(w.engine)
    if domain:
        msgs = await queue_view.off_loop(queue_view.in_domain, msgs, domain)
    msgs.sort(key=lambda m: (m.time_created, m.id))
    try:
        start = max(0, int(request.query.get("start", "0")))
    except ValueError:
        start = 0
    now = dt.datetime.now()
    shown = [(m, queue_view.state_of(w.engine, m, now)) for m in msgs[start:start + PAGE]]
    return w.render(request, "messages.html", title=f"Queue: {domain or 'all messages'}",
                    domain=domain, shown=shown, total=len(msgs), start=start, page=PAGE)


async def message(request: web.Request) -> web.Response:
    w = _web(request)
    msg_id = request.match_info["id"]
    msg, where = queue_view.find(w.engine, msg_id)
    if msg is None and where is None:
        raise web.HTTPNotFound(text=f"Message {msg_id} is not in the queue (any more).")
    return w.render(request, "message.html", title=f"Message {msg_id}", msg_id=msg_id, msg=msg,
                    where=where, state=queue_view.state_of(w.engine, msg) if msg else "",
                    replies={a: (when, text, categorize_reply(text)) for a, (when, text)
                             in (queue_view.last_replies(msg) if msg else {}).items()},
                    inf=queue_view.inf_text(w.engine, msg_id, where),
                    headers=queue_view.head_of_data(w.engine, msg_id, where))


async def message_action(request: web.Request) -> web.Response:
    w = _web(request)
    msg_id, action = request.match_info["id"], request.match_info["action"]
    done, problems = await queue_actions.run(w.engine, action, [msg_id])
    target = "/gui/admin/queue" if action == "delete" and done else \
        f"/gui/admin/queue/message/{quote(msg_id)}"
    if problems:
        _back(request, target, "error", f"{action}: " + "; ".join(
            f"{k}: {v}" for k, v in problems.items()))
    _back(request, target, "ok", f"{action}: done for {msg_id}")


async def domain_action(request: web.Request) -> web.Response:
    w = _web(request)
    domain, action = request.match_info["domain"].lower(), request.match_info["action"]
    done, problems = await queue_actions.run(w.engine, action, ["@" + domain])
    text = f"{action}: {len(done)} messages for {domain}"
    if problems:
        text += f"; {len(problems)} not: " + "; ".join(
            f"{k}: {v}" for k, v in list(problems.items())[:5])
    _back(request, "/gui/admin/queue", "error" if problems else "ok", text)


# --- bounce and undeliverable lists ---------------------------------------------------------------

def _list_path(w, name: str):
    if name not in LISTS:
        raise web.HTTPNotFound(text=f"No list {name!r}.")
    return w.cfg.home / name


def _tail(path, n: int) -> tuple[list[str], int]:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 256 * n))
            data = f.read()
    except FileNotFoundError:
        return [], 0
    lines = data.decode("utf-8", "replace").splitlines()
    if size > 256 * n:
        lines = lines[1:]  # the first may be cut
    return lines[-n:], size


async def lists(request: web.Request) -> web.Response:
    w = _web(request)
    rows = []
    for name in LISTS:
        p = w.cfg.home / name
        try:
            st = p.stat()
            with open(p, "rb") as f:
                count = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
            rows.append({"name": name, "lines": count, "size": st.st_size,
                         "changed": time.strftime("%Y/%m/%d %H:%M:%S",
                                                  time.localtime(st.st_mtime))})
        except FileNotFoundError:
            rows.append({"name": name, "lines": 0, "size": 0, "changed": ""})
    return w.render(request, "lists.html", title="Bounce and undeliverable lists", rows=rows,
                    home=str(w.cfg.home), bounces=_recent_bounces(w), problem=override_problem())


def _recent_bounces(w) -> list[dict]:
    """The last bounces recorded (log/bounces.jsonl), newest first, with their category."""
    lines, _ = _tail(w.cfg.log_dir / BOUNCES_JSONL, 4 * RECENT_BOUNCES)  # lines are long
    out: list[dict] = []
    for line in reversed(lines):
        if len(out) >= RECENT_BOUNCES:
            break
        try:
            b = json.loads(line)
        except ValueError:
            continue  # a line cut by the tail, or written by hand
        if not isinstance(b, dict) or b.get("kind") not in ("hard", "soft"):
            continue
        row = {k: str(b.get(k) or "") for k in ("time", "address", "kind", "category",
                                                 "status", "code", "reason")}
        if not row["category"]:  # written before categories existed
            row["category"] = categorize(b.get("code") if isinstance(b.get("code"), int)
                                         else 0, row["status"], row["reason"])
        out.append(row)
    return out


async def list_view(request: web.Request) -> web.Response:
    w = _web(request)
    name = request.match_info["name"]
    lines, size = _tail(_list_path(w, name), LIST_VIEW_LINES)
    return w.render(request, "list_view.html", title=name, name=name, lines=lines, size=size,
                    limit=LIST_VIEW_LINES)


async def list_download(request: web.Request) -> web.StreamResponse:
    w = _web(request)
    name = request.match_info["name"]
    path = _list_path(w, name)
    if not path.exists():
        return web.Response(body=b"", content_type="text/plain",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"',
                                           "Content-Type": "text/plain; charset=utf-8"})


# --- DKIM ------------------------------------------------------------------------------------------

def _dkim_state(w) -> dict:
    """What the DKIM page and dkim.json show: each signing table entry's DNS record and the
    problems of the keys (the same lines the engine logged at start)."""
    signer = w.engine.dkim
    if signer is None:
        saved = settings_edit.read_file_values(w.cfg.home).get("dkim.signing_table") or []
        return {"enabled": False, "pending": bool(saved), "records": [], "problems": []}
    counts = {}
    for d in set(signer.unsigned) | set(signer.held):
        parts = []
        if signer.unsigned.get(d):
            parts.append(f"{signer.unsigned[d]} messages sent unsigned (key unusable)")
        if signer.held.get(d):
            parts.append(f"{signer.held[d]} times a message was held (key unusable)")
        counts[d] = "; ".join(parts)
    return {"enabled": True, "pending": False, "records": signer.dns_records(),
            "problems": signer.problems(), "missing_key": signer.missing_key,
            "canonicalization": signer.canonicalization, "counts": counts}


async def dkim_page(request: web.Request) -> web.Response:
    w = _web(request)
    return w.render(request, "dkim.html", title="DKIM",
                    config_file=str(w.cfg.home / "mailengine.toml"), **_dkim_state(w))


async def dkim_json(request: web.Request) -> web.Response:
    state = _dkim_state(_web(request))
    state.pop("counts", None)
    return web.json_response(state)


async def dkim_reload(request: web.Request) -> web.Response:
    signer = _web(request).engine.dkim
    if signer is None:
        _back(request, "/gui/admin/dkim", "error", "DKIM signing is off.")
    signer.reload()
    problems = signer.problems()
    _back(request, "/gui/admin/dkim", "error" if problems else "ok",
          f"Key files read again: {len(problems)} problems left." if problems
          else "Key files read again: every key is usable.")


# --- API tokens and account -----------------------------------------------------------------------

async def tokens(request: web.Request, new_token: str = "", new_name: str = "") -> web.Response:
    w = _web(request)
    return w.render(request, "tokens.html", title="API tokens", names=w.tokens.names(),
                    new_token=new_token, new_name=new_name, path_file=str(w.tokens.path))


async def tokens_post(request: web.Request) -> web.Response:
    w = _web(request)
    form = request["form"]
    name = str(form.get("name", "")).strip()
    if not name or ":" in name or any(c.isspace() for c in name) or len(name) > 64:
        _back(request, "/gui/admin/tokens", "error",
              "A token name is one word (no ':' or spaces), at most 64 characters.")
    if form.get("revoke"):
        w.tokens.revoke(name)
        _back(request, "/gui/admin/tokens", "ok", f"Token {name} revoked.")
    token = w.tokens.create(name)
    request["session"].flash.append(("ok", f"Token {name} created. Copy it now: it is stored "
                                           f"hashed and cannot be shown again."))
    return await tokens(request, token, name)


async def account(request: web.Request) -> web.Response:
    w = _web(request)
    return w.render(request, "account.html", title="Account",
                    password_file=str(w.cfg.password_file))


async def account_post(request: web.Request) -> web.Response:
    w = _web(request)
    form = request["form"]
    session = request["session"]
    if not w.engine.users.check(session.user, str(form.get("current", ""))):
        w.login_throttle.failed(request.remote or "")
        _back(request, "/gui/admin/account", "error", "The current password is wrong.")
    new, again = str(form.get("new", "")), str(form.get("again", ""))
    if len(new) < 8:
        _back(request, "/gui/admin/account", "error",
              "The new password needs 8 characters or more.")
    if new != again:
        _back(request, "/gui/admin/account", "error", "The two new passwords differ.")
    w.engine.users.set_password(session.user, new)
    w.sessions.end_user(session.user, keep=session.id)
    _back(request, "/gui/admin/account", "ok",
          f"Password changed; stored hashed in {w.cfg.password_file}.")

