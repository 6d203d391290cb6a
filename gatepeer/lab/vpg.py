"""The emulated VPG endpoints following the API: which gate peers they tunnel to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gatepeer.lab import netns
from gatepeer.lab.layout import RETURN_TABLE, ZERO_MAC, Layout
from gatepeer.lab.netns import bridge, bridge_json, ip


def _peer_field(peer: Any, *names: str) -> str | None:
    for name in names:
        value = peer.get(name) if isinstance(peer, Mapping) else getattr(peer, name, None)
        if value:
            return str(value)
    return None


def customer_peers(peers: Iterable[Any]) -> list[tuple[str, str]]:
    """(outer, inner) of each customer gate peer, in the order given. Accepts objects with
    outer_ip/inner_ip attributes, dicts with the same keys, or API-shaped dicts."""
    out: list[tuple[str, str]] = []
    for peer in peers:
        owned = (
            peer.get("ownedByCustomer", True)
            if isinstance(peer, Mapping)
            else getattr(peer, "owned_by_customer", True)
        )
        if owned is False:
            continue
        outer = _peer_field(peer, "outer_ip", "outerIpAddress")
        inner = _peer_field(peer, "inner_ip", "innerIpAddress")
        if outer and inner and (outer, inner) not in out:
            out.append((outer, inner))
    return out


def endpoint_fdb(ns: str) -> list[str]:
    """Destinations of the all-zero-MAC (flood) entries on the endpoint's vxlan0."""
    return [
        str(e["dst"])
        for e in bridge_json(ns, "fdb", "show", "dev", "vxlan0")
        if e.get("mac") == ZERO_MAC and e.get("dst")
    ]


def sync_peers(layout: Layout, peers: Sequence[tuple[str, str]]) -> list[str]:
    """Point every VPG endpoint at exactly these customer gate peers (outer, inner): add and
    remove flood entries as a set difference, and route device return traffic to the first
    peer. Returns what changed, as iproute2 commands."""
    changes: list[str] = []
    wanted = [outer for outer, _ in peers]
    for ep in layout.endpoints:
        if not netns.link_exists(ep.ns, "vxlan0"):
            continue
        have = endpoint_fdb(ep.ns)
        for dst in [d for d in wanted if d not in have]:
            args = ("fdb", "append", ZERO_MAC, "dev", "vxlan0", "dst", dst)
            bridge(ep.ns, *args)
            changes.append(f"bridge -n {ep.ns} {' '.join(args)}")
        for dst in [d for d in have if d not in wanted]:
            args = ("fdb", "del", ZERO_MAC, "dev", "vxlan0", "dst", dst)
            bridge(ep.ns, *args)
            changes.append(f"bridge -n {ep.ns} {' '.join(args)}")
        route: tuple[str, ...] = ("unreachable", "default")
        if peers:
            route = ("default", "via", peers[0][1], "dev", "vxlan0", "onlink")
        ip(ep.ns, "route", "replace", *route, "table", RETURN_TABLE)
        # A re-created peer vxlan0 has a new MAC: forget old answers instead of waiting ~30 s.
        ip(ep.ns, "neigh", "flush", "dev", "vxlan0", check=False)
    return changes
