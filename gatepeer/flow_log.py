"""Pure: the flow log's records, made from conntrack's connection events.

A connection a device opens (or one opened to a device, in route mode) is logged twice: when
conntrack creates its entry ("new") and when it destroys it ("destroy", with the packets and
bytes each way: they need net.netfilter.nf_conntrack_acct = 1, which gatepeer sets while the
flow log is on). One JSON object per line, keys in a fixed order:

    {"time": "2026-12-06T21:40:10.951Z", "event": "destroy", "protocol": "tcp",
     "device": "10.128.0.5", "sim": "meter-001", "direction": "from_device",
     "peer": "198.51.100.7", "device_port": 40542, "peer_port": 443,
     "nat_address": "172.31.5.10", "nat_port": 40542,
     "packets_from_device": 12, "bytes_from_device": 1830,
     "packets_to_device": 10, "bytes_to_device": 5120}

`peer` is the other end (the destination when the device opened the connection); `nat_address`
and `nat_port` appear only when the connection was source-NATed (nat mode, route mode's
masquerade of what leaves the VPC); the counters only on "destroy". Connections where neither
end is in the device subnet (the peer's own) are not logged. Nothing else is ever written: no
payload, no configuration, no secret.

The events come from `conntrack -E` (gatepeer.kernel.conntrack_events says why); its line
format is parsed here:

    [1796593110.987930]	[DESTROY] udp      17 29 src=A dst=B sport=P dport=Q packets=1
    bytes=128 [UNREPLIED] src=B dst=A sport=Q dport=P packets=0 bytes=0 id=3950312478
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

EVENTS = {"NEW": "new", "DESTROY": "destroy"}
_LINE_RE = re.compile(r"^\[(?P<time>\d+\.\d+)\]\s+\[(?P<event>[A-Z]+)\]\s+(?P<protocol>\S+)\s")


@dataclass(frozen=True)
class DeviceScope:
    """Who is a device: an address in the device subnet other than the peer's own inner
    address and the VPG endpoints' inner addresses (the probes' pings are the peer's own)."""

    subnet: ipaddress.IPv4Network
    not_devices: frozenset[ipaddress.IPv4Address] = frozenset()

    def __contains__(self, address: object) -> bool:
        return address in self.subnet and address not in self.not_devices

    def touches_own(self, event: ConnectionEvent) -> bool:
        o = event.original
        return o.source in self.not_devices or o.destination in self.not_devices


@dataclass(frozen=True)
class Tuple:
    """One direction of a connection as conntrack shows it."""

    source: ipaddress.IPv4Address
    destination: ipaddress.IPv4Address
    source_port: int | None = None
    destination_port: int | None = None
    packets: int | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class ConnectionEvent:
    time: float
    event: str  # "new" or "destroy"
    protocol: str
    original: Tuple
    reply: Tuple


def parse_event(line: str) -> ConnectionEvent | None:
    """One line of `conntrack -E -o timestamp`; None for anything else (IPv6, its summary)."""
    head = _LINE_RE.match(line)
    if head is None or head["event"] not in EVENTS:
        return None
    directions: list[dict[str, str]] = []
    for word in line[head.end() :].split():
        key, sep, value = word.partition("=")
        if not sep:
            continue
        if key == "src":
            directions.append({})
        if directions:
            directions[-1].setdefault(key, value)
    if len(directions) < 2:
        return None
    try:
        original, reply = (_tuple(d) for d in directions[:2])
    except (KeyError, ValueError):
        return None  # IPv6 or a line cut short
    return ConnectionEvent(
        float(head["time"]), EVENTS[head["event"]], head["protocol"], original, reply
    )


def _tuple(fields: dict[str, str]) -> Tuple:
    def number(key: str) -> int | None:
        return int(fields[key]) if key in fields else None

    return Tuple(
        ipaddress.IPv4Address(fields["src"]),
        ipaddress.IPv4Address(fields["dst"]),
        number("sport"),
        number("dport"),
        number("packets"),
        number("bytes"),
    )


def record(
    event: ConnectionEvent,
    devices: DeviceScope,
    sim_name: Callable[[ipaddress.IPv4Address], str | None],
) -> dict[str, object] | None:
    """The flow log's record of one event; None when no end is a device, or one end is the
    peer's or the VPG's own inner address."""
    o, r = event.original, event.reply
    if devices.touches_own(event):
        return None
    if o.source in devices:
        direction, device, peer = "from_device", o.source, o.destination
        device_port, peer_port = o.source_port, o.destination_port
        sent, received = o, r
        # Source NAT shows as a reply addressed to another address than the original source.
        nat = (r.destination, r.destination_port) if r.destination != o.source else None
    elif o.destination in devices:
        direction, device, peer = "to_device", o.destination, o.source
        device_port, peer_port = o.destination_port, o.source_port
        sent, received = r, o
        nat = None
    else:
        return None
    out: dict[str, object] = {
        "time": datetime.fromtimestamp(event.time, UTC).isoformat(timespec="milliseconds")[:-6]
        + "Z",
        "event": event.event,
        "protocol": event.protocol,
        "device": str(device),
        "sim": sim_name(device),
        "direction": direction,
        "peer": str(peer),
    }
    if device_port is not None:
        out["device_port"] = device_port
        out["peer_port"] = peer_port
    if nat is not None:
        out["nat_address"] = str(nat[0])
        if nat[1] is not None:
            out["nat_port"] = nat[1]
    if event.event == "destroy" and sent.bytes is not None:
        out["packets_from_device"] = sent.packets
        out["bytes_from_device"] = sent.bytes
        out["packets_to_device"] = received.packets
        out["bytes_to_device"] = received.bytes
    return out


def line(fields: dict[str, object]) -> str:
    return json.dumps(fields, separators=(",", ":"))


class RateLimit:
    """A token bucket: `rate` records a second, bursts of as many; what exceeds it is counted
    as dropped so that a connection storm costs the peer a counter, not its disk or journal."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.clock = clock
        self.tokens = rate
        self.stamp = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False
