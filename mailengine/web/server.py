"""The web admin, the HTTP API and /metrics: the service app.py plugs into the running engine.

app.py builds `WebServer(engine)` and awaits `start()` after the SMTP listener and `stop()`
before the engine stops. The web application itself (site.py: aiohttp, Jinja2 templates) is
imported and built only when the web admin is on (`network.web_port` not 0 and
`network.web_ip` not "0"), so an engine without it starts as fast as before. A web port that
cannot be had (in use, or below 1024 without root) is one warning line, not the end of the
engine: mail goes on flowing without the admin.
"""
from __future__ import annotations

import logging

log = logging.getLogger("mailengine.web")


class WebServer:
    def __init__(self, engine):
        self.engine = engine
        self.site = None  # site.WebSite while serving

    async def start(self) -> None:
        net = self.engine.cfg.network
        if not net.web_port:
            log.info("web admin is off (network.web_port = 0)")
            return
        if net.web_ip == "0":
            log.info('web admin is off (network.web_ip = "0")')
            return
        from .site import WebSite
        site = WebSite(self.engine)
        if await site.start():
            self.site = site

    async def stop(self) -> None:
        if self.site is not None:
            await self.site.stop()
            self.site = None
