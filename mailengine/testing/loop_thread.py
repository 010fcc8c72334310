"""A test server's event loop in a daemon thread, for synchronous tests and benchmarks.

ThreadedSink, WebhookReceiver and FakeNet run asyncio servers that synchronous code (pytest
tests, bench/ scripts) starts and stops: `LoopThread(name, start, stop).run()` runs the
coroutine function `start` on a new loop in a thread and returns that loop once it has
finished (an exception from it is raised in the caller, and the thread is gone); `stop()` runs
the coroutine function `stop` on the loop, then closes it and joins the thread.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Awaitable, Callable


class LoopThread:
    def __init__(self, name: str, start: Callable[[], Awaitable],
                 stop: Callable[[], Awaitable]) -> None:
        self.name = name
        self._start, self._stop = start, stop
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread while it runs."""
        return self._thread

    def run(self, timeout: float = 30.0) -> asyncio.AbstractEventLoop:
        ready = threading.Event()
        error: list[BaseException] = []
        loop = self.loop = asyncio.new_event_loop()

        def main() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._start())
            except BaseException as e:  # raised in the starting thread below
                error.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop())

        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(timeout)
        if error:
            self._thread.join()
            self._thread = None
            loop.close()
            raise error[0]
        return loop

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None or self.loop is None:
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()
        self._thread = None
