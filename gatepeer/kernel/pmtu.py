"""Does the path to each VPG endpoint carry a whole encapsulated tunnel packet? A DF-bit probe.

One ICMP echo request per endpoint, as large as one VXLAN packet of a full tunnel MTU
(tunnel MTU + 50 bytes of IP), with Don't Fragment set, sent from the tunnel's local address
over the underlay; and a small echo request beside it, so that an endpoint that answers no
ICMP at all is told apart from a path that drops large packets.

`IP_PMTUDISC_PROBE` sets DF but ignores the kernel's cached path MTU, so each run measures
afresh rather than repeating what an earlier ICMP taught the kernel. Three answers end a probe:
an echo reply (the size passes), EMSGSIZE at send (this host's own route or interface is
smaller) or a router's "fragmentation needed" carrying its next-hop MTU.

A raw ICMP socket (`gatepeer.kernel.icmp`), like the endpoint probes: it needs CAP_NET_RAW.
"""

from __future__ import annotations

import errno
import random
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address
from typing import Any

from gatepeer.kernel.icmp import (
    ICMP_DEST_UNREACH,
    ICMP_ECHO_REPLY,
    echo_request,
    open_raw,
    parse_echo_reply,
)

# <linux/in.h>
IP_MTU_DISCOVER, IP_MTU = 10, 14
IP_PMTUDISC_PROBE = 3
IP_HEADER, ICMP_HEADER = 20, 8
ICMP_FRAG_NEEDED = 4  # the code of "destination unreachable" that carries a next-hop MTU
SMALL_PACKET = 84  # what ping sends by default: answered wherever ICMP echo is
DEFAULT_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class PathProbe:
    """What one endpoint's probes came back with."""

    target: IPv4Address
    size: int  # bytes of the large probe, IP header included
    answered: bool = False  # the large probe got an echo reply
    small_answered: bool = False
    local_mtu: int | None = None  # EMSGSIZE at send: the MTU of this host's route
    reported_mtu: int | None = None  # a router's "fragmentation needed": its next-hop MTU
    error: str | None = None  # the probe could not be sent at all


def parse_frag_needed(packet: bytes, ident: int) -> tuple[IPv4Address, int] | None:
    """(the probe's destination, the next-hop MTU) when `packet` (IP header included) is a
    "fragmentation needed" about one of our echo requests; None otherwise."""
    if len(packet) < IP_HEADER:
        return None
    offset = (packet[0] & 0x0F) * 4
    if len(packet) < offset + ICMP_HEADER + IP_HEADER:
        return None
    kind, code, _, _, mtu = struct.unpack_from("!BBHHH", packet, offset)
    if kind != ICMP_DEST_UNREACH or code != ICMP_FRAG_NEEDED:
        return None
    inner = offset + ICMP_HEADER  # the header of the packet that did not fit
    inner_len = (packet[inner] & 0x0F) * 4
    if len(packet) < inner + inner_len + ICMP_HEADER:
        return None
    destination = IPv4Address(packet[inner + 16 : inner + 20])
    inner_kind, _, _, got_ident, _ = struct.unpack_from("!BBHHH", packet, inner + inner_len)
    if inner_kind != 8 or got_ident != ident:
        return None
    return destination, mtu


def route_mtu(target: IPv4Address) -> int | None:
    """The MTU this host's route toward `target` allows (a connected socket's IP_MTU)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((str(target), 9))  # connecting a UDP socket sends nothing
            return int(sock.getsockopt(socket.IPPROTO_IP, IP_MTU))
        except OSError:
            return None


def _open(interface: str | None, source: IPv4Address | None) -> socket.socket:
    # Echo replies and "fragmentation needed" (a destination-unreachable code) get through.
    sock = open_raw(keep=(ICMP_ECHO_REPLY, ICMP_DEST_UNREACH), interface=interface)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        if source is not None:
            sock.bind((str(source), 0))
    except OSError:
        sock.close()
        raise
    return sock


def probe_paths(
    targets: Sequence[IPv4Address],
    size: int,
    *,
    interface: str | None = None,
    source: IPv4Address | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[PathProbe]:
    """Probe every target at once (a large and a small echo request each), then wait up to
    `timeout` for the answers. Raises ProbeUnavailable without CAP_NET_RAW."""
    ident = random.randrange(1, 0x10000)
    large = b"\xa5" * max(0, size - IP_HEADER - ICMP_HEADER)
    small = b"\x5a" * (SMALL_PACKET - IP_HEADER - ICMP_HEADER)
    results = {t: PathProbe(t, size) for t in targets}
    by_seq: dict[int, tuple[IPv4Address, bool]] = {}
    with _open(interface, source) as sock:
        for i, target in enumerate(targets):
            by_seq[2 * i + 1], by_seq[2 * i + 2] = (target, True), (target, False)
            for seq, payload in ((2 * i + 1, large), (2 * i + 2, small)):
                try:
                    sock.sendto(echo_request(ident, seq, payload), (str(target), 0))
                except OSError as exc:
                    if exc.errno == errno.EMSGSIZE and payload is large:
                        results[target] = _with(results[target], local_mtu=route_mtu(target))
                    else:
                        results[target] = _with(results[target], error=exc.strerror or str(exc))
        deadline = time.monotonic() + timeout
        while not all(_settled(r) for r in results.values()):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([sock], [], [], left)[0]:
                break
            try:
                packet, _ = sock.recvfrom(65535)
            except BlockingIOError:
                continue
            answered = parse_echo_reply(packet, ident)
            if answered is not None and answered in by_seq:
                target, is_large = by_seq[answered]
                field = "answered" if is_large else "small_answered"
                results[target] = _with(results[target], **{field: True})
                continue
            frag = parse_frag_needed(packet, ident)
            if frag is not None and frag[0] in results:
                results[frag[0]] = _with(results[frag[0]], reported_mtu=frag[1])
    return [results[t] for t in targets]


def _settled(p: PathProbe) -> bool:
    """The large probe's fate is known (the small one matters only when it is not)."""
    known = p.local_mtu is not None or p.reported_mtu is not None
    return p.error is not None or p.answered or known


def _with(p: PathProbe, **changes: Any) -> PathProbe:
    return replace(p, **changes)
