"""Helpers shared by the benchmarks: timed smtp-source runs, an smtp-sink process, result files.

Everything here drives Postfix's own test programs (`smtp-source`, `smtp-sink`, from Debian's
`postfix` package) on loopback addresses only. Nothing here knows about MailEngine; the
benchmarks (`bench/intake.py`, later `bench/relay.py`) put the pieces together.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", "")

# The envelope smtp-source uses in every benchmark: a remote-looking recipient domain that
# nothing resolves (.invalid), so no benchmark can ever reach a real server.
SENDER = "bench@source.example"
RECIPIENT = "rcpt@dest.invalid"
HELO = "smtp-source.bench"


def tool(name: str) -> str:
    """Full path of a Postfix test program, or a clear error saying how to get it."""
    path = shutil.which(name, path=SBIN_PATH)
    if not path:
        raise SystemExit(f"{name} not found: install Debian's postfix package "
                         "(apt-get install postfix; its own service need not run)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 10.0, greeting: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                if not greeting or s.recv(100).startswith(b"220"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"nothing answering on {host}:{port} after {timeout}s")


def wait_count(count, expected: int, timeout: float, poll: float = 0.02) -> int:
    """Poll count() until it reaches `expected` or `timeout` s pass; the last count."""
    deadline = time.monotonic() + timeout
    n = count()
    while n < expected and time.monotonic() < deadline:
        time.sleep(poll)
        n = count()
    return n


# -- smtp-source ---------------------------------------------------------------------------

@dataclass
class SourceRun:
    """One timed smtp-source run."""
    target: str
    messages: int
    sessions: int
    size: int
    seconds: float
    returncode: int
    command: list[str]
    stderr: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_smtp_source(port: int, messages: int, sessions: int, size: int,
                    host: str = "127.0.0.1", sender: str = SENDER, recipient: str = RECIPIENT,
                    extra: list[str] | None = None, timeout: float = 3600.0,
                    check: bool = True) -> SourceRun:
    """Run `smtp-source -s SESSIONS -m MESSAGES -l SIZE` against host:port; wall time around it.

    smtp-source opens a new connection for every message (no -d) and stops at the first reply
    that is not 2xx/3xx, so a zero exit status means every message got its 250.
    """
    cmd = [tool("smtp-source"), "-s", str(sessions), "-m", str(messages), "-l", str(size),
           "-M", HELO, "-f", sender, "-t", recipient, *(extra or []), f"{host}:{port}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - t0
    run = SourceRun(f"{host}:{port}", messages, sessions, size, seconds, proc.returncode, cmd,
                    proc.stderr[-2000:])
    if check and not run.ok:
        raise RuntimeError(f"smtp-source failed ({proc.returncode}) after {seconds:.1f}s: "
                           f"{' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return run


def run_smtp_sources(targets: list[int], messages: int, sessions: int, size: int,
                     sources: int = 1, recipients: list[str] | None = None,
                     timeout: float = 3600.0) -> SourceRun:
    """`sources` smtp-source processes at once (one tops out near 7,000 msg/s on 16 cores),
    sharing out `messages` and `sessions`; source i sends to port targets[i % len(targets)] and
    recipient recipients[i % len(recipients)]. One SourceRun for them all, timed from the first
    start to the last exit; a failure of any one raises, as run_smtp_source does."""
    if sources <= 1 and len(targets) == 1:
        return run_smtp_source(targets[0], messages, sessions, size,
                               recipient=(recipients or [RECIPIENT])[0], timeout=timeout)
    sources = max(1, sources)
    recipients = recipients or [RECIPIENT]
    procs = []
    t0 = time.perf_counter()
    for i in range(sources):
        share = messages // sources + (1 if i < messages % sources else 0)
        cmd = [tool("smtp-source"), "-s", str(max(1, sessions // sources)), "-m", str(share),
               "-l", str(size), "-M", HELO, "-f", SENDER, "-t", recipients[i % len(recipients)],
               f"127.0.0.1:{targets[i % len(targets)]}"]
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, text=True)))
    failed = []
    try:
        for cmd, proc in procs:
            _, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))
            if proc.returncode != 0:
                failed.append(f"{' '.join(cmd)} ({proc.returncode}): {err[-500:]}")
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"smtp-source failed after {seconds:.1f}s: " + "\n".join(failed))
    return SourceRun(",".join(map(str, targets)), messages, sessions, size, seconds, 0,
                     procs[0][0])


def sink_recipients(sinks: int) -> list[str]:
    """One recipient domain per sink when there are several (each routed to its own sink),
    else the usual one."""
    if sinks <= 1:
        return [RECIPIENT]
    local, _, domain = RECIPIENT.partition("@")
    return [f"{local}@s{i}.{domain}" for i in range(sinks)]


# -- smtp-sink -----------------------------------------------------------------------------

class SmtpSink:
    """An `smtp-sink` process on a free loopback port that throws mail away and counts it.

        with SmtpSink() as sink:
            ... deliver to 127.0.0.1:sink.port ...
            sink.wait_messages(20000, timeout=120)

    It runs in its own process group; leaving the block kills that group.
    """

    COUNTER = re.compile(rb"mesg=(\d+)")

    def __init__(self, port: int | None = None, backlog: int = 1024, max_connections: int = 1024,
                 extra: list[str] | None = None, workdir: Path | None = None):
        self.port = port or free_port()
        self.backlog = backlog
        self.max_connections = max_connections
        self.extra = list(extra or [])
        self.workdir = Path(workdir) if workdir else None
        self.proc: subprocess.Popen | None = None
        self._out = None
        self._out_path: Path | None = None

    def start(self) -> "SmtpSink":
        import tempfile
        cmd = [tool("smtp-sink"), "-c", "-m", str(self.max_connections), *self.extra]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]         # smtp-sink refuses to keep root privileges
        cmd += [f"127.0.0.1:{self.port}", str(self.backlog)]
        fd, name = tempfile.mkstemp(prefix="smtp-sink-", suffix=".out", dir=self.workdir)
        self._out_path = Path(name)
        self._out = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, 10.0)
        except BaseException:
            self.stop()
            raise
        return self

    def count(self) -> int:
        """Messages the sink has received (its '-c' counter: each '.' that ended a DATA).

        Before the first message the sink prints nothing; the probe connection of start()
        shows as a session, not as a message.
        """
        if self._out_path is None:
            return 0
        with open(self._out_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 200))
            found = self.COUNTER.findall(f.read())
        return int(found[-1]) if found else 0

    def wait_messages(self, expected: int, timeout: float = 60.0, poll: float = 0.02) -> int:
        return wait_count(self.count, expected, timeout, poll)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self.proc = None
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._out_path is not None:
            self._out_path.unlink(missing_ok=True)
            self._out_path = None

    def __enter__(self) -> "SmtpSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SinkGroup:
    """`n` smtp-sink processes, each on its own port, counted together (one smtp-sink process
    is one core: on a large machine one sink caps what a benchmark can show)."""

    def __init__(self, n: int, workdir: Path | None = None):
        self.sinks = [SmtpSink(workdir=workdir) for _ in range(max(1, n))]

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.sinks]

    def count(self) -> int:
        return sum(s.count() for s in self.sinks)

    def wait_messages(self, expected: int, timeout: float = 60.0, poll: float = 0.02) -> int:
        return wait_count(self.count, expected, timeout, poll)

    def __enter__(self) -> "SinkGroup":
        try:
            for s in self.sinks:
                s.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.sinks:
            s.stop()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- results -------------------------------------------------------------------------------

def _cmd_out(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict:
    """What the figures were measured on."""
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    postfix_version = _cmd_out([shutil.which("postconf", path=SBIN_PATH) or "postconf",
                                "-d", "-h", "mail_version"])
    try:
        import uvloop  # noqa: F401  (only: is it there?)
        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix_version,
        "event_loop_available": loop,
        "git_commit": _cmd_out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_results(name: str, data: dict) -> Path:
    """bench/results/NAME-<timestamp>.json (bench/results/ is git-ignored)."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"{name}-{timestamp()}.json"
    path.write_text(json.dumps(data, indent=2, default=jsonable) + "\n")
    return path


def jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    raise TypeError(f"not JSON serialisable: {obj!r}")


def print_table(rows: list[dict], columns: list[tuple[str, str]], out=None) -> None:
    """Print rows (dicts) as an aligned text table; columns are (key, heading) pairs."""
    out = out or sys.stdout
    cells = [[h for _, h in columns]]
    numeric = [True] * len(columns)     # numbers and percentages right-aligned, text left
    for row in rows:
        line = []
        for i, (key, _) in enumerate(columns):
            v = row.get(key, "")
            if isinstance(v, float):
                v = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"
            elif not isinstance(v, int) and not re.fullmatch(r"[\d.,]+%?|", str(v)):
                numeric[i] = False
            line.append(str(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) if numeric[i] else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip(), file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    out.flush()


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


@dataclass
class Case:
    """One benchmark case's outcome, as printed and saved."""
    key: str
    label: str
    rate: float = 0.0
    seconds: float = 0.0
    messages: int = 0
    ok: bool = False
    check: str = ""
    error: str = ""
    extra: dict = field(default_factory=dict)


def add_load_arguments(ap, cases: str, set_help: str, parse_setting) -> None:
    """The smtp-source load options that bench/intake and bench/relay share."""
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=4096, help="message body bytes (smtp-source -l)")
    ap.add_argument("--cases", default=cases,
                    help=f"which cases to run, e.g. '{cases[:2]}' (default {cases})")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every case this many times (interleaved); the median is reported")
    ap.add_argument("--set", action="append", type=parse_setting, default=[],
                    metavar="SECTION.KEY=VALUE", help=set_help)
    ap.add_argument("--sources", type=int, default=1,
                    help="smtp-source processes sending at once, sharing --messages and "
                         "--sessions (one process tops out near 7,000 msg/s)")
    ap.add_argument("--sinks", type=int, default=1,
                    help="smtp-sink processes receiving (one recipient domain routed to each); "
                         "one process is one core")


