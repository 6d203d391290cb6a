"""The packet path's two device sets read over nftables' netlink interface, as columns.

`nft -j list set` (nft 1.0.6) fetches every set element of the namespace before it prints one
set, then prints JSON the reader parses into a dict per element: 2.6 s and over 100 MB of
transient objects at 100,000 devices. Here one NFT_MSG_GETSETELEM dump per set asks the kernel
for that set's elements only, and each answer is decoded with `struct` straight into a
`DeviceReading` (columns), a buffer at a time: no object per element.

What an element carries (the kernel's nf_tables_fill_setelem): its key (NFTA_SET_ELEM_KEY,
the address), the time left before it expires (NFTA_SET_ELEM_EXPIRATION, ms), its own timeout
when it differs from the set's (NFTA_SET_ELEM_TIMEOUT, ms), and the set's counter
(NFTA_SET_ELEM_EXPR, or NFTA_SET_ELEM_EXPRESSIONS on kernels that allow several). The last
packet's age is the timeout less the time left, as `ruleset.device_traffic_from_json` has it
from nft's `expires`, here to the millisecond.

Netlink numbers are from linux/netfilter/nf_tables.h and nfnetlink.h (pyroute2's
`nftsocket` names the same ones).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from gatepeer.device_traffic import ADDRESS_TYPE, COUNTER_TYPE, DeviceReading
from gatepeer.ruleset import (
    DEVICE_SETS,
    DEVICE_TABLE_PREFIX,
    DEVICE_TIMEOUT_S,
    DEVICES_FROM_SET,
)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_GETTABLE = 1
NFT_MSG_GETSETELEM = 13
NFPROTO_INET = 1
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
NFTA_TABLE_NAME = 1
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_EXPIRATION = 5
NFTA_SET_ELEM_EXPR = 7
NFTA_SET_ELEM_EXPRESSIONS = 11
NFTA_DATA_VALUE = 1
NFTA_EXPR_NAME = 1
NFTA_EXPR_DATA = 2
NFTA_COUNTER_BYTES = 1
NFTA_COUNTER_PACKETS = 2

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
RECV_BUFFER = 1 << 20  # a dump answers in messages of up to a page or so; read many at once
TIMEOUT_S = 10.0

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id (big-endian)
_ATTR = struct.Struct("=HH")  # nlattr: length, type
_BE32 = struct.Struct("!I")
_BE64 = struct.Struct("!Q")

T = TypeVar("T")


class DeviceSetsError(RuntimeError):
    """The kernel refused a dump, or answered what is not one; the message says which."""


def device_reading(netns: str | None = None) -> DeviceReading:
    """Both device sets of the device table (the one whose name starts with
    DEVICE_TABLE_PREFIX), merged by address: packets and bytes from the device out of
    `devices_from`, to it out of `devices_to`, the younger of the two ages. Empty when no
    device table is loaded."""
    reading = DeviceReading()
    with _socket(netns) as sock:
        tables = [t for t in _table_names(sock) if t.startswith(DEVICE_TABLE_PREFIX)]
        for table in tables:
            for name in DEVICE_SETS:
                found = _SetColumns()
                for address, packets, count, age in _elements(sock, table, name):
                    found.addresses.append(address)
                    found.packets.append(packets)
                    found.counts.append(count)
                    found.ages.append(age)
                reading = _merged(reading, found.ordered(), to_device=name != DEVICES_FROM_SET)
    return reading


class _SetColumns:
    """One set's elements as the kernel listed them (in its hash order): no object each."""

    def __init__(self) -> None:
        self.addresses = array(ADDRESS_TYPE)
        self.packets = array(COUNTER_TYPE)
        self.counts = array(COUNTER_TYPE)
        self.ages = array("d")  # -1: unknown

    def ordered(self) -> _SetColumns:
        order = sorted(range(len(self.addresses)), key=self.addresses.__getitem__)
        out = _SetColumns()
        out.addresses = array(ADDRESS_TYPE, (self.addresses[k] for k in order))
        out.packets = array(COUNTER_TYPE, (self.packets[k] for k in order))
        out.counts = array(COUNTER_TYPE, (self.counts[k] for k in order))
        out.ages = array("d", (self.ages[k] for k in order))
        return out


def _merged(reading: DeviceReading, found: _SetColumns, *, to_device: bool) -> DeviceReading:
    """`reading` with one set's ordered elements added (both ordered by address): its counts
    each way summed, the younger age kept."""
    out = DeviceReading()
    i = j = 0
    have, add = reading.addresses, found.addresses
    while i < len(have) or j < len(add):
        if j >= len(add) or (i < len(have) and have[i] < add[j]):
            age = reading.ages[i]
            out.append(
                have[i],
                reading.packets_from[i],
                reading.bytes_from[i],
                reading.packets_to[i],
                reading.bytes_to[i],
                None if age != age else age,
            )
            i += 1
            continue
        n, packets, count, age = add[j], found.packets[j], found.counts[j], found.ages[j]
        pf = bf = pt = bt = 0
        if i < len(have) and have[i] == n:
            pf, bf = reading.packets_from[i], reading.bytes_from[i]
            pt, bt = reading.packets_to[i], reading.bytes_to[i]
            known = reading.ages[i]
            if known == known and (age < 0 or known < age):
                age = known
            i += 1
        if to_device:
            pt, bt = pt + packets, bt + count
        else:
            pf, bf = pf + packets, bf + count
        out.append(n, pf, bf, pt, bt, None if age < 0 else age)
        j += 1
    return out


