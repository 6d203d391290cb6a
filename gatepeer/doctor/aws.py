"""The doctor's EC2 checks: the source/destination check, the security groups' UDP 4789, the
VPC route toward the device subnet, and the IAM permissions.

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
    device_subnet_routes,
    eni_security_groups,
    ingress_rules,
    source_dest_check,
)
from gatepeer.aws.integration import InstanceFactsSource
from gatepeer.aws.permissions import Subject, verify
from gatepeer.config import Config
from gatepeer.doctor.judgments import (
    IAM,
    NAMES,
    ROUTE,
    SECURITY_GROUP,
    SOURCE_DEST,
    Check,
    Status,
    judge_permissions,
    judge_routes,
    judge_security_groups,
    judge_source_dest_check,
)

__all__ = ["IAM", "NAMES", "ROUTE", "SECURITY_GROUP", "SOURCE_DEST", "run"]


def _all(status: Status, detail: str) -> list[Check]:
    return [Check(status, name, detail) for name in NAMES]


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
        return _all("skip", "not an EC2 instance (DMI): the AWS checks do not apply")
    try:
        require_boto3()
    except AwsUnavailable as exc:
        return _all("warn", f"cannot run the AWS checks: {exc}")
    facts = source.get()
    if facts is None:
        return _all("warn", f"no instance facts from IMDS: {source.why_missing()}")
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
        out.append(judge_security_groups(groups, rules, endpoints, config.tunnel.destination_port))
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
    subject = Subject(facts.eni_id, facts.vpc_id, device_subnet)
    try:
        out.append(judge_permissions(verify(config, subject, cached, ssm_read=ssm_read)))
    except AwsError as exc:
        out.append(Check("warn", IAM, f"cannot check the permissions: {exc}"))
    return out
