"""Numbers of the running engine: one snapshot, a short history for the charts, Prometheus text.

`snapshot(engine)` reads counters the engine keeps anyway (engine.stats, the inbound server's
connections, the delivery engine's pool and queue); nothing here walks a directory. `History` samples a snapshot every SAMPLE_SECONDS into a ring of
HISTORY_SAMPLES (30 minutes) for the live status page.
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from collections import deque

from ..categories import categorize_reply
from . import sources_view

SAMPLE_SECONDS = 2.0
HISTORY_SAMPLES = 900


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class OutcomeCounter(logging.Handler):
    """Counts failed and deferred recipients, by category too (categories.py, from the reply),
    and keeps each domain's last reply, from the delivery engine's per-recipient log lines
    ("ID: address failed|deferred: reply"), so the web admin needs no hook inside delivery.
    Attached to the "mailengine.delivery" logger."""

    MAX_DOMAINS = 10000

    def __init__(self):
        super().__init__(logging.INFO)
        self.failed = 0
        self.deferred = 0
        self.last_reply: dict[str, tuple[float, str]] = {}  # domain -> (time, "addr: reply")
        self.by_category: dict[str, dict[str, int]] = {}  # category -> {failed, deferred}

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if record.msg != "%s: %s %s: %s" or not isinstance(args, tuple) or len(args) != 4:
            return
        if args[2] == "failed":
            self.failed += 1
        elif args[2] == "deferred":
            self.deferred += 1
        else:
            return
        cat = categorize_reply(str(args[3]))
        counts = self.by_category.setdefault(cat, {"failed": 0, "deferred": 0})
        counts[args[2]] += 1
        addr = str(args[1])
        dom = addr.rpartition("@")[2].lower()
        self.last_reply.pop(dom, None)
        self.last_reply[dom] = (record.created, f"{addr} {args[2]} ({cat}): {args[3]}")
        while len(self.last_reply) > self.MAX_DOMAINS:
            del self.last_reply[next(iter(self.last_reply))]

    def attach(self) -> None:
        logging.getLogger("mailengine.delivery").addHandler(self)

    def detach(self) -> None:
        logging.getLogger("mailengine.delivery").removeHandler(self)


def snapshot(engine, counter: OutcomeCounter | None = None, cheap: bool = False) -> dict:
    """The numbers of now; `cheap` skips those that walk the queue (recipients left)."""
    st = engine.stats
    delivery = engine.delivery
    ins = engine.inbound_counts()  # this process's sessions, or the intake workers'
    snap = {
        "time": time.time(),
        "received": st.recv.total,
        "received_local": st.inbound.total,
        "received_relay": st.relay.total,
        "sent": st.sent.total,
        # failures are counted from the delivery log lines (OutcomeCounter), not in engine.stats
        "failed": None if counter is None else counter.failed,
        "deferred": None if counter is None else counter.deferred,
        "inbound_connections": ins["open"],
        "inbound_sessions_total": ins["sessions_total"],
        "inbound_refused_busy": ins["refused_busy"],
        "outbound_connections": delivery.pool.total,
        "delivery_processes": (delivery.deliverers.counts()["running"]
                               if delivery.deliverers is not None else 0),
        "delivery_process_restarts": (delivery.deliverers.counts()["restarts"]
                                      if delivery.deliverers is not None else 0),
        "memory_bytes": rss_bytes(),
        "spool_stores": engine.spool.stores,
        "spool_flushes": engine.spool.flushes,
        "paused": bool(engine.cfg.queue.pause_sending),
        "shared_up": None,  # None: not shared
    }
    shared = delivery.shared
    if shared is not None:
        snap["shared_up"] = int(not shared.health.down)
    ledger = engine.ledger
    snap["queue_messages"] = ledger.total  # recipients: in memory
    snap["queue_recipients"] = None if cheap else sum(
        len(m.rcpt_to_send) for m in ledger.messages())
    snap["queue_sending"] = ledger.sending
    return snap


class History:
    """The last HISTORY_SAMPLES snapshots (rates are computed by the page from the totals)."""

    FIELDS = ("time", "received", "sent", "failed", "queue_messages", "inbound_connections",
              "outbound_connections", "memory_bytes")

    def __init__(self, engine, counter: OutcomeCounter | None = None):
        self.engine = engine
        self.counter = counter
        self.samples: deque[tuple] = deque(maxlen=HISTORY_SAMPLES)
        self._task: asyncio.Task | None = None

    def sample(self) -> None:
        s = snapshot(self.engine, self.counter, cheap=True)
        self.samples.append(tuple(s[f] for f in self.FIELDS))

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_SECONDS)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def as_json(self) -> dict:
        return {"fields": list(self.FIELDS), "interval": SAMPLE_SECONDS,
                "samples": [list(s) for s in self.samples]}


def _esc(value) -> str:
    """A label value as the exposition format writes it (backslash, quote, newline escaped)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"


