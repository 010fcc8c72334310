"""The HTTP API under /api/v1/ (JSON, bearer tokens): inject mail, query and act on the queue,
read statistics. The OpenAPI description is /api/v1/openapi.json (openapi.py).

Injected mail takes the SMTP intake's road: the policy's sender and recipient checks (a token
counts as an authenticated client, so it may relay), then `Intake.on_message`, which stores the
message in the spool (fsync'ed when relay_via_disk) before the API answers 202 with queue ids.
"""
from __future__ import annotations

import functools
import json
import re

from aiohttp import web

from ..smtp.server import MessageReceived, Session, Transaction
from . import admin, queue_actions, queue_view, suppressions
from .inject import InjectError, prepare
from .metrics import snapshot
from .openapi import openapi

QUEUED = re.compile(r"queued as (\S+)")
MAX_LIST = 1000


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/openapi.json", openapi_json)
    r.add_post("/api/v1/messages", token(inject))
    r.add_get("/api/v1/stats", token(stats))
    r.add_get("/api/v1/queue", token(queue_list))
    r.add_get("/api/v1/queue/domains", token(queue_domains))
    r.add_post("/api/v1/queue/domains/{domain}/{action}", token(domain_action))
    r.add_get("/api/v1/queue/{id}", token(queue_message))
    r.add_delete("/api/v1/queue/{id}", token(message_delete))
    r.add_post("/api/v1/queue/{id}/{action}", token(message_action))
    suppressions.add_api_routes(app, token)


def error(status: int, text: str, **extra) -> web.Response:
    return web.json_response({"error": text, **extra}, status=status)


