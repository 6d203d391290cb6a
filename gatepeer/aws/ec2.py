"""EC2 calls: the ENI's source/destination check, and the VPC routes toward the device subnet.

Route and nat modes forward packets that are neither from nor to the ENI's own address; EC2
drops them while the ENI's source/destination check is on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from gatepeer.aws import AwsError
from gatepeer.aws.clients import error_code, error_message, http_status, transport_errors


class Ec2Error(AwsError):
    """An EC2 call failed; the message names the call (the IAM action) and the resource."""

    def __init__(self, action: str, resource: str, reason: str, code: str = "") -> None:
        super().__init__(f"ec2:{action} on {resource}: {reason}")
        self.action = action
        self.code = code


def _call(action: str, resource: str, fn: Any, **kwargs: Any) -> Any:
    from botocore.exceptions import ClientError

    try:
        return fn(**kwargs)
    except ClientError as exc:
        code = error_code(exc)
        reason = error_message(exc)
        denied = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
        if code in denied or http_status(exc) == 403:
            reason = f"access denied; the instance role needs ec2:{action}"
        raise Ec2Error(action, resource, reason, code) from None
    except transport_errors() as exc:
        raise Ec2Error(action, resource, error_message(exc)) from None


def source_dest_check(ec2: Any, eni_id: str) -> bool:
    """True when the ENI's source/destination check is on (forwarding is dropped)."""
    answer = _call(
        "DescribeNetworkInterfaceAttribute",
        eni_id,
        ec2.describe_network_interface_attribute,
        NetworkInterfaceId=eni_id,
        Attribute="sourceDestCheck",
    )
    return bool(answer.get("SourceDestCheck", {}).get("Value", True))


def disable_source_dest_check(ec2: Any, eni_id: str) -> bool:
    """Turn the check off and read it back; False when it was already off."""
    if not source_dest_check(ec2, eni_id):
        return False
    _call(
        "ModifyNetworkInterfaceAttribute",
        eni_id,
        ec2.modify_network_interface_attribute,
        NetworkInterfaceId=eni_id,
        SourceDestCheck={"Value": False},
    )
    if source_dest_check(ec2, eni_id):
        raise Ec2Error(
            "ModifyNetworkInterfaceAttribute", eni_id, "accepted, but the check is still on"
        )
    return True


@dataclass(frozen=True)
class VpcRoute:
    """The route a VPC route table uses for the device subnet (its longest matching prefix)."""

    table_id: str
    subnets: tuple[str, ...]  # explicitly associated subnets
    main: bool  # the VPC's main table (used by subnets without an association)
    destination: IPv4Network
    target: str  # the ENI, instance, gateway... id the route sends to
    state: str  # "active" or "blackhole"

    def points_to(self, eni_id: str, instance_id: str) -> bool:
        return self.state == "active" and self.target in (eni_id, instance_id)


_TARGET_KEYS = (
    "NetworkInterfaceId",
    "InstanceId",
    "GatewayId",
    "NatGatewayId",
    "TransitGatewayId",
    "VpcPeeringConnectionId",
    "LocalGatewayId",
    "CarrierGatewayId",
    "CoreNetworkArn",
)


def route_target(route: Mapping[str, Any], missing: str = "?") -> str:
    """The id a route of DescribeRouteTables sends to (ENI, instance, gateway...)."""
    return next((str(route[k]) for k in _TARGET_KEYS if route.get(k)), missing)


def device_subnet_routes(ec2: Any, vpc_id: str, device_subnet: IPv4Network) -> list[VpcRoute]:
    """For each route table of the VPC, the route that carries traffic to the device subnet;
    tables with no such route are left out."""
    answer = _call(
        "DescribeRouteTables",
        vpc_id,
        ec2.describe_route_tables,
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
    )
    found: list[VpcRoute] = []
    for table in answer.get("RouteTables", []):
        best: tuple[IPv4Network, dict[str, Any]] | None = None
        for route in table.get("Routes", []):
            try:
                destination = IPv4Network(route.get("DestinationCidrBlock") or "")
            except ValueError:
                continue  # an IPv6 route or a prefix list
            if device_subnet.subnet_of(destination) and (
                best is None or destination.prefixlen > best[0].prefixlen
            ):
                best = (destination, route)
        if best is None:
            continue
        associations = table.get("Associations", [])
        found.append(
            VpcRoute(
                table_id=table["RouteTableId"],
                subnets=tuple(a["SubnetId"] for a in associations if a.get("SubnetId")),
                main=any(a.get("Main") for a in associations),
                destination=best[0],
                target=route_target(best[1]),
                state=str(best[1].get("State", "active")),
            )
        )
    return found


def table_of_subnet(routes: list[VpcRoute], subnet_id: str) -> VpcRoute | None:
    """The route the given subnet uses: its own table's, else the main table's."""
    own = [r for r in routes if subnet_id in r.subnets]
    if own:
        return own[0]
    return next((r for r in routes if r.main), None)


# ---- security groups: what the ENI admits ------------------------------------------------------

ALL_PROTOCOLS = "-1"
UDP_PROTOCOLS = ("udp", "17", ALL_PROTOCOLS)


