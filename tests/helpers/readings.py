"""Kernel readings as the status, health, doctor and HA checks receive them."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

from gatepeer.kernel.rtnl import InterfaceStats, LinkReading


def link(**changes: Any) -> LinkReading:
    """A healthy vxlan0 (up, VNI 10, local 172.31.5.10, some traffic); `changes` override."""
    values: dict[str, Any] = {
        "index": 7,
        "name": "vxlan0",
        "kind": "vxlan",
        "flags": 0x1 | 0x10000,
        "mtu": 1500,
        "oper_state": "unknown",
        "stats": InterfaceStats(10, 20, 1500, 3000, 0, 0, 0, 1),
        "vni": 10,
        "local": IPv4Address("172.31.5.10"),
        "dst_port": 4789,
        "underlay_index": 2,
    }
    values.update(changes)
    return LinkReading(**values)
