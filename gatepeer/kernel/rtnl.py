"""Read-only rtnetlink queries in the standard library: one link, its addresses, its FDB flood
entries, its neighbour count.

`gatepeer status` and the metrics scrape use this instead of pyroute2: importing pyroute2 costs
about 100 ms, these few requests need only `socket` and `struct`. Each call opens its own
socket, so any thread may call it. It reads the network namespace of the calling thread.
Nothing here changes the kernel; the agent's changes go through `kernel.netlink` (pyroute2).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
AF_BRIDGE = 7
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30

IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_OPERSTATE = 1, 3, 4, 16
IFLA_LINKINFO, IFLA_STATS64 = 18, 23
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFLA_VXLAN_ID, IFLA_VXLAN_LINK, IFLA_VXLAN_LOCAL, IFLA_VXLAN_PORT = 1, 3, 4, 15
IFA_ADDRESS, IFA_LOCAL = 1, 2
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
IFF_UP, IFF_LOWER_UP = 0x1, 0x10000

NLMSGHDR = struct.Struct("=IHHII")
IFINFOMSG = struct.Struct("=BxHiII")
IFADDRMSG = struct.Struct("=BBBBI")
NDMSG = struct.Struct("=BxxxiHBB")
RTATTR = struct.Struct("=HH")
NLA_TYPE_MASK = 0x3FFF  # strips the nested and byte-order flags

# RFC 2863 operational states, as IFLA_OPERSTATE numbers them.
OPER_STATES = ("unknown", "notpresent", "down", "lowerlayerdown", "testing", "dormant", "up")
ZERO_MAC = b"\x00" * 6

_seq = itertools.count(1)


class RtnlError(OSError):
    """The kernel refused a request; errno is the kernel's."""


@dataclass(frozen=True)
class InterfaceStats:
    """The first eight fields of `struct rtnl_link_stats64`, the ones node_exporter exports."""

    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    rx_errors: int
    tx_errors: int
    rx_dropped: int
    tx_dropped: int


@dataclass(frozen=True)
class LinkReading:
    index: int
    name: str
    kind: str | None
    flags: int
    mtu: int
    oper_state: str
    stats: InterfaceStats | None
    vni: int | None = None
    local: ipaddress.IPv4Address | None = None
    dst_port: int | None = None
    underlay_index: int | None = None

    @property
    def admin_up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def carrier(self) -> bool:
        return bool(self.flags & IFF_LOWER_UP)

    @property
    def oper_up(self) -> bool:
        """Up, carrier, and an operational state that passes packets. vxlan links report
        "unknown" (they have no carrier detection of their own), which counts as up."""
        return self.admin_up and self.carrier and self.oper_state in ("up", "unknown")


