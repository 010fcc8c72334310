"""bench/fakenet: a mailing through a simulated internet, MailEngine against Postfix.

    python bench/fakenet.py [--messages 5000] [--domains 1000] [--latency 20-200] [--quick]
                            [--cases acb] [--time-scale 300] [--set KEY=VALUE ...]
                            [--shaping bench/fakenet_shaping.toml]

The internet is mailengine/testing/fakenet.py's `standard_internet()`: providers like Gmail,
Yahoo and Outlook (connection caps and message rates per client IP, answered with provider-like
`421 4.7.x`), a greylisting ISP, one that tarpits the data, small hosters, each on its own
loopback address (NET.1 to NET.9, port 25), and DOMAINS domains whose MX records (a real DNS
server, dnsmasq on NET.53:53) point at them. MESSAGES messages, one recipient each, spread over
the domains as a real list is (half of them at the big three), are queued in each relay while it
holds its mail, then released; the clock runs from the release until every recipient is final
(delivered, or failed for good: the fakenet's unknown users answer `550 5.1.1`):

  (a) MailEngine with its defaults (`basic.nameservers` = the loopback DNS server), filled over
      SMTP with `queue.pause_sending = true`, released with `config.set` on the control socket;
      finality read from log/events.jsonl
  (c) the same MailEngine with traffic shaping rules for these providers (`--shaping`, by
      default bench/fakenet_shaping.toml, copied to HOME/shaping.toml with its retry_intervals
      scaled as below): what a sender who wrote a shaping.toml for them gets
  (b) a private Postfix (bench/postfix.py) with its defaults for delivery (destination
      concurrency 20, process limit 100, connection cache on demand), resolving MX records
      through the same DNS server (Postfix asks /etc/resolv.conf's server on port 53: it is
      started in a mount namespace of its own where /etc/resolv.conf names NET.53), filled with
      `defer_transports = smtp`, released by emptying it, `postfix reload` and `postqueue -f`
      (the reload is inside the timed span); finality read from its log

Retry intervals are shortened for both by --time-scale (300: five minutes of the real schedule
are a second here): MailEngine's `queue.retry_intervals` (30, 120, 240, 480, 960 minutes) and
`queue.queue_check_interval`; Postfix's `minimal_backoff_time` (300 s), `maximal_backoff_time`
(4000 s) and `queue_run_delay` (300 s); the greylisting delay is 300 s scaled the same way. The
output says the values used.

For each relay it prints: seconds until all are final, recipients delivered and failed,
throttling replies provoked (421 over a connection cap or a message rate), greylisting replies,
connections opened, deliveries per connection, and whether every message ended exactly once
(each deliverable recipient accepted once by the fakenet and reported sent by the relay, each
unknown one reported failed, none accepted twice). Results go to bench/results/fakenet-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (ENGINE_DEFAULTS, Case, add_run_arguments, announce,  # noqa: E402
                    machine_info, print_table, ratio, run_workdir, write_results)
from intake import parse_setting  # noqa: E402
from postfix import POSTCONF, PostfixInstance  # noqa: E402

from mailengine.testing.dnsserver import TestDNSServer  # noqa: E402
from mailengine.testing.fakenet import Internet, standard_internet  # noqa: E402

CASES = {"a": "MailEngine", "c": "MailEngine, shaping.toml", "b": "Postfix"}
SHAPING_FILE = Path(__file__).resolve().parent / "fakenet_shaping.toml"
SENDER_LOCAL = "news"
ENGINE_RETRY_MINUTES = [30, 120, 240, 480, 960]   # queue.retry_intervals' default
ENGINE_QUEUE_CHECK = 600                          # queue.queue_check_interval's default (s)
POSTFIX_BACKOFF = {"minimal_backoff_time": 300, "maximal_backoff_time": 4000,
                   "queue_run_delay": 300}        # Postfix's defaults (s)
GREYLIST_SECONDS = 300                            # a common greylisting delay (s)
FILL_THREADS = 4


def parse_latency(text: str) -> tuple[float, float]:
    """'20-200' (milliseconds) -> (0.02, 0.2); '50' -> (0.05, 0.05)."""
    lo, _, hi = text.partition("-")
    try:
        a, b = float(lo), float(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MS or LO-HI in milliseconds, not {text!r}")
    if a < 0 or b < a:
        raise argparse.ArgumentTypeError(f"latency {text!r}: need 0 <= LO <= HI")
    return a / 1000, b / 1000


def message(i: int, case: str, sender: str, rcpt: str) -> tuple[str, bytes]:
    mid = f"<fakenet-{case}-{i}@{sender.partition('@')[2]}>"
    body = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: issue {i}\r\nMessage-ID: {mid}\r\n\r\n"
            + "This is the newsletter.\r\n" * 40)
    return mid, body.encode()


def fill(port: int, sender: str, rcpts: list[str], case: str) -> None:
    """Queue one message per recipient over SMTP, FILL_THREADS connections at once."""
    errors: list[str] = []

    def worker(k: int) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
                for i in range(k, len(rcpts), FILL_THREADS):
                    _, data = message(i, case, sender, rcpts[i])
                    s.sendmail(sender, [rcpts[i]], data)
        except Exception as e:  # reported below, with the relay's name
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(FILL_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"filling the queue failed: {errors[0]}")


class LogFollower:
    """Reads a growing log from where it stopped; finals() feeds each new line to `parse`."""

    def __init__(self, path: Path, parse) -> None:
        self.path, self.parse, self.offset, self.rest = path, parse, 0, b""
        self.final: dict[str, str] = {}   # rcpt -> "sent" | "failed"

    def update(self) -> dict[str, str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.final
        self.offset += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            got = self.parse(line.decode("utf-8", "replace"))
            if got:
                self.final.setdefault(got[0].lower(), got[1])
        return self.final


def engine_event(line: str):
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if rec.get("event") == "attempt" and rec.get("final"):
        return rec["rcpt"], "sent" if rec.get("result") == "sent" else "failed"
    return None


POSTFIX_FINAL = re.compile(r"\bto=<([^>]*)>.*\bstatus=(sent|bounced|expired)\b")


def postfix_event(line: str):
    m = POSTFIX_FINAL.search(line)
    if m:
        return m.group(1), "sent" if m.group(2) == "sent" else "failed"
    return None


def wait_final(follower: LogFollower, rcpts: set[str], timeout: float, alive) -> tuple[float, int]:
    """Seconds until every recipient is final (or the timeout); and how many are not."""
    t0 = time.perf_counter()
    while True:
        final = follower.update()
        left = sum(1 for r in rcpts if r not in final)
        if not left or time.perf_counter() - t0 > timeout or not alive():
            return time.perf_counter() - t0, left
        time.sleep(0.1)


def judge(result: Case, internet: Internet, rcpts: list[str], case: str, final: dict,
          before: dict, after: dict) -> None:
    """Fill the result's figures from the fakenet's counts and the relay's finals."""
    net = internet.net
    accepted = net.accepted()
    lost = dup = wrong = given_up = sent = failed = pending = 0
    for i, r in enumerate(rcpts):
        mid, _ = message(i, case, f"{SENDER_LOCAL}@{internet.sender_domain}", r)
        n = accepted.get((mid, r.lower()), 0)
        unknown = net.provider_of(r).is_unknown(r)
        verdict = final.get(r.lower())
        sent += verdict == "sent"
        failed += verdict == "failed"
        if n > 1:
            dup += 1
        if unknown:
            wrong += n > 0 or verdict == "sent"
        elif n == 0:
            if verdict == "failed":
                given_up += 1   # finally failed, and said so: not lost, but not delivered
            elif verdict is None:
                pending += 1    # still queued at the timeout: neither delivered nor lost
            else:
                lost += 1
        elif verdict != "sent":
            wrong += 1          # delivered, but the relay does not say so
    per = {}
    totals = dict(connections=0, throttling=0, greylisted=0, unknown=0, transactions=0,
                  notices=0)
    for name, st in after.items():
        b = before[name]
        row = dict(connections=st.connections - b.connections,
                   throttling=st.throttling - b.throttling,
                   greylisted=st.greylisted - b.greylisted, unknown=st.unknown - b.unknown,
                   transactions=st.transactions - b.transactions,
                   notices=st.notices - b.notices,
                   peak=st.peak_connections)
        per[name] = row
        for k in totals:
            totals[k] += row[k]
    exact = lost == 0 and dup == 0 and wrong == 0
    result.extra.update(
        sent=sent, failed=failed, lost=lost, duplicates=dup, wrong=wrong, given_up=given_up,
        pending=pending,
        exactly_once=exact, per_provider=per, **totals,
        per_connection=(totals["transactions"] / totals["connections"]
                        if totals["connections"] else 0.0))
    result.ok = exact and given_up == 0 and pending == 0 and not result.error
    result.check = ("every message exactly once" if exact else
                    f"NOT exactly once: {lost} lost, {dup} duplicated, {wrong} misreported")
    if given_up:
        result.check += f"; {given_up} given up after the last retry"
    if pending:
        result.check += f"; {pending} still queued at the timeout"


