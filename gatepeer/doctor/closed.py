"""The doctor's closed-network judgments (`packet_path.closed = true`): pure, from readings.

- `closed-route`: each allowed destination, followed from the peer subnet's route table by
  longest prefix (a prefix-list route counts as a route for each of its entries): VPC-local, a
  gateway endpoint, peering, a transit gateway, a virtual private or local gateway keep it
  inside; an internet gateway, a NAT gateway, a blackhole or no route at all leak it (`fail`,
  naming the table, the destination and the target). An appliance (an ENI or instance) cannot
  be followed further (`warn`).
- `closed-endpoint-sg`: every interface endpoint's security groups admit the peer (nat mode:
  devices' traffic arrives from the peer's address) or the device subnet (route mode).
- `closed-endpoint-dns`: interface endpoints' private DNS, and the VPC's DNS support and
  hostnames it needs. AWS offers no private DNS for some endpoints (IoT Core's data and
  credentials endpoints): for those, a Route 53 private hosted zone associated with the VPC must
  hold the service's names instead.
- `closed-resolver`: with SSM's endpoints, a Route 53 inbound resolver endpoint in the VPC
  (devices resolve the service's private name through it, via the SIM group's custom DNS).

`gatepeer.doctor.closed_aws` makes the readings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING

from gatepeer.doctor.judgments import Check, Status

if TYPE_CHECKING:
    from gatepeer.aws.ec2 import IngressRule

ROUTE = "closed-route"
ENDPOINT_SG = "closed-endpoint-sg"
ENDPOINT_DNS = "closed-endpoint-dns"
RESOLVER = "closed-resolver"
NAMES = (ROUTE, ENDPOINT_SG, ENDPOINT_DNS, RESOLVER)
# SSM's agent needs these three (and S3 for its own updates and logs).
SSM_SERVICES = ("ssm", "ssmmessages", "ec2messages")
# Interface endpoints AWS gives no private DNS: a private hosted zone stands in (AWS IoT Core's
# developer guide, "Using AWS IoT Core with interface VPC endpoints").
NO_PRIVATE_DNS = ("iot.data", "iot.credentials")

# Route targets by id prefix: (inside the closed network?, what it is).
_TARGETS: tuple[tuple[str, bool | None, str], ...] = (
    ("local", True, "VPC-local"),
    ("vpce-", True, "gateway endpoint"),
    ("pcx-", True, "VPC peering"),
    ("tgw-", True, "transit gateway"),
    ("vgw-", True, "virtual private gateway"),
    ("lgw-", True, "local gateway"),
    ("igw-", False, "internet gateway"),
    ("nat-", False, "NAT gateway"),
    ("cagw-", False, "carrier gateway"),
    ("eigw-", False, "egress-only internet gateway"),
    ("eni-", None, "network interface (an appliance: doctor cannot follow it further)"),
    ("i-", None, "instance (an appliance: doctor cannot follow it further)"),
)


def classify(target: str) -> tuple[bool | None, str]:
    """Whether a route's target keeps traffic inside (None: cannot tell), and what it is."""
    for prefix, inside, what in _TARGETS:
        if target.startswith(prefix):
            return inside, what
    return None, "an unknown target"


@dataclass(frozen=True)
class TableRoute:
    """One active or blackhole route: to a CIDR, or to a prefix list's entries."""

    target: str
    destination: IPv4Network | None = None
    prefix_list_id: str | None = None
    state: str = "active"