def _family(out: list[str], name: str, kind: str, help_: str, lines: list[str]) -> None:
    """A metric with labels: its HELP and TYPE once, then its lines (nothing when none)."""
    if lines:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *lines]


def _sources(out: list[str], engine) -> None:
    """The sending sources (sources.py; web/sources_view.py): what each is, its pools, its
    reverse DNS, its connections and today's warm-up per provider."""
    rows = sources_view.rows(engine)
    if not rows:
        return
    today = [(r["source"], t) for r in rows for t in r["today"]]
    for name, help_, lines in (
            ("info", "A sending source of shaping.toml: its local address and EHLO name "
             "(always 1).",
             [(dict(source=r["source"], ip=r["ip"], helo=r["helo"]), 1) for r in rows]),
            ("pool_weight", "A source's weight in a sending pool ([pools.NAME]).",
             [(dict(source=r["source"], pool=p["pool"]), p["weight"])
              for r in rows for p in r["pools"]]),
            ("outbound_connections", "Open outbound SMTP connections from a source (idle ones "
             "included).", [(dict(source=r["source"]), r["connections"]) for r in rows]),
            ("rdns_ok", "1 when a source's reverse DNS names its EHLO name, 0 when not (absent "
             "until checked).", [(dict(source=r["source"]), int(r["rdns_problem"] is None))
                                 for r in rows if r["rdns_checked"]]),
            ("warmup_day", "The day of its warm-up a source is on (absent when warmed or "
             "without a warm-up).", [(dict(source=r["source"]), r["warmup_day"]) for r in rows
                                     if r["warmup_day"] is not None and not r["warmed"]]),
            ("warmup_sent", "Recipients a source sent a provider today against its warm-up "
             "(every engine's with shared.redis_url); 0 again at midnight.",
             [(dict(source=src, provider=t["provider"]), t["sent"]) for src, t in today]),
            ("warmup_limit", "Recipients a source may send a provider today (its warm-up "
             "volume; absent: no cap).",
             [(dict(source=src, provider=t["provider"]), t["limit"]) for src, t in today
              if t["limit"] is not None]),
            ("warmup_default_limit", "Recipients a source may send today to each provider "
             "without a ramp of its own (absent: no cap).",
             [(dict(source=r["source"]), r["limit"]) for r in rows if r["limit"] is not None])):
        name = "mailengine_source_" + name
        _family(out, name, "gauge", help_,
                [f"{name}{_labels(**labels)} {value}" for labels, value in lines])


def _line(out: list[str], name: str, kind: str, help_: str, value, labels: str = "") -> None:
    if value is None:
        return
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")
    out.append(f"{name}{labels} {value}")


