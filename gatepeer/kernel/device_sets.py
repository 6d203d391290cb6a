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

import errno
import math
import os
import socket
import struct
from array import array
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import TypeVar

from gatepeer.device_traffic import ADDRESS_TYPE, COUNTER_TYPE, DeviceReading
from gatepeer.kernel.netns import NamespaceMissing, call_in_netns
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

RECV_BUFFER = 1 << 20  # a dump answers in messages of up to a page or so; read many at once
TIMEOUT_S = 10.0

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, resource id (big-endian)
_ATTR = struct.Struct("=HH")  # nlattr: length, type
_BE32 = struct.Struct("!I")
_BE64 = struct.Struct("!Q")

T = TypeVar("T")
_from_big = int.from_bytes


class DeviceSetsError(RuntimeError):
    """The kernel refused a dump, or answered what is not one; the message says which."""


def device_reading(netns: str | None = None) -> DeviceReading:
    """Both device sets of the device table (the one whose name starts with
    DEVICE_TABLE_PREFIX), merged by address: packets and bytes from the device out of
    `devices_from`, to it out of `devices_to`, the younger of the two ages. Empty when no
    device table is loaded."""
    reading = DeviceReading()
    with _Socket(netns) as sock:
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


def inet_tables(netns: str | None = None) -> list[str]:
    """The names of the inet tables loaded: one small dump, where `nft list table` would
    print every set element (the HA verdict asks only whether gatepeer's table is there)."""
    with _Socket(netns) as sock:
        return _table_names(sock)


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
    if not reading.addresses:  # the first set: its elements as they are, zeros the other way
        counted = (found.packets, found.counts)
        zeros = (array(COUNTER_TYPE, bytes(8 * len(found.addresses))) for _ in range(2))
        out.addresses = found.addresses
        out.packets_from, out.bytes_from = tuple(zeros) if to_device else counted
        out.packets_to, out.bytes_to = counted if to_device else tuple(zeros)
        out.ages = array("d", (math.nan if a < 0 else a for a in found.ages))
        return out
    i = j = 0
    have, add = reading.addresses, found.addresses
    r_pf, r_bf, r_pt, r_bt, r_age = (
        reading.packets_from,
        reading.bytes_from,
        reading.packets_to,
        reading.bytes_to,
        reading.ages,
    )
    f_packets, f_counts, f_ages = found.packets, found.counts, found.ages
    append = out.append
    n_have, n_add = len(have), len(add)
    while i < n_have or j < n_add:
        if j >= n_add or (i < n_have and have[i] < add[j]):
            age = r_age[i]
            append(have[i], r_pf[i], r_bf[i], r_pt[i], r_bt[i], None if age != age else age)
            i += 1
            continue
        n, packets, count, age = add[j], f_packets[j], f_counts[j], f_ages[j]
        pf = bf = pt = bt = 0
        if i < n_have and have[i] == n:
            pf, bf, pt, bt, known = r_pf[i], r_bf[i], r_pt[i], r_bt[i], r_age[i]
            if known == known and (age < 0 or known < age):
                age = known
            i += 1
        if to_device:
            pt, bt = pt + packets, bt + count
        else:
            pf, bf = pf + packets, bf + count
        append(n, pf, bf, pt, bt, None if age < 0 else age)
        j += 1
    return out


class _Socket:
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

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *_: object) -> None:
        self.sock.close()


def _in_netns(name: str, fn: Callable[[], T]) -> T:
    try:
        return call_in_netns(name, fn)
    except NamespaceMissing as exc:
        raise DeviceSetsError(str(exc)) from None


def _attr(kind: int, value: bytes) -> bytes:
    size = _ATTR.size + len(value)
    return _ATTR.pack(size, kind) + value + b"\0" * (-size % 4)


def _dump(s: _Socket, message: int, attrs: bytes, what: str) -> Iterator[memoryview]:
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


def _table_names(s: _Socket) -> list[str]:
    names = []
    for payload in _dump(s, NFT_MSG_GETTABLE, b"", "listing nftables tables"):
        for kind, start, end in _attrs(payload):
            if kind == NFTA_TABLE_NAME:
                names.append(bytes(payload[start:end]).rstrip(b"\0").decode())
    return names


def _elements(s: _Socket, table: str, name: str) -> Iterator[tuple[int, int, int, float]]:
    """(address's integer, packets, bytes, age in s or -1 when unknown) per element."""
    attrs = _attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + _attr(
        NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"
    )
    what = f"listing set inet {table} {name}"
    shape: _Shape | None = None
    for payload in _dump(s, NFT_MSG_GETSETELEM, attrs, what):
        for kind, start, end in _attrs(payload):
            if kind != NFTA_SET_ELEM_LIST_ELEMENTS:
                continue
            at = start
            while at + 4 <= end:
                size, item = _ATTR.unpack_from(payload, at)
                if size < 4:
                    break
                if item & NLA_TYPE_MASK == NFTA_LIST_ELEM:
                    found = shape.read(payload, at, size) if shape is not None else None
                    if found is None:  # the first element, or one laid out otherwise
                        shape = _Shape.learn(payload, at, size)
                        found = shape.read(payload, at, size)
                    if found is None or found[0] < 0:
                        raise DeviceSetsError(f"{what}: an element without an IPv4 key")
                    yield found
                at += (size + 3) & ~3


