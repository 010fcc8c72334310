"""bench/relay: the whole path, end to end: SMTP in, durable queue, SMTP out, against Postfix.

    python bench/relay.py [--messages 20000] [--sessions 50] [--size 4096] [--set KEY=VALUE ...]
                          [--sources K] [--sinks K]

`smtp-source -s SESSIONS -m MESSAGES -l SIZE` (a new connection per message, one recipient each)
sends to a relay that delivers everything to an `smtp-sink`; each case is timed, wall clock, from
the start of smtp-source until the sink has counted every message:

  (a) MailEngine relaying, durable (queue.relay_via_disk = true: every 250 means ID.dat + ID.inf
      fsync'ed), the recipient domain pinned to the sink by a basic.dns_servers MX entry;
      afterwards mailq/retry and mailq/working must be empty (the engine removes a message's
      files after the sink's 250: the check waits while their number still falls)
  (b) a private Postfix relaying to the sink (bench/postfix.py, relayhost = the sink)
  (c) smtp-source -> smtp-sink directly: the ceiling of this machine and of the tools

With `--sinks K` there are K smtp-sink processes, each the mail server of its own recipient
domain, and with `--sources K` K smtp-source processes share the load (source i sends to domain
i mod K): on a large machine one of each is one core, and caps what the relays can show.

It prints messages/s for each, the ratios a/b (goal: at least 4) and a/c (goal: at least 0.4),
the CPU each relay used, the engine's own `N sent (X/h avg, T total)` statistics line, and writes
everything to bench/results/relay-<timestamp>.json.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (parse_delivery_args, ENGINE_DEFAULTS, Case, SinkGroup,  # noqa: E402
                    announce, machine_info, ratio, summarise,
                    run_rounds, run_smtp_sources, run_workdir, sink_recipients, write_results)
from intake import parse_setting, tree_cpu  # noqa: E402
from postfix import PostfixInstance  # noqa: E402

CASES = {
    "a": "MailEngine relay, durable",
    "b": "Postfix relay",
    "c": "smtp-source -> smtp-sink (ceiling)",
}
SENT_LINE = re.compile(r"(\d+) sent \((\d+)/h avg, (\d+) total\)")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def count_files(directory: Path, suffix: str) -> int:
    try:
        return sum(1 for e in os.scandir(directory) if e.name.endswith(suffix))
    except FileNotFoundError:
        return 0


def timed_relay(port: int, sinks: SinkGroup, args, result: Case, cpu_pid: int,
                ports: list[int] | None = None) -> bool:
    """smtp-source (--sources of them) into `port` (or `ports`), then wait for the sinks to
    count them all; fills `result`, with the CPU used meanwhile by the process tree of `cpu_pid`
    (the relay under test)."""
    cpu0 = tree_cpu(cpu_pid)
    t0 = time.perf_counter()
    run = run_smtp_sources(ports or [port], args.messages, args.sessions, args.size,
                           max(args.sources, args.sinks), sink_recipients(args.sinks))
    got = sinks.wait_messages(args.messages, timeout=args.timeout)
    seconds = time.perf_counter() - t0
    result.extra["intake_seconds"] = run.seconds
    result.extra["sink_counted"] = got
    result.extra["per_sink"] = [s.count() for s in sinks.sinks]
    result.seconds = seconds
    result.rate = args.messages / seconds
    result.extra["relay_cpu_percent"] = 100 * (tree_cpu(cpu_pid) - cpu0) / seconds
    if got < args.messages:
        result.error = f"the sinks counted {got} of {args.messages} after {seconds:.0f}s"
        return False
    return True


def queued(mailq: Path) -> int:
    return count_files(mailq / "retry", ".inf") + count_files(mailq / "working", ".inf")


def wait_queue_empty(mailq: Path, quiet_seconds: float = 10.0) -> int:
    """The messages left in the engine's queue once it is empty, or once the number has not
    fallen for `quiet_seconds` (the engine removes the files of delivered messages in batches,
    after the sink's 250s: on a large run thousands are still being removed when the sink has
    counted the last one)."""
    left = queued(mailq)
    last_change = time.monotonic()
    while left and time.monotonic() - last_change < quiet_seconds:
        time.sleep(0.2)
        now = queued(mailq)
        if now < left:
            last_change = time.monotonic()
        left = now
    return left


def route_settings(sinks: SinkGroup) -> dict:
    """The engine's basic.dns_servers entries: each recipient domain's MX is its own sink."""
    return {"basic.dns_servers": [
        f"{rcpt.rpartition('@')[2]},sink{i}.bench,MX,127.0.0.1:{port}"
        for i, (rcpt, port) in enumerate(zip(sink_recipients(len(sinks.sinks)), sinks.ports))]}


def postfix_routes(sinks: SinkGroup) -> dict:
    """Postfix's main.cf lines for the same routes (one sink: its relayhost does it)."""
    if len(sinks.sinks) == 1:
        return {}
    table = ", ".join(f"{rcpt.rpartition('@')[2]}=relay:[127.0.0.1]:{port}"
                      for rcpt, port in zip(sink_recipients(len(sinks.sinks)), sinks.ports))
    return {"transport_maps": "inline:{ " + table + " }"}