def prometheus(engine, counter: OutcomeCounter | None = None) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    s = snapshot(engine, counter)
    out: list[str] = []
    out.append("# HELP mailengine_received_total Messages received and stored, by kind.")
    out.append("# TYPE mailengine_received_total counter")
    out.append(f'mailengine_received_total{{kind="relay"}} {s["received_relay"]}')
    out.append(f'mailengine_received_total{{kind="local"}} {s["received_local"]}')
    _line(out, "mailengine_sent_total", "counter", "Recipients delivered.", s["sent"])
    _line(out, "mailengine_failed_total", "counter", "Recipients that failed for good.",
          s["failed"])
    _line(out, "mailengine_deferred_total", "counter", "Recipient attempts deferred for a retry.",
          s["deferred"])
    if counter is not None and counter.by_category:
        out.append("# HELP mailengine_failures_by_category_total Failed and deferred recipients "
                   "by the category of their reply (bounce categories).")
        out.append("# TYPE mailengine_failures_by_category_total counter")
        for cat, counts in sorted(counter.by_category.items()):
            for result, n in counts.items():
                out.append(f'mailengine_failures_by_category_total{{category="{cat}",'
                           f'result="{result}"}} {n}')
    _line(out, "mailengine_queue_messages", "gauge", "Messages in the queue (retry and working).",
          s["queue_messages"])
    _line(out, "mailengine_queue_recipients", "gauge", "Recipients still to send.",
          s["queue_recipients"])
    _line(out, "mailengine_queue_sending", "gauge", "Messages being delivered now.",
          s["queue_sending"])
    _line(out, "mailengine_inbound_connections", "gauge", "Open inbound SMTP sessions.",
          s["inbound_connections"])
    _line(out, "mailengine_inbound_sessions_total", "counter", "Inbound SMTP sessions accepted.",
          s["inbound_sessions_total"])
    _line(out, "mailengine_inbound_refused_busy_total", "counter",
          "Inbound sessions refused with 421 (max_inbound_connections).",
          s["inbound_refused_busy"])
    _line(out, "mailengine_outbound_connections", "gauge", "Open outbound SMTP connections.",
          s["outbound_connections"])
    _line(out, "mailengine_delivery_processes", "gauge",
          "Delivery processes running (0: the engine process sends itself).",
          s["delivery_processes"])
    _line(out, "mailengine_delivery_process_restarts_total", "counter",
          "Delivery processes started again after they died.", s["delivery_process_restarts"])
    _line(out, "mailengine_spool_stores_total", "counter", "Messages written to the spool.",
          s["spool_stores"])
    _line(out, "mailengine_spool_flushes_total", "counter", "Spool sync rounds (group commits).",
          s["spool_flushes"])
    _line(out, "mailengine_sending_paused", "gauge", "1 when queue.pause_sending is on.",
          int(s["paused"]))
    _line(out, "mailengine_resident_memory_bytes", "gauge", "Resident memory of the engine.",
          s["memory_bytes"])
    _line(out, "mailengine_shared_redis_up", "gauge",
          "1 when the Redis of shared.redis_url answers (absent when not shared).", s["shared_up"])
    urls = (engine.webhooks.status() or {}).get("urls", [])
    for name, key, kind, help_ in (
            ("mailengine_webhook_pending", "pending", "gauge",
             "Events waiting for a webhook URL to acknowledge them."),
            ("mailengine_webhook_posted_total", "sent", "counter",
             "Events a webhook URL acknowledged since the start."),
            ("mailengine_webhook_failures", "failures", "gauge",
             "Failed posts in a row to a webhook URL.")):
        if urls:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for u in urls:
            out.append(f'{name}{_labels(url=u["url"])} {u[key]}')
    active = engine.delivery.shaping.active()
    if active:  # traffic shaping (shaping.py): one line per suspension or throttle in force
        out.append("# HELP mailengine_shaping_factor Share of its limits a destination may use "
                   "now: 0 while suspended, the throttle's factor while throttled.")
        out.append("# TYPE mailengine_shaping_factor gauge")
        for a in active:
            out.append(f'mailengine_shaping_factor{{dest="{a["dest"]}",action="{a["action"]}"}} '
                       f'{a["factor"]:g}')
    _sources(out, engine)
    return "\n".join(out) + "\n"
