"""bench/fanout: one message to many recipients over many domains: deliveries per second.

    python bench/fanout.py [--recipients 100000] [--domains 1000] [--sinks 4] [--set KEY=VALUE]

One message for RECIPIENTS addresses spread evenly over DOMAINS domains, whose MX records (a real
DNS server on loopback, bench-only zones) point at SINKS `smtp-sink` processes listening on port
25 of 127.0.0.2, 127.0.0.3, ... Each relay delivers it; the clock runs from the moment the message
is queued until the relay's queue is empty:

  (a) MailEngine: the message dropped into mailq/retry (client.enqueue) while the engine runs;
      done when nothing is left in retry/ or working/; mailq/done/ must list every recipient
      in rcptsent
  (b) a private Postfix (bench/postfix.py) with a transport map sending each domain to its sink
      (the same routes, without DNS): the message submitted over SMTP in one transaction; done
      when its queue is empty

It prints recipients delivered per second for each and the ratio, with each relay's CPU, and
writes bench/results/fanout-<timestamp>.json. Both relays keep their default concurrency
settings unless told otherwise (`--set limits.max_connections_per_host=20`,
`--postfix-concurrency 20`).
"""
from __future__ import annotations

import argparse
import os
import signal
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (ENGINE_DEFAULTS, Case, add_run_arguments, announce,  # noqa: E402
                    machine_info, print_table, ratio, run_rounds, run_workdir, tool,
                    wait_for_port, write_results)
from intake import parse_setting, tree_cpu  # noqa: E402
from postfix import PostfixInstance  # noqa: E402

CASES = {"a": "MailEngine", "b": "Postfix"}
SENDER = "list@source.example"
BODY = "This is the newsletter.\r\n" * 150  # about 4 KiB


def domains(n: int) -> list[str]:
    return [f"d{i}.fanout.test" for i in range(n)]


def recipients(count: int, doms: list[str]) -> list[str]:
    return [f"u{i}@{doms[i % len(doms)]}" for i in range(count)]


def sink_ip(k: int) -> str:
    return f"127.0.0.{k + 2}"


class Sinks:
    """`smtp-sink` processes on port 25 of 127.0.0.2, .3, ... (own process groups)."""

    def __init__(self, n: int, workdir: Path) -> None:
        self.n = n
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []
        self.outs: list[Path] = []

    def start(self) -> "Sinks":
        for k in range(self.n):
            out = self.workdir / f"sink-{k}.out"
            cmd = [tool("smtp-sink"), "-c", "-m", "1024"]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]
            cmd += [f"{sink_ip(k)}:25", "1024"]
            with open(out, "wb") as f:
                self.procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL,
                                                   start_new_session=True))
            self.outs.append(out)
            wait_for_port(sink_ip(k), 25, 10.0)
        return self

    def messages(self) -> int:
        import re
        total = 0
        for out in self.outs:
            with open(out, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 200))
                found = re.findall(rb"mesg=(\d+)", f.read())
            total += int(found[-1]) if found else 0
        return total

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            p.wait()
        self.procs = []

    def __enter__(self) -> "Sinks":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def count_inf(d: Path) -> int:
    try:
        return sum(1 for e in os.scandir(d) if e.name.endswith(".inf"))
    except FileNotFoundError:
        return 0


def run_engine(args, workdir: Path) -> Case:
    from mailengine.client import enqueue
    from mailengine.envelope import parse_inf
    from mailengine.testing.dnsserver import TestDNSServer
    from mailengine.testing.engine import RunningEngine

    result = Case("a", CASES["a"], messages=args.recipients)
    doms = domains(args.domains)
    zones = {d: {"MX": [(10, f"mx{i % args.sinks}.fanout.test")]} for i, d in enumerate(doms)}
    zones.update({f"mx{k}.fanout.test": {"A": [sink_ip(k)]} for k in range(args.sinks)})
    home = Path(tempfile.mkdtemp(prefix="engine-fanout-", dir=workdir))
    rcpts = recipients(args.recipients, doms)
    with Sinks(args.sinks, workdir) as sinks, TestDNSServer(zones) as dns:
        settings = {**ENGINE_DEFAULTS, "basic.nameservers": [dns.address],
                    "queue.pause_sending": False,
                    "queue.save_done": True, "queue.queue_check_interval": 0.2,
                    "logging.stats_interval": 1, "network.smtp_port": 1, **dict(args.set)}
        eng = RunningEngine(home, settings)
        try:
            eng.start()
            time.sleep(1.0)  # started (no SMTP port to wait for)
            cpu0 = tree_cpu(eng.proc.pid)
            t0 = time.perf_counter()
            enqueue(eng.mailq, SENDER, rcpts, ["Subject: fan-out"], BODY)
            while True:
                time.sleep(0.05)
                if count_inf(eng.mailq / "done") and not count_inf(eng.mailq / "retry") \
                        and not count_inf(eng.mailq / "working"):
                    break
                if time.perf_counter() - t0 > args.timeout:
                    result.error = f"not finished after {args.timeout:.0f}s"
                    return result
                if eng.proc.poll() is not None:
                    result.error = f"engine exited: {eng.read_output()[-1500:]}"
                    return result
            seconds = time.perf_counter() - t0
            cpu1 = tree_cpu(eng.proc.pid)
            done = [parse_inf(p.read_bytes(), p.name[:-4])
                    for p in (eng.mailq / "done").glob("*.inf")]
            sent = sum(len(m.rcpt_sent) for m in done)
            failed = sum(len(m.rcpt_failed) for m in done)
            eng.stop()
            out = eng.output.decode(errors="replace")
            result.seconds, result.rate = seconds, sent / seconds
            result.ok = sent == args.recipients
            result.check = (f"{sent} sent, {failed} failed, {sinks.messages()} transactions at "
                            "the sinks")
            result.extra.update(relay_cpu_percent=100 * (cpu1 - cpu0) / seconds,
                                sent_lines=[l for l in out.splitlines() if " sent (" in l][-2:])
        finally:
            eng.stop()
    return result


