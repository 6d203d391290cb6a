"""The doctor's closed-network readings (EC2 and Route 53 Resolver, Describe/List only), judged
by `gatepeer.doctor.closed`. Anything that cannot be read is a `warn` naming the call."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Network
from typing import Any

from gatepeer.aws import AwsError
from gatepeer.aws.clients import error_code, error_message, transport_errors
from gatepeer.aws.destinations import DestinationError, resolve_entry
from gatepeer.aws.ec2 import _call, eni_security_groups, ingress_rules, route_target
from gatepeer.aws.imds import InstanceFacts
from gatepeer.config import Config
from gatepeer.doctor.closed import (
    ENDPOINT_DNS,
    ENDPOINT_SG,
    RESOLVER,
    ROUTE,
    Destination,
    Endpoint,
    Resolver,
    RouteTable,
    TableRoute,
    judge_endpoint_dns,
    judge_endpoint_groups,
    judge_resolver,
    judge_routes,
)
from gatepeer.doctor.judgments import Check


def subnet_route_table(ec2: Any, vpc_id: str, subnet_id: str) -> RouteTable | None:
    """The table the subnet is associated with, else the VPC's main table; with the entries
    of each prefix list its routes name."""
    tables = _call(
        "DescribeRouteTables",
        vpc_id,
        ec2.describe_route_tables,
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
    ).get("RouteTables", [])
    table = next(
        (t for t in tables if any(a.get("SubnetId") == subnet_id for a in t["Associations"])),
        None,
    ) or next((t for t in tables if any(a.get("Main") for a in t["Associations"])), None)
    if table is None:
        return None
    routes: list[TableRoute] = []
    lists: dict[str, tuple[IPv4Network, ...]] = {}
    for route in table.get("Routes", []):
        target = route_target(route, "none")
        state = str(route.get("State", "active"))
        if route.get("DestinationPrefixListId"):
            pl = str(route["DestinationPrefixListId"])
            routes.append(TableRoute(target, prefix_list_id=pl, state=state))
            if pl not in lists:
                try:
                    lists[pl] = resolve_entry(ec2, pl)
                except DestinationError:
                    lists[pl] = ()
            continue
        try:
            destination = IPv4Network(route.get("DestinationCidrBlock") or "")
        except ValueError:
            continue  # IPv6
        routes.append(TableRoute(target, destination=destination, state=state))
    return RouteTable(str(table["RouteTableId"]), tuple(routes), lists)


def destinations(ec2: Any, config: Config) -> list[Destination]:
    pp = config.packet_path
    out = [Destination(str(n), (n,)) for n in pp.allowed_destinations]
    for name in pp.allowed_names:
        try:
            out.append(Destination(name, resolve_entry(ec2, name)))
        except DestinationError as exc:
            out.append(Destination(name, error=str(exc), missing=exc.missing))
    return out


def vpc_endpoints(ec2: Any, vpc_id: str, named: tuple[str, ...]) -> list[Endpoint]:
    """The VPC's endpoints, and those the allow-list names (which may be in a peered VPC)."""
    found = _call(
        "DescribeVpcEndpoints",
        vpc_id,
        ec2.describe_vpc_endpoints,
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
    ).get("VpcEndpoints", [])
    ids = {e["VpcEndpointId"] for e in found}
    elsewhere = [n for n in named if n.startswith("vpce-") and n not in ids]
    for endpoint_id in elsewhere:
        try:
            found += _call(
                "DescribeVpcEndpoints",
                endpoint_id,
                ec2.describe_vpc_endpoints,
                VpcEndpointIds=[endpoint_id],
            ).get("VpcEndpoints", [])
        except AwsError:
            continue  # a missing endpoint is closed-route's finding
    return [
        Endpoint(
            endpoint_id=str(e["VpcEndpointId"]),
            kind=str(e.get("VpcEndpointType", "")),
            service=str(e.get("ServiceName", "")),
            state=str(e.get("State", "")).lower(),
            private_dns=bool(e.get("PrivateDnsEnabled")),
            groups=tuple(str(g["GroupId"]) for g in e.get("Groups", [])),
        )
        for e in found
        if str(e.get("State", "")).lower() not in ("deleted", "deleting", "rejected", "failed")
    ]