def token(handler):
    """Require `Authorization: Bearer TOKEN` naming a token of HOME/api-tokens.txt."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        w = request.app["web"]
        ip = request.remote or ""
        left = w.api_throttle.wait_left(ip)
        if left > 0:
            return error(429, f"too many wrong tokens from {ip}: wait {left:.1f} s",
                         retry_after=round(left, 1))
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if not w.tokens:
            return error(401, f"no API tokens: create one on the web admin's API tokens page or "
                              f"add a line name:secret to {w.tokens.path}")
        name = w.tokens.check(value.strip()) if scheme.lower() == "bearer" else None
        if name is None:
            delay = w.api_throttle.failed(ip)
            resp = error(401, "missing or wrong token (send 'Authorization: Bearer TOKEN')",
                         retry_after=round(delay, 1))
            resp.headers["WWW-Authenticate"] = 'Bearer realm="mailengine"'
            return resp
        w.api_throttle.succeeded(ip)
        request["token_name"] = name
        return await handler(request)
    return wrapped


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi())


# --- injection ------------------------------------------------------------------------------------

async def inject(request: web.Request) -> web.Response:
    w = request.app["web"]
    engine = w.engine
    try:
        doc = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as e:
        return error(400, f"the request body is not JSON: {e}")
    cfg = engine.cfg
    try:
        prepared = prepare(doc, engine.hostname, cfg.limits.max_recipients,
                           cfg.limits.max_message_size)
    except InjectError as e:
        return error(400, str(e))
    peer = request.transport.get_extra_info("peername") if request.transport else None
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    results = []
    suppressed: list[dict] = []  # recipients left out: on the suppression list
    for p in prepared:
        session = Session(peer_ip=request.remote or "", peer_port=peer[1] if peer else 0,
                          peer_hostname=request.remote or "", local_ip=sock[0] if sock else "",
                          local_port=sock[1] if sock else 0, helo="http-api", esmtp=True,
                          auth_user=request["token_name"])
        txn = Transaction(mail_from=p.mail_from)
        refusal = engine.policy.on_mail(session, txn, p.mail_from)
        if refusal is not None:
            return _refused(refusal, results)
        for r in p.rcpts:
            # A suppressed recipient is left out and listed in the answer, whatever
            # suppression.action says for SMTP: the caller learns it at once.
            refusal = engine.policy.rcpt(session, txn, r, drop_suppressed=True)
            if refusal is not None:
                return _refused(refusal, results, r)
            txn.rcpts.append(r)
        suppressed += [{"address": a, "reason": e.reason, "source": e.source,
                        "sender_domain": e.sender_domain} for a, e in txn.dropped.items()]
        try:
            reply = await engine.intake.on_message(MessageReceived(session, txn, p.data))
        except OSError as e:
            return error(503, f"cannot store the message: {e.strerror or e}; nothing queued "
                              f"for it", queued=results, suppressed=suppressed)
        if reply.code == 250 and txn.dropped and len(txn.dropped) == len(txn.rcpts):
            continue  # every recipient suppressed: nothing stored
        m = QUEUED.search(reply.text)
        if reply.code != 250 or m is None:
            return _refused(reply, results)
        results.append({"id": m.group(1), "to": [r for r in p.rcpts if r not in txn.dropped],
                        "local": sorted(txn.local), "size": len(p.data)})
    # 202: accepted for delivery; 200 when every recipient was suppressed (nothing queued)
    return web.json_response({"ids": [r["id"] for r in results], "messages": results,
                              "suppressed": suppressed}, status=202 if results else 200)


def _refused(reply, results, rcpt: str = "") -> web.Response:
    status = 503 if 400 <= reply.code < 500 else 403
    what = f" ({rcpt})" if rcpt else ""
    return error(status, f"refused{what}: {reply.code} {reply.enhanced} {reply.text}",
                 queued=results)


# --- statistics and the queue ---------------------------------------------------------------------

async def stats(request: web.Request) -> web.Response:
    w = request.app["web"]
    d = getattr(w.engine, "delivery", None)
    return web.json_response({**snapshot(w.engine, w.outcomes),
                              "destinations": admin.cached_destinations(w),
                              # traffic shaping's suspensions and throttles (shaping.py)
                              "shaping": d.shaping.active() if d is not None else [],
                              # each sending source's warm-up use today (sources.py)
                              "sources": d.sources.usage() if d is not None else []})


def _int(request, name: str, default: int, top: int) -> int:
    try:
        return max(0, min(top, int(request.query.get(name, default))))
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"{name}: not a number"}),
                                 content_type="application/json")


async def queue_list(request: web.Request) -> web.Response:
    w = request.app["web"]
    msgs = await queue_view.messages(w.engine)
    domain = request.query.get("domain")
    if domain:
        msgs = await queue_view.off_loop(queue_view.in_domain, msgs, domain)
    state = request.query.get("state")
    if state:
        msgs = [m for m in msgs if queue_view.state_of(w.engine, m) == state]
    msgs.sort(key=lambda m: (m.time_created, m.id))
    offset, limit = _int(request, "offset", 0, 1 << 40), _int(request, "limit", 100, MAX_LIST)
    total = len(msgs) if domain or state else queue_view.queued_total(w.engine, msgs)
    return web.json_response({"total": total, "partial": queue_view.partial(w.engine),
                              "offset": offset, "messages": [
        queue_view.to_json(w.engine, m) for m in msgs[offset:offset + limit]]})


async def queue_domains(request: web.Request) -> web.Response:
    w = request.app["web"]
    rows = await queue_view.off_loop(queue_view.by_domain, w.engine,
                                     await queue_view.messages(w.engine))
    return web.json_response({"domains": [{
        "domain": r.domain, "messages": r.messages, "recipients": r.recipients, "held": r.held,
        "sending": r.sending, "waiting": r.waiting,
        "oldest": r.oldest.isoformat() if r.oldest else None,
        "next_retry": r.next_retry.isoformat() if r.next_retry else None,
        "last": r.last_log} for r in rows]})


async def queue_message(request: web.Request) -> web.Response:
    w = request.app["web"]
    msg_id = request.match_info["id"]
    msg, where = queue_view.find(w.engine, msg_id)
    if msg is None:
        return error(404, f"{msg_id}: not in the queue")
    return web.json_response({**queue_view.to_json(w.engine, msg), "directory": where,
                              "history": msg.log,
                              "inf": queue_view.inf_text(w.engine, msg_id, where)})


async def _act(request, action: str, ids: list[str]) -> web.Response:
    w = request.app["web"]
    done, problems = await queue_actions.run(w.engine, action, ids)
    status = 200 if done or not problems else (404 if all(
        "not in the queue" in v for v in problems.values()) else 409)
    return web.json_response({"action": action, "done": done, "not_done": problems},
                             status=status)


async def message_delete(request: web.Request) -> web.Response:
    return await _act(request, "delete", [request.match_info["id"]])


async def message_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in queue_actions.ACTIONS:
        return error(404, f"no action {action!r}; one of {', '.join(queue_actions.ACTIONS)}")
    return await _act(request, action, [request.match_info["id"]])


async def domain_action(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in queue_actions.ACTIONS:
        return error(404, f"no action {action!r}; one of {', '.join(queue_actions.ACTIONS)}")
    return await _act(request, action, ["@" + request.match_info["domain"].lower()])
