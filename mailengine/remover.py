"""Finished messages deleted from working/ in one thread, many at a time (delivery.py hands
them over as each attempt ends); with delivery processes, in the recycler process instead
(recycler.py: no thread hand-offs in the engine).

Their files become spare files (spare.py): the file system work and the directory sync that
makes the removals safe to reuse are done in the thread, a batch at a time, while the event loop
goes on. A crash before a batch runs leaves its messages to be delivered again (a duplicate,
never a loss).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from .queue_dirs import WORKING

log = logging.getLogger("mailengine.delivery")


class Remover:
    def __init__(self, spool) -> None:
        self.spool = spool
        self._thread: ThreadPoolExecutor | None = None  # made at the first removal
        self._lock = threading.Lock()  # _ids is filled by the event loop, drained by the thread
        self._ids: list[str] = []
        self._queued = False  # a batch is waiting to run: the next ids join it

    def remove(self, msg_id: str) -> None:
        if self.spool.recycle_soon(msg_id, WORKING):  # the recycler process does it all
            return
        with self._lock:
            self._ids.append(msg_id)
            if self._queued:
                return
            self._queued = True
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, "delivery-remove")
        self._thread.submit(self._batch)

    def shutdown(self) -> None:
        """Wait for the removals handed over (a stop)."""
        if self._thread is not None:
            self._thread.shutdown()

    def _batch(self) -> None:
        with self._lock:
            ids, self._ids = self._ids, []
            self._queued = False
        try:
            self.spool.recycle(ids, WORKING)
        except OSError as e:
            log.error("delivered, but cannot be removed from working/ (%s): %s",
                      ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else ""), e)