class _socket:
    """A NETLINK_NETFILTER socket, in `netns` when named (opened there by a short-lived thread:
    setns changes only the calling thread, and a socket stays in the namespace it was made in)."""

    def __init__(self, netns: str | None) -> None:
        self.sock = _in_netns(netns, self._open) if netns else self._open()
        self.sequence = 0

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.settimeout(TIMEOUT_S)
        sock.bind((0, 0))
        return sock

    def __enter__(self) -> _socket:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()


def _in_netns(name: str, fn: Callable[[], T]) -> T:
    path = NETNS_DIR / name
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise DeviceSetsError(f"entering network namespace {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if failure:
        if isinstance(failure[0], FileNotFoundError):
            raise DeviceSetsError(f"network namespace {name} does not exist") from None
        raise failure[0]
    return result[0]


def _attr(kind: int, value: bytes) -> bytes:
    size = _ATTR.size + len(value)
    return _ATTR.pack(size, kind) + value + b"\0" * (-size % 4)


def _dump(s: _socket, message: int, attrs: bytes, what: str) -> Iterator[memoryview]:
    """Each answer's payload after its nfgenmsg, until the kernel says done."""
    s.sequence += 1
    body = _NFGEN.pack(NFPROTO_INET, 0, 0) + attrs
    kind = (NFNL_SUBSYS_NFTABLES << 8) | message
    s.sock.send(
        _HEADER.pack(_HEADER.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, s.sequence, 0)
        + body
    )
    while True:
        try:
            data = memoryview(s.sock.recv(RECV_BUFFER))
        except TimeoutError:
            raise DeviceSetsError(f"{what}: no answer within {TIMEOUT_S:g}s") from None
        at = 0
        while at + _HEADER.size <= len(data):
            length, kind, _flags, sequence, _port = _HEADER.unpack_from(data, at)
            if length < _HEADER.size:
                raise DeviceSetsError(f"{what}: a malformed answer")
            if sequence != s.sequence:
                at += (length + 3) & ~3
                continue
            if kind == NLMSG_DONE:
                return
            if kind == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, at + _HEADER.size)
                if code == 0:
                    return
                raise _refused(what, -code)
            yield data[at + _HEADER.size + _NFGEN.size : at + length]
            at += (length + 3) & ~3


def _refused(what: str, code: int) -> DeviceSetsError:
    return DeviceSetsError(f"{what}: {os.strerror(code)} ({errno.errorcode.get(code, code)})")


def _attrs(
    data: memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int]]:
    """(type, start of value, end of value) of each attribute in data[start:end]."""
    end = len(data) if end is None else end
    at = start
    while at + 4 <= end:
        size, kind = _ATTR.unpack_from(data, at)
        if size < 4:
            return
        yield kind & NLA_TYPE_MASK, at + 4, at + size
        at += (size + 3) & ~3


def _table_names(s: _socket) -> list[str]:
    names = []
    for payload in _dump(s, NFT_MSG_GETTABLE, b"", "listing nftables tables"):
        for kind, start, end in _attrs(payload):
            if kind == NFTA_TABLE_NAME:
                names.append(bytes(payload[start:end]).rstrip(b"\0").decode())
    return names


def _elements(s: _socket, table: str, name: str) -> Iterator[tuple[int, int, int, float]]:
    """(address's integer, packets, bytes, age in s or -1 when unknown) per element."""
    attrs = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _attr(
        NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"
    )
    default_ms = DEVICE_TIMEOUT_S * 1000
    what = f"listing set inet {table} {name}"
    for payload in _dump(s, NFT_MSG_GETSETELEM, attrs, what):
        for kind, start, end in _attrs(payload):
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            for item, elem_start, elem_end in _attrs(payload, start, end):
                if item != NFTA_LIST_ELEM:
                    continue
                address = packets = count = -1
                timeout_ms, expires_ms = default_ms, -1
                for field, a, b in _attrs(payload, elem_start, elem_end):
                    if field == NFTA_SET_ELEM_KEY:
                        for sub, x, y in _attrs(payload, a, b):
                            if sub == NFTA_DATA_VALUE and y - x == 4:
                                (address,) = _BE32.unpack_from(payload, x)
                    elif field == NFTA_SET_ELEM_EXPIRATION:
                        (expires_ms,) = _BE64.unpack_from(payload, a)
                    elif field == NFTA_SET_ELEM_TIMEOUT:
                        (timeout_ms,) = _BE64.unpack_from(payload, a)
                    elif field == NFTA_SET_ELEM_EXPR:
                        packets, count = _counter(payload, a, b, packets, count)
                    elif field == NFTA_SET_ELEM_EXPRESSIONS:
                        for _, x, y in _attrs(payload, a, b):
                            packets, count = _counter(payload, x, y, packets, count)
                if address < 0:
                    raise DeviceSetsError(f"{what}: an element without an IPv4 key")
                age = -1.0 if expires_ms < 0 else max(0.0, (timeout_ms - expires_ms) / 1000)
                yield address, max(packets, 0), max(count, 0), age


def _counter(data: memoryview, start: int, end: int, packets: int, count: int) -> tuple[int, int]:
    """The packets and bytes of a counter expression in data[start:end]; else those given."""
    name = b""
    values: tuple[int, int] | None = None
    for kind, a, b in _attrs(data, start, end):
        if kind == NFTA_EXPR_NAME:
            name = bytes(data[a:b]).rstrip(b"\0")
        elif kind == NFTA_EXPR_DATA:
            found = {k: _BE64.unpack_from(data, x)[0] for k, x, _ in _attrs(data, a, b)}
            values = (found.get(NFTA_COUNTER_PACKETS, 0), found.get(NFTA_COUNTER_BYTES, 0))
    if name == b"counter" and values is not None:
        return values
    return packets, count
