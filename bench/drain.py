"""bench/drain: delivery alone. Fill the queue while sending is paused, release it, and time how
long the relay takes to deliver everything to smtp-sink.

    python bench/drain.py [--messages 20000] [--sessions 50] [--size 4096] [--sources K]
                          [--sinks K] [--set KEY=VALUE ...] [--repeat N]

  (a) MailEngine: `queue.pause_sending = true`, smtp-source fills mailq/retry (durable), then
      `queue.pause_sending = false` through the control socket (as `mailengine config set`
      does); timed from that request until the sinks have counted every message. Afterwards
      mailq/retry and mailq/working must be empty.
  (b) Postfix: `defer_transports` holds the mail in its deferred queue while smtp-source fills
      it; then `defer_transports` is emptied and `postfix reload` (not timed: Postfix's restart
      takes about a second), then `postqueue -f`, timed from there until the sinks have counted
      every message (anything delivered before the flush is said in the check column).

The recipient domains are routed to the sinks as in bench/relay.py (one sink per domain with
`--sinks K`). It prints messages/s for each and the ratio a/b (goal on 2 cores: at least 2),
and writes everything to bench/results/drain-<timestamp>.json.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (parse_delivery_args, Case, SinkGroup,  # noqa: E402
                    announce, machine_info, ratio, summarise, run_rounds, run_smtp_sources,
                    run_workdir, sink_recipients, wait_count, write_results)
from intake import own_cpu, parse_setting, tree_cpu  # noqa: E402
from postfix import POSTCONF, PostfixInstance  # noqa: E402
from relay import (SENT_LINE, _tail, engine_settings, postfix_routes, queued,  # noqa: E402
                   wait_queue_empty)

CASES = {"a": "MailEngine drain", "b": "Postfix drain"}


def fill(port: int, args) -> None:
    run_smtp_sources([port], args.messages, args.sessions, args.size,
                     max(args.sources, args.sinks), sink_recipients(args.sinks))


def timed_drain(release, sinks: SinkGroup, args, result: Case, cpu_pid: int,
                manager: bool = False) -> bool:
    """`manager`: also the CPU of `cpu_pid` alone (the engine process: the queue manager)."""
    cpu0, own0 = tree_cpu(cpu_pid), own_cpu(cpu_pid)
    t0 = time.perf_counter()
    release()
    got = sinks.wait_messages(args.messages, timeout=args.timeout)
    seconds = time.perf_counter() - t0
    result.seconds, result.rate = seconds, args.messages / seconds
    result.extra.update(sink_counted=got, per_sink=[s.count() for s in sinks.sinks],
                        relay_cpu_percent=100 * (tree_cpu(cpu_pid) - cpu0) / seconds)
    if manager:
        result.extra["manager_cpu_percent"] = 100 * (own_cpu(cpu_pid) - own0) / seconds
    if got < args.messages:
        result.error = f"the sinks counted {got} of {args.messages} after {seconds:.0f}s"
        return False
    return True


def run_engine_case(args, workdir: Path) -> Case:
    from mailengine import control
    from mailengine.testing.engine import RunningEngine

    result = Case("a", CASES["a"], messages=args.messages)
    home = Path(tempfile.mkdtemp(prefix="engine-drain-", dir=workdir))
    with SinkGroup(args.sinks, workdir=workdir) as sinks:
        eng = RunningEngine(home, {**engine_settings(args, sinks), "queue.pause_sending": True})
        try:
            try:
                eng.start()
                fill(eng.smtp_port, args)
            except Exception as e:
                result.error = f"filling the queue: {e}\n{_tail(home / 'engine-output.txt')}"
                return result
            held = wait_count(lambda: queued(eng.mailq), args.messages, 60, poll=0.1)
            if held < args.messages:
                result.error = f"{held} of {args.messages} in the queue before the release"
                return result
            os.sync()

            def release():
                control.request(home / "mailengine.sock", "config.set",
                                name="queue.pause_sending", value=False)

            ok = timed_drain(release, sinks, args, result, eng.proc.pid, manager=True)
            left = wait_queue_empty(eng.mailq)
            eng.stop()
            sent = [m.group(0) for m in SENT_LINE.finditer(eng.output.decode(errors="replace"))]
            result.ok = ok and left == 0
            counted = "+".join(map(str, result.extra["per_sink"]))
            result.check = (f"sinks counted {counted}, queue empty" if result.ok
                            else result.error or f"{left} messages left in mailq")
            if sent:
                result.check += f"; engine: {sent[-1]}"
            return result
        finally:
            eng.stop()


def run_postfix_case(args, workdir: Path) -> Case:
    result = Case("b", CASES["b"], messages=args.messages)
    try:
        with SinkGroup(args.sinks, workdir=workdir) as sinks, PostfixInstance(
                mode="relay", relay_to=f"127.0.0.1:{sinks.ports[0]}", base_dir=workdir,
                keep=True, in_flow_delay=args.postfix_in_flow_delay,
                extra_main={**postfix_routes(sinks), "defer_transports": "smtp relay"}) as pf:
            fill(pf.port, args)
            held = pf.wait_queue(args.messages, timeout=60)
            pf.wait_settled(timeout=120)  # every message parked in deferred/
            if held < args.messages:
                result.error = f"{held} of {args.messages} in its queue before the release"
                return result
            os.sync()
            etc = str(pf.config_dir)

            subprocess.run([POSTCONF, "-c", etc, "-e", "defer_transports ="], check=True)
            pf._postfix("reload")
            time.sleep(1.0)
            early = sinks.count()

            def release():
                subprocess.run(["postqueue", "-c", etc, "-f"], check=True,
                               env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

            result.ok = timed_drain(release, sinks, args, result, pf.master_pid)
            result.check = "sinks counted " + "+".join(map(str, result.extra["per_sink"]))
            if early:
                result.check += f" ({early} before the flush)"
    except Exception as e:
        result.error = result.error or str(e)
    return result


def main(argv: list[str] | None = None) -> int:
    args, cases = parse_delivery_args(__doc__, "ab", "seconds to wait for the sinks after the release",
                                      parse_setting, argv)

    info = machine_info()
    with run_workdir("bench-drain-", args) as (workdir, fs):
        announce(f"bench/drain: {args.messages} queued messages of {args.size} bytes, "
                 f"delivery alone to {args.sinks} sink(s)", info, workdir, fs)
        run = {"a": run_engine_case, "b": run_postfix_case}
        runs = run_rounds(cases, args.repeat, CASES, lambda c: run[c](args, workdir))

    rates = summarise(runs, CASES, args.messages, "msg/s delivered")
    r = ratio(rates.get("a"), rates.get("b"))
    print(f"ratio: engine/postfix {r:.2f}" if r else "ratio: engine/postfix n/a",
          "  (goal on 2 cores: >= 2)")
    if not args.no_save:
        path = write_results("drain", {
            "args": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
            "machine": info, "filesystem": fs, "ratio": r, "rates": rates,
            "runs": {c: [vars(x) for x in rs] for c, rs in runs.items()}})
        print(f"results: {path}")
    return 0 if all(x.ok for rs in runs.values() for x in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
