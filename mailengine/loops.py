"""Mail that would come straight back: "mail for X loops back to myself" (Postfix's words).

When a destination's mail server is this engine itself (its MX, implicit MX or `dns_servers`
pin names an address and port the engine listens on), sending there hands the message back to
our own intake, which relays it again: hundreds of copies a second. Delivery asks `Listeners`
of every target; as Postfix does, a destination that lists us among its MX hosts is sent only
to the hosts it prefers to us, and when there are none the recipients fail at once with
`554 5.4.6` (a permanent failure: retrying cannot help). Longer loops, through other servers,
end at the hop limit (`limits.max_hops`, smtp/server.py).

"Listens on" is `network.smtp_port` at a `network.smtp_listen_ips` address; with no listen
addresses given, or a wildcard one (0.0.0.0, ::), any address of this machine counts: whether an
address is this machine's is asked of the kernel (can a socket be bound to it?), and remembered.
"""
from __future__ import annotations

import ipaddress
import socket

from .config import Config, parse_address_range

LOCAL_MEMO = 4096  # addresses whose "is it ours" answer is kept


def _address(ip: str) -> ipaddress._BaseAddress | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_this_machine(addr: ipaddress._BaseAddress) -> bool:
    """True when `addr` is one of this machine's own addresses (a socket can be bound to it)."""
    if addr.is_unspecified:
        return True  # connecting to 0.0.0.0 or :: reaches this machine
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((str(addr), 0))
        return True
    except OSError:
        return False


class Listeners:
    """The addresses and port this engine takes SMTP on, from its settings."""

    def __init__(self, cfg: Config):
        net = cfg.network
        self.port = 0 if net.smtp_port == 1 else net.smtp_port  # 1: no SMTP intake at all
        ranges = [parse_address_range(e) for e in net.smtp_listen_ips]
        # families listened on at every address: no entries at all, or a wildcard entry
        self.any_local = {4, 6} if not ranges else {
            a.version for a, b in ranges if a == b and a.is_unspecified}
        self.ranges = ranges
        self._memo: dict[ipaddress._BaseAddress, bool] = {}

    def is_me(self, ip: str, port: int) -> bool:
        """Would a connection to ip:port reach this engine's own SMTP intake?"""
        if not self.port or port != self.port:
            return False
        addr = _address(ip)
        if addr is None:
            return False
        if any(a.version == addr.version and a <= addr <= b for a, b in self.ranges):
            return True
        if addr.version in self.any_local or addr.is_unspecified:
            return self._local(addr)
        return False

    def _local(self, addr: ipaddress._BaseAddress) -> bool:
        hit = self._memo.get(addr)
        if hit is None:
            if len(self._memo) >= LOCAL_MEMO:
                self._memo.clear()
            hit = self._memo[addr] = is_this_machine(addr)
        return hit
