"""The control channel of a running engine: a Unix socket `HOME/mailengine.sock` (mode 600).

The command line (`mailengine queue`, `config set`, `status`) talks to the engine through it, so
a change is made by the process that holds the queue in memory. The protocol is JSON lines: each
request is one line `{"op": "...", ...}`, each answer one line `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`; a connection may carry several requests. Only the engine's own
user (or root) may connect: the socket is mode 600 and the peer's uid is checked.

Operations: `ping`, `status`, `queue.list`, `queue.show`, `queue.apply` (delete, hold, release,
retry, flush), `config.set` (apply a setting that needs no restart), `shaping.list` and
`shaping.lift` (traffic shaping's suspensions and throttles, shaping.py). A test-mode engine
(`mailengine test`) listens on `HOME/mailengine-test.sock`.

Server side: `ControlServer(engine)`, one of app.Engine's services. Client side:
`request(path, op, **args)`, raising `NotRunning` when no engine answers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import time
from collections import deque
from pathlib import Path

from . import NAME, __version__, queueops

log = logging.getLogger("mailengine.control")

SOCKET_NAME = "mailengine.sock"
TEST_SOCKET_NAME = "mailengine-test.sock"
MAX_REQUEST = 1 << 20  # bytes in one request line
SAMPLE_SECONDS = 5.0  # the rate sampler's period
SAMPLES = 61  # five minutes of samples


def socket_path(home: Path | str, test_mode: bool = False) -> Path:
    return Path(home) / (TEST_SOCKET_NAME if test_mode else SOCKET_NAME)


class ControlError(Exception):
    """The engine answered with an error."""


class NotRunning(ControlError):
    """No engine answers on the control socket."""


# ---------------------------------------------------------------- addresses

def _bindable(path: Path) -> tuple[str, int | None]:
    """A name for bind/connect. A Unix socket path is limited to 107 bytes; a longer one is
    reached through /proc/self/fd/N of its directory (Linux), N an fd the caller closes."""
    text = str(path)
    if len(os.fsencode(text)) < 104:
        return text, None
    fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    return f"/proc/self/fd/{fd}/{path.name}", fd


# ---------------------------------------------------------------- client

def request(path: Path | str, op: str, timeout: float = 60.0, **args) -> dict:
    """Send one request; return the answer (a dict with ok = True). NotRunning when nothing
    answers; ControlError for an error answer."""
    path = Path(path)
    if not path.exists():
        raise NotRunning(f"no control socket {path}")
    name, fd = _bindable(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(name)
        except (ConnectionRefusedError, FileNotFoundError) as e:
            raise NotRunning(f"nothing answers on {path} ({e.strerror})") from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied (run this as the engine's user)") \
                from None
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = bytearray()
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                raise ControlError(f"the engine closed the control connection ({op})")
            buf += chunk
    except socket.timeout:
        raise ControlError(f"no answer from the engine within {timeout:g}s ({op})") from None
    finally:
        s.close()
        if fd is not None:
            os.close(fd)
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise ControlError(answer.get("error") or "the engine refused the request")
    return answer


def running(path: Path | str) -> dict | None:
    """The engine's `ping` answer, or None when no engine answers."""
    try:
        return request(path, "ping", timeout=10.0)
    except NotRunning:
        return None


# ---------------------------------------------------------------- server

