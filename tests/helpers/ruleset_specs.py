"""The packet-path specs the ruleset's golden files are rendered from, by case name."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from gatepeer.ruleset import PacketPathSpec

SUBNET = IPv4Network("198.19.0.0/16")


VNI = 10


LOCAL = IPv4Address("198.18.0.1")


EP1, EP2, EP3 = IPv4Address("198.18.0.11"), IPv4Address("198.18.0.12"), IPv4Address("198.18.0.13")


ALLOW = (
    IPv4Network("203.0.113.0/25"),
    IPv4Network("192.0.2.0/24"),
    IPv4Network("203.0.113.0/24"),  # overlaps the first: collapsed before loading
    IPv4Network("198.51.100.7/32"),
)


# The VPC: the underlay's 198.18.0.0/16 and a second CIDR block (the /25 inside it collapses).
VPC = (IPv4Network("198.18.0.0/16"), IPv4Network("203.0.113.0/24"), IPv4Network("198.18.1.0/25"))


# The NAT address that moves with the HA master.
SNAT = IPv4Address("198.18.0.50")


def spec(**kw: object) -> PacketPathSpec:
    base: dict[str, object] = {
        "device_subnet": SUBNET,
        "vni": VNI,
        "local_address": LOCAL,
        "endpoints": frozenset({EP1, EP2}),
    }
    base.update(kw)
    return PacketPathSpec(**base)  # type: ignore[arg-type]


CASES = {
    "route_0ep": spec(endpoints=frozenset()),
    "route_1ep": spec(endpoints=frozenset({EP1})),
    "route_2ep": spec(),
    "nat_2ep": spec(mode="nat"),
    "nat_allowlist": spec(mode="nat", allowed_destinations=ALLOW),
    "route_flowtable": spec(flowtable=True),
    "route_host_services": spec(host_services=(("tcp", 22), ("tcp", 8080), ("udp", 53))),
    "nat_host_service": spec(mode="nat", host_services=(("udp", 53),)),
    "nat_allowlist_flowtable_0ep": spec(
        mode="nat", allowed_destinations=ALLOW, flowtable=True, endpoints=frozenset()
    ),
    # Route mode masquerading what leaves the VPC; the VPC given as two overlapping prefixes.
    "route_masquerade_2ep": spec(outside_vpc="masquerade", vpc_networks=VPC),
    "route_masquerade_allowlist": spec(
        outside_vpc="masquerade", vpc_networks=VPC, allowed_destinations=ALLOW
    ),
    # Issue 18-20's features: HA's own NAT address and conntrackd's sync, per-device counters, a
    # closed network with an allow-list, route mode keeping flows tracked for the flow log.
    "nat_snat_counters_closed": spec(
        mode="nat",
        snat_address=SNAT,
        sync_events=True,
        device_counters=True,
        closed=True,
        vpc_networks=VPC,
        allowed_destinations=ALLOW,
    ),
    "route_closed_vpc_only": spec(closed=True, vpc_networks=VPC),
    "route_masquerade_tracked_counters": spec(
        outside_vpc="masquerade", vpc_networks=VPC, track_flows=True, device_counters=True
    ),
}


PLAIN = [name for name, s in CASES.items() if not s.flowtable]


WITH_FLOWTABLE = [name for name, s in CASES.items() if s.flowtable]
