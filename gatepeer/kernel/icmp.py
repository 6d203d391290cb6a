"""ICMP echo on a raw socket: the packet codec and the socket, shared by the endpoint prober
(`gatepeer.probes`) and the path-MTU probe (`gatepeer.kernel.pmtu`).

A raw socket needs CAP_NET_RAW; without it `open_raw` raises `ProbeUnavailable`, which says
nothing about the far end, so callers report "unknown" rather than "down".
"""

from __future__ import annotations

import socket
import struct

ICMP_ECHO_REPLY, ICMP_DEST_UNREACH, ICMP_ECHO_REQUEST = 0, 3, 8
# <linux/icmp.h>: a raw ICMP socket's filter of the types the kernel drops.
SOL_RAW, ICMP_FILTER = 255, 1
PAYLOAD = b"gatepeer-probe\0\0"


class ProbeUnavailable(OSError):
    """No raw ICMP socket here (CAP_NET_RAW missing): nothing was measured."""


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071); a packet carrying a correct one sums to zero."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = PAYLOAD) -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    sum_ = checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, sum_, ident, seq) + payload


def parse_echo_reply(packet: bytes, ident: int) -> int | None:
    """The sequence number if `packet` (IP header included) is an echo reply to `ident`."""
    if len(packet) < 20:
        return None
    offset = (packet[0] & 0x0F) * 4
    if len(packet) < offset + 8:
        return None
    kind, _, _, got_ident, seq = struct.unpack_from("!BBHHH", packet, offset)
    return seq if kind == ICMP_ECHO_REPLY and got_ident == ident else None


def open_raw(*, keep: tuple[int, ...], interface: str | None = None) -> socket.socket:
    """A non-blocking raw ICMP socket whose kernel filter lets only the `keep` types through,
    bound to `interface` when given (SO_BINDTODEVICE: nothing leaves or arrives by another
    link). Raises ProbeUnavailable without CAP_NET_RAW."""
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    except PermissionError as exc:
        raise ProbeUnavailable(
            exc.errno, f"cannot open a raw ICMP socket ({exc.strerror}): needs CAP_NET_RAW"
        ) from None
    try:
        # The filter's set bits are the ICMP types the kernel drops.
        wanted = sum(1 << kind for kind in keep)
        sock.setsockopt(SOL_RAW, ICMP_FILTER, struct.pack("=I", ~wanted & 0xFFFFFFFF))
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode() + b"\0")
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
