"""Builders for the devices report: SIM maps, per-device traffic, conntrack dumps."""

from __future__ import annotations

from ipaddress import IPv4Address

from gatepeer import sims
from gatepeer.device_traffic import DeviceTraffic


def device_address(n: int) -> IPv4Address:
    """The n-th device address of the lab's device subnet's upper half (198.19.128.0/17)."""
    return IPv4Address(int(IPv4Address("198.19.128.1")) + n)


def sim_map(count: int, *, fetched_at: float = 1000.0, named: bool = True) -> sims.SimMap:
    records = {}
    for n in range(count):
        address = device_address(n)
        records[address] = sims.SimRecord(
            address=address,
            imsi=f"44010{n:010d}",
            sim_id=f"894231{n:013d}",
            name=f"sensor-{n}" if named else None,
            group_id="grp-sensors",
            online=True,
            source="session",
        )
    return sims.SimMap(records=records, fetched_at=fetched_at)


def traffic(count: int) -> dict[IPv4Address, DeviceTraffic]:
    return {
        device_address(n): DeviceTraffic(device_address(n), n + 1, 100 * (n + 1), n, 90 * n, 1.5)
        for n in range(count)
    }


def conntrack_dump(pairs: list[tuple[IPv4Address, str]]) -> str:
    """`conntrack -L` lines, one per (device, destination): the device opened each."""
    return "".join(
        f"tcp      6 431999 ESTABLISHED src={device} dst={dest} sport={40000 + i} dport=443 "
        f"src={dest} dst={device} sport=443 dport={40000 + i} [ASSURED] mark=0 use=1\n"
        for i, (device, dest) in enumerate(pairs)
    )