# Settings every benchmarked engine gets unless --set says otherwise: the product's own defaults
# for intake processes (0 = one per core) and delivery processes (0 = one per four cores, at
# least 2). RunningEngine's defaults of 1 are for tests.
ENGINE_DEFAULTS = {"network.intake_workers": 0, "network.delivery_processes": 0}


def make_workdir(prefix: str, parent: Path | None) -> tuple[Path, str]:
    """A fresh directory for one benchmark run's engine homes, Postfix instances and sinks;
    returns it and its file system type. Everything in it is deleted once, at the end of the run,
    never between cases: on ext4 a case's file creations pay for the files deleted in the minutes
    before it (bench/inode_alloc.py), so deleting one case's 40,000 files would slow the next
    case, whichever program it measures. For the same reason the directory gets ext4's
    top-directory flag where it can (chattr +T), so that each home made in it is placed in a block
    group of its own choosing rather than next to what earlier runs deleted."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(workdir, 0o755)  # Postfix's daemons (user postfix) must reach their queue
    if shutil.which("chattr"):
        subprocess.run(["chattr", "+T", str(workdir)], capture_output=True)  # ext2/3/4 only
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(workdir)], capture_output=True,
                        text=True).stdout.strip()
    return workdir, fs


def add_run_arguments(ap) -> None:
    """--workdir, --keep and --no-save, which every benchmark takes."""
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the engine homes and the Postfix instances live (default: the "
                         "system temp dir; use a real disk, not tmpfs, or durability is free)")
    ap.add_argument("--keep", action="store_true", help="keep engine homes and Postfix dirs")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")


@contextlib.contextmanager
def run_workdir(prefix: str, args):
    """make_workdir() for the run, removed at its end (unless --keep); yields (path, fs type)."""
    workdir, fs = make_workdir(prefix, args.workdir)
    try:
        yield workdir, fs
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def announce(what: str, info: dict, workdir: Path, fs: str) -> None:
    """Every benchmark's header line (`what` it runs, then the machine) and its warnings."""
    print(f"{what}; {info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']}, "
          f"Postfix {info['postfix']}; load {info['load_average_at_start'][0]}; "
          f"workdir {workdir} ({fs})", flush=True)
    if info["load_average_at_start"][0] > 0.5:
        print("note: the machine is not idle; other work skews the figures", flush=True)
    if fs in ("tmpfs", "ramfs"):
        print("warning: the workdir is in memory: fsync costs nothing there", flush=True)


