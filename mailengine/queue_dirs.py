"""The directories of the queue (HOME/mailq/…), named once; docs/QUEUE.md says what each holds.

- RETRY: waiting mail, new and retried (the manual's drop-in directory too);
- WORKING: mail being sent (and relayed mail stored straight there to be sent at once, which
  waits there when memory is full: ledger.disk_where);
- DONE: finished mail kept for `queue.done_retention_minutes`;
- INCOMING: local mail kept for `queue.incoming_retention_minutes`.
"""
from __future__ import annotations

RETRY = "retry"
WORKING = "working"
DONE = "done"
INCOMING = "incoming"
DIRS = (RETRY, WORKING, DONE, INCOMING)
