"""bench/queue_scale: a queue of many messages in bounded memory, and how soon a restart serves.

    python bench/queue_scale.py [--counts 100000,1000000] [--size 1024] [--postfix-messages 20000]

For each count N, N messages of `--size` bytes (one recipient each) are written into
`mailq/retry/` of a fresh home the way a drop-in program writes them (`ID.dat` + `ID.inf`, not
synced: this measures the engine, not the filling). Then, with `intake_workers = 1` (the engine
is one process) and the product's other defaults:

  - empty: the engine's RSS on an empty queue (the baseline);
  - cold start: the engine started on the N messages with no index (as after a crash): seconds
    to the first `220`, seconds until `mailengine status` counts all N, RSS then;
  - warm start: stopped cleanly (it writes mailq/backlog.index) and started again: seconds to
    the first `220`, RSS once all N are counted, and seconds from the start until the first
    message reaches an smtp-sink (sending on, the recipient domain pinned to the sink);
  - RSS per queued message = (RSS with N queued - RSS empty) / N (goal: at most 1 KiB).

Postfix, same run: `--postfix-messages M` messages are queued in a private Postfix through
smtp-source (defer mode; M is smaller since Postfix takes them by SMTP only), and its queue
manager's RSS (qmgr, the process that holds the active queue) is printed with the engine's at
the same M... and the time from `postfix start` to its first `220` with M queued.
Writes bench/results/queue_scale-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (SmtpSink, announce, machine_info, print_table,  # noqa: E402
                    run_smtp_source, run_workdir, write_results)
from postfix import PostfixInstance  # noqa: E402

DOMAIN = "dest.invalid"


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def fill(mailq: Path, n: int, size: int) -> float:
    """N messages in mailq/retry/, written directly (no sync); returns the seconds it took."""
    from mailengine.envelope import Message, format_inf
    from mailengine.message_ids import make_id

    retry = mailq / "retry"
    retry.mkdir(parents=True, exist_ok=True)
    body = (b"From: bench@source.example\r\nTo: rcpt@" + DOMAIN.encode() +
            b"\r\nSubject: queue scale\r\n\r\n")
    body += b"x" * max(0, size - len(body) - 2) + b"\r\n"
    t0 = time.perf_counter()
    for i in range(n):
        msg = Message(id=make_id("scale.bench"), mail_from="bench@source.example",
                      rcpt_to_send=[f"r{i}@{DOMAIN}"])
        with open(retry / f"{msg.id}.dat", "wb") as f:
            f.write(body)
        with open(retry / f"{msg.id}.inf", "wb") as f:
            f.write(format_inf(msg))
    return time.perf_counter() - t0


def wait_220(port: int, proc: subprocess.Popen, timeout: float = 600.0) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(100).startswith(b"220"):
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.01)
    raise TimeoutError("no 220")


class Engine:
    """The engine as an operator runs it (`python -m mailengine.cli --home H start`), timed from
    the moment the process is started."""

    def __init__(self, home: Path, settings: dict):
        from mailengine.testing.engine import free_port, write_config
        self.home = home
        self.port = free_port()
        write_config(home, {"network.smtp_port": self.port,
                            "network.smtp_listen_ips": ["127.0.0.1"], "network.web_port": 0,
                            "network.intake_workers": 1, "logging.stats_interval": 0,
                            **settings})
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> float:
        """Start; seconds to the first 220."""
        self.out = open(self.home / "engine-output.txt", "ab")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "mailengine.cli", "--home",
                                      str(self.home), "start"], stdout=self.out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return wait_220(self.port, self.proc)

    def queued(self) -> int:
        from mailengine import control
        try:
            q = control.request(self.home / "mailengine.sock", "status", timeout=30)["queue"]
            return int(q["messages"])
        except (OSError, KeyError, ValueError):
            return -1

    def wait_queued(self, n: int, timeout: float = 900.0) -> float:
        """Seconds from the start until status counts n messages."""
        deadline = time.perf_counter() + timeout
        while self.queued() < n:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"status counts {self.queued()} of {n}")
            time.sleep(0.2)
        return time.perf_counter() - self.started

    def rss(self) -> int:
        return rss_kib(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(300)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "out", None):
            self.out.close()
            self.out = None


def engine_case(n: int, args, workdir: Path, empty_rss: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"scale-{n}-", dir=workdir))
    row: dict = {"messages": n}
    row["fill_s"] = round(fill(home / "mailq", n, args.size), 1)
    with SmtpSink(workdir=workdir) as sink:
        pin = {"basic.dns_servers": [f"{DOMAIN},sink.bench,MX,127.0.0.1:{sink.port}"]}
        eng = Engine(home, {"queue.pause_sending": True, **pin})
        try:
            row["cold_220_s"] = round(eng.start(), 2)
            row["cold_all_counted_s"] = round(eng.wait_queued(n), 1)
            time.sleep(2.0)
            row["cold_rss_kib"] = eng.rss()
            eng.stop()
            row["index_written"] = (home / "mailq" / "backlog.index").exists()
            eng = Engine(home, {"queue.pause_sending": True, **pin})
            row["warm_220_s"] = round(eng.start(), 2)
            row["warm_all_counted_s"] = round(eng.wait_queued(n), 1)
            time.sleep(2.0)
            row["warm_rss_kib"] = eng.rss()
            eng.stop()
            eng = Engine(home, {"queue.pause_sending": False, **pin})
            eng.start()
            got = sink.wait_messages(1, timeout=120, poll=0.01)
            row["first_delivery_s"] = round(time.perf_counter() - eng.started, 2) if got else None
            eng.stop()
        finally:
            eng.stop()
    rss = max(row["cold_rss_kib"], row["warm_rss_kib"])
    row["rss_per_message_bytes"] = round((rss - empty_rss) * 1024 / n)
    return row


def empty_engine_rss(workdir: Path) -> int:
    home = Path(tempfile.mkdtemp(prefix="scale-empty-", dir=workdir))
    eng = Engine(home, {"queue.pause_sending": True})
    try:
        eng.start()
        time.sleep(2.0)
        return eng.rss()
    finally:
        eng.stop()


def postfix_case(m: int, args, workdir: Path) -> dict:
    row: dict = {"messages": m}
    with PostfixInstance(mode="defer", base_dir=workdir, keep=True) as pf:
        run_smtp_source(pf.port, m, 50, args.size, timeout=3600)
        pf.wait_queue(m, timeout=600)
        pf.wait_settled(timeout=600)
        pids = subprocess.run(["pgrep", "-f", f"qmgr.*{pf.config_dir}"], capture_output=True,
                              text=True).stdout.split() or \
            [str(p) for p in pf.running_pids()]
        row["qmgr_rss_kib"] = max((rss_kib(int(p)) for p in pids), default=0)
        row["all_rss_kib"] = sum(rss_kib(p) for p in pf.running_pids())
        pf._postfix("stop")
        t0 = time.perf_counter()
        pf._postfix("start")
        deadline = t0 + 120
        while time.perf_counter() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", pf.port), timeout=1) as s:
                    if s.recv(100).startswith(b"220"):
                        break
            except OSError:
                time.sleep(0.01)
        row["restart_220_s"] = round(time.perf_counter() - t0, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="100000,1000000",
                    help="queue sizes to measure, comma-separated")
    ap.add_argument("--size", type=int, default=1024, help="bytes per message")
    ap.add_argument("--postfix-messages", type=int, default=20000,
                    help="messages queued in Postfix (by SMTP) for its figures; 0 = skip")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine_info()
    rows, pf_row = [], None
    with run_workdir("bench-queue-scale-", args) as (workdir, fs):
        announce(f"bench/queue_scale: {', '.join(map(str, counts))} queued messages of "
                 f"{args.size} bytes", info, workdir, fs)
        empty = empty_engine_rss(workdir)
        print(f"  engine RSS with an empty queue: {empty / 1024:.0f} MiB", flush=True)
        for n in counts:
            print(f"  {n} messages ...", end=" ", flush=True)
            row = engine_case(n, args, workdir, empty)
            rows.append(row)
            print(f"{row['rss_per_message_bytes']} bytes/message, 220 after "
                  f"{row['warm_220_s']} s, first delivery after {row['first_delivery_s']} s",
                  flush=True)
        if args.postfix_messages:
            print(f"  Postfix with {args.postfix_messages} messages ...", end=" ", flush=True)
            try:
                pf_row = postfix_case(args.postfix_messages, args, workdir)
                print(f"qmgr {pf_row['qmgr_rss_kib'] / 1024:.0f} MiB", flush=True)
            except Exception as e:  # Postfix missing or refusing: the engine's figures stand
                print(f"FAILED ({e})", flush=True)
    print()
    print_table([{"n": f"{r['messages']:,}", "cold220": r["cold_220_s"],
                  "coldall": r["cold_all_counted_s"], "warm220": r["warm_220_s"],
                  "warmall": r["warm_all_counted_s"], "first": r["first_delivery_s"],
                  "rss": f"{max(r['cold_rss_kib'], r['warm_rss_kib']) / 1024:,.0f}",
                  "per": r["rss_per_message_bytes"]} for r in rows],
                [("n", "queued"), ("cold220", "220 s (no index)"),
                 ("coldall", "all counted s"), ("warm220", "220 s (index)"),
                 ("warmall", "all counted s"), ("first", "1st delivery s"),
                 ("rss", "RSS MiB"), ("per", "bytes/message")])
    print(f"empty-queue RSS {empty / 1024:.0f} MiB; goals: 220 within 2 s, first delivery "
          "within 5 s, at most 1024 bytes per queued message")
    if pf_row:
        print(f"Postfix with {pf_row['messages']:,} queued: qmgr RSS "
              f"{pf_row['qmgr_rss_kib'] / 1024:.1f} MiB, all its processes "
              f"{pf_row['all_rss_kib'] / 1024:.0f} MiB; 220 {pf_row['restart_220_s']} s "
              "after postfix start")
    if not args.no_save:
        path = write_results("queue_scale", {"args": {k: str(v) for k, v in vars(args).items()},
                                             "machine": info, "filesystem": fs,
                                             "empty_rss_kib": empty, "engine": rows,
                                             "postfix": pf_row})
        print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
