"""Which AWS permissions this configuration needs, and whether the instance role has them.

How each is asked, without changing anything:
- EC2 actions with `DryRun=True`: EC2 answers DryRunOperation when the caller may make the
  call and UnauthorizedOperation when not. moto honours DryRun behind its IAM enforcement the
  same way, so the tests see both answers.
- `ssm:GetParameter`: proven by the doctor's secret check, which reads the key.
- Auto Scaling, Route 53 and Route 53 Resolver have no dry run, nor has EC2's
  AssignPrivateIpAddresses (`NO_DRY_RUN`): those actions are asked through
  `iam:SimulatePrincipalPolicy` for the role behind the instance's credentials. That needs the
  permission itself (instance roles rarely have it) and moto does not implement it, so when no
  simulation can be made those actions are reported as not verified, never as missing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

from gatepeer.aws.clients import error_code, error_message, http_status
from gatepeer.config import Config

DENIED_CODES = frozenset(
    {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException", "AuthFailure"}
)
# EC2 actions whose API takes no DryRun: asked by simulation, as Auto Scaling's are.
NO_DRY_RUN = frozenset({"ec2:AssignPrivateIpAddresses"})
LIFECYCLE_ACTIONS = (
    "autoscaling:CompleteLifecycleAction",
    "autoscaling:RecordLifecycleActionHeartbeat",
)


@dataclass(frozen=True)
class Permission:
    action: str  # "ec2:ModifyNetworkInterfaceAttribute"
    why: str  # the setting or check that needs it
    scope: str = "Describe"  # the policy statement (its Sid) that grants it; see SCOPES


# What each scope's statement is allowed on. Describe* actions take no resource-level
# permissions; the ENI is not known when the policy is written (any in this account and
# region); route tables are named by the ec2:RouteTableID condition key (see policy()).
SCOPES: dict[str, str] = {
    "Describe": "*",
    "NetworkInterface": "arn:{partition}:ec2:{region}:{account}:network-interface/*",
    "RouteTables": "arn:{partition}:ec2:{region}:{account}:route-table/*",
    "AuthKey": "arn:{partition}:ssm:{region}:{account}:parameter{name}",
    "LifecycleHooks": (
        "arn:{partition}:autoscaling:{region}:{account}:autoScalingGroup:*:"
        "autoScalingGroupName/{name}"
    ),
}
# What the README's IAM table says each scope's resource is.
SCOPE_RESOURCES: dict[str, str] = {
    "Describe": "`*` (Describe actions take no resource-level permissions)",
    "NetworkInterface": "`network-interface/*` in this account and region (the ENI is not "
    "known when the policy is written)",
    "RouteTables": "`route-table/*` on the condition `ec2:RouteTableID` = the listed tables",
    "AuthKey": "the parameter (`arn:aws:ssm:REGION:ACCOUNT:parameter/gatepeer/auth-key`); "
    "`kms:Decrypt` on the key too when it is a customer managed key",
    "LifecycleHooks": "the Auto Scaling group (`aws.autoscaling_group`)",
}


def _route_tables(config: Config) -> tuple[str, ...]:
    """Every route table gatepeer may point at this instance: [aws] (a single peer, at each
    reconcile) and [ha] (the master's claim)."""
    single = config.aws.route_tables
    pair = config.ha.route_tables if config.ha is not None else ()
    return tuple(dict.fromkeys((*single, *pair)))


@dataclass(frozen=True)
class Feature:
    """One setting (or check) and the actions it calls, each in its statement's scope."""

    setting: str
    grants: tuple[tuple[str, str], ...]  # (action, scope)
    applies: Callable[[Config], bool]
    row: str = ""  # the IAM table's first column when it is not the setting's key


_ROUTES = (
    ("ec2:DescribeRouteTables", "Describe"),
    ("ec2:DescribeNetworkInterfaces", "Describe"),
    ("ec2:CreateRoute", "RouteTables"),
    ("ec2:ReplaceRoute", "RouteTables"),
)
_LIFECYCLE = tuple((action, "LifecycleHooks") for action in LIFECYCLE_ACTIONS)

# The one list of what gatepeer calls in AWS, by setting: `needed()`, `gatepeer aws policy`,
# the CloudFormation stack's role (checked by tests/delivery/test_stack.py) and the IAM table in
# docs/deploy.md all come from here.
FEATURES: tuple[Feature, ...] = (
    Feature(
        "the source/destination check",
        (("ec2:DescribeNetworkInterfaceAttribute", "Describe"),),
        lambda c: True,
        "any peer on EC2 (doctor's source/destination check)",
    ),
    Feature(
        "the security group check",
        (
            ("ec2:DescribeNetworkInterfaces", "Describe"),
            ("ec2:DescribeSecurityGroups", "Describe"),
        ),
        lambda c: True,
        "any peer on EC2 (doctor's security group check)",
    ),
    Feature(
        "the route check",
        (("ec2:DescribeRouteTables", "Describe"),),
        lambda c: c.packet_path.mode == "route",
        '`packet_path.mode = "route"` (doctor\'s route check)',
    ),
    Feature(
        "the return-path check",
        (("ec2:DescribeNatGateways", "Describe"),),
        lambda c: (
            c.packet_path.mode == "route"
            and c.packet_path.outside_vpc == "route"
            and c.soracom.redirection == "self"
        ),
        '`packet_path.outside_vpc = "route"` with `soracom.redirection = "self"` '
        "(doctor's return-path check)",
    ),
    Feature(
        "packet_path.allowed_destinations",
        (
            ("ec2:DescribeManagedPrefixLists", "Describe"),
            ("ec2:GetManagedPrefixListEntries", "Describe"),
            ("ec2:DescribeVpcEndpoints", "Describe"),
            ("ec2:DescribeNetworkInterfaces", "Describe"),
        ),
        lambda c: bool(c.packet_path.allowed_names),
        "`packet_path.allowed_destinations` naming `pl-…`, `com.amazonaws.…` or `vpce-…`",
    ),
    Feature(
        "the closed-network check",
        (
            ("ec2:DescribeRouteTables", "Describe"),
            ("ec2:DescribeVpcEndpoints", "Describe"),
            ("ec2:DescribeManagedPrefixLists", "Describe"),
            ("ec2:DescribeSecurityGroups", "Describe"),
            ("ec2:DescribeVpcAttribute", "Describe"),
            ("route53resolver:ListResolverEndpoints", "Describe"),
            ("route53:ListHostedZonesByVPC", "Describe"),
        ),
        lambda c: c.packet_path.closed,
        "`packet_path.closed = true` (doctor's closed-network check)",
    ),
    Feature(
        "aws.disable_source_dest_check",
        (("ec2:ModifyNetworkInterfaceAttribute", "NetworkInterface"),),
        lambda c: c.aws.disable_source_dest_check,
    ),
    Feature(
        "aws.route_tables",
        _ROUTES,
        lambda c: bool(c.aws.route_tables),
    ),
    Feature(
        "ha.route_tables",
        _ROUTES,
        lambda c: c.ha is not None and bool(c.ha.route_tables),
    ),
    Feature(
        "ha.snat_address",
        (("ec2:AssignPrivateIpAddresses", "NetworkInterface"),),
        lambda c: c.ha is not None and c.ha.snat_address is not None,
        "`ha.snat_address` (the master's claim moves it to its ENI)",
    ),
    Feature(
        "aws.remove_stale_registrations",
        (("ec2:DescribeNetworkInterfaces", "Describe"),),
        lambda c: c.aws.remove_stale_registrations,
    ),
    Feature(
        "soracom.auth_key_ssm_parameter",
        (("ssm:GetParameter", "AuthKey"),),
        lambda c: bool(c.soracom.auth_key_ssm_parameter),
    ),
    Feature(
        "aws.launch_lifecycle_hook",
        _LIFECYCLE,
        lambda c: bool(c.aws.launch_lifecycle_hook),
    ),
    Feature(
        "aws.termination_lifecycle_hook",
        _LIFECYCLE,
        lambda c: bool(c.aws.termination_lifecycle_hook),
    ),
)


def needed(config: Config) -> list[Permission]:
    """Each action this config calls (doctor's own EC2 checks first, then each configured
    feature), once, with every setting that needs it."""
    why: dict[str, list[str]] = {}
    scope: dict[str, str] = {}
    for feature in FEATURES:
        if not feature.applies(config):
            continue
        for action, in_scope in feature.grants:
            why.setdefault(action, []).append(feature.setting)
            scope[action] = in_scope
    return [Permission(action, " and ".join(why[action]), scope[action]) for action in why]


@dataclass(frozen=True)
class Account:
    """Where the policy applies; "*" when not known (any region, any account)."""

    partition: str = "aws"
    region: str = "*"
    account: str = "*"


def policy(configs: list[Config], where: Account) -> dict[str, Any]:
    """The minimal IAM policy document for instances running these configs (one, or both
    peers of a pair sharing a role): one statement per scope, in SCOPES order, actions sorted."""
    actions: dict[str, set[str]] = {}
    for config in configs:
        for p in needed(config):
            actions.setdefault(p.scope, set()).add(p.action)
    statements: list[dict[str, Any]] = []
    for scope, pattern in SCOPES.items():
        if scope not in actions:
            continue
        names = sorted(_scope_names(scope, configs))
        arns = [
            pattern.format(
                partition=where.partition, region=where.region, account=where.account, name=n
            )
            for n in (names or [""])
        ]
        statement: dict[str, Any] = {
            "Sid": scope,
            "Effect": "Allow",
            "Action": sorted(actions[scope]),
            "Resource": arns[0] if len(arns) == 1 else arns,
        }
        if scope == "RouteTables":
            # One ARN per table cannot be written in CloudFormation from a list of ids (the
            # stack renders this same policy), so the condition key names the tables.
            statement["Resource"] = arns[0]
            statement["Condition"] = {"StringEquals": {"ec2:RouteTableID": names}}
        statements.append(statement)
    return {"Version": "2012-10-17", "Statement": statements}


def _scope_names(scope: str, configs: list[Config]) -> set[str]:
    """The names a scope's resources carry: SSM parameter paths, Auto Scaling group names,
    route table ids."""
    out: set[str] = set()
    for c in configs:
        if scope == "AuthKey" and c.soracom.auth_key_ssm_parameter:
            name = c.soracom.auth_key_ssm_parameter
            out.add(name if name.startswith("/") else f"/{name}")
        elif scope == "LifecycleHooks":
            out.add(c.aws.autoscaling_group or "*")
        elif scope == "RouteTables":
            out.update(_route_tables(c))
    return out


def iam_table() -> str:
    """The README's IAM table (Markdown), one row per setting or check, from FEATURES."""
    rows = [
        "| setting | actions | resource |",
        "|---|---|---|",
    ]
    for feature in FEATURES:
        by_scope: dict[str, list[str]] = {}
        for action, scope in feature.grants:
            by_scope.setdefault(scope, []).append(f"`{action}`")
        actions = "; ".join(", ".join(a) for a in by_scope.values())
        resources = "; ".join(SCOPE_RESOURCES[s] for s in by_scope)
        setting = feature.row or f"`{feature.setting}`"
        rows.append(f"| {setting} | {actions} | {resources} |")
    return "\n".join(rows) + "\n"


@dataclass
class Verdict:
    allowed: list[str] = field(default_factory=list)
    denied: list[Permission] = field(default_factory=list)
    unverified: list[tuple[str, str]] = field(default_factory=list)  # (action, why not)


@dataclass(frozen=True)
class Subject:
    """What the dry runs act on: this instance's ENI, VPC and the device subnet."""

    eni_id: str
    vpc_id: str
    device_subnet: IPv4Network | None


def dry_run(fn: Callable[..., Any], **kwargs: Any) -> tuple[bool | None, str]:
    """(True, "") allowed, (False, "") denied, (None, why) when the answer says neither."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        fn(DryRun=True, **kwargs)
    except ClientError as exc:
        code = error_code(exc)
        if code == "DryRunOperation":
            return True, ""
        if code in DENIED_CODES or http_status(exc) == 403:
            return False, ""
        return None, f"{code}: {error_message(exc)}"
    except BotoCoreError as exc:
        return None, error_message(exc)
    return True, ""  # answered for real (an endpoint that ignores DryRun): allowed


def _ec2_call(ec2: Any, action: str, s: Subject, config: Config) -> tuple[bool | None, str]:
    if action == "ec2:DescribeNetworkInterfaceAttribute":
        return dry_run(
            ec2.describe_network_interface_attribute,
            NetworkInterfaceId=s.eni_id,
            Attribute="sourceDestCheck",
        )
    if action == "ec2:DescribeNetworkInterfaces":
        return dry_run(ec2.describe_network_interfaces, NetworkInterfaceIds=[s.eni_id])
    if action == "ec2:DescribeSecurityGroups":
        return dry_run(ec2.describe_security_groups)
    if action == "ec2:DescribeRouteTables":
        return dry_run(
            ec2.describe_route_tables, Filters=[{"Name": "vpc-id", "Values": [s.vpc_id]}]
        )
    if action == "ec2:DescribeManagedPrefixLists":
        return dry_run(ec2.describe_managed_prefix_lists)
    if action == "ec2:GetManagedPrefixListEntries":
        lists = [n for n in config.packet_path.allowed_names if n.startswith("pl-")]
        if not lists:
            return None, "no pl-... entry to ask about (DescribeManagedPrefixLists is asked)"
        return dry_run(ec2.get_managed_prefix_list_entries, PrefixListId=lists[0])
    if action == "ec2:DescribeVpcEndpoints":
        return dry_run(ec2.describe_vpc_endpoints)
    if action == "ec2:DescribeVpcAttribute":
        return dry_run(ec2.describe_vpc_attribute, VpcId=s.vpc_id, Attribute="enableDnsSupport")
    if action == "ec2:ModifyNetworkInterfaceAttribute":
        return dry_run(
            ec2.modify_network_interface_attribute,
            NetworkInterfaceId=s.eni_id,
            SourceDestCheck={"Value": False},
        )
    if action in ("ec2:ReplaceRoute", "ec2:CreateRoute"):
        if s.device_subnet is None:
            return None, "the device subnet is not known (the API was not reached)"
        call = ec2.replace_route if action == "ec2:ReplaceRoute" else ec2.create_route
        answers = [
            dry_run(
                call,
                RouteTableId=table,
                DestinationCidrBlock=str(s.device_subnet),
                NetworkInterfaceId=s.eni_id,
            )
            for table in _route_tables(config)
        ]
        if any(a[0] is False for a in answers):
            return False, ""
        unknown = [why for ok, why in answers if ok is None]
        return (None, unknown[0]) if unknown else (True, "")
    return None, "no dry run for this action"


def principal_arn(caller_arn: str) -> str:
    """The IAM role behind an assumed-role session ARN (what SimulatePrincipalPolicy takes);
    any other ARN as it is. A role's path is not in the session ARN, so a role with a path is
    named without it (the simulation then fails and says so)."""
    parts = caller_arn.split(":", 5)
    if len(parts) == 6 and parts[2] == "sts" and parts[5].startswith("assumed-role/"):
        role = parts[5].split("/")[1]
        return f"arn:{parts[1]}:iam::{parts[4]}:role/{role}"
    return caller_arn


def simulate(make_client: Callable[[str], Any], actions: list[str]) -> dict[str, bool | str]:
    """action -> allowed (bool), or the reason no simulation could be made (str)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        arn = principal_arn(str(make_client("sts").get_caller_identity()["Arn"]))
        answer = make_client("iam").simulate_principal_policy(
            PolicySourceArn=arn, ActionNames=actions
        )
    except ClientError as exc:
        code = error_code(exc)
        reason = (
            "iam:SimulatePrincipalPolicy is denied to this role"
            if code in DENIED_CODES or http_status(exc) == 403
            else f"iam:SimulatePrincipalPolicy failed: {code or error_message(exc)}"
        )
        return dict.fromkeys(actions, reason)
    except (BotoCoreError, KeyError) as exc:
        return dict.fromkeys(actions, f"iam:SimulatePrincipalPolicy failed: {exc}")
    except Exception as exc:  # noqa: BLE001 - e.g. an endpoint without it answers 500 in HTML
        reason = f"iam:SimulatePrincipalPolicy unavailable ({type(exc).__name__})"
        return dict.fromkeys(actions, reason)
    decided: dict[str, bool | str] = dict.fromkeys(actions, "not in the simulation's answer")
    for result in answer.get("EvaluationResults", []):
        name = result.get("EvalActionName")
        if name in decided:
            decided[name] = result.get("EvalDecision") == "allowed"
    return decided


def verify(
    config: Config,
    subject: Subject,
    make_client: Callable[[str], Any],
    *,
    ssm_read: bool | None,
) -> Verdict:
    """Ask for each needed permission; `ssm_read`: the secret check read the key from SSM
    (True), was denied (False), or did not get that far (None)."""
    verdict = Verdict()
    wanted = needed(config)
    ec2 = make_client("ec2") if any(p.action.startswith("ec2:") for p in wanted) else None
    # Auto Scaling, Route 53 Resolver and the actions listed in NO_DRY_RUN have no dry run.
    to_simulate = [
        p
        for p in wanted
        if p.action.split(":")[0] in ("autoscaling", "route53resolver", "route53")
        or p.action in NO_DRY_RUN
    ]
    simulated = simulate(make_client, [p.action for p in to_simulate]) if to_simulate else {}
    for p in wanted:
        if p.action.startswith("ec2:") and p.action not in NO_DRY_RUN:
            ok, why = _ec2_call(ec2, p.action, subject, config)
        elif p.action == "ssm:GetParameter":
            ok, why = ssm_read, "the key was not read (see the secret check)"
        else:
            answer = simulated.get(p.action, "not simulated")
            ok, why = (answer, "") if isinstance(answer, bool) else (None, answer)
        if ok is True:
            verdict.allowed.append(p.action)
        elif ok is False:
            verdict.denied.append(p)
        else:
            verdict.unverified.append((p.action, why))
    return verdict