@dataclass(frozen=True)
class RouteTable:
    table_id: str
    routes: tuple[TableRoute, ...]
    # The entries of each prefix list a route names (absent: could not be read).
    prefix_lists: Mapping[str, tuple[IPv4Network, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Destination:
    """One allowed_destinations entry: a prefix, or an AWS name with what it stands for."""

    entry: str
    prefixes: tuple[IPv4Network, ...] = ()
    error: str | None = None  # could not be resolved
    missing: bool = False  # ... because it does not exist (a fail, not a warn)


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str
    kind: str  # "Interface", "Gateway", ...
    service: str  # com.amazonaws.<region>.<service>
    state: str
    private_dns: bool
    groups: tuple[str, ...] = ()

    @property
    def short_service(self) -> str:
        return self.service.rsplit(".", 1)[-1]

    @property
    def zone_service(self) -> str | None:
        """For a service AWS gives no private DNS, the DNS domain its names live under
        (com.amazonaws.<region>.iot.data: iot.<region>.amazonaws.com); else None."""
        parts = self.service.split(".")
        if len(parts) < 4 or ".".join(parts[3:]) not in NO_PRIVATE_DNS:
            return None
        return f"{parts[3]}.{parts[2]}.amazonaws.com"


@dataclass(frozen=True)
class Resolver:
    resolver_id: str
    direction: str  # "INBOUND" or "OUTBOUND"
    status: str
    vpc_id: str


def _routes_for(table: RouteTable) -> list[tuple[IPv4Network, TableRoute]]:
    """Every route as (CIDR, route): a prefix-list route once per entry."""
    out: list[tuple[IPv4Network, TableRoute]] = []
    for route in table.routes:
        if route.destination is not None:
            out.append((route.destination, route))
        elif route.prefix_list_id is not None:
            out.extend((n, route) for n in table.prefix_lists.get(route.prefix_list_id, ()))
    return out


def follow(table: RouteTable, prefix: IPv4Network) -> list[tuple[IPv4Network, TableRoute | None]]:
    """Where traffic to `prefix` goes: the longest route covering all of it, and each longer
    route inside it (those take part of it elsewhere). (prefix, None): no route covers it."""
    routes = _routes_for(table)
    covering = [(n, r) for n, r in routes if prefix.subnet_of(n)]
    best = max(covering, key=lambda nr: nr[0].prefixlen, default=None)
    floor = best[0].prefixlen if best else -1
    inner = [(n, r) for n, r in routes if n.subnet_of(prefix) and n.prefixlen > floor]
    return [(prefix, best[1] if best else None), *inner]


def _via(route: TableRoute) -> str:
    via = f" (route to {route.prefix_list_id})" if route.prefix_list_id else ""
    return f"{route.target}{via}"


def judge_destination(table: RouteTable, destination: Destination) -> Check:
    entry, t = destination.entry, table.table_id
    if destination.error is not None:
        status: Status = "fail" if destination.missing else "warn"
        return Check(status, ROUTE, f"{destination.error}: it cannot be followed from {t}")
    leaks: list[str] = []
    unknown: list[str] = []
    targets: dict[str, str] = {}
    for prefix in destination.prefixes:
        for part, route in follow(table, prefix):
            if route is None:
                leaks.append(f"{part}: no route")
                continue
            if route.state != "active":
                leaks.append(f"{part}: blackhole route to {_via(route)}")
                continue
            inside, what = classify(route.target)
            if inside is False:
                leaks.append(f"{part} via {what} {_via(route)}")
            elif inside is None:
                unknown.append(f"{part} via {what} {_via(route)}")
            else:
                targets[route.target] = what
    if leaks:
        more = f" (and {len(leaks) - 1} more)" if len(leaks) > 1 else ""
        return Check(
            "fail",
            ROUTE,
            f"{entry} from {t}: {leaks[0]}{more}: it leaves the closed network; add the "
            "endpoint's route (a gateway endpoint associated with this table) or a route "
            "that stays inside",
        )
    if unknown:
        return Check("warn", ROUTE, f"{entry} from {t}: {unknown[0]}")
    if not targets:
        return Check("warn", ROUTE, f"{entry}: resolves to no prefix to follow from {t}")
    inside_by = ", ".join(f"{what} {target}" for target, what in sorted(targets.items()))
    return Check("ok", ROUTE, f"{entry} from {t}: inside, via {inside_by}")


def judge_routes(table: RouteTable | None, destinations: Sequence[Destination]) -> list[Check]:
    if table is None:
        return [
            Check("fail", ROUTE, "the peer's subnet has no route table (nor the VPC a main one)")
        ]
    if not destinations:
        return [
            Check(
                "ok",
                ROUTE,
                "packet_path.closed with no allowed destination: devices reach only the VPC",
            )
        ]
    return [judge_destination(table, d) for d in destinations]


def _admits_tcp(rule: IngressRule, source: IPv4Network, groups: Sequence[str]) -> bool:
    if rule.protocol not in ("tcp", "6", "-1"):
        return False
    return any(source.subnet_of(s) for s in rule.sources) or any(
        g in rule.other_sources for g in groups
    )


def judge_endpoint_groups(
    endpoints: Sequence[Endpoint],
    rules: Sequence[IngressRule],
    *,
    mode: str,
    peer: IPv4Address,
    peer_groups: Sequence[str],
    device_subnet: IPv4Network | None,
) -> Check:
    interface = [e for e in endpoints if e.kind == "Interface"]
    if not interface:
        return Check("ok", ENDPOINT_SG, "no interface endpoint to judge")
    if mode == "nat":
        source, who, groups = IPv4Network(f"{peer}/32"), f"the peer {peer}", peer_groups
    elif device_subnet is not None:
        source, who, groups = device_subnet, f"the device subnet {device_subnet}", ()
    else:
        return Check(
            "warn", ENDPOINT_SG, "the device subnet is not known (the API was not reached)"
        )
    refusing = [
        e
        for e in interface
        if not any(r.group_id in e.groups and _admits_tcp(r, source, groups) for r in rules)
    ]
    if refusing:
        e = refusing[0]
        return Check(
            "fail",
            ENDPOINT_SG,
            f"{e.endpoint_id} ({e.service}): its security groups "
            f"({', '.join(e.groups) or 'none'}) admit no TCP from {who}: devices' connections "
            "to it are dropped; add an inbound rule (TCP 443, or the service's port) from "
            f"{source}"
            + (f" (and {len(refusing) - 1} more endpoint(s))" if len(refusing) > 1 else ""),
        )
    return Check("ok", ENDPOINT_SG, f"{len(interface)} interface endpoint(s) admit {who}")


def _covers(zone: str, domain: str) -> bool:
    """A private hosted zone named `zone` can answer names under `domain`."""
    zone = zone.rstrip(".").lower()
    return zone == domain or zone.endswith("." + domain) or domain.endswith("." + zone)


def judge_endpoint_dns(
    endpoints: Sequence[Endpoint],
    dns_support: bool | None,
    dns_hostnames: bool | None,
    private_zones: Sequence[str] | None = (),
) -> Check:
    """`private_zones`: the names of the private hosted zones associated with the VPC (None:
    they could not be read)."""
    interface = [e for e in endpoints if e.kind == "Interface"]
    if not interface:
        return Check("ok", ENDPOINT_DNS, "no interface endpoint to judge")
    off = [e for e in interface if not e.private_dns and e.zone_service is None]
    if off:
        return Check(
            "fail",
            ENDPOINT_DNS,
            f"{off[0].endpoint_id} ({off[0].service}): private DNS is off: the service's "
            "public name resolves to public addresses, outside the closed network; turn on "
            "its private DNS",
        )
    zoned = [e for e in interface if e.zone_service is not None]
    if zoned and private_zones is None:
        return Check(
            "warn",
            ENDPOINT_DNS,
            f"{zoned[0].endpoint_id} ({zoned[0].service}) has no private DNS from AWS and the "
            "VPC's private hosted zones could not be read (route53:ListHostedZonesByVPC)",
        )
    unzoned = [
        e
        for e in zoned
        if e.zone_service is not None
        and not any(_covers(z, e.zone_service) for z in private_zones or ())
    ]
    if unzoned:
        e = unzoned[0]
        return Check(
            "fail",
            ENDPOINT_DNS,
            f"{e.endpoint_id} ({e.service}): AWS gives this endpoint no private DNS and no "
            f"private hosted zone for {e.zone_service} is associated with the VPC: devices "
            "resolve the public addresses, outside the closed network; create one with the "
            "service's name pointing at the endpoint",
        )
    missing = [
        name
        for name, value in (
            ("enableDnsSupport", dns_support),
            ("enableDnsHostnames", dns_hostnames),
        )
        if value is False
    ]
    if missing:
        return Check(
            "fail",
            ENDPOINT_DNS,
            f"the VPC's {' and '.join(missing)} is off: the endpoints' private DNS names do not "
            "resolve; turn it on",
        )
    how = f" ({len(zoned)} through a private hosted zone)" if zoned else ""
    return Check(
        "ok", ENDPOINT_DNS, f"private DNS on for {len(interface)} interface endpoint(s){how}"
    )


def judge_resolver(endpoints: Sequence[Endpoint], resolvers: Sequence[Resolver] | None) -> Check:
    ssm = sorted({e.short_service for e in endpoints if e.short_service in SSM_SERVICES})
    if not ssm:
        return Check("ok", RESOLVER, "no SSM endpoint: devices need no resolver here")
    missing = [s for s in SSM_SERVICES if s not in ssm]
    if resolvers is None:
        return Check("warn", RESOLVER, "cannot tell: the resolver endpoints were not read")
    inbound = [r for r in resolvers if r.direction == "INBOUND" and r.status == "OPERATIONAL"]
    if not inbound:
        return Check(
            "fail",
            RESOLVER,
            "SSM's endpoints are here but no Route 53 inbound resolver endpoint is operational "
            "in the VPC: devices cannot resolve their private names; create one and point the "
            "SIM group's custom DNS at its addresses",
        )
    if missing:
        return Check(
            "warn",
            RESOLVER,
            f"inbound resolver {inbound[0].resolver_id}; but no endpoint for "
            f"{', '.join(missing)}: the SSM agent needs ssm, ssmmessages and ec2messages",
        )
    return Check("ok", RESOLVER, f"inbound resolver {inbound[0].resolver_id} for SSM's endpoints")