def settle(net, seconds: float = 1.0) -> None:
    """Let connections the relay keeps open for reuse close (their counts land at close)."""
    time.sleep(seconds)


def scaled_shaping(text: str, scale: float) -> str:
    """A shaping.toml with every `retry_intervals = [...]` (minutes) divided by the time scale,
    as queue.retry_intervals is."""
    def scaled(m: re.Match) -> str:
        return m.group(1) + json.dumps([float(x) / scale for x in json.loads(m.group(2))])
    return re.sub(r"^(\s*retry_intervals\s*=\s*)(\[[^\]]*\])", scaled, text, flags=re.M)


def run_engine(args, internet: Internet, dns: TestDNSServer, rcpts: list[str],
               workdir: Path, case: str = "a") -> Case:
    from mailengine import control
    from mailengine.testing.engine import RunningEngine

    result = Case(case, CASES[case], messages=len(rcpts))
    home = Path(tempfile.mkdtemp(prefix="engine-fakenet-", dir=workdir))
    if case == "c":
        home.mkdir(parents=True, exist_ok=True)
        (home / "shaping.toml").write_text(
            scaled_shaping(Path(args.shaping).read_text(), args.time_scale))
    settings = {**ENGINE_DEFAULTS, "basic.nameservers": [dns.address],
                "queue.pause_sending": True, "logging.stats_interval": 0,
                "queue.retry_intervals": [m / args.time_scale for m in ENGINE_RETRY_MINUTES],
                "queue.queue_check_interval": max(0.1, ENGINE_QUEUE_CHECK / args.time_scale),
                **dict(args.set)}
    sender = f"{SENDER_LOCAL}@{internet.sender_domain}"
    eng = RunningEngine(home, settings)
    try:
        eng.start()
        fill(eng.smtp_port, sender, rcpts, case)
        follower = LogFollower(home / "log" / "events.jsonl", engine_event)
        internet.net.reset()
        before = internet.net.stats()
        control.request(home / "mailengine.sock", "config.set", name="queue.pause_sending",
                        value=False)
        result.seconds, left = wait_final(follower, {r.lower() for r in rcpts}, args.timeout,
                                          lambda: eng.proc.poll() is None)
        if left:
            result.error = f"{left} recipients not final after {result.seconds:.0f}s"
        settle(internet.net)
        eng.stop()
        judge(result, internet, rcpts, case, follower.update(), before, internet.net.stats())
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}\n{eng.read_output()[-1500:] if eng.proc else ''}"
    finally:
        eng.stop()
    return result


