"""Looking at a running lab: the peer's vxlan0, its flood entries and inner address, the
emulator's counts, and waiting for a condition."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gatepeer.lab.network import netns

if TYPE_CHECKING:
    from conftest import LabHandle


ZERO_MAC = "00:00:00:00:00:00"


def vxlan(h: LabHandle) -> dict[str, Any] | None:
    """`ip -d link show vxlan0` in the peer namespace, decoded; None when absent."""
    return netns.link_details(h.ns("peer"), "vxlan0")


def flood_entries(h: LabHandle) -> set[str]:
    """Destinations of the all-zero-MAC entries on the peer's vxlan0."""
    if vxlan(h) is None:
        return set()
    rows = netns.bridge_json(h.ns("peer"), "fdb", "show", "dev", "vxlan0")
    return {str(r["dst"]) for r in rows if r.get("mac") == ZERO_MAC and r.get("dst")}


def inner_address(h: LabHandle) -> ipaddress.IPv4Interface | None:
    if vxlan(h) is None:
        return None
    for entry in netns.ip_json(h.ns("peer"), "-4", "addr", "show", "dev", "vxlan0"):
        for info in entry.get("addr_info", []):
            return ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
    return None


def customer_peers(h: LabHandle) -> list[dict[str, Any]]:
    return list(h.state()["peers"])


def api_calls(h: LabHandle, operation: str) -> int:
    return int(h.state()["counts"].get(operation, 0))


def wait_for(condition: Callable[[], bool], timeout: float, step: float = 0.01) -> float | None:
    """Seconds until `condition()` held, or None if it did not within `timeout`."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(step)