# What an element's values are, by where they sit: the IPv4 key, the counter's packets and
# bytes, the element's own timeout, the time left before it expires.
_KEY, _PACKETS, _BYTES, _TIMEOUT, _EXPIRES = range(5)


class _Shape:
    """The byte layout of one set element: every attribute header (length and type) and where
    each value sits. The kernel lays out every element of these sets alike, so an element is
    read with one `struct` call and checked by comparing its headers with the shape's in one
    tuple comparison (about 1 us, against 10 us walking its attributes). An element laid out
    otherwise (another kernel, a per-element timeout) teaches a new shape."""

    def __init__(self, size: int, tokens: list[tuple[str, int | None]]) -> None:
        # tokens: (struct format, role): role None compared, else the value's index.
        self.size = size
        self.struct = struct.Struct("=" + "".join(f for f, _ in tokens))
        self.compared: list[int] = []
        self.roles: list[tuple[int, int]] = []  # (field index, value index)
        index = 0
        for fmt, role in tokens:
            count = 0 if fmt.endswith("x") else (2 if fmt == "HH" else 1)
            for k in range(index, index + count):
                if role is None:
                    self.compared.append(k)
                else:
                    self.roles.append((k, role))
            index += count
        # Every header has two fields: at least two compared, so a tuple.
        self.pick_compared = itemgetter(*self.compared)
        self.expected: tuple[object, ...] = ()

    @classmethod
    def learn(cls, data: memoryview, at: int, size: int) -> _Shape:
        tokens: list[tuple[str, int | None]] = []
        _tokens(data, at, at + size, tokens, "list")
        shape = cls(size, tokens)
        fields = shape.struct.unpack_from(data, at)
        shape.expected = shape.pick_compared(fields)
        return shape

    def read(self, data: memoryview, at: int, size: int) -> tuple[int, int, int, float] | None:
        """The element's values when it has this shape; None when it does not."""
        if size != self.size:
            return None
        fields = self.struct.unpack_from(data, at)
        if self.pick_compared(fields) != self.expected:
            return None
        values: list[int] = [-1, 0, 0, DEVICE_TIMEOUT_S * 1000, -1]
        for k, role in self.roles:
            values[role] = _from_big(fields[k], "big")
        key, packets, count, timeout_ms, expires_ms = values
        age = -1.0 if expires_ms < 0 else max(0.0, (timeout_ms - expires_ms) / 1000)
        return key, packets, count, age


def _tokens(
    data: memoryview, start: int, end: int, out: list[tuple[str, int | None]], within: str
) -> None:
    """The struct tokens of the attributes in data[start:end], depth first, `within` naming
    what holds them: "list" (the list element itself), "element" (its fields), "key",
    "expressions", "expression", "counter" (a counter's data) or "other"."""
    at = start
    while at + 4 <= end:
        size, kind = _ATTR.unpack_from(data, at)
        if size < 4 or at + size > end:
            raise DeviceSetsError("a malformed set element")
        kind &= NLA_TYPE_MASK
        out.append(("HH", None))
        value_start, value_end = at + 4, at + size
        inner: str | None = None  # what this attribute holds, when nested
        role: int | None = None
        compared = False
        if within == "list":
            inner = "element"
        elif within == "element":
            inner = {
                NFTA_SET_ELEM_KEY: "key",
                NFTA_SET_ELEM_EXPR: "expression",
                NFTA_SET_ELEM_EXPRESSIONS: "expressions",
            }.get(kind)
            role = {NFTA_SET_ELEM_TIMEOUT: _TIMEOUT, NFTA_SET_ELEM_EXPIRATION: _EXPIRES}.get(kind)
        elif within == "key":
            role = _KEY if kind == NFTA_DATA_VALUE and size - 4 == 4 else None
        elif within == "expressions":
            inner = "expression"
        elif within == "expression":
            if kind == NFTA_EXPR_DATA:
                counter = _expression_name(data, start, end) == b"counter"
                inner = "counter" if counter else "other"
            compared = kind == NFTA_EXPR_NAME  # the expression's name
        elif within == "counter" and size - 4 == 8:
            role = {NFTA_COUNTER_PACKETS: _PACKETS, NFTA_COUNTER_BYTES: _BYTES}.get(kind)
        if inner is not None:
            _tokens(data, value_start, value_end, out, inner)
        elif value_end > value_start:
            kept = role is not None or compared
            out.append((f"{value_end - value_start}{'s' if kept else 'x'}", role))
        at = _pad(out, at, size)


def _pad(out: list[tuple[str, int | None]], at: int, size: int) -> int:
    if size % 4:
        out.append((f"{-size % 4}x", None))
    return at + ((size + 3) & ~3)


def _expression_name(data: memoryview, start: int, end: int) -> bytes:
    for kind, a, b in _attrs(data, start, end):
        if kind == NFTA_EXPR_NAME:
            return bytes(data[a:b]).rstrip(b"\0")
    return b""