class NamespacedPostfix(PostfixInstance):
    """A private Postfix started in a mount namespace of its own, where /etc/resolv.conf names
    only the benchmark's DNS server (Postfix cannot be given a resolver's port); its daemons,
    forked by its master, stay in that namespace. The machine's own file is untouched."""

    def __init__(self, *a, resolv_conf: Path, **kw) -> None:
        super().__init__(*a, **kw)
        self.resolv_conf = resolv_conf

    def _postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        if args[:1] != ("start",):
            return super()._postfix(*args, timeout=timeout)
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script, str(self.resolv_conf), "/usr/sbin/postfix", "-c",
                               str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"postfix {' '.join(args)} (in its namespace) failed "
                               f"({proc.returncode}):\n{proc.stdout}{proc.stderr}"
                               f"{self.log_tail()}")
        return proc


def postfix_settings(args) -> dict:
    scaled = {k: f"{max(1, round(v / args.time_scale))}s" for k, v in POSTFIX_BACKOFF.items()}
    return {
        "relayhost": "",
        "smtp_dns_support_level": "enabled",
        "smtp_host_lookup": "dns",
        "defer_transports": "smtp",
        # Postfix's own defaults where bench/postfix.py's relay mode sets others.
        "default_destination_concurrency_limit": "20",
        "smtp_destination_concurrency_limit": "$default_destination_concurrency_limit",
        "smtp_connection_cache_time_limit": "2s",
        **scaled,
    }


