"""The web application: aiohttp routes, access guard, templates, start and stop of the listener.

server.WebServer builds a `WebSite(engine)` only when the web admin is on, so an engine without
it never imports aiohttp. Everything on the port answers only clients allowed by
`network.web_ip` (empty: any; an address, CIDR network or range; "0": the web admin is off).
When web_ip names loopback addresses only, the port is bound on loopback only; otherwise on
every address.

    /                   -> /gui/admin
    /gui/login          log in with a user of HOME/password.txt
    /gui/admin/...      status, settings, queue, bounce lists, API tokens, account (admin.py);
                        complaint rates (complaints_view.py, also /api/v1/complaints)
    /api/v1/...         JSON API with bearer tokens (api.py), /api/v1/openapi.json
    /metrics            Prometheus text format (metrics.py)
"""
from __future__ import annotations

import logging
from pathlib import Path

import jinja2
from aiohttp import web

from ..config import AddressSet, parse_address_range
from . import admin, api, complaints_view
from .auth import ApiTokens, Sessions, Throttle, TOKENS_FILE
from .metrics import History, OutcomeCounter, prometheus

log = logging.getLogger("mailengine.web")

HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "script-src 'self'; form-action 'self'; frame-ancestors 'none'"),
}


def bind_hosts(web_ip: str) -> list[str] | None:
    """Where to listen: on loopback only when web_ip admits loopback clients only (every
    loopback client can reach 127.0.0.1 or ::1), else on every address (None)."""
    if not web_ip or web_ip == "0":
        return None
    try:
        first, last = parse_address_range(web_ip)
    except ValueError:
        return None
    if first.is_loopback and last.is_loopback:
        return ["::1" if first.version == 6 else "127.0.0.1"]
    return None


class WebSite:
    def __init__(self, engine):
        self.engine = engine
        self.cfg = engine.cfg
        self.sessions = Sessions()
        self.login_throttle = Throttle()
        self.api_throttle = Throttle()
        self.tokens = ApiTokens(engine.cfg.home / TOKENS_FILE)
        self.outcomes = OutcomeCounter()
        self.history = History(engine, self.outcomes)
        self.runner: web.AppRunner | None = None
        self.bound: list[tuple[str, int]] = []
        self._allowed_key: str | None = None
        self._allowed: AddressSet | None = None
        self.templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=jinja2.select_autoescape(("html",)),
            undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
        self.app = self.make_app()

    # --- the application -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        max_size = self.cfg.limits.max_message_size
        # A JSON document may escape every byte of the message (\u00XX: 6 bytes per byte).
        client_max = 6 * max_size + (1 << 20) if max_size else 256 << 20
        app = web.Application(client_max_size=client_max,
                              middlewares=[self.guard_middleware])
        app["web"] = self
        app.router.add_get("/", lambda r: _redirect("/gui/admin"))
        app.router.add_get("/gui", lambda r: _redirect("/gui/admin"))
        app.router.add_get("/gui/", lambda r: _redirect("/gui/admin"))
        app.router.add_static("/gui/static", HERE / "static")
        admin.add_routes(app)
        api.add_routes(app)
        complaints_view.add_routes(app)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=prometheus(self.engine, self.outcomes)
                            + await complaints_view.prometheus(self.engine),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    def allowed(self, ip: str | None) -> bool:
        web_ip = self.cfg.network.web_ip
        if web_ip == "0":
            return False
        if not web_ip:
            return True
        if web_ip != self._allowed_key:
            self._allowed_key, self._allowed = web_ip, AddressSet([web_ip])
        return ip is not None and ip in self._allowed

    @web.middleware
    async def guard_middleware(self, request: web.Request, handler) -> web.StreamResponse:
        ip = request.remote
        if not self.allowed(ip):
            web_ip = self.cfg.network.web_ip
            if request.path.startswith("/api/") or request.path == "/metrics":
                why = ("the web admin is off (network.web_ip = \"0\")" if web_ip == "0" else
                       f"client address {ip} is not allowed: network.web_ip = {web_ip!r}")
                return web.json_response({"error": why}, status=403)
            resp = self.render(request, "forbidden.html", status=403, client_ip=ip,
                               web_ip=web_ip, config=str(self.cfg.home / "mailengine.toml"))
        else:
            try:
                resp = await handler(request)
            except web.HTTPException as e:
                if e.status >= 400 and not request.path.startswith("/api/") and \
                        e.content_type != "application/json":
                    resp = self.render(request, "error.html", status=e.status,
                                       title=e.reason, text=e.text if e.text != e.reason else "")
                else:
                    raise
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        if request.path.startswith("/gui/") and not request.path.startswith("/gui/static/"):
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    def render(self, request: web.Request | None, template: str, status: int = 200,
               **ctx) -> web.Response:
        session = request.get("session") if request is not None else None
        flash = []
        if session is not None:
            flash, session.flash = session.flash, []
        html = self.templates.get_template(template).render(
            user=session.user if session else None,
            csrf=session.csrf if session else "",
            flash=flash, path=request.path if request is not None else "",
            static=lambda f: f"/gui/static/{f}",
            hostname=self.engine.hostname, **ctx)
        return web.Response(text=html, content_type="text/html", charset="utf-8", status=status)

    # --- life cycle ------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Listen; False (after one warning line) when the port cannot be had."""
        net = self.cfg.network
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        hosts = bind_hosts(net.web_ip)
        ssl_ctx = None
        if net.web_tls:  # the SMTP certificate (tls.py), so there is one pair to renew
            from .. import tls
            ssl_ctx = tls.server_context(self.cfg.home, net.tls_cert, net.tls_key,
                                         self.engine.hostname)
        try:
            for host in hosts or [None]:
                site = web.TCPSite(self.runner, host, net.web_port, reuse_address=True,
                                   shutdown_timeout=2.0, ssl_context=ssl_ctx)
                await site.start()
                for sock in site._server.sockets:  # the addresses really bound
                    self.bound.append(sock.getsockname()[:2])
        except OSError as e:
            # The web admin is optional: mail keeps flowing without it, so the engine goes on.
            await self.runner.cleanup()
            self.runner, self.bound = None, []
            if isinstance(e, PermissionError):
                why = "a port below 1024 needs root or CAP_NET_BIND_SERVICE"
            else:
                why = f"{e.strerror or e}; is another program using it?"
            log.warning("web admin NOT started: cannot listen on port %d: %s. Choose another "
                        "with --web-port or network.web_port (0 turns the web admin off).",
                        net.web_port, why)
            return False
        self.outcomes.attach()
        self.history.start()
        where = ", ".join(f"{h} port {p}" for h, p in self.bound)
        log.info("web admin on %s: %s://%s:%d/gui/admin%s", where,
                 "https" if ssl_ctx else "http", hosts[0] if hosts else "127.0.0.1", net.web_port,
                 f" (clients: {net.web_ip})" if net.web_ip else "")
        if not self.engine.users:
            log.warning("web admin: no users: %s is missing or empty; make the first one "
                        "with: mailengine --home %s init", self.cfg.password_file, self.cfg.home)
        return True

    async def stop(self) -> None:
        self.outcomes.detach()
        await self.history.stop()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _redirect(location: str) -> web.Response:
    raise web.HTTPFound(location)
