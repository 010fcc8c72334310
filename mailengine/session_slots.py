"""One inbound session count for all intake processes, so `max_inbound_connections` holds for
the engine as a whole.

The kernel's SO_REUSEPORT spread over the intake processes is not even (it hashes each client's
address and port), so a cap cut into equal shares refuses sessions while other processes have
room. Instead the engine makes a small shared memory file (memfd) of counters, one slot per
intake process it starts, and passes it to each. A process admits a session only while the sum of
all slots is below the cap: the sum and its own increment happen under one `lockf` lock on the
file, so two processes cannot both take the last place. A session's end lowers the process's own
slot (one writer per slot, an aligned 8-byte store: no lock needed). When a process ends, however
it ends, the engine zeroes its slot and gives the slot to a later process: the sessions of a
process killed with SIGKILL are gone with it.

`max_connections_per_ip` is counted the same way: each slot also holds ADDRESS_BUCKETS
counters, one per hash of a client address, and a session is admitted while the sum of its
address's bucket over all slots is below the limit. Two addresses that share a bucket count
together, which can only refuse early, never admit more (with 4096 buckets, rarely).

Linux only (memfd); elsewhere each process keeps its equal share of both limits, as before.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import zlib

SLOT = struct.Struct("q")
BUCKET = struct.Struct("i")
ADDRESS_BUCKETS = 4096
# One slot: its session count, then its per-address buckets.
SLOT_SIZE = SLOT.size + BUCKET.size * ADDRESS_BUCKETS


def address_bucket(address: str) -> int:
    """The same bucket for the same address in every process (str hashes are salted per
    process, so not hash())."""
    return zlib.crc32(address.encode()) % ADDRESS_BUCKETS


class SessionSlots:
    """The engine's side: the shared file and which slots are in use."""

    def __init__(self, slots: int):
        self.slots = slots
        self.fd = os.memfd_create("mailengine-inbound-sessions")
        os.ftruncate(self.fd, SLOT_SIZE * slots)
        self.map = mmap.mmap(self.fd, SLOT_SIZE * slots)
        self.free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest first

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
        self.map[slot * SLOT_SIZE:(slot + 1) * SLOT_SIZE] = bytes(SLOT_SIZE)

    def total(self) -> int:
        return sum(SLOT.unpack_from(self.map, i * SLOT_SIZE)[0] for i in range(self.slots))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class SharedSessionCount:
    """An intake process's side: admit against the engine-wide counts, release at session end."""

    def __init__(self, fd: int, slot: int):
        self.fd = fd
        size = os.fstat(fd).st_size
        self.slots = size // SLOT_SIZE
        self.offset = slot * SLOT_SIZE
        self.map = mmap.mmap(fd, size)

    def try_admit(self, cap: int) -> bool:
        with self._locked():
            if self._sum(0, SLOT) >= cap:
                return False
            self._add(0, SLOT, 1)
            return True

    def add_exempt(self) -> None:
        """A session admitted past the cap (inbound_priority_ips) still counts for the others."""
        self._add(0, SLOT, 1)

    def release(self) -> None:
        self._add(0, SLOT, -1)

    def try_admit_address(self, address: str, limit: int) -> bool:
        """Count a session of `address` unless the engine holds `limit` of its bucket already
        (limit 0: count it whatever the others hold; exempt addresses)."""
        at = SLOT.size + BUCKET.size * address_bucket(address)
        with self._locked():
            if limit and self._sum(at, BUCKET) >= limit:
                return False
            self._add(at, BUCKET, 1)
            return True

    def release_address(self, address: str) -> None:
        self._add(SLOT.size + BUCKET.size * address_bucket(address), BUCKET, -1)

    # A slot's counters have one writer (their process), so changes need no lock; the lock
    # makes a sum and the increment that depends on it one step for all processes.
    def _locked(self):
        return _Lock(self.fd)

    def _sum(self, at: int, fmt: struct.Struct) -> int:
        return sum(fmt.unpack_from(self.map, i * SLOT_SIZE + at)[0] for i in range(self.slots))

    def _add(self, at: int, fmt: struct.Struct, n: int) -> None:
        (v,) = fmt.unpack_from(self.map, self.offset + at)
        fmt.pack_into(self.map, self.offset + at, v + n)


class _Lock:
    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN)