@dataclass(frozen=True)
class IngressRule:
    """One inbound permission of a security group, the parts an address can be judged by."""

    group_id: str
    protocol: str  # "udp", "tcp", "17", or "-1" (every protocol, every port)
    from_port: int | None
    to_port: int | None
    sources: tuple[IPv4Network, ...]  # IPv4 CIDR ranges
    # Other security groups and prefix lists: whether they hold an address needs more calls.
    other_sources: tuple[str, ...] = ()

    def admits_udp(self, port: int, source: IPv4Address) -> bool:
        if self.protocol not in UDP_PROTOCOLS:
            return False
        ports_all = self.protocol == ALL_PROTOCOLS or self.from_port in (None, -1)
        if not ports_all and not (self.from_port or 0) <= port <= (self.to_port or 0):
            return False
        return any(source in net for net in self.sources)


def eni_security_groups(ec2: Any, eni_id: str) -> list[str]:
    """The ids of the security groups attached to the ENI."""
    answer = _call(
        "DescribeNetworkInterfaces",
        eni_id,
        ec2.describe_network_interfaces,
        NetworkInterfaceIds=[eni_id],
    )
    interfaces = answer.get("NetworkInterfaces") or []
    if not interfaces:
        raise Ec2Error("DescribeNetworkInterfaces", eni_id, "no such network interface")
    return [str(g["GroupId"]) for g in interfaces[0].get("Groups", []) if g.get("GroupId")]


def ingress_rules(ec2: Any, group_ids: list[str]) -> list[IngressRule]:
    """The inbound rules of these security groups."""
    if not group_ids:
        return []
    answer = _call(
        "DescribeSecurityGroups",
        ",".join(group_ids),
        ec2.describe_security_groups,
        GroupIds=group_ids,
    )
    rules = []
    for group in answer.get("SecurityGroups", []):
        for perm in group.get("IpPermissions", []):
            sources = []
            for r in perm.get("IpRanges", []):
                try:
                    sources.append(IPv4Network(r.get("CidrIp") or "", strict=False))
                except ValueError:
                    continue
            others = [str(p["GroupId"]) for p in perm.get("UserIdGroupPairs", []) if "GroupId" in p]
            others += [str(p["PrefixListId"]) for p in perm.get("PrefixListIds", [])]
            rules.append(
                IngressRule(
                    group_id=str(group["GroupId"]),
                    protocol=str(perm.get("IpProtocol", "")).lower(),
                    from_port=perm.get("FromPort"),
                    to_port=perm.get("ToPort"),
                    sources=tuple(sources),
                    other_sources=tuple(others),
                )
            )
    return rules


def groups_admitting_udp(rules: list[IngressRule], port: int, source: IPv4Address) -> list[str]:
    """The security groups with a rule that lets UDP `port` in from `source`."""
    return sorted({r.group_id for r in rules if r.admits_udp(port, source)})


def point_route_at(ec2: Any, table_id: str, destination: IPv4Network, eni_id: str) -> str:
    """Send `destination` in route table `table_id` to `eni_id` (HA route mode, on MASTER):
    ReplaceRoute, or CreateRoute when the table has no such route yet. Returns which."""
    kwargs = {
        "RouteTableId": table_id,
        "DestinationCidrBlock": str(destination),
        "NetworkInterfaceId": eni_id,
    }
    try:
        _call("ReplaceRoute", table_id, ec2.replace_route, **kwargs)
        return "replaced"
    except Ec2Error as exc:
        # EC2 answers InvalidParameterValue "There is no route defined ... Use CreateRoute".
        missing = exc.code == "InvalidRoute.NotFound" or (
            exc.code == "InvalidParameterValue" and "no route defined" in str(exc)
        )
        if not missing:
            raise
    _call("CreateRoute", table_id, ec2.create_route, **kwargs)
    return "created"


def assign_private_address(ec2: Any, eni_id: str, address: IPv4Address) -> None:
    """Move `address` to `eni_id` as a secondary private address, taking it from whichever ENI
    in the subnet holds it now (HA's `snat_address`, on MASTER). Idempotent: assigning an
    address the ENI already holds succeeds."""
    _call(
        "AssignPrivateIpAddresses",
        f"{address} -> {eni_id}",
        ec2.assign_private_ip_addresses,
        NetworkInterfaceId=eni_id,
        PrivateIpAddresses=[str(address)],
        AllowReassignment=True,
    )


def eni_of_address(ec2: Any, table_id: str, address: str) -> str:
    """The ENI that holds `address` in the VPC of route table `table_id`: how route mode finds
    this instance's ENI without IMDS (private addresses are unique only within a VPC)."""
    tables = _call(
        "DescribeRouteTables",
        table_id,
        ec2.describe_route_tables,
        RouteTableIds=[table_id],
    ).get("RouteTables", [])
    if not tables:
        raise Ec2Error("DescribeRouteTables", table_id, "no such route table")
    vpc_id = tables[0]["VpcId"]
    enis = _call(
        "DescribeNetworkInterfaces",
        f"{address} in {vpc_id}",
        ec2.describe_network_interfaces,
        Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "addresses.private-ip-address", "Values": [address]},
        ],
    ).get("NetworkInterfaces", [])
    if len(enis) != 1:
        raise Ec2Error(
            "DescribeNetworkInterfaces",
            f"{address} in {vpc_id}",
            f"{len(enis)} network interfaces hold this address, expected one",
        )
    return str(enis[0]["NetworkInterfaceId"])
