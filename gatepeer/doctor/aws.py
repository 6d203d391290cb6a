"""The doctor's EC2 checks: the source/destination check, the security groups (UDP 4789 from
the VPG, and in route mode the VPC's traffic forwarded to devices), the VPC route toward the
device subnet, the NAT gateways' return path for devices' own addresses, with
packet_path.closed the closed network (`closed_aws`), and the IAM permissions.

`run` reads (the calls in `gatepeer.aws.ec2` and `gatepeer.aws.permissions`) and asks the pure
judgments in `gatepeer.doctor.judgments`. Off EC2 (DMI decides, no network call) every
check is `skip`. On EC2, what cannot be read (no boto3, IMDS or a call failing, a permission
missing) is a `warn` naming what to fix, never a crash and never a `fail`: only a finding about
the VPC itself fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from gatepeer.aws import AwsError, AwsUnavailable, require_boto3
from gatepeer.aws.clients import AwsTarget, client
from gatepeer.aws.ec2 import (
    Ec2Error,
    VpcRoute,
    _call,
    device_subnet_routes,
    eni_security_groups,
    ingress_rules,
    route_target,
    source_dest_check,
)
from gatepeer.aws.integration import InstanceFactsSource
from gatepeer.aws.permissions import Subject, verify
from gatepeer.config import Config
from gatepeer.doctor import closed, closed_aws
from gatepeer.doctor.judgments import (
    IAM,
    NAMES,
    RETURN_PATH,
    ROUTE,
    SECURITY_GROUP,
    SOURCE_DEST,
    Check,
    NatReturnPath,
    Status,
    judge_permissions,
    judge_return_path,
    judge_routes,
    judge_security_groups,
    judge_source_dest_check,
    return_path_needed,
)

__all__ = ["IAM", "NAMES", "RETURN_PATH", "ROUTE", "SECURITY_GROUP", "SOURCE_DEST", "run"]


def _all(status: Status, detail: str, config: Config | None = None) -> list[Check]:
    closed_names = closed.NAMES if config is not None and config.packet_path.closed else ()
    return [Check(status, name, detail) for name in (*NAMES, *closed_names)]


def run(
    config: Config,
    source: InstanceFactsSource,
    *,
    endpoints: Sequence[IPv4Address],
    device_subnet: IPv4Network | None,
    ssm_read: bool | None,
    make_client: Callable[[str], Any] | None = None,
) -> list[Check]:
    """Every EC2 check; `skip` off EC2 without a single network call."""
    if not source.on_ec2():
        return _all("skip", "not an EC2 instance (DMI): the AWS checks do not apply", config)
    try:
        require_boto3()
    except AwsUnavailable as exc:
        return _all("warn", f"cannot run the AWS checks: {exc}", config)
    facts = source.get()
    if facts is None:
        return _all("warn", f"no instance facts from IMDS: {source.why_missing()}", config)
    if make_client is None:
        region = config.aws.region or facts.region

        def make_client(service: str) -> Any:
            return client(service, AwsTarget(region))

    clients: dict[str, Any] = {}

    def cached(service: str) -> Any:
        if service not in clients:
            clients[service] = make_client(service)
        return clients[service]

    out: list[Check] = []
    try:
        enabled = source_dest_check(cached("ec2"), facts.eni_id)
        out.append(judge_source_dest_check(enabled, facts.eni_id))
    except AwsError as exc:
        out.append(Check("warn", SOURCE_DEST, f"cannot read it: {exc}"))
    try:
        groups = eni_security_groups(cached("ec2"), facts.eni_id)
        rules = ingress_rules(cached("ec2"), groups)
        # Route mode: VPC hosts' packets to devices arrive at this ENI and are judged by its
        # groups; what the VPC is: the config's, else IMDS's, else this subnet.
        vpc = config.packet_path.vpc_cidrs or facts.vpc_cidrs or (facts.subnet_cidr,)
        forwarded = vpc if config.packet_path.mode == "route" else ()
        out.append(
            judge_security_groups(
                groups, rules, endpoints, config.tunnel.destination_port, forwarded_from=forwarded
            )
        )
    except AwsError as exc:
        out.append(Check("warn", SECURITY_GROUP, f"cannot read them: {exc}"))
    routes: list[VpcRoute] = []
    if config.packet_path.mode == "route" and device_subnet is not None:
        try:
            routes = device_subnet_routes(cached("ec2"), facts.vpc_id, device_subnet)
        except Ec2Error as exc:
            out.append(Check("warn", ROUTE, f"cannot read the route tables: {exc}"))
    if not any(name == ROUTE for _, name, _ in out):
        out.append(judge_routes(config.packet_path.mode, routes, facts, device_subnet))
    paths: list[NatReturnPath] = []
    if return_path_needed(config) is None and device_subnet is not None:
        try:
            paths = nat_return_paths(cached("ec2"), facts.vpc_id, device_subnet)
        except Ec2Error as exc:
            out.append(Check("warn", RETURN_PATH, f"cannot read the NAT gateways: {exc}"))
    if not any(name == RETURN_PATH for _, name, _ in out):
        out.append(judge_return_path(config, paths, facts, device_subnet))
    out += closed_aws.run(config, facts, cached, device_subnet=device_subnet)
    subject = Subject(facts.eni_id, facts.vpc_id, device_subnet)
    try:
        out.append(judge_permissions(verify(config, subject, cached, ssm_read=ssm_read)))
    except AwsError as exc:
        out.append(Check("warn", IAM, f"cannot check the permissions: {exc}"))
    return out


def nat_return_paths(ec2: Any, vpc_id: str, device_subnet: IPv4Network) -> list[NatReturnPath]:
    """Each available NAT gateway of the VPC, and where its subnet's route table (its own
    association, else the main table) sends the device subnet."""
    answer = _call(
        "DescribeNatGateways",
        vpc_id,
        ec2.describe_nat_gateways,
        Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "state", "Values": ["available"]},
        ],
    )
    gateways = [(str(g["NatGatewayId"]), str(g["SubnetId"])) for g in answer.get("NatGateways", [])]
    if not gateways:
        return []
    tables = _call(
        "DescribeRouteTables",
        vpc_id,
        ec2.describe_route_tables,
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
    ).get("RouteTables", [])
    out = []
    for nat_id, subnet_id in gateways:
        table = next(
            (t for t in tables if any(a.get("SubnetId") == subnet_id for a in t["Associations"])),
            None,
        ) or next((t for t in tables if any(a.get("Main") for a in t["Associations"])), None)
        out.append(
            NatReturnPath(
                nat_gateway_id=nat_id,
                subnet_id=subnet_id,
                table_id=str(table["RouteTableId"]) if table else None,
                target=_route_target(table, device_subnet) if table else None,
            )
        )
    return out


def _route_target(table: dict[str, Any], device_subnet: IPv4Network) -> str | None:
    """The target of the table's longest active route covering the device subnet."""
    best: tuple[int, str] | None = None
    for route in table.get("Routes", []):
        try:
            destination = IPv4Network(route.get("DestinationCidrBlock") or "")
        except ValueError:
            continue
        if route.get("State", "active") != "active" or not device_subnet.subnet_of(destination):
            continue
        target = route_target(route)
        if best is None or destination.prefixlen > best[0]:
            best = (destination.prefixlen, target)
    return best[1] if best else None