def engine_settings(args, sinks: SinkGroup) -> dict:
    settings = {
        **ENGINE_DEFAULTS,
        "logging.stats_interval": 1,
        "limits.max_inbound_connections": max(1000, 4 * args.sessions),
        "queue.pause_sending": False,
        "queue.relay_via_disk": True,
        "queue.save_done": False,
        "policy.relay_ips": ["127.0.0.1"],
        **route_settings(sinks),
    }
    settings.update(dict(args.set))
    return settings


def run_engine_case(args, workdir: Path) -> Case:
    from mailengine.testing.engine import RunningEngine

    result = Case("a", CASES["a"], messages=args.messages)
    home = Path(tempfile.mkdtemp(prefix="engine-relay-", dir=workdir))
    with SinkGroup(args.sinks, workdir=workdir) as sink:
        eng = RunningEngine(home, engine_settings(args, sink))
        try:
            try:
                eng.start()
            except Exception as e:
                result.error = f"engine did not start: {e}\n{_tail(home / 'engine-output.txt')}"
                return result
            os.sync()
            try:
                ok = timed_relay(eng.smtp_port, sink, args, result, eng.proc.pid)
            except Exception as e:
                result.error = f"{e}\n{_tail(home / 'engine-output.txt')}"
                return result
            left = wait_queue_empty(eng.mailq)
            rc = eng.stop()
            out = eng.output.decode(errors="replace")
            sent = [m.group(0) for m in SENT_LINE.finditer(out)]
            result.extra.update(engine_exit_status=rc, left_in_queue=left,
                                sent_lines=sent[-3:])
            result.ok = ok and left == 0
            counted = '+'.join(map(str, result.extra['per_sink']))
            result.check = (f"sinks counted {counted}, queue empty"
                            if result.ok else f"{left} messages left in mailq")
            if sent:
                result.check += f"; engine: {sent[-1]}"
            return result
        finally:
            eng.stop()


def run_postfix_case(args, workdir: Path) -> Case:
    result = Case("b", CASES["b"], messages=args.messages)
    try:
        with SinkGroup(args.sinks, workdir=workdir) as sink, PostfixInstance(
                mode="relay", relay_to=f"127.0.0.1:{sink.ports[0]}", base_dir=workdir,
                keep=True, in_flow_delay=args.postfix_in_flow_delay,
                extra_main=postfix_routes(sink)) as pf:
            os.sync()
            ok = timed_relay(pf.port, sink, args, result, pf.master_pid)
            result.ok = ok
            result.check = f"sinks counted {'+'.join(map(str, result.extra['per_sink']))}"
    except Exception as e:
        result.error = result.error or str(e)
    return result


def run_direct_case(args, workdir: Path) -> Case:
    result = Case("c", CASES["c"], messages=args.messages)
    try:
        with SinkGroup(args.sinks, workdir=workdir) as sink:
            ok = timed_relay(0, sink, args, result, sink.sinks[0].proc.pid, ports=sink.ports)
            result.ok = ok
            result.check = f"sinks counted {'+'.join(map(str, result.extra['per_sink']))}"
    except Exception as e:
        result.error = result.error or str(e)
    return result


def main(argv: list[str] | None = None) -> int:
    args, cases = parse_delivery_args(__doc__, "abc", "seconds to wait for the sink after smtp-source is done",
                                      parse_setting, argv)

    info = machine_info()
    with run_workdir("bench-relay-", args) as (workdir, fs):
        announce(f"bench/relay: {args.messages} messages of {args.size} bytes over "
                 f"{args.sessions} sessions, end to end", info, workdir, fs)
        run = {"a": run_engine_case, "b": run_postfix_case, "c": run_direct_case}
        runs = run_rounds(cases, args.repeat, CASES, lambda c: run[c](args, workdir))

    rates = summarise(runs, CASES, args.messages, "msg/s end to end")
    ratios = {"engine/postfix": ratio(rates.get("a"), rates.get("b")),
              "engine/direct": ratio(rates.get("a"), rates.get("c")),
              "postfix/direct": ratio(rates.get("b"), rates.get("c"))}
    print("ratios: " + ", ".join(f"{k} {v:.2f}" if v else f"{k} n/a" for k, v in ratios.items())
          + "   (goals: engine/postfix >= 4, engine/direct >= 0.40)")
    for r in runs.get("a", []):
        for line in r.extra.get("sent_lines", [])[-1:]:
            print(f"engine statistics: {line}")
    if not args.no_save:
        path = write_results("relay", {
            "args": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
            "machine": info, "filesystem": fs, "ratios": ratios, "rates": rates,
            "runs": {c: [vars(r) for r in rs] for c, rs in runs.items()}})
        print(f"results: {path}")
    return 0 if all(r.ok for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
