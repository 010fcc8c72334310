"""One inbound session count for all intake processes, so `max_inbound_connections` and
`max_connections_per_ip` hold for the engine as a whole.

The kernel's SO_REUSEPORT spread over the intake processes is not even (it hashes each client's
address and port), so a cap cut into equal shares refuses sessions while other processes have
room. Instead the engine makes a small shared memory file (memfd) of counters, one slot per
intake process it starts, and passes it to each. A process admits a session only while the sum
of all slots is below the cap: the sums and its own increments happen under one `lockf` lock on
the file, so two processes cannot both take the last place. A session's end lowers the process's
own counters (one writer per counter, an aligned store: no lock needed). When a process ends,
however it ends, the engine zeroes its slot and gives the slot to a later process: the sessions
of a process killed with SIGKILL are gone with it.

`max_connections_per_ip` is counted the same way, in ADDRESS_BUCKETS counters per slot, one per
hash of a client address: a session is admitted while the sum of its address's bucket over all
slots is below the limit. Two addresses that share a bucket count together, which can only
refuse early, never admit more (with 4096 buckets, rarely).

The layout keeps what one admission sums contiguous, so each sum is one unpack: the session
counts of all slots (int64 each), then for each bucket the counters of all slots (int32 each).

Linux only (memfd); elsewhere each process keeps an equal share of both limits.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import zlib

ADDRESS_BUCKETS = 4096
COUNT = struct.Struct("q")
BUCKET = struct.Struct("i")


def address_bucket(address: str) -> int:
    """The same bucket for the same address in every process (str hashes are salted per
    process, so not hash())."""
    return zlib.crc32(address.encode()) % ADDRESS_BUCKETS


class _Layout:
    def __init__(self, slots: int):
        self.slots = slots
        self.counts = struct.Struct(f"{slots}q")  # every slot's session count
        self.row = struct.Struct(f"{slots}i")  # every slot's counter of one address bucket
        self.size = self.counts.size + ADDRESS_BUCKETS * self.row.size

    def count_at(self, slot: int) -> int:
        return slot * COUNT.size

    def bucket_at(self, bucket: int, slot: int = 0) -> int:
        return self.counts.size + bucket * self.row.size + slot * BUCKET.size


class SessionSlots:
    """The engine's side: the shared file and which slots are in use."""

    def __init__(self, slots: int):
        self.layout = _Layout(slots)
        self.fd = os.memfd_create("mailengine-inbound-sessions")
        os.ftruncate(self.fd, self.layout.size)
        self.map = mmap.mmap(self.fd, self.layout.size)
        self.free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest first

    @property
    def slots(self) -> int:
        return self.layout.slots

    @classmethod
    def make(cls, slots: int) -> "SessionSlots | None":
        """None where the system has no memfd (not Linux): processes then share the caps out."""
        try:
            return cls(slots)
        except (AttributeError, OSError):
            return None

    def take(self) -> int | None:
        """A slot for a new process, zeroed; None when all are in use (the new process then
        counts its sessions against its equal share alone)."""
        if not self.free:
            return None
        slot = self.free.pop()
        self._zero(slot)
        return slot

    def give_back(self, slot: int) -> None:
        """The process holding `slot` has ended: its sessions ended with it."""
        self._zero(slot)
        self.free.append(slot)

    def _zero(self, slot: int) -> None:
        lay = self.layout
        COUNT.pack_into(self.map, lay.count_at(slot), 0)
        for b in range(ADDRESS_BUCKETS):
            BUCKET.pack_into(self.map, lay.bucket_at(b, slot), 0)

    def total(self) -> int:
        return sum(self.layout.counts.unpack_from(self.map, 0))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class SharedSessionCount:
    """An intake process's side: admit against the engine-wide counts, release at session end."""

    def __init__(self, fd: int, slot: int):
        self.fd = fd
        size = os.fstat(fd).st_size
        slots = (size // (COUNT.size + ADDRESS_BUCKETS * BUCKET.size))
        self.layout = _Layout(slots)
        self.slot = slot
        self.map = mmap.mmap(fd, size)

    def admit(self, address: str, cap: int, limit: int, over_cap_ok: bool,
              over_limit_ok: bool) -> str | None:
        """Count a session of `address` unless the engine holds `cap` sessions (and this one is
        not `over_cap_ok`) or `limit` of its address's bucket (0: no limit; `over_limit_ok`:
        exempt). None when counted, else "cap" or "address"."""
        lay = self.layout
        at = lay.bucket_at(address_bucket(address))
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if not over_cap_ok and sum(lay.counts.unpack_from(self.map, 0)) >= cap:
                return "cap"
            if limit and not over_limit_ok and sum(lay.row.unpack_from(self.map, at)) >= limit:
                return "address"
            self._add(address, 1)
            return None
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def release(self, address: str) -> None:
        self._add(address, -1)

    def _add(self, address: str, n: int) -> None:
        # this process's own counters: one writer each, so no lock is needed to change them
        lay, m = self.layout, self.map
        at = lay.count_at(self.slot)
        COUNT.pack_into(m, at, COUNT.unpack_from(m, at)[0] + n)
        at = lay.bucket_at(address_bucket(address), self.slot)
        BUCKET.pack_into(m, at, BUCKET.unpack_from(m, at)[0] + n)