def vpc_dns(ec2: Any, vpc_id: str) -> tuple[bool | None, bool | None]:
    out: list[bool | None] = []
    for attribute, key in (
        ("enableDnsSupport", "EnableDnsSupport"),
        ("enableDnsHostnames", "EnableDnsHostnames"),
    ):
        answer = _call(
            "DescribeVpcAttribute",
            vpc_id,
            ec2.describe_vpc_attribute,
            VpcId=vpc_id,
            Attribute=attribute,
        )
        value = answer.get(key, {}).get("Value")
        out.append(bool(value) if value is not None else None)
    return out[0], out[1]


def resolvers(r53: Any, vpc_id: str) -> list[Resolver]:
    from botocore.exceptions import ClientError

    try:
        answer = r53.list_resolver_endpoints(Filters=[{"Name": "HostVPCId", "Values": [vpc_id]}])
    except ClientError as exc:
        raise AwsError(
            f"route53resolver:ListResolverEndpoints on {vpc_id}: "
            f"{error_code(exc) or 'error'}: {error_message(exc)}"
        ) from None
    except transport_errors() as exc:
        raise AwsError(f"route53resolver:ListResolverEndpoints: {exc}") from None
    return [
        Resolver(
            resolver_id=str(r["Id"]),
            direction=str(r.get("Direction", "")),
            status=str(r.get("Status", "")),
            vpc_id=str(r.get("HostVPCId", "")),
        )
        for r in answer.get("ResolverEndpoints", [])
        if r.get("HostVPCId", vpc_id) == vpc_id
    ]


def private_zones(r53: Any, vpc_id: str, region: str) -> list[str]:
    """The names of the Route 53 private hosted zones associated with the VPC."""
    from botocore.exceptions import ClientError

    try:
        answer = r53.list_hosted_zones_by_vpc(VPCId=vpc_id, VPCRegion=region)
    except ClientError as exc:
        raise AwsError(
            f"route53:ListHostedZonesByVPC on {vpc_id}: "
            f"{error_code(exc) or 'error'}: {error_message(exc)}"
        ) from None
    except transport_errors() as exc:
        raise AwsError(f"route53:ListHostedZonesByVPC: {exc}") from None
    return [z["Name"] for z in answer.get("HostedZoneSummaries", [])]


def run(
    config: Config,
    facts: InstanceFacts,
    make_client: Callable[[str], Any],
    *,
    device_subnet: IPv4Network | None,
) -> list[Check]:
    """The closed-network checks; none unless packet_path.closed."""
    if not config.packet_path.closed:
        return []
    out: list[Check] = []
    ec2 = make_client("ec2")
    try:
        table = subnet_route_table(ec2, facts.vpc_id, facts.subnet_id)
        out += judge_routes(table, destinations(ec2, config))
    except AwsError as exc:
        out.append(Check("warn", ROUTE, f"cannot read the route tables: {exc}"))
    try:
        endpoints = vpc_endpoints(ec2, facts.vpc_id, config.packet_path.allowed_names)
    except AwsError as exc:
        return [
            *out,
            *(
                Check("warn", name, f"cannot read the VPC endpoints: {exc}")
                for name in (ENDPOINT_SG, ENDPOINT_DNS, RESOLVER)
            ),
        ]
    try:
        groups = sorted({g for e in endpoints for g in e.groups})
        peer_groups = eni_security_groups(ec2, facts.eni_id)
        out.append(
            judge_endpoint_groups(
                endpoints,
                ingress_rules(ec2, groups),
                mode=config.packet_path.mode,
                peer=facts.private_ipv4,
                peer_groups=peer_groups,
                device_subnet=device_subnet,
            )
        )
    except AwsError as exc:
        out.append(Check("warn", ENDPOINT_SG, f"cannot read the security groups: {exc}"))
    try:
        support, hostnames = vpc_dns(ec2, facts.vpc_id)
        zones: list[str] | None = []
        if any(e.zone_service for e in endpoints if e.kind == "Interface"):
            try:
                zones = private_zones(make_client("route53"), facts.vpc_id, facts.region)
            except AwsError:
                zones = None
        out.append(judge_endpoint_dns(endpoints, support, hostnames, zones))
    except AwsError as exc:
        out.append(Check("warn", ENDPOINT_DNS, f"cannot read the VPC's DNS attributes: {exc}"))
    found: list[Resolver] | None
    try:
        found = resolvers(make_client("route53resolver"), facts.vpc_id)
    except AwsError as exc:
        out.append(Check("warn", RESOLVER, f"cannot read the resolver endpoints: {exc}"))
        return out
    out.append(judge_resolver(endpoints, found))
    return out
