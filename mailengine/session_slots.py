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

Linux only (memfd); elsewhere each process keeps its equal share, as before.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct

SLOT = struct.Struct("q")


class SessionSlots:
    """The engine's side: the shared file and which slots are in use."""

    def __init__(self, slots: int):
        self.slots = slots
        self.fd = os.memfd_create("mailengine-inbound-sessions")
        os.ftruncate(self.fd, SLOT.size * slots)
        self.map = mmap.mmap(self.fd, SLOT.size * slots)
        self.free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest first

    @classmethod
    def make(cls, slots: int) -> "SessionSlots | None":
        """None where the system has no memfd (not Linux): processes then share the cap out."""
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
        SLOT.pack_into(self.map, slot * SLOT.size, 0)
        return slot

    def give_back(self, slot: int) -> None:
        """The process holding `slot` has ended: its sessions ended with it."""
        SLOT.pack_into(self.map, slot * SLOT.size, 0)
        self.free.append(slot)

    def total(self) -> int:
        return sum(v for (v,) in SLOT.iter_unpack(self.map))

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


class SharedSessionCount:
    """An intake process's side: admit against the engine-wide count, release at session end."""

    def __init__(self, fd: int, slot: int):
        self.fd = fd
        self.offset = slot * SLOT.size
        self.map = mmap.mmap(fd, os.fstat(fd).st_size)

    def try_admit(self, cap: int) -> bool:
        fcntl.lockf(self.fd, fcntl.LOCK_EX)
        try:
            if sum(v for (v,) in SLOT.iter_unpack(self.map)) >= cap:
                return False
            self._add(1)
            return True
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def add_exempt(self) -> None:
        """A session admitted past the cap (inbound_priority_ips) still counts for the others."""
        self._add(1)

    def release(self) -> None:
        self._add(-1)

    def _add(self, n: int) -> None:
        (v,) = SLOT.unpack_from(self.map, self.offset)
        SLOT.pack_into(self.map, self.offset, v + n)
