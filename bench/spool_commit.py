"""How fast can the spool commit messages? Stores per second for N concurrent writers.

Each writer is an asyncio task storing 4 KiB messages in a loop, as SMTP sessions do. For each
flush strategy of `mailengine.spool.Spool` it prints stores/s, syncs (flushes) per second,
messages per sync, the store() latency (median, 99th percentile), and the CPU time per message
of the whole process (event loop and flusher; the figure that matters on a busy machine):

  syncfs       one syncfs(2) of the spool's file system per round (two-phase, pipelined)
  fdatasync    fdatasync(2) of every new file and fsync(2) of each directory, in a thread pool
               (two-phase, pipelined), so the journal commits many of them together
  fdatasync-1  the same with one thread: what an fsync per file costs without overlap
  syncfs-1ph   (c) one phase: rename first, then one syncfs; half the latency, but a crash
               in the sync can leave an .inf without its data (why the spool does not do it)
  memory       durable=False: no sync at all (relay_via_disk off): the cost of the writes

  python bench/spool_commit.py                      # all strategies, 1/10/100/300 writers
  python bench/spool_commit.py --writers 100 --seconds 5 --strategies syncfs,fdatasync
  python bench/spool_commit.py --dir /var/spool/x   # measure the disk the spool will use
  python bench/spool_commit.py --primitive          # only the sync primitives, per batch
  nice -n -5 python bench/spool_commit.py --wait-idle 80   # on a machine shared with others

The temporary spool is created in --dir (default: the system temp dir) and removed afterwards:
measure on the file system that will hold mailq/.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mailengine.envelope import Message  # noqa: E402
from mailengine.spool import Spool  # noqa: E402

ALL = ("syncfs", "fdatasync", "fdatasync-1", "syncfs-1ph", "memory")


async def run(strategy: str, root: Path, writers: int, seconds: float, size: int) -> dict:
    if strategy == "memory":
        spool = Spool(root, durable=False)
    elif strategy == "fdatasync-1":
        spool = Spool(root, strategy="fdatasync", fdatasync_threads=1)
    elif strategy == "syncfs-1ph":
        spool = Spool(root, durable=False)  # writes and renames at once ...
        barrier = Spool(root, strategy="syncfs")  # ... then one syncfs for the batch
    else:
        spool = Spool(root, strategy=strategy)
    spool.ensure_dirs()
    body = b"X" * (size - 2) + b"\r\n"
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def writer(n: int) -> None:
        while time.perf_counter() < stop:
            msg = Message(id="", mail_from="bench@example.com",
                          rcpt_to_send=[f"r{n}@example.net"])
            t0 = time.perf_counter()
            await spool.store(msg, body, "working")
            if strategy == "syncfs-1ph":
                await barrier.sync()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    c0 = time.process_time()
    async with asyncio.TaskGroup() as tg:
        for n in range(writers):
            tg.create_task(writer(n))
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    spool.close()
    flushes = spool.flushes
    if strategy == "syncfs-1ph":
        barrier.close()
        flushes = barrier.flushes
    # A figure counts only if every store that returned is really there, whole: .dat and .inf
    # (a spool that answered before committing would look very fast here).
    names = os.listdir(root / "working")
    infs = sum(n.endswith(".inf") for n in names)
    dats = sum(n.endswith(".dat") for n in names)
    if infs != len(latencies) or dats != len(latencies) or len(names) != 2 * len(latencies):
        raise SystemExit(f"{strategy}/{writers}: {len(latencies)} stores returned but "
                         f"working/ holds {infs} .inf, {dats} .dat, {len(names)} files: "
                         "the spool acknowledged stores it had not committed")
    latencies.sort()
    return {
        "stores_s": len(latencies) / elapsed,
        "flushes_s": flushes / elapsed,
        "per_flush": len(latencies) / flushes if flushes else float("nan"),
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "cpu_us": cpu / len(latencies) * 1e6,
    }


def primitive(root: Path, sizes: list[int], repeat: int, size: int) -> None:
    """Time only the sync primitive: make a batch of K new messages (a 4 KiB `.dat` and a small
    `.inf`, created then renamed, as a store does) durable, by syncfs or by fdatasync of every
    file plus fsync of the directory. The batches alternate between the two primitives, so both
    see the same disk and the same neighbours; this is the part of a store that differs between
    the strategies (the rest is the same CPU work)."""
    from concurrent.futures import ThreadPoolExecutor
    from mailengine.group_commit import _syncfs
    pool = ThreadPoolExecutor(32)
    d = root / "working"
    d.mkdir(parents=True)
    dfd = os.open(d, os.O_RDONLY)
    body, inf = b"X" * size, b"mailfrom=a@b.example\nrcpttosend=c@d.example\n"
    seq = iter(range(10**9))
    times: dict[tuple[str, int], list[float]] = {}

    def write(k: int, keep: bool) -> list[tuple[int, str, str]]:
        out = []
        for _ in range(k):
            n = next(seq)
            fd1 = os.open(d / f"{n}.dat", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd1, body)
            fd2 = os.open(d / f"{n}.inf.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd2, inf)
            for fd in (fd1, fd2):
                if keep:
                    out.append(fd)
                else:
                    os.close(fd)
            out.append((d / f"{n}.inf.tmp", d / f"{n}.inf"))
        return out

    for _ in range(repeat):
        for k in sizes:
            for how in ("syncfs", "fdatasync"):
                items = write(k, keep=how == "fdatasync")
                fds = [x for x in items if isinstance(x, int)]
                renames = [x for x in items if not isinstance(x, int)]
                t0 = time.perf_counter()
                if how == "syncfs":  # two phases, as the spool does: data, then renames
                    _syncfs(dfd)
                    for a, b in renames:
                        os.rename(a, b)
                    _syncfs(dfd)
                else:
                    list(pool.map(os.fdatasync, fds))
                    for a, b in renames:
                        os.rename(a, b)
                    os.fsync(dfd)
                times.setdefault((how, k), []).append(time.perf_counter() - t0)
                for fd in fds:
                    os.close(fd)
    print(f"{'primitive':<10} {'batch':>6} {'median ms':>10} {'best ms':>8} {'msg/s at median':>16}")
    for k in sizes:
        for how in ("syncfs", "fdatasync"):
            ts = sorted(times[(how, k)])
            med = ts[len(ts) // 2]
            print(f"{how:<10} {k:>6} {med * 1000:>10.2f} {ts[0] * 1000:>8.2f} {k / med:>16.0f}")
    os.close(dfd)
    pool.shutdown()


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v), v[3] + v[4]  # total, idle + iowait


def wait_idle(pct: float, limit: float = 60.0) -> None:
    """Wait until the CPUs were at least `pct` % idle over half a second (at most `limit` s)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        t0, i0 = _cpu_times()
        time.sleep(0.5)
        t1, i1 = _cpu_times()
        if t1 > t0 and (i1 - i0) * 100 / (t1 - t0) >= pct:
            return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", default="1,10,100,300", help="comma list of writer counts")
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each run")
    ap.add_argument("--size", type=int, default=4096, help="message size in bytes")
    ap.add_argument("--strategies", default=",".join(ALL))
    ap.add_argument("--dir", default=None, help="where to create the temporary spool")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="PCT",
                    help="before each run, wait (up to 60 s) for the CPUs to be PCT %% idle")
    ap.add_argument("--repeat", type=int, default=5,
                    help="rounds: runs per line")
    ap.add_argument("--pick", choices=("best", "median"), default="best",
                    help="which run of each line to print (by stores/s); other work on the "
                         "machine only ever slows a run down, so the best is the fairest there")
    ap.add_argument("--primitive", action="store_true",
                    help="time only the sync primitives per batch (see primitive())")
    args = ap.parse_args()
    if args.primitive:
        root = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
        try:
            primitive(root, [int(w) for w in args.writers.split(",")], args.repeat * 4,
                      args.size)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return
    if args.uvloop:
        import uvloop
        uvloop.install()
    strategies = args.strategies.split(",")
    counts = [int(w) for w in args.writers.split(",")]
    # Rounds interleave the configurations, so that on a machine shared with other work each
    # one sees the same mix of busy and quiet moments.
    runs: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.repeat):
        for strategy in strategies:
            for writers in counts:
                if args.wait_idle:
                    wait_idle(args.wait_idle)
                root = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
                try:
                    r = asyncio.run(run(strategy, root, writers, args.seconds, args.size))
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                runs.setdefault((strategy, writers), []).append(r)
                print(f"round {rnd + 1}/{args.repeat} {strategy} {writers}: "
                      f"{r['stores_s']:.0f}/s", file=sys.stderr, flush=True)
        os.sync()  # the next round starts from a clean page cache
    print(f"{'strategy':<12} {'writers':>7} {'stores/s':>9} {'syncs/s':>8} {'msg/sync':>8} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'CPU µs/msg':>10}")
    for strategy in strategies:
        for writers in counts:
            rs = sorted(runs[(strategy, writers)], key=lambda x: x["stores_s"])
            r = rs[-1] if args.pick == "best" else rs[len(rs) // 2]
            print(f"{strategy:<12} {writers:>7} {r['stores_s']:>9.0f} {r['flushes_s']:>8.0f} "
                  f"{r['per_flush']:>8.1f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} "
                  f"{r['cpu_us']:>10.0f}")


if __name__ == "__main__":
    main()