def run_postfix(args, internet: Internet, dns: TestDNSServer, rcpts: list[str],
                workdir: Path) -> Case:
    result = Case("b", CASES["b"], messages=len(rcpts))
    resolv = workdir / "resolv.conf"
    resolv.write_text(f"nameserver {dns.host}\noptions timeout:1 attempts:2\n")
    os.chmod(resolv, 0o644)
    sender = f"{SENDER_LOCAL}@{internet.sender_domain}"
    try:
        with NamespacedPostfix(mode="relay", relay_to="127.0.0.1:9", base_dir=workdir, keep=True,
                               process_limit=100, extra_main=postfix_settings(args),
                               resolv_conf=resolv) as pf:
            fill(pf.port, sender, rcpts, "b")
            held = pf.wait_queue(len(rcpts), timeout=120)
            pf.wait_settled(timeout=120)
            if held < len(rcpts):
                raise RuntimeError(f"{held} of {len(rcpts)} in its queue before the release")
            follower = LogFollower(pf.maillog, postfix_event)
            follower.update()           # skip what was logged while filling
            follower.final.clear()
            internet.net.reset()
            before = internet.net.stats()
            etc = str(pf.config_dir)
            t0 = time.perf_counter()
            subprocess.run([POSTCONF, "-c", etc, "-e", "defer_transports ="], check=True)
            pf._postfix("reload")
            time.sleep(0.5)
            subprocess.run(["postqueue", "-c", etc, "-f"], check=True,
                           env={**os.environ, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
            spent = time.perf_counter() - t0
            seconds, left = wait_final(follower, {r.lower() for r in rcpts},
                                       max(1.0, args.timeout - spent), lambda: True)
            result.seconds = spent + seconds
            if left:
                result.error = f"{left} recipients not final after {result.seconds:.0f}s"
            settle(internet.net, 2.5)  # its connection cache holds connections 2 s
            judge(result, internet, rcpts, "b", follower.update(), before,
                  internet.net.stats())
    except Exception as e:
        result.error = result.error or f"{type(e).__name__}: {e}"
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--domains", type=int, default=1000)
    ap.add_argument("--latency", type=parse_latency, default=(0.02, 0.2), metavar="LO-HI",
                    help="milliseconds per reply round trip, uniform (default 20-200)")
    ap.add_argument("--quick", action="store_true",
                    help="a small run to see that it all works (300 messages, 100 domains, "
                         "latency 5-20 ms), unless given otherwise")
    ap.add_argument("--time-scale", type=float, default=None,
                    help="retry intervals and greylisting divided by this (default 300: "
                         "MailEngine's first retry after 6 s, Postfix's after 1 s)")
    ap.add_argument("--net", default="127.0.1", help="the first three octets of the providers' "
                    "loopback addresses (default 127.0.1: NET.1-9, DNS on NET.53)")
    ap.add_argument("--cases", default="acb",
                    help="a: MailEngine, c: MailEngine with --shaping, b: Postfix")
    ap.add_argument("--shaping", type=Path, default=SHAPING_FILE,
                    help="the shaping.toml of case (c) (default bench/fakenet_shaping.toml)")
    ap.add_argument("--set", action="append", type=parse_setting, default=[],
                    metavar="SECTION.KEY=VALUE", help="extra engine setting for (a)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds to wait for every recipient to be final")
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        if "--messages" not in given:
            args.messages = 300
        if "--domains" not in given:
            args.domains = 100
        if "--latency" not in given:
            args.latency = (0.005, 0.02)
    args.time_scale = args.time_scale or 300.0
    cases = [c for c in "acb" if c in args.cases]
    if not cases or set(args.cases) - set("acb"):
        ap.error("--cases takes letters from acb")
    if not re.fullmatch(r"127\.\d{1,3}\.\d{1,3}", args.net):
        ap.error("--net must be three octets in 127.0.0.0/8, e.g. 127.0.1")
    if os.geteuid() != 0:
        ap.error("needs root: the providers listen on port 25, the DNS server on port 53")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    internet = standard_internet(args.domains, args.net, args.latency,
                                 greylist=GREYLIST_SECONDS / args.time_scale)
    rcpts = internet.recipients(args.messages)
    info = machine_info()
    scale = args.time_scale
    engine_retry = ", ".join(f"{m * 60 / scale:g}" for m in ENGINE_RETRY_MINUTES)
    pf = postfix_settings(args)
    runs: dict[str, Case] = {}
    with run_workdir("bench-fakenet-", args) as (workdir, fs):
        announce(f"bench/fakenet: {args.messages} messages over {len(internet.weights)} domains "
                 f"and {len(internet.net.providers) - 1} providers, latency "
                 f"{args.latency[0] * 1000:g}-{args.latency[1] * 1000:g} ms", info, workdir, fs)
        print(f"time scale {scale:g}: MailEngine retries after {engine_retry} s "
              f"(queue_check_interval {max(0.1, ENGINE_QUEUE_CHECK / scale):g} s); Postfix "
              f"minimal_backoff_time {pf['minimal_backoff_time']}, maximal_backoff_time "
              f"{pf['maximal_backoff_time']}, queue_run_delay {pf['queue_run_delay']}; "
              f"greylisting {GREYLIST_SECONDS / scale:g} s", flush=True)
        with TestDNSServer(internet.net.zones(), host=f"{args.net}.53", port=53) as dns, \
                internet.net:
            for c in cases:
                print(f"  ({c}) {CASES[c]} ...", end=" ", flush=True)
                if c == "b":
                    res = run_postfix(args, internet, dns, rcpts, workdir)
                else:
                    res = run_engine(args, internet, dns, rcpts, workdir, c)
                runs[c] = res
                print(f"{res.seconds:.1f} s" if not res.error else "FAILED",
                      f"({res.check or res.error.splitlines()[0]})", flush=True)
                if res.error and res.check:
                    print(f"      {res.error.splitlines()[0]}")
    rows = []
    for c, r in runs.items():
        x = r.extra
        rows.append({"case": f"({c}) {CASES[c]}",
                     "seconds": (f"> {r.seconds:.0f}" if x.get("pending") else
                                 f"{r.seconds:.1f}") if "sent" in x else "",
                     "sent": x.get("sent", ""), "failed": x.get("failed", ""),
                     "given_up": x.get("given_up", ""),
                     "throttling": x.get("throttling", ""), "greylisted": x.get("greylisted", ""),
                     "connections": x.get("connections", ""),
                     "per_conn": f"{x['per_connection']:.1f}" if "per_connection" in x else "",
                     "once": ("NO" if not x.get("exactly_once") else
                              f"{x['pending']} still queued" if x.get("pending") else
                              "yes") if "sent" in x else ""})
    print()
    print_table(rows, [("case", "relay"), ("seconds", "s to all final"), ("sent", "sent"),
                       ("failed", "failed"), ("given_up", "of them given up"),
                       ("throttling", "421s provoked"),
                       ("greylisted", "greylisted"), ("connections", "connections"),
                       ("per_conn", "deliveries/conn"), ("once", "exactly once")])
    for c, r in runs.items():
        per = r.extra.get("per_provider", {})
        if per:
            print(f"({c}) per provider: " + "; ".join(
                f"{n} {p['connections']} conn, {p['throttling']} 421, peak {p['peak']}"
                for n, p in per.items() if n != "home"))
    b = runs.get("b")
    for c in "ac":
        a = runs.get(c)
        if a and b and a.ok and b.ok:
            print(f"({c}) Postfix/MailEngine time {ratio(b.seconds, a.seconds):.2f} (goal >= 3); "
                  f"MailEngine/Postfix 421s {a.extra['throttling']}/{b.extra['throttling']} "
                  "(goal <= 0.1)")
    if not args.no_save:
        path = write_results("fakenet", {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": info, "runs": {c: vars(r) for c, r in runs.items()}})
        print(f"results: {path}")
    return 0 if runs and all(r.ok for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
