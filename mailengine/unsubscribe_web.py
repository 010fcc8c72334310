"""The public unsubscribe listener: the one HTTP service of the engine that strangers may reach.

It answers the links that unsubscribe.py puts in List-Unsubscribe, on `unsubscribe.listen`
(its own address and port, no login; the web admin in web/ stays private):

    POST /u/TOKEN   body List-Unsubscribe=One-Click (RFC 8058; form-urlencoded or multipart):
                    the token is verified and its address suppressed at once; 200
    GET  /u/TOKEN   a page with a button that sends that POST. A GET never unsubscribes: mail
                    filters and link scanners fetch every URL in a message.

A token this engine did not make (forged, damaged, cut) gets 404 and a plain sentence; a POST
without List-Unsubscribe=One-Click gets 400; a body over MAX_BODY bytes 413; request lines and
header fields are capped too. Nothing a client sends can show a traceback: a failure to record
the unsubscribe is logged here and answered 503 ("try again later"), which mailbox providers do.
The listener speaks plain HTTP behind a TLS proxy, or HTTPS itself with the SMTP certificate
(`unsubscribe.listen_tls`). app.py starts it only when `unsubscribe.listen` is set; a port that
cannot be had is a warning, never the end of the engine.
"""
from __future__ import annotations

import asyncio
import html
import logging
from urllib.parse import parse_qs

from aiohttp import web

from .config import split_host_port
from .unsubscribe import URL_PATH, Unsubscriber

log = logging.getLogger("mailengine.unsubscribe")


class _OneLine(logging.Filter):
    """aiohttp logs a request it cannot parse (a line too long, garbage) with a traceback: a
    stranger's bad request is one line here, never a traceback in the engine's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            why = " ".join(str(getattr(err, "message", "") or err).split())[:200]
            record.msg, record.args = f"{record.getMessage()}: {type(err).__name__} {why}", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


http_log = logging.getLogger("mailengine.unsubscribe.http")  # given to aiohttp's server
http_log.addFilter(_OneLine())

MAX_BODY = 4096  # bytes: the one-click body is 26; a multipart form a few hundred
MAX_LINE = 2048  # the request line (the token is at most recipient_token.MAX_TOKEN)
MAX_FIELD = 4096  # one header field
MAX_FIELDS = 48  # header fields in one request
KEEPALIVE = 15.0  # seconds an idle connection is kept
HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the URL holds the token
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
}
NOT_VALID = "This unsubscribe link is not valid (it may have been cut or changed).\n"
NEEDS_ONE_CLICK = "An unsubscribe request must carry List-Unsubscribe=One-Click (RFC 8058).\n"
TRY_LATER = "The unsubscribe could not be recorded just now; please try again later.\n"


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain", headers=HEADERS)


def _page(title: str, body: str) -> web.Response:
    return web.Response(
        text=(f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
              f'<meta name="viewport" content="width=device-width">'
              f"<title>{title}</title></head>\n<body>\n{body}\n</body></html>\n"),
        content_type="text/html", headers=HEADERS)


def _who(address: str, sender_domain: str) -> str:
    sender = f" from {html.escape(sender_domain)}" if sender_domain else ""
    return f"mail{sender} to <b>{html.escape(address)}</b>"


class UnsubscribeListener:
    """The service app.py starts and stops (as the web admin): `start()`, `stop()`."""

    def __init__(self, engine, unsubscriber: Unsubscriber | None = None):
        self.engine = engine
        self.cfg = engine.cfg
        self.unsub = unsubscriber or Unsubscriber.for_config(engine.cfg)
        self.runner: web.AppRunner | None = None
        self.bound: list[tuple[str, int]] = []

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._no_tracebacks])
        app.router.add_get(URL_PATH + "{token}", self.get)
        app.router.add_post(URL_PATH + "{token}", self.post)
        return app

    @web.middleware
    async def _no_tracebacks(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as e:  # 404, 405, 413... as plain text, with our headers
            if e.status < 400:
                raise
            return _text(e.status, f"{e.status} {e.reason}\n")
        except Exception:
            log.exception("unsubscribe listener: %s %s failed", request.method, request.path)
            return _text(500, TRY_LATER)

    async def get(self, request: web.Request) -> web.Response:
        who = self.unsub.verify(request.match_info["token"])
        if who is None:
            return _text(404, NOT_VALID)
        return _page("Unsubscribe", (
            f"<p>Stop {_who(who.address, who.sender_domain)}?</p>\n"
            '<form method="post">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            '<button type="submit">Unsubscribe</button></form>'))

    async def post(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if self.unsub.verify(token) is None:
            return _text(404, NOT_VALID)
        if request.content_type == "multipart/form-data":
            form = await request.post()
            values = [str(v) for v in form.getall("List-Unsubscribe", [])]
        else:  # form-urlencoded, or a client that left the content type out
            raw = await request.read()
            values = parse_qs(raw.decode("latin-1")).get("List-Unsubscribe", [])
        if "One-Click" not in values:
            return _text(400, NEEDS_ONE_CLICK)
        try:
            who = await asyncio.to_thread(self.unsub.unsubscribe, token, "https",
                                          request.remote or "")
        except Exception:
            log.exception("unsubscribe via https could not be recorded")
            return _text(503, TRY_LATER)
        return _page("Unsubscribed", f"<p>Done: no more {_who(who.address, who.sender_domain)}."
                                     "</p>")

    async def start(self) -> bool:
        u = self.cfg.unsubscribe
        host, port = split_host_port(u.listen, 443)
        ssl_ctx = None
        if u.listen_tls:  # the SMTP certificate (tls.py), as the web admin's web_tls
            from . import tls
            net = self.cfg.network
            ssl_ctx = tls.server_context(self.cfg.home, net.tls_cert, net.tls_key,
                                         self.engine.hostname)
        self.runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False,
                                    max_line_size=MAX_LINE, max_field_size=MAX_FIELD,
                                    max_headers=MAX_FIELDS, keepalive_timeout=KEEPALIVE,
                                    logger=http_log, shutdown_timeout=2.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True, ssl_context=ssl_ctx)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            self.runner = None
            log.warning("unsubscribe listener NOT started: cannot listen on %s: %s",
                        u.listen, e.strerror or e)
            return False
        self.bound = [s.getsockname()[:2] for s in site._server.sockets]
        log.info("unsubscribe listener on %s port %d (%s); links: %s%s<token>", host, port,
                 "https" if ssl_ctx else "http", u.url_base or "(no url_base)", URL_PATH)
        return True

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