class ControlServer:
    def __init__(self, engine) -> None:
        self.engine = engine
        self.path = socket_path(engine.cfg.home, engine.test_mode)
        self.server: asyncio.base_events.Server | None = None
        self.tracker = queueops.ReplyTracker()
        self.started = time.time()
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=SAMPLES)
        self._sampler: asyncio.Task | None = None
        self._inode: int | None = None
        self._clients: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.started = time.time()
        if self.path.exists() or self.path.is_symlink():
            if running(self.path) is not None:
                log.warning("another engine answers on %s: this one has no control socket "
                            "(mailengine queue/status talk to the other one)", self.path)
                return
            self.path.unlink()  # left by an engine that did not stop cleanly
        name, fd = _bindable(self.path)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)  # the socket is born mode 600
            try:
                sock.bind(name)
            finally:
                os.umask(old)
        finally:
            if fd is not None:
                os.close(fd)
        os.chmod(self.path, 0o600)
        self._inode = os.stat(self.path).st_ino
        self.server = await asyncio.start_unix_server(self._client, sock=sock,
                                                      limit=MAX_REQUEST)
        logging.getLogger("mailengine.delivery").addHandler(self.tracker)
        self._sampler = asyncio.get_running_loop().create_task(self._sample())
        log.info("control socket %s", self.path)

    async def stop(self) -> None:
        logging.getLogger("mailengine.delivery").removeHandler(self.tracker)
        if self._sampler is not None:
            self._sampler.cancel()
        if self.server is None:
            return
        self.server.close()
        for t in list(self._clients):
            t.cancel()
        try:
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients.add(task)
        try:
            if not self._peer_allowed(writer):
                writer.write(b'{"ok": false, "error": "not the engine\'s user"}\n')
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(b'{"ok": false, "error": "request too long"}\n')
                    break
                if not line:
                    break
                answer = await self.handle_line(line)
                writer.write(json.dumps(answer, default=str).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    @staticmethod
    def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
        sock = writer.get_extra_info("socket")
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                    struct.calcsize("3i"))
        except (OSError, AttributeError):
            return True  # no SO_PEERCRED here: the file mode guards the socket
        _, uid, _ = struct.unpack("3i", creds)
        return uid in (0, os.getuid())

    async def handle_line(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            op = req.get("op")
            fn = OPS.get(op)
            if fn is None:
                return {"ok": False, "error": f"unknown operation {op!r}; "
                                              f"known: {', '.join(sorted(OPS))}"}
            result = fn(self, req)
            if asyncio.iscoroutine(result):
                result = await result
            return {"ok": True, **result}
        except Exception as e:  # an answer, never a dead engine
            if not isinstance(e, (ValueError, KeyError, RuntimeError)):
                log.exception("control request %r failed", line[:200])
            return {"ok": False, "error": str(e) or type(e).__name__}

    # ---- operations

    def op_ping(self, req: dict) -> dict:
        eng = self.engine
        return {"name": NAME, "version": __version__, "pid": os.getpid(),
                "home": str(eng.cfg.home), "mailq": str(eng.spool.root),
                "test_mode": eng.test_mode, "since": self.started}

    async def _sample(self) -> None:
        while True:
            st = self.engine.stats
            self.samples.append((time.time(), st.recv.total, st.sent.total))
            await asyncio.sleep(SAMPLE_SECONDS)

    def _rates(self) -> dict:
        st = self.engine.stats
        now = time.time()
        out = {}
        for label, span in (("1m", 60), ("5m", 300)):
            old = next((s for s in self.samples if now - s[0] <= span + 1), None)
            if old is None or now - old[0] < 1:
                out[label] = {"recv_per_hour": 0, "sent_per_hour": 0}
                continue
            dt = now - old[0]
            out[label] = {"recv_per_hour": int((st.recv.total - old[1]) * 3600 / dt),
                          "sent_per_hour": int((st.sent.total - old[2]) * 3600 / dt)}
        return out

    async def op_status(self, req: dict) -> dict:
        eng = self.engine
        st = eng.stats
        now = time.time()
        out = self.op_ping(req)
        out["uptime"] = now - self.started
        out["received"] = {"total": st.recv.total, "local": st.inbound.total,
                           "relay": st.relay.total, "avg_per_hour": st.recv.per_hour(now)}
        out["sent"] = {"total": st.sent.total, "avg_per_hour": st.sent.per_hour(now)}
        out["rates"] = self._rates()
        d = getattr(eng, "delivery", None)
        ledger = eng.ledger
        q = {"messages": ledger.total}
        if d is not None:
            # recipients: of the messages in memory (the backlog's are on disk only)
            q = {"messages": ledger.total, "held": ledger.held(),
                 "in_memory": ledger.in_memory, "on_disk_only": len(ledger.backlog),
                 "sending": ledger.sending,
                 "recipients": sum(len(m.rcpt_to_send) for m in ledger.messages()),
                 "ready_units": d.sched.ready, "paused": bool(d.sched.paused)}
        loop = asyncio.get_running_loop()
        q["on_disk"] = {k: {"messages": v[0], "bytes": v[1]} for k, v in
                        (await loop.run_in_executor(None, eng.spool.usage)).items()}
        out["queue"] = q
        conns: dict = {}
        if eng.inbound is not None or eng.workers is not None:
            ins = eng.inbound_counts()
            conns["inbound"] = ins["open"]
            conns["inbound_max"] = eng.cfg.limits.max_inbound_connections
            conns["inbound_sessions_total"] = ins["sessions_total"]
            conns["intake_processes"] = ins["processes"]
        if d is not None:
            pool = d.pool
            idle = sum(len(v) for v in pool.idle.values())
            hosts = sorted(pool.per_host.items(), key=lambda kv: -kv[1])[:10]
            conns.update({"outbound": pool.total, "outbound_idle": idle,
                          "outbound_peak": pool.peak,
                          "outbound_max": eng.cfg.limits.max_outbound_connections,
                          "outbound_hosts": [[f"{k[0]}:{k[1]}" + (f" from {k[2]}" if k[2:] else ""), n]
                                             for k, n in hosts]})
            dp = d.deliverers.counts() if d.deliverers is not None else None
            conns["delivery_processes"] = dp["running"] if dp else 0  # 0: the engine sends
            if dp:
                conns["delivery_process_restarts"] = dp["restarts"]
        out["connections"] = conns
        if d is not None and d.shared is not None:
            out["shared"] = d.shared.state()
        hooks = eng.webhooks.status()
        if hooks is not None:
            out["webhooks"] = hooks
        if d is not None:
            out["shaping"] = d.shaping.active()
            if d.sources.enabled:  # each sending source's warm-up use today (sources.py)
                out["sources"] = d.sources.usage()
        return out

    def op_shaping_list(self, req: dict) -> dict:
        d = self.engine.delivery
        return {"active": d.shaping.active(), "providers": sorted(d.shaping.rules.providers),
                "sources": d.sources.usage()}

    def op_shaping_lift(self, req: dict) -> dict:
        dest = str(req.get("dest") or "").strip().lower()
        d = self.engine.delivery
        o = d.lift(d.shaping.dest(dest))  # a provider's name, or one of its domains
        if o is None:
            active = [a["dest"] for a in d.shaping.active()]
            raise ValueError(f"{dest}: nothing to lift (in force: "
                             f"{', '.join(active) if active else 'none'})")
        return {"lifted": dest, "action": o.action, "cause": o.cause}

    async def op_queue_scan(self, req: dict) -> dict:
        """Take in mail dropped into retry/ now (mailengine-sendmail), not at the next scan."""
        return {"taken": await self.engine.rescan()}

    async def op_queue_list(self, req: dict) -> dict:
        await self.engine.rescan()
        return {"records": await queueops.engine_records(self.engine, self.tracker)}

    async def op_queue_show(self, req: dict) -> dict:
        msg_id = str(req.get("id") or "")
        try:
            return await queueops.engine_show(self.engine, msg_id, self.tracker)
        except KeyError:
            raise ValueError(f"{msg_id}: no such message in the queue") from None

    async def op_queue_apply(self, req: dict) -> dict:
        action = req.get("action")
        if action not in (*queueops.ACTIONS, "flush"):
            raise ValueError(f"unknown queue action {action!r}")
        targets = [queueops.parse_target(str(t)) for t in req.get("targets") or []]
        if action != "flush" and not targets:
            raise ValueError("name a message id, @domain or all")
        return await queueops.engine_apply(self.engine, action, targets)

    def op_config_set(self, req: dict) -> dict:
        from . import config
        from .secret_values import shown
        name = str(req.get("name"))
        setting = config.BY_NAME.get(name)
        if setting is None:
            raise ValueError(f"{name}: no such setting")
        if setting.restart:
            return {"applied": False, "why": "takes effect after restart"}
        self.engine.cfg.set(name, req.get("value"))
        notes = apply_settings(self.engine)
        value = shown(setting, self.engine.cfg.get(name))  # a secret stays out of the log
        log.info("config: %s = %r (set by mailengine config set)", name, value)
        return {"applied": True, "value": value, "notes": notes}


OPS = {
    "ping": ControlServer.op_ping,
    "status": ControlServer.op_status,
    "queue.scan": ControlServer.op_queue_scan,
    "queue.list": ControlServer.op_queue_list,
    "queue.show": ControlServer.op_queue_show,
    "queue.apply": ControlServer.op_queue_apply,
    "config.set": ControlServer.op_config_set,
    "shaping.list": ControlServer.op_shaping_list,
    "shaping.lift": ControlServer.op_shaping_lift,
}


def apply_settings(engine) -> list[str]:
    """Hand the engine's (changed) settings to the parts that copied them at start."""
    return engine.apply_settings()