def run_postfix(args, workdir: Path) -> Case:
    result = Case("b", CASES["b"], messages=args.recipients)
    doms = domains(args.domains)
    rcpts = recipients(args.recipients, doms)
    tmap = workdir / "transport"
    tmap.write_text("".join(f"{d} smtp:[{sink_ip(i % args.sinks)}]:25\n"
                            for i, d in enumerate(doms)))
    os.chmod(tmap, 0o644)
    extra = {"relayhost": "", "transport_maps": f"texthash:{tmap}",
             "smtpd_recipient_limit": str(args.recipients + 10),
             "default_destination_concurrency_limit": str(args.postfix_concurrency),
             "smtp_destination_concurrency_limit": str(args.postfix_concurrency)}
    try:
        with Sinks(args.sinks, workdir) as sinks, PostfixInstance(
                mode="relay", relay_to="127.0.0.1:9", base_dir=workdir, keep=True,
                extra_main=extra) as pf:
            with smtplib.SMTP("127.0.0.1", pf.port, timeout=600) as s:
                s.ehlo("fanout.bench")
                s.mail(SENDER)
                for r in rcpts:
                    code, msg = s.rcpt(r)
                    if code != 250:
                        raise RuntimeError(f"Postfix refused {r}: {code} {msg!r}")
                cpu0 = tree_cpu(pf.master_pid)
                t0 = time.perf_counter()
                code, msg = s.data(f"Subject: fan-out\r\n\r\n{BODY}".encode())
                if code != 250:
                    raise RuntimeError(f"Postfix refused the message: {code} {msg!r}")
            time.sleep(0.2)
            while pf.queue_count():
                if time.perf_counter() - t0 > args.timeout:
                    raise RuntimeError(f"not finished after {args.timeout:.0f}s")
                time.sleep(0.05)
            seconds = time.perf_counter() - t0
            cpu1 = tree_cpu(pf.master_pid)
            log = pf.maillog.read_text(errors="replace")
            sent = log.count("status=sent")
            bounced = log.count("status=bounced")
            result.seconds, result.rate = seconds, sent / seconds
            result.ok = sent == args.recipients
            result.check = (f"{sent} sent, {bounced} bounced, {sinks.messages()} transactions "
                            "at the sinks")
            result.extra["relay_cpu_percent"] = 100 * (cpu1 - cpu0) / seconds
    except Exception as e:
        result.error = str(e)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipients", type=int, default=100000)
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--sinks", type=int, default=4, help="smtp-sink processes (MX hosts)")
    ap.add_argument("--cases", default="ab")
    ap.add_argument("--set", action="append", type=parse_setting, default=[],
                    metavar="SECTION.KEY=VALUE", help="extra engine setting for (a)")
    ap.add_argument("--postfix-concurrency", type=int, default=20,
                    help="Postfix's per-destination concurrency (its default: 20)")
    ap.add_argument("--timeout", type=float, default=900.0)
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    cases = [c for c in "ab" if c in args.cases]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    info = machine_info()
    with run_workdir("bench-fanout-", args) as (workdir, fs):
        announce(f"bench/fanout: one message to {args.recipients} recipients over "
                 f"{args.domains} domains, {args.sinks} MX hosts (smtp-sink)", info, workdir, fs)
        rounds = run_rounds(cases, 1, CASES, lambda c: run_engine(args, workdir) if c == "a"
                            else run_postfix(args, workdir), unit="recipients/s")
    runs = {c: rs[0] for c, rs in rounds.items()}
    rows = [{"case": f"({c}) {CASES[c]}", "rate": f"{r.rate:,.0f}" if r.ok else "FAILED",
             "seconds": f"{r.seconds:.1f}" if r.ok else "",
             "cpu": f"{r.extra.get('relay_cpu_percent', 0):.0f}%" if r.ok else ""}
            for c, r in runs.items()]
    print()
    print_table(rows, [("case", "case"), ("rate", "recipients/s"), ("seconds", "seconds"),
                       ("cpu", "relay CPU")])
    a, b = runs.get("a"), runs.get("b")
    rt = ratio(a.rate if a and a.ok else None, b.rate if b and b.ok else None)
    print(f"ratio engine/postfix: {rt:.2f}" if rt else "ratio engine/postfix: n/a")
    for line in (a.extra.get("sent_lines", []) if a else [])[-1:]:
        print(f"engine statistics: {line}")
    if not args.no_save:
        path = write_results("fanout", {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": info, "ratio": rt, "runs": {c: vars(r) for c, r in runs.items()}})
        print(f"results: {path}")
    return 0 if all(r.ok for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
