"""The emulated VPG endpoints following the API: which gate peers they tunnel to (registered
gate peers), and where the devices' traffic out of the device subnet goes (Junction
redirection). The emulator process calls these from its callbacks, before it answers the API
call that caused the change."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import RETURN_TABLE, ZERO_MAC, Layout
from gatepeer.lab.network.netns import bridge, bridge_json, ip


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
    remove flood entries as a set difference. Returns what changed, as iproute2 commands."""
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
        # A re-created peer vxlan0 has a new MAC: forget old answers instead of waiting ~30 s.
        ip(ep.ns, "neigh", "flush", "dev", "vxlan0", check=False)
    return changes


def redirection_gateway(redirection: Mapping[str, Any] | None) -> str | None:
    """Where the VPG sends devices' traffic bound outside the device subnet: the gateway of a
    Junction redirection that is enabled; None (the VPG's own NATed path) otherwise."""
    if not redirection or redirection.get("enabled") is not True:
        return None
    gateway = redirection.get("gateway")
    return str(gateway) if gateway else None


def endpoint_gateway(ns: str) -> str | None:
    """The redirection gateway an endpoint routes the devices' outbound traffic to, or None."""
    proc = ip(ns, "-j", "route", "show", "default", "table", RETURN_TABLE, check=False)
    if proc.returncode != 0:  # an empty table does not exist, and showing it fails
        return None
    routes = json.loads(proc.stdout or "[]")
    return str(routes[0]["gateway"]) if routes and routes[0].get("gateway") else None


def sync_redirection(layout: Layout, gateway: str | None) -> list[str]:
    """Send the devices' traffic that leaves the device subnet to `gateway` over the tunnel
    (the next hop's owner answers ARP: a peer's inner address or a virtual one it holds), or,
    with None, let it take the endpoint's NATed way out. Endpoints whose tunnel is down (Gate
    closed) are left alone: the kernel dropped routes through it, and opening Gate syncs
    again. Returns what changed, as iproute2 commands."""
    changes: list[str] = []
    for ep in layout.endpoints:
        details = netns.link_details(ep.ns, "vxlan0")
        if details is None or "UP" not in details.get("flags", []):
            continue
        if endpoint_gateway(ep.ns) == gateway:
            continue
        if gateway is None:
            args: tuple[str, ...] = ("route", "del", "default", "table", RETURN_TABLE)
        else:
            args = ("route", "replace", "default", "via", gateway, "dev", "vxlan0", "onlink")
            args += ("table", RETURN_TABLE)
        ip(ep.ns, *args)
        changes.append(f"ip -n {ep.ns} {' '.join(args)}")
    return changes
