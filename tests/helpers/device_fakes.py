"""Builders for the device metrics' inputs: the kernel's `DeviceTraffic`, the SIM map's
`SimRecord`, a fake device source, and an ENA ethtool answer
encoded as the kernel returns it."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path

from gatepeer.aws import ena
from gatepeer.device_traffic import DeviceTraffic
from gatepeer.metrics.device_activity import NO_GROUP, UNKNOWN_SIM, DeviceActivity
from gatepeer.sims import SimMap, SimRecord

ENA_STATS = Path(__file__).parents[1] / "golden" / "ena" / "ethtool_stats.txt"


def traffic(address: str, sent: int, received: int, age: float | None = 1.0) -> DeviceTraffic:
    """A device's counters: `sent` bytes from it in sent/100 packets, `received` to it."""
    return DeviceTraffic(
        IPv4Address(address), max(1, sent // 100), sent, max(1, received // 100), received, age
    )


def sim(address: str, imsi: str, name: str | None, group: str | None) -> SimRecord:
    return SimRecord(IPv4Address(address), imsi, f"sim-{imsi[-4:]}", name, group, True, "session")


@dataclass
class FakeDevices:
    readings: dict[IPv4Address, DeviceTraffic] | None = None
    sim_map: SimMap | None = field(default=None)

    def traffic(self) -> Mapping[IPv4Address, DeviceTraffic] | None:
        return self.readings

    def sims(self) -> SimMap | None:
        return self.sim_map


def set_traffic(*readings: DeviceTraffic) -> dict[IPv4Address, DeviceTraffic]:
    return {r.address: r for r in readings}


def recorded_ena_statistics() -> list[tuple[str, int]]:
    """`ethtool -S eth0` of an ENA interface (names in the driver's order), as recorded."""
    out = []
    for line in ENA_STATS.read_text().splitlines()[1:]:
        name, _, value = line.strip().rpartition(": ")
        out.append((name, int(value)))
    return out


def kernel_answers(stats: list[tuple[str, int]]) -> tuple[bytes, bytes, bytes]:
    """What the kernel writes back for GSSET_INFO, GSTRINGS and GSTATS with these statistics."""
    count = len(stats)
    sset = struct.pack("=IIQI", ena.ETHTOOL_GSSET_INFO, 0, 1 << ena.ETH_SS_STATS, count)
    names = struct.pack("=III", ena.ETHTOOL_GSTRINGS, ena.ETH_SS_STATS, count) + b"".join(
        n.encode().ljust(ena.ETH_GSTRING_LEN, b"\0") for n, _ in stats
    )
    values = struct.pack(f"=II{count}Q", ena.ETHTOOL_GSTATS, count, *(v for _, v in stats))
    return sset, names, values


A = IPv4Address
SIMS = SimMap(
    {
        A("10.128.0.1"): sim("10.128.0.1", "440103200000001", "meter-001", "grp-meters"),
        A("10.128.0.2"): sim("10.128.0.2", "440103200000002", "meter-002", "grp-meters"),
        A("10.128.0.3"): sim("10.128.0.3", "440103200000003", None, None),
    }
)
READING = set_traffic(
    traffic("10.128.0.1", 4000, 1000),
    traffic("10.128.0.2", 100, 100),
    traffic("10.128.0.3", 9000, 9000),
    traffic("10.128.9.9", 50, 0),  # not in the SIM map
)


def recorded_ena_allowances(_interface: str) -> dict[str, int]:
    recorded = recorded_ena_statistics()
    return ena.allowances([n for n, _ in recorded], [v for _, v in recorded])


def trained_activity(now: float) -> DeviceActivity:
    """A tracker with history up to `now`: 10.128.0.1 and .3 send every 60 s and did so 1 s
    ago; 10.128.0.2 sent every 60 s until 1,000 s ago (silent); 10.128.9.9 is new."""

    def group_of(n: int) -> str:
        record = SIMS.records.get(IPv4Address(n))
        if record is None:
            return UNKNOWN_SIM
        return record.group_id or NO_GROUP

    activity = DeviceActivity()
    start = now - 1200
    for step in range(0, 1200, 30):
        t = start + step
        reading = {
            a: replace(r, last_packet_age_s=(t - start) % 60)
            for a, r in READING.items()
            if a != A("10.128.9.9") and (a != A("10.128.0.2") or t < now - 1000)
        }
        activity.observe(reading, group_of, t)
    return activity


# What the kernel shows after trained_activity: 10.128.0.2's element still there, its last
# packet 1,000 s ago (silent); the others active a second ago.
TRAINED_READING = {
    a: replace(r, last_packet_age_s=1000.0) if a == A("10.128.0.2") else r
    for a, r in READING.items()
}
