"""What a new file costs on the spool's file system, and what reusing a spare file costs instead.

Creates --deleted files in a fresh directory and deletes them (what a busy spool does all day),
then times, per file: creating a file (O_CREAT|O_EXCL, write 4 KiB, close), renaming an existing
file into place and overwriting it (what mailengine/spare.py does), and unlinking. On ext4 without
a journal, new inodes near recently deleted ones are expensive: the allocator checks every inode
deleted between 1 and 60-300 s ago (fs/ext4/ialloc.c, recently_deleted), so the first line
also depends on what was deleted on the disk in the last minutes.

  python3 bench/inode_alloc.py                 # in the system temp dir
  python3 bench/inode_alloc.py --dir /var/spool/mailengine --deleted 50000
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time


def timed(label: str, n: int, fn) -> None:
    t0, c0 = time.perf_counter(), os.times()
    for i in range(n):
        fn(i)
    t1, c1 = time.perf_counter(), os.times()
    print(f"{label:<44} {n / (t1 - t0):>9,.0f}/s  {(t1 - t0) / n * 1e6:>6.0f} µs wall"
          f"  {(c1.system - c0.system) / n * 1e6:>6.0f} µs kernel CPU")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to make the scratch directory")
    ap.add_argument("--deleted", type=int, default=20000, help="files deleted beforehand")
    ap.add_argument("--files", type=int, default=5000, help="files timed per operation")
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="inode-alloc-", dir=args.dir)
    work, spare = f"{base}/work", f"{base}/spare"
    os.mkdir(work)
    os.mkdir(spare)
    data = b"X" * 4096
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL

    def create(path: str) -> None:
        fd = os.open(path, flags, 0o644)
        os.write(fd, data)
        os.close(fd)

    try:
        timed("create (a new directory, the disk as it is)", args.files,
              lambda i: create(f"{work}/fresh{i}"))
        for i in range(args.files):
            os.rename(f"{work}/fresh{i}", f"{spare}/{i}")
        for i in range(args.deleted):
            create(f"{work}/old{i}")
        for i in range(args.deleted):
            os.unlink(f"{work}/old{i}")
        time.sleep(2)  # an inode freed in the current second is not "recent" to ext4; later it is
        timed(f"create, {args.deleted:,} files deleted 2 s ago", args.files,
              lambda i: create(f"{work}/new{i}"))

        def reuse(i: int) -> None:
            os.rename(f"{spare}/{i}", f"{work}/reused{i}")
            fd = os.open(f"{work}/reused{i}", os.O_WRONLY)
            os.write(fd, data)
            os.ftruncate(fd, len(data))
            os.close(fd)
        timed("reuse a spare file (rename, overwrite)", args.files, reuse)
        timed("give it back (rename into spare/)", args.files,
              lambda i: os.rename(f"{work}/reused{i}", f"{spare}/{i}"))
        timed("unlink", args.files, lambda i: os.unlink(f"{work}/new{i}"))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