def summarise(runs: dict[str, list[Case]], labels: dict[str, str], messages: int,
              rate_heading: str) -> dict[str, float]:
    """The table every benchmark ends with: the median rate of each case (0 when any round
    failed), seconds and the relay's CPU; returns the medians by case."""
    summary, rates = [], {}
    manager = any("manager_cpu_percent" in r.extra for rs in runs.values() for r in rs)
    for c, rs in runs.items():
        ok_rates = [r.rate for r in rs if r.ok]
        med = statistics.median(ok_rates) if ok_rates and len(ok_rates) == len(rs) else 0.0
        rates[c] = med
        cpu = [r.extra.get("relay_cpu_percent") for r in rs if r.ok]
        summary.append({"case": f"({c}) {labels[c]}", "rate": f"{med:,.0f}" if med else "FAILED",
                        "seconds": f"{messages / med:.1f}" if med else "",
                        "cpu": f"{statistics.median(cpu):.0f}%" if cpu and None not in cpu
                        else ""})
        own = [r.extra["manager_cpu_percent"] for r in rs if r.ok and "manager_cpu_percent" in r.extra]
        summary[-1]["own"] = f"{statistics.median(own):.0f}%" if own else ""
    print()
    print_table(summary, [("case", "case"), ("rate", rate_heading), ("seconds", "seconds"),
                          ("cpu", "relay CPU")] + ([("own", "engine process CPU")] if manager else []))
    return rates


def parse_delivery_args(doc: str, letters: str, timeout_help: str, parse_setting,
                        argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The options of the benchmarks that deliver to sinks (relay, drain): the load, Postfix's
    in_flow_delay, the wait for the sinks, the run options; returns them and the cases chosen.
    SIGTERM then ends the run through its cleanups."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(ap, letters, "extra engine setting for (a), e.g. "
                       "limits.max_connections_per_host=20", parse_setting)
    ap.add_argument("--postfix-in-flow-delay", default="1s",
                    help="Postfix's in_flow_delay (its default, 1s)")
    ap.add_argument("--timeout", type=float, default=600.0, help=timeout_help)
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    cases = [c for c in letters if c in args.cases]
    if not cases or set(args.cases) - set(letters):
        ap.error(f"--cases takes letters from {letters}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return args, cases


def run_rounds(cases: list[str], repeat: int, labels: dict[str, str], run_case,
               unit: str = "msg/s") -> dict[str, list[Case]]:
    """Every case `repeat` times, interleaved (a b c a b c ...), each result printed."""
    runs: dict[str, list[Case]] = {c: [] for c in cases}
    for r in range(repeat):
        for c in cases:
            print(f"  run {r + 1}/{repeat} ({c}) {labels[c]} ...", end=" ", flush=True)
            res = run_case(c)
            runs[c].append(res)
            note = res.check if res.ok else (res.error or res.check or "?").splitlines()[0]
            print(f"{res.rate:,.0f} {unit}" if res.ok else "FAILED", f"({note})", flush=True)
    return runs
