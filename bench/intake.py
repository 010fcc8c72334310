"""bench/intake: how fast MailEngine takes mail in, against Postfix on the same machine, same run.

    python bench/intake.py [--messages 20000] [--sessions 50] [--size 4096] [--profile]
                           [--suppressed 100000]

`smtp-source -s SESSIONS -m MESSAGES -l SIZE` (a new connection per message, one recipient each)
is timed, wall clock, against four receivers, one after the other:

  (a) MailEngine with every recipient local and discarded   (basic.local_domains = ["."])
  (b) MailEngine queueing for relay, durable                  (queue.relay_via_disk = true):
      every 250 means ID.dat + ID.inf fsync'ed; afterwards all N must be in mailq/retry
  (c) a private Postfix accepting and queueing durably without delivering
      (defer_transports = smtp, bench/postfix.py); afterwards all N must be in its queue
  (d) smtp-sink, which keeps nothing: the ceiling of this machine and of smtp-source

It prints messages/s for each, the ratios b/c, a/c and b/d, the CPU each receiver used, and writes
everything to bench/results/intake-<timestamp>.json. Goal (issue 2): b at least 4 times c.

`--suppressed N` puts N addresses on the engines' suppression list before they start (none of
them among the recipients sent to), so every RCPT of (b) is checked against a list that size.

The engine runs with `queue.pause_sending = true`, so the relayed mail of (b) stays in retry/ even
once the delivery engine exists: this benchmark measures intake only (bench/relay measures the
whole path). `--profile` then runs (b) once more under py-spy (or cProfile when py-spy is missing)
and prints the functions where the engine spends its time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (ENGINE_DEFAULTS, Case, SinkGroup, add_load_arguments,  # noqa: E402
                    add_run_arguments, jsonable, announce, machine_info, print_table,
                    ratio, run_rounds, run_smtp_sources, run_workdir, write_results)
from postfix import PostfixInstance  # noqa: E402

CASES = {
    "a": "MailEngine, local recipients discarded",
    "b": "MailEngine, relay queue, durable",
    "c": "Postfix, defer_transports = smtp",
    "d": "smtp-sink (ceiling)",
}


# -- CPU accounting ------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of pid itself plus its reaped children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # after the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime ...
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) / CLK_TCK


def own_cpu(pid: int) -> float:
    """CPU seconds of pid itself (the engine process without its intake and delivery processes:
    the queue manager's share, what bounds delivery on many cores)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, no reaped children


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by root and all its descendants, live or reaped."""
    info = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st:
                info[int(entry)] = st
    total, todo = 0.0, [root]
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in info.items():
        children.setdefault(ppid, []).append(pid)
    while todo:
        pid = todo.pop()
        if pid in info:
            total += info[pid][1]
            todo.extend(children.get(pid, []))
    return total


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# -- the engine ------------------------------------------------------------------------------

def parse_setting(text: str) -> tuple[str, object]:
    """'section.key=VALUE' with VALUE in TOML (a bare word is taken as a string)."""
    name, _, value = text.partition("=")
    if "." not in name or not _:
        raise argparse.ArgumentTypeError(f"expected section.key=VALUE, not {text!r}")
    try:
        return name.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return name.strip(), value


def engine_settings(case: str, args) -> dict:
    settings = {
        **ENGINE_DEFAULTS,
        "logging.stats_interval": 0,
        "limits.max_inbound_connections": max(1000, 4 * args.sessions),
        "queue.pause_sending": True,
        "policy.relay_ips": ["127.0.0.1"],
    }
    if case == "a":
        settings["basic.local_domains"] = ["."]
    else:
        settings["queue.relay_via_disk"] = True
    settings.update(dict(args.set))
    return settings


def count_files(directory: Path, suffix: str) -> int:
    try:
        return sum(1 for e in os.scandir(directory) if e.name.endswith(suffix))
    except FileNotFoundError:
        return 0


STATS_LINE = re.compile(r"(\d+) recv \[(\d+) inbound, (\d+) relay\]")


def run_engine_case(case: str, args, workdir: Path, profiler: str | None = None) -> Case:
    from mailengine.testing.engine import RunningEngine

    result = Case(case, CASES[case], messages=args.messages)
    home = Path(tempfile.mkdtemp(prefix=f"engine-{case}-", dir=workdir))
    if args.suppressed:
        result.extra["suppressed"] = preload_suppressed(home, args.suppressed)
    eng = RunningEngine(home, engine_settings(case, args))
    spy = None
    try:
        try:
            eng.start()
        except Exception as e:
            result.error = f"engine did not start: {e}\n{_tail(home / 'engine-output.txt')}"
            return result
        if profiler == "py-spy":
            spy = start_py_spy(eng.proc.pid, home / "py-spy.txt")
        os.sync()
        cpu0, src0 = tree_cpu(eng.proc.pid), children_cpu()
        try:
            run = run_smtp_sources([eng.smtp_port], args.messages, args.sessions, args.size,
                                   args.sources)
        except Exception as e:
            result.error = f"{e}\n{_tail(home / 'engine-output.txt')}"
            return result
        cpu1, src1 = tree_cpu(eng.proc.pid), children_cpu()
        result.rate, result.seconds, result.ok = run.rate, run.seconds, True
        result.extra["receiver_cpu_percent"] = 100 * (cpu1 - cpu0) / run.seconds
        result.extra["smtp_source_cpu_percent"] = 100 * (src1 - src0) / run.seconds
        mailq = eng.mailq
        stored_now = count_files(mailq / "retry", ".inf") + count_files(mailq / "working", ".inf")
        if spy is not None:
            stop_py_spy(spy)
            spy = None
            result.extra["profile"] = read_collapsed(home / "py-spy.txt", run.seconds)
        rc = eng.stop()
        result.extra["engine_exit_status"] = rc
        output = eng.output.decode(errors="replace")
        stats = STATS_LINE.findall(output)
        if stats:
            result.extra["engine_stats"] = [int(x) for x in stats[-1]]
        retry_inf = count_files(mailq / "retry", ".inf")
        retry_dat = count_files(mailq / "retry", ".dat")
        left_working = count_files(mailq / "working", ".inf")
        if case == "b":
            result.extra.update(stored_when_source_finished=stored_now, retry_inf=retry_inf,
                                retry_dat=retry_dat, working_after_stop=left_working)
            good = retry_inf == retry_dat == args.messages and left_working == 0
            result.check = (f"{retry_inf} in mailq/retry" if good else
                            f"MISSING: {retry_inf} .inf, {retry_dat} .dat in retry/, "
                            f"{left_working} in working/, expected {args.messages}")
            result.ok = good
        else:
            good = retry_inf == 0
            if stats and stats[-1][1] != str(args.messages):
                good = False
            result.check = ("discarded" + (f", engine counted {stats[-1][1]} inbound"
                                           if stats else "")) if good else (
                f"UNEXPECTED: {retry_inf} queued in retry/, engine stats {stats[-1:]}")
            result.ok = good
        if rc not in (0, None):
            result.check += f", engine exit status {rc}"
        if profiler == "cprofile":
            result.extra["profile"] = read_cprofile(home / "cprofile.out")
        return result
    finally:
        if spy is not None:
            spy.kill()
            spy.wait()
        eng.stop()


def preload_suppressed(home: Path, n: int) -> int:
    """n entries on `home`'s suppression list, none of them a recipient of the run."""
    import io
    from mailengine.suppression import SuppressionStore
    store = SuppressionStore(home)
    try:
        return store.import_csv(io.StringIO("address,reason,source\n" + "".join(
            f"gone{i}@suppressed.bench.test,550 5.1.1 user unknown,bounce\n"
            for i in range(n))))
    finally:
        store.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- Postfix and smtp-sink -------------------------------------------------------------------

def run_postfix_case(args, workdir: Path) -> Case:
    result = Case("c", CASES["c"], messages=args.messages)
    try:
        with PostfixInstance(mode="defer", base_dir=workdir, keep=True,  # deleted with workdir
                             in_flow_delay=args.postfix_in_flow_delay) as pf:
            os.sync()
            cpu0, src0 = tree_cpu(pf.master_pid), children_cpu()
            run = run_smtp_sources([pf.port], args.messages, args.sessions, args.size,
                                   args.sources)
            cpu1, src1 = tree_cpu(pf.master_pid), children_cpu()
            result.extra["smtp_source_cpu_percent"] = 100 * (src1 - src0) / run.seconds
            now = pf.queue_count()
            final = pf.wait_settled(timeout=120)
            result.rate, result.seconds = run.rate, run.seconds
            result.extra.update(receiver_cpu_percent=100 * (cpu1 - cpu0) / run.seconds,
                                queued_when_source_finished=now, queued_after_settling=final,
                                deferred=pf.queue_count(("deferred",)))
            result.ok = final == args.messages
            result.check = (f"{final} in its queue" if result.ok else
                            f"MISSING: {final} in its queue, expected {args.messages}")
    except Exception as e:
        result.error = str(e)
    return result


def run_sink_case(args, workdir: Path) -> Case:
    result = Case("d", CASES["d"], messages=args.messages)
    try:
        with SinkGroup(args.sinks, workdir=workdir) as sink:
            pids = [s.proc.pid for s in sink.sinks]
            cpu0, src0 = sum(map(tree_cpu, pids)), children_cpu()
            run = run_smtp_sources(sink.ports, args.messages, args.sessions, args.size,
                                   max(args.sources, args.sinks))
            cpu1, src1 = sum(map(tree_cpu, pids)), children_cpu()
            result.extra["smtp_source_cpu_percent"] = 100 * (src1 - src0) / run.seconds
            got = sink.wait_messages(args.messages, timeout=10)
            result.rate, result.seconds = run.rate, run.seconds
            result.extra["receiver_cpu_percent"] = 100 * (cpu1 - cpu0) / run.seconds
            result.ok = got == args.messages
            result.check = f"sink counted {got}"
    except Exception as e:
        result.error = str(e)
    return result


# -- profiling -----------------------------------------------------------------------------------

SPY_RATE = 250   # samples per second and thread


def start_py_spy(pid: int, out: Path) -> subprocess.Popen:
    spy = subprocess.Popen([shutil.which("py-spy"), "record", "--pid", str(pid),
                            "--subprocesses", "--threads", "--nonblocking",
                            "--rate", str(SPY_RATE), "--format", "raw", "--output", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    time.sleep(1.0)  # let it attach before the load starts
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy exited at once: {spy.stderr.read().decode(errors='replace')}")
    return spy


def stop_py_spy(spy: subprocess.Popen) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def _short_path(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "lib/python3.":
                path = path.split("/", 1)[-1]
            break
    return path


def _frame(frame: str, with_line: bool = False) -> str:
    """'handle (/x/mailengine/inbound.py:120)' -> 'handle (mailengine/inbound.py[:120])'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    if not path:
        path, line = where, ""
    path = _short_path(path)
    if with_line and line:
        path = f"{path}:{line}"
    return f"{name} ({path})" if path else name


def read_collapsed(path: Path, seconds: float, top: int = 25) -> dict:
    """Where the engine's threads were busy, from py-spy's raw (collapsed stack) output.

    py-spy samples each thread SPY_RATE times a second and skips threads that wait (in the
    event loop's poll, on a lock); a thread in a system call such as fsync or write counts as
    busy. Figures are percent of the load's wall time: 100 % = one thread busy all along.
    """
    own, incl, lines_, threads = Counter(), Counter(), Counter(), Counter()
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as e:
        return {"error": f"no py-spy output: {e}"}
    total = 0
    for line in text:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        n = int(n)
        parts = stack.split(";")
        thread = next((p.split(": ", 1)[-1] for p in parts if p.startswith("thread (")), "?")
        proc = next((p.split(":", 1)[0] for p in parts if p.startswith("process ")), "")
        frames = [p for p in parts if p and not p.startswith(("process ", "thread ("))]
        if not frames:
            continue
        total += n
        threads[f"{proc} {thread}".strip()] += n
        own[_frame(frames[-1])] += n
        lines_[_frame(frames[-1], with_line=True)] += n
        for f in {_frame(f) for f in frames}:
            incl[f] += n
    full = SPY_RATE * seconds or 1

    def pct(counter, k):
        return [(f, n, 100 * n / full) for f, n in counter.most_common(k)]

    return {"tool": "py-spy", "samples": total, "rate": SPY_RATE, "seconds": seconds,
            "threads": pct(threads, 10), "self": pct(own, top), "inclusive": pct(incl, top),
            "self_lines": pct(lines_, top)}


def read_cprofile(path: Path, top: int = 25) -> dict:
    import pstats
    try:
        st = pstats.Stats(str(path))
    except (OSError, TypeError) as e:
        return {"error": f"no cProfile output: {e}"}
    total = st.total_tt or 1
    rows = []
    for (file, line, func), (cc, nc, tt, ct, callers) in st.stats.items():
        rows.append((f"{func} ({_short_path(file)}:{line})", tt, ct))
    own = sorted(rows, key=lambda r: -r[1])[:top]
    cum = sorted(rows, key=lambda r: -r[2])[:top]
    return {"tool": "cProfile (main thread only)", "seconds": total,
            "self": [(f, round(t, 3), 100 * t / total) for f, t, _ in own],
            "inclusive": [(f, round(c, 3), 100 * c / total) for f, _, c in cum]}


def run_profile(args, workdir: Path) -> Case:
    if shutil.which("py-spy"):
        return run_engine_case("b", args, workdir, profiler="py-spy")
    # cProfile: the engine started as `python -m cProfile -o FILE -m mailengine.cli ...`.
    from mailengine.testing import engine as engine_mod
    real_popen = engine_mod.subprocess.Popen

    def popen(cmd, *a, **kw):
        if cmd[1:3] == ["-m", "mailengine.cli"]:
            home = Path(cmd[cmd.index("--home") + 1])
            cmd = [cmd[0], "-m", "cProfile", "-o", str(home / "cprofile.out"), *cmd[1:]]
        return real_popen(cmd, *a, **kw)

    engine_mod.subprocess.Popen = popen
    try:
        return run_engine_case("b", args, workdir, profiler="cprofile")
    finally:
        engine_mod.subprocess.Popen = real_popen


def print_profile(profile: dict, top: int) -> None:
    if "error" in profile:
        print(f"\nprofile: {profile['error']}")
        return
    if profile["tool"] == "py-spy":
        print(f"\nProfile of (b) by py-spy: {profile['samples']} samples at {profile['rate']}/s "
              f"per thread over {profile['seconds']:.1f} s of load. Approximate percent of wall time "
              f"(100% = one thread busy throughout; waiting in poll or on a lock is not counted, "
              f"time in a system call such as fsync is):")
        print("\n  busy threads:")
        for f, n, pct in profile["threads"]:
            print(f"    {pct:5.1f}%  {f}")
        kinds = ("self", "self_lines", "inclusive")
    else:
        print(f"\nProfile of (b) by {profile['tool']}: percent of {profile['seconds']:.1f} "
              f"profiled seconds")
        kinds = ("self", "inclusive")
    for kind in kinds:
        label = {"self": "self time (by function)", "self_lines": "self time (by line)",
                 "inclusive": "inclusive time"}[kind]
        print(f"\n  top {top} by {label}:")
        for f, n, pct in profile[kind][:top]:
            print(f"    {pct:5.1f}%  {f}")


# -- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(ap, "abcd", "extra engine setting for (a) and (b), e.g. network.intake_workers=2", parse_setting)
    ap.add_argument("--postfix-in-flow-delay", default="1s",
                    help="Postfix's in_flow_delay for (c) (its default, 1s)")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, run (b) under py-spy (or cProfile) and print top functions")
    ap.add_argument("--top", type=int, default=15, help="functions shown by --profile")
    ap.add_argument("--suppressed", type=int, default=0, metavar="N",
                    help="preload N addresses (none of those sent to) on the engines' "
                         "suppression list")
    add_run_arguments(ap)
    ap.add_argument("--json", type=Path, help="write the results to this file instead")
    args = ap.parse_args(argv)
    cases = [c for c in "abcd" if c in args.cases]
    if not cases or set(args.cases) - set("abcd"):
        ap.error("--cases takes letters from abcd")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # clean up on SIGTERM too

    info = machine_info()
    with run_workdir("bench-intake-", args) as (workdir, fs):
        announce(f"bench/intake: {args.messages} messages of {args.size} bytes over "
                 f"{args.sessions} sessions", info, workdir, fs)

        def run_case(c: str) -> Case:
            if c in "ab":
                return run_engine_case(c, args, workdir)
            return run_postfix_case(args, workdir) if c == "c" else run_sink_case(args, workdir)
        runs = run_rounds(cases, args.repeat, CASES, run_case)
        profile = None
        if args.profile:
            print("  profiling (b) ...", flush=True)
            prof_case = run_profile(args, workdir)
            profile = prof_case.extra.get("profile") or {"error": prof_case.error or "none"}
            profile["rate_while_profiled"] = prof_case.rate

    summary = []
    for c in cases:
        ok_rates = [r.rate for r in runs[c] if r.ok]
        best = runs[c][-1]
        med = statistics.median(ok_rates) if len(ok_rates) == len(runs[c]) else 0.0
        cpu = [r.extra.get("receiver_cpu_percent") for r in runs[c] if r.ok]
        src = [r.extra["smtp_source_cpu_percent"] for r in runs[c]
               if r.ok and "smtp_source_cpu_percent" in r.extra]
        summary.append({
            "case": f"({c}) {CASES[c]}", "key": c, "rate": med,
            "seconds": args.messages / med if med else 0.0,
            "cpu": f"{statistics.median(cpu):.0f}%" if cpu else "",
            "src": f"{statistics.median(src):.0f}%" if src else "",
            "check": best.check if best.ok else ("FAILED: " + (best.error or best.check)
                                                  ).splitlines()[0][:100],
        })
    rates = {s["key"]: s["rate"] for s in summary}
    print()
    print_table(summary, [("case", "case"), ("rate", "msg/s"), ("seconds", "seconds"),
                          ("cpu", "receiver CPU"), ("src", "smtp-source CPU"),
                          ("check", "check")])
    ratios = {"b/c": ratio(rates.get("b"), rates.get("c")),
              "a/c": ratio(rates.get("a"), rates.get("c")),
              "b/d": ratio(rates.get("b"), rates.get("d"))}
    shown = [f"{k} = {v:.2f}" for k, v in ratios.items() if v is not None]
    if shown:
        print("\nratios: " + ", ".join(shown)
              + ("   (goal: b/c >= 4)" if ratios["b/c"] is not None else ""))
    if args.repeat > 1 and "b" in runs and "c" in runs:
        # Interleaved runs: each round's b/c is less exposed to load drifting over the runs.
        per_round = [f"{b.rate / c.rate:.2f}" for b, c in zip(runs["b"], runs["c"])
                     if b.ok and c.ok]
        print(f"b/c round by round: {', '.join(per_round)}")
        ratios["b/c by round"] = per_round
    for c in cases:
        for res in runs[c]:
            if res.error:
                print(f"\n({c}) failed:\n{res.error}")
    if profile:
        print_profile(profile, args.top)
        if profile.get("rate_while_profiled"):
            print(f"\n  (b) ran at {profile['rate_while_profiled']:,.0f} msg/s while profiled")

    data = {"benchmark": "intake", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None
                                                            else sys.argv[1:])]),
            "messages": args.messages, "sessions": args.sessions, "size": args.size,
            "suppressed": args.suppressed,
            "engine_settings": {c: engine_settings(c, args) for c in "ab"},
            "filesystem": fs, "machine": info,
            "rates": rates, "ratios": ratios, "summary": summary,
            "runs": {c: runs[c] for c in cases}, "profile": profile}
    if args.json:
        args.json.write_text(json.dumps(data, indent=2, default=jsonable) + "\n")
    elif not args.no_save:
        path = write_results("intake", data)
        print(f"\nresults: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    all_ok = all(r.ok for rs in runs.values() for r in rs)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
