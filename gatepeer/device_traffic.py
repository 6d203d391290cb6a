"""What the kernel counted for one device address (`packet_path.device_counters`): packets and
bytes each way, and how long ago its last packet passed. Read by
`gatepeer.kernel.nftables.device_traffic`, parsed by `gatepeer.ruleset.device_traffic_from_json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address


@dataclass(frozen=True, slots=True)
class DeviceTraffic:
    """One device's counts since it was first seen (or since it last fell silent for longer
    than the sets' timeout). Bytes are inner IP bytes. `last_packet_age_s` has the kernel's
    one-second resolution; None when the kernel did not say. Slots: the daemon holds one per
    device (100,000 on a large peer)."""

    address: IPv4Address
    packets_from_device: int
    bytes_from_device: int
    packets_to_device: int
    bytes_to_device: int
    last_packet_age_s: float | None
