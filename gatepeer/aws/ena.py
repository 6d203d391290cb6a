"""The ENA driver's allowance counters, read through the kernel's ethtool interface.

EC2 shapes an instance's traffic by allowances (bandwidth in and out, packets per second,
tracked connections, link-local traffic such as DNS, IMDS and NTP); the ENA driver counts the
packets it queued or dropped because one was exceeded and publishes the counts as ethtool
statistics (`ethtool -S eth0`). This module asks for them the way ethtool does: SIOCETHTOOL
with ETHTOOL_GSSET_INFO (how many statistics), ETHTOOL_GSTRINGS (their names) and
ETHTOOL_GSTATS (their values), on any socket. No library needed: three ioctls and
struct layouts from <linux/ethtool.h>.

Off ENA (another driver, a veth in the lab) none of these names exist and `read` returns an
empty mapping: the metrics are then absent, not zero.
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct

SIOCETHTOOL = 0x8946
ETHTOOL_GSTRINGS = 0x1B
ETHTOOL_GSTATS = 0x1D
ETHTOOL_GSSET_INFO = 0x37
ETH_SS_STATS = 1
ETH_GSTRING_LEN = 32
IFNAMSIZ = 16

# Counters of packets shaped because an allowance was exceeded (monotonic).
ALLOWANCE_COUNTERS = (
    "bw_in_allowance_exceeded",
    "bw_out_allowance_exceeded",
    "pps_allowance_exceeded",
    "conntrack_allowance_exceeded",
    "linklocal_allowance_exceeded",
)
# A gauge newer drivers add: tracked connections still available before the allowance.
CONNTRACK_AVAILABLE = "conntrack_allowance_available"


class EthtoolError(OSError):
    pass


def _ioctl(interface: str, request: bytearray) -> None:
    """SIOCETHTOOL with `request` (an ethtool command struct) filled in by the kernel."""
    if len(interface.encode()) >= IFNAMSIZ:
        raise EthtoolError(f"interface name too long: {interface!r}")
    buffer = array.array("B", request)
    address, _ = buffer.buffer_info()
    ifreq = struct.pack(f"{IFNAMSIZ}sP", interface.encode(), address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    request[:] = buffer.tobytes()


def statistics_count_request() -> bytearray:
    # struct ethtool_sset_info { u32 cmd; u32 reserved; u64 sset_mask; u32 data[]; }
    return bytearray(struct.pack("=IIQI", ETHTOOL_GSSET_INFO, 0, 1 << ETH_SS_STATS, 0))


def parse_statistics_count(answer: bytes) -> int:
    """How many statistics the driver has; 0 when it has none (the mask bit cleared)."""
    _cmd, _reserved, mask, count = struct.unpack_from("=IIQI", answer)
    return count if mask & (1 << ETH_SS_STATS) else 0


def names_request(count: int) -> bytearray:
    # struct ethtool_gstrings { u32 cmd; u32 string_set; u32 len; u8 data[len * 32]; }
    head = struct.pack("=III", ETHTOOL_GSTRINGS, ETH_SS_STATS, count)
    return bytearray(head + bytes(count * ETH_GSTRING_LEN))


def parse_names(answer: bytes) -> list[str]:
    _cmd, _set, count = struct.unpack_from("=III", answer)
    data = answer[12 : 12 + count * ETH_GSTRING_LEN]
    return [
        data[i : i + ETH_GSTRING_LEN].split(b"\0", 1)[0].decode("ascii", "replace")
        for i in range(0, len(data), ETH_GSTRING_LEN)
    ]


def values_request(count: int) -> bytearray:
    # struct ethtool_stats { u32 cmd; u32 n_stats; u64 data[n_stats]; }
    return bytearray(struct.pack("=II", ETHTOOL_GSTATS, count) + bytes(count * 8))


def parse_values(answer: bytes) -> list[int]:
    _cmd, count = struct.unpack_from("=II", answer)
    return list(struct.unpack_from(f"={count}Q", answer, 8))


def allowances(names: list[str], values: list[int]) -> dict[str, int]:
    """The allowance statistics among all of a driver's (empty off ENA)."""
    wanted = (*ALLOWANCE_COUNTERS, CONNTRACK_AVAILABLE)
    return {n: v for n, v in zip(names, values, strict=True) if n in wanted}


def statistics(interface: str) -> tuple[list[str], list[int]]:
    """Every ethtool statistic of `interface` (what `ethtool -S` prints), names and values."""
    request = statistics_count_request()
    try:
        _ioctl(interface, request)
    except OSError as exc:
        raise EthtoolError(f"{interface}: ethtool statistics unavailable: {exc}") from exc
    count = parse_statistics_count(bytes(request))
    if count == 0:
        return [], []
    names = names_request(count)
    values = values_request(count)
    try:
        _ioctl(interface, names)
        _ioctl(interface, values)
    except OSError as exc:
        raise EthtoolError(f"{interface}: ethtool statistics unavailable: {exc}") from exc
    found_names, found_values = parse_names(bytes(names)), parse_values(bytes(values))
    if len(found_names) != len(found_values):  # the driver changed its set between calls
        raise EthtoolError(f"{interface}: ethtool statistics changed while read")
    return found_names, found_values


def read(interface: str) -> dict[str, int]:
    """The ENA allowance statistics of `interface`; empty off ENA or without statistics."""
    try:
        names, values = statistics(interface)
    except EthtoolError:
        return {}
    return allowances(names, values)