def attributes(data: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each rtattr in `data` from `offset`; stops at a malformed one."""
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > len(data):
            return
        yield kind & NLA_TYPE_MASK, data[offset + RTATTR.size : offset + length]
        offset += (length + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    length = RTATTR.size + len(payload)
    return RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def request(msg_type: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
    """Send one request and collect the answers as (type, payload after the header).
    A dump reads until NLMSG_DONE; a plain request until its one answer."""
    seq = next(_seq)
    with socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
    ) as sock:
        sock.bind((0, 0))
        port = sock.getsockname()[0]
        sock.sendto(
            NLMSGHDR.pack(NLMSGHDR.size + len(body), msg_type, NLM_F_REQUEST | flags, seq, 0)
            + body,
            (0, 0),
        )
        out: list[tuple[int, bytes]] = []
        while True:
            data = sock.recv(1 << 20)
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, kind, _, got_seq, got_port = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    raise RtnlError(errno.EBADMSG, "malformed netlink message")
                payload = data[offset + NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if got_seq != seq or got_port not in (0, port):
                    continue  # not ours
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise RtnlError(code, os.strerror(code))
                    return out
                out.append((kind, payload))
                if not flags & NLM_F_DUMP:
                    return out


def _ipv4(payload: bytes) -> ipaddress.IPv4Address | None:
    return ipaddress.IPv4Address(payload) if len(payload) == 4 else None


def link(name: str) -> LinkReading | None:
    """The link called `name`, or None when there is none."""
    body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attr(IFLA_IFNAME, name.encode() + b"\0")
    try:
        answers = request(RTM_GETLINK, 0, body)
    except RtnlError as exc:
        if exc.errno == errno.ENODEV:
            return None
        raise
    for kind, payload in answers:
        if kind == RTM_NEWLINK:
            return _parse_link(payload)
    return None


def _parse_link(payload: bytes) -> LinkReading:
    _, _, index, flags, _ = IFINFOMSG.unpack_from(payload)
    attrs = dict(attributes(payload, IFINFOMSG.size))
    oper = attrs.get(IFLA_OPERSTATE, b"\0")[0]
    stats = None
    raw_stats = attrs.get(IFLA_STATS64, b"")
    if len(raw_stats) >= 64:
        stats = InterfaceStats(*struct.unpack_from("=8Q", raw_stats))
    kind: str | None = None
    info_data: dict[int, bytes] = {}
    if IFLA_LINKINFO in attrs:
        info = dict(attributes(attrs[IFLA_LINKINFO]))
        if IFLA_INFO_KIND in info:
            kind = info[IFLA_INFO_KIND].rstrip(b"\0").decode()
        if kind == "vxlan" and IFLA_INFO_DATA in info:
            info_data = dict(attributes(info[IFLA_INFO_DATA]))
    vni = info_data.get(IFLA_VXLAN_ID)
    port = info_data.get(IFLA_VXLAN_PORT)
    underlay = info_data.get(IFLA_VXLAN_LINK)
    return LinkReading(
        index=index,
        name=attrs.get(IFLA_IFNAME, b"").rstrip(b"\0").decode(),
        kind=kind,
        flags=flags,
        mtu=struct.unpack("=I", attrs[IFLA_MTU])[0] if IFLA_MTU in attrs else 0,
        oper_state=OPER_STATES[oper] if oper < len(OPER_STATES) else "unknown",
        stats=stats,
        vni=struct.unpack("=I", vni)[0] if vni else None,
        local=_ipv4(info_data.get(IFLA_VXLAN_LOCAL, b"")),
        dst_port=struct.unpack("!H", port)[0] if port else None,  # network byte order
        underlay_index=struct.unpack("=I", underlay)[0] if underlay else None,
    )


def addresses(index: int) -> list[ipaddress.IPv4Interface]:
    """The IPv4 addresses on the link with this index, with their prefix lengths."""
    found = []
    body = IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, 0)
    for kind, payload in request(RTM_GETADDR, NLM_F_DUMP, body):
        if kind != RTM_NEWADDR:
            continue
        _, prefixlen, _, _, got_index = IFADDRMSG.unpack_from(payload)
        if got_index != index:
            continue  # a dump is not filtered by index
        attrs = dict(attributes(payload, IFADDRMSG.size))
        address = _ipv4(attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS, b"")))
        if address is not None:
            found.append(ipaddress.IPv4Interface(f"{address}/{prefixlen}"))
    return found


def flood_destinations(index: int) -> frozenset[ipaddress.IPv4Address]:
    """Destinations of the all-zero-MAC FDB entries (head-end replication) on the link."""
    found = set()
    body = NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0)
    for kind, payload in request(RTM_GETNEIGH, NLM_F_DUMP, body):
        if kind != RTM_NEWNEIGH:
            continue
        _, got_index, _, _, _ = NDMSG.unpack_from(payload)
        if got_index != index:
            continue  # the bridge FDB dump is not filtered by the header's index
        attrs = dict(attributes(payload, NDMSG.size))
        dst = _ipv4(attrs.get(NDA_DST, b""))
        if attrs.get(NDA_LLADDR) == ZERO_MAC and dst is not None:
            found.add(dst)
    return frozenset(found)


def neighbour_count(index: int) -> int:
    """IPv4 neighbour (ARP) entries on the link: each active device behind the tunnel holds one
    in the table whose size gc_thresh3 caps."""
    body = NDMSG.pack(socket.AF_INET, 0, 0, 0, 0) + _attr(NDA_IFINDEX, struct.pack("=I", index))
    count = 0
    for kind, payload in request(RTM_GETNEIGH, NLM_F_DUMP, body):
        # The kernel filters by NDA_IFINDEX; older ones ignore it, so check anyway.
        if kind == RTM_NEWNEIGH and NDMSG.unpack_from(payload)[1] == index:
            count += 1
    return count


def flood_destinations_of(name: str) -> frozenset[ipaddress.IPv4Address] | None:
    """The flood entries of the link called `name`; None when there is no such link."""
    found = link(name)
    return flood_destinations(found.index) if found is not None else None


@dataclass(frozen=True)
class TunnelReading:
    """The tunnel link as the kernel has it now: the link, its addresses, its flood entries."""

    link: LinkReading | None
    addresses: tuple[ipaddress.IPv4Interface, ...] = ()
    flood: frozenset[ipaddress.IPv4Address] = frozenset()

    @classmethod
    def read(cls, interface: str) -> TunnelReading:
        found = link(interface)
        if found is None:
            return cls(None)
        return cls(found, tuple(addresses(found.index)), flood_destinations(found.index))
