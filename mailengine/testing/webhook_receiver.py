"""A webhook receiver on loopback, for tests and benchmarks of webhooks.py.

A real aiohttp HTTP server in a background thread that records every POST (headers, body, the
answer it gave) and, from the batches it acknowledged, the events. A test scripts how it
answers:

    with WebhookReceiver(secret="s3cret") as rx:        # rx.url: http://127.0.0.1:PORT/hook
        rx.mode = "fail"     # 500 to every POST; "stall": answer after stall_seconds; "ok": 200
        rx.close_port()      # connections refused until rx.open_port()
        ... rx.events, rx.requests, rx.bad_signatures

Each request's signature is checked with webhooks.verify when a secret is given; a request whose
signature does not verify is answered 401 and counted in `bad_signatures`.
`python -m mailengine.testing.webhook_receiver [HOST:PORT]` runs one and prints a line a second.
"""
from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

from aiohttp import web

from ..webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from .loop_thread import LoopThread


class WebhookReceiver:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, secret: str = "",
                 path: str = "/hook"):
        self.host, self.port, self.secret, self.path = host, port, secret, path
        self.mode = "ok"  # ok | fail | stall (recorded with status 0)
        self.stall_seconds = 30.0
        self.requests: list[dict] = []  # every POST: time, status, headers, body
        self.events: list[dict] = []  # the events of the POSTs answered 2xx
        self.bad_signatures = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._background: LoopThread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.path}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        mode = self.mode
        status = 200
        if self.secret and not verify(self.secret, request.headers.get(TIMESTAMP_HEADER, ""),
                                      request.headers.get(SIGNATURE_HEADER, ""), body):
            with self._lock:
                self.bad_signatures += 1
            status = 401
        elif mode == "fail":
            status = 500
        elif mode == "stall":  # the sender has given up by then: not an acknowledgement
            status = 0
        with self._lock:
            self.requests.append({"time": time.time(), "status": status, "mode": mode,
                                  "headers": dict(request.headers), "body": body})
            if status == 200:
                self.events.extend(json.loads(body)["events"])
        if mode == "stall":
            await asyncio.sleep(self.stall_seconds)
        return web.Response(status=status or 200, text="ok" if status == 200 else "no")

    async def _open(self) -> None:
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        if not self.port:
            self.port = self._site._server.sockets[0].getsockname()[1]

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(self.path, self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await self._open()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def start(self) -> "WebhookReceiver":
        self._background = LoopThread("webhook-receiver", self._start,
                                      lambda: self._runner.cleanup())
        self._loop = self._background.run(10)
        return self

    def close_port(self) -> None:
        """Stop listening: connections are refused (the port stays this receiver's)."""
        self._call(self._site.stop())

    def open_port(self) -> None:
        self._call(self._open())

    def stop(self) -> None:
        if self._background is not None:
            self._background.stop()
            self._background = None

    def snapshot(self) -> tuple[list[dict], list[dict]]:
        """(requests, events) as of now."""
        with self._lock:
            return list(self.requests), list(self.events)

    def __enter__(self) -> "WebhookReceiver":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> None:
    host, _, port = (argv[0] if argv else "127.0.0.1:8089").rpartition(":")
    with WebhookReceiver(host or "127.0.0.1", int(port)) as rx:
        print(f"listening on {rx.url}", flush=True)
        while True:
            time.sleep(1)
            print(f"{len(rx.requests)} requests, {len(rx.events)} events", flush=True)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        pass
