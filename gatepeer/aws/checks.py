"""The doctor's EC2 checks: the source/destination check, the security groups' UDP 4789, the
VPC route toward the device subnet, and the IAM permissions.

Each check is a pure judgment over values read by `run`; the reads are the calls in
`gatepeer.aws.ec2` and `gatepeer.aws.permissions`. Off EC2 (DMI decides, no network call) every
check is `skip`. On EC2, what cannot be read (no boto3, IMDS or a call failing, a permission
missing) is a `warn` naming what to fix, never a crash and never a `fail`: only a finding about
the VPC itself fails.

Results are plain (status, name, detail) tuples, so this module needs nothing of the doctor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from gatepeer.aws import AwsError, AwsUnavailable, require_boto3
from gatepeer.aws.clients import AwsTarget, client
from gatepeer.aws.ec2 import (
    Ec2Error,
    IngressRule,
    VpcRoute,
    device_subnet_routes,
    eni_security_groups,
    groups_admitting_udp,
    ingress_rules,
    source_dest_check,
)
from gatepeer.aws.imds import InstanceFacts
from gatepeer.aws.integration import InstanceFactsSource
from gatepeer.aws.permissions import Subject, Verdict, verify
from gatepeer.config import Config

Result = tuple[str, str, str]  # (status, name, detail)

SOURCE_DEST = "aws-source-dest-check"
SECURITY_GROUP = "aws-security-group"
ROUTE = "aws-route"
IAM = "aws-iam"
NAMES = (SOURCE_DEST, SECURITY_GROUP, ROUTE, IAM)


# ---- judgments ----------------------------------------------------------------------------------


def judge_source_dest_check(enabled: bool, eni_id: str) -> Result:
    if enabled:
        return (
            "fail",
            SOURCE_DEST,
            f"the source/destination check is on for {eni_id}: EC2 drops every packet this "
            "peer forwards; turn it off (aws ec2 modify-network-interface-attribute "
            f"--network-interface-id {eni_id} --no-source-dest-check, or set "
            "aws.disable_source_dest_check = true)",
        )
    return "ok", SOURCE_DEST, f"off for {eni_id}: EC2 passes the traffic this peer forwards"


def judge_security_groups(
    groups: Sequence[str], rules: Sequence[IngressRule], endpoints: Sequence[IPv4Address], port: int
) -> Result:
    if not endpoints:
        return "skip", SECURITY_GROUP, "no VPG endpoint is known (the API was not reached)"
    shut = [e for e in endpoints if not groups_admitting_udp(list(rules), port, e)]
    if not shut:
        return (
            "ok",
            SECURITY_GROUP,
            f"{', '.join(groups)} admit UDP {port} from every VPG endpoint "
            f"({', '.join(map(str, endpoints))})",
        )
    unjudged = sorted({s for r in rules for s in r.other_sources})
    addresses = ", ".join(str(e) for e in shut)
    if unjudged:
        return (
            "warn",
            SECURITY_GROUP,
            f"no CIDR rule of {', '.join(groups) or 'the ENI'} admits UDP {port} from "
            f"{addresses}; rules naming {', '.join(unjudged)} were not judged: make sure one of "
            f"them holds those addresses, or add inbound UDP {port} from each /32",
        )
    return (
        "fail",
        SECURITY_GROUP,
        f"no security group on the ENI ({', '.join(groups) or 'none'}) admits UDP {port} from "
        f"VPG endpoint {addresses}: the VPG's VXLAN is dropped; add an inbound rule for UDP "
        f"{port} from each endpoint's /32",
    )


def judge_routes(
    mode: str,
    routes: Sequence[VpcRoute],
    facts: InstanceFacts,
    device_subnet: IPv4Network | None,
) -> Result:
    if mode != "route":
        return "skip", ROUTE, f"packet_path.mode is {mode}: the VPC needs no route to the devices"
    if device_subnet is None:
        return "skip", ROUTE, "the device subnet is not known (the API was not reached)"
    ours = [r for r in routes if r.points_to(facts.eni_id, facts.instance_id)]
    if not ours:
        elsewhere = [f"{r.table_id} sends {r.destination} to {r.target}" for r in routes]
        return (
            "fail",
            ROUTE,
            f"no route table of {facts.vpc_id} sends {device_subnet} to {facts.eni_id} or "
            f"{facts.instance_id}"
            + (f" ({'; '.join(elsewhere)})" if elsewhere else "")
            + f": add a route {device_subnet} -> {facts.eni_id} to the route table of each "
            "subnet whose hosts talk to the devices",
        )
    own_subnet = [r for r in ours if facts.subnet_id in r.subnets or r.main]
    names = ", ".join(r.table_id + (" (main)" if r.main else "") for r in ours)
    note = "" if own_subnet else f"; {facts.subnet_id}'s own table has no such route"
    return "ok", ROUTE, f"{names} send {device_subnet} to this peer{note}"


def judge_permissions(verdict: Verdict) -> Result:
    if verdict.denied:
        missing = ", ".join(f"{p.action} (for {p.why})" for p in verdict.denied)
        return "warn", IAM, f"the instance role lacks {missing}: add them to its policy"
    detail = f"allowed: {', '.join(verdict.allowed) or 'nothing needed'}"
    if verdict.unverified:
        detail += "; not verified: " + ", ".join(f"{a} ({why})" for a, why in verdict.unverified)
    return "ok", IAM, detail


# ---- the calls ----------------------------------------------------------------------------------


def _all(status: str, detail: str) -> list[Result]:
    return [(status, name, detail) for name in NAMES]


def run(
    config: Config,
    source: InstanceFactsSource,
    *,
    endpoints: Sequence[IPv4Address],
    device_subnet: IPv4Network | None,
    ssm_read: bool | None,
    make_client: Callable[[str], Any] | None = None,
) -> list[Result]:
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

    out: list[Result] = []
    try:
        enabled = source_dest_check(cached("ec2"), facts.eni_id)
        out.append(judge_source_dest_check(enabled, facts.eni_id))
    except AwsError as exc:
        out.append(("warn", SOURCE_DEST, f"cannot read it: {exc}"))
    try:
        groups = eni_security_groups(cached("ec2"), facts.eni_id)
        rules = ingress_rules(cached("ec2"), groups)
        out.append(judge_security_groups(groups, rules, endpoints, config.tunnel.destination_port))
    except AwsError as exc:
        out.append(("warn", SECURITY_GROUP, f"cannot read them: {exc}"))
    routes: list[VpcRoute] = []
    if config.packet_path.mode == "route" and device_subnet is not None:
        try:
            routes = device_subnet_routes(cached("ec2"), facts.vpc_id, device_subnet)
        except Ec2Error as exc:
            out.append(("warn", ROUTE, f"cannot read the route tables: {exc}"))
    if not any(name == ROUTE for _, name, _ in out):
        out.append(judge_routes(config.packet_path.mode, routes, facts, device_subnet))
    subject = Subject(facts.eni_id, facts.vpc_id, device_subnet)
    try:
        out.append(judge_permissions(verify(config, subject, cached, ssm_read=ssm_read)))
    except AwsError as exc:
        out.append(("warn", IAM, f"cannot check the permissions: {exc}"))
    return out
