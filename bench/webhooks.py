"""bench/webhooks: what webhooks cost the engine process's event loop, per event.

    python bench/webhooks.py [--events 100000] [--concurrency 500] [--batch-size 100]

(0) the attempts of (a) with webhooks off: what the loop of this script costs by itself.
(a) capture: N attempt records of one recipient each go through `Webhooks.attempt` as
    notices.py passes them after each send attempt, `--concurrency` attempts in flight, each
    awaiting its commit as delivery does; timed until every event is in HOME/webhooks.db.
(b) posting: the same N events sent by `Webhooks.run` to a receiver in another process
    (`python -m mailengine.testing.webhook_receiver`), timed until it acknowledged them all.

For each it prints events/s and the CPU the event loop's thread used per event (the part that
competes with delivery; the SQLite commits run in the outbox's own thread). At 30,000
recipients/s (bench/fanout.py), X µs per event is X * 3 % of one core.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailengine.config import Config  # noqa: E402
from mailengine.testing.engine import free_port  # noqa: E402
from mailengine.webhooks import Webhooks  # noqa: E402


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def record(i: int) -> dict:
    return {"time": "2026-12-05T00:12:31.402+0000", "event": "attempt", "id": f"M{i}@bench",
            "from": "news@src.bench", "rcpt": f"r{i}@dest.bench", "attempt": 1,
            "result": "sent", "final": True, "mx": "mx.dest.bench", "ip": "127.0.0.1",
            "port": 25, "code": 250, "enhanced": "2.0.0", "text": "queued as 1234",
            "stage": "body", "class": "", "duration": 0.004}


async def capture(hooks: Webhooks | None, n: int, concurrency: int) -> tuple[float, float]:
    # the event log's lines: made by delivery whether webhooks are on or not
    pairs = [(r, json.dumps(r, ensure_ascii=False, separators=(",", ":")))
             for r in map(record, range(n))]

    async def one(i: int) -> None:
        fut = hooks.attempt(pairs[i:i + 1]) if hooks is not None else None
        if fut is not None:
            await fut

    cpu0, t0 = time.thread_time(), time.perf_counter()
    for start in range(0, n, concurrency):  # waves of attempts ending together
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + concurrency))))
    return time.perf_counter() - t0, time.thread_time() - cpu0


async def post_all(hooks: Webhooks, url: str) -> tuple[float, float]:
    cpu0, t0 = time.thread_time(), time.perf_counter()
    runner = asyncio.create_task(hooks.run())
    while await hooks._db(hooks.outbox.pending, url):
        await asyncio.sleep(0.05)
    seconds, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    return seconds, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--concurrency", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=100)
    args = ap.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    rx = subprocess.Popen([sys.executable, "-m", "mailengine.testing.webhook_receiver",
                           f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, env=env)
    try:
        wait_listening(port)
        with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as home:
            cfg = Config(home=Path(home), values={
                "webhooks.urls": [url], "webhooks.secret": "bench",
                "webhooks.batch_size": args.batch_size, "webhooks.batch_wait": 0.2})
            hooks = Webhooks(cfg)

            async def run() -> None:
                n = args.events
                base = await capture(None, n, args.concurrency)
                for name, (seconds, cpu) in (
                        ("(0) the same attempts, webhooks off", base),
                        ("(a) capture", await capture(hooks, n, args.concurrency)),
                        ("(b) posting", await post_all(hooks, url))):
                    print(f"{name}: {n / seconds:,.0f} events/s, event loop CPU "
                          f"{cpu / n * 1e6:.1f} µs per event ({seconds:.1f} s)")
                await hooks.stop()

            asyncio.run(run())
    finally:
        rx.terminate()
        rx.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
