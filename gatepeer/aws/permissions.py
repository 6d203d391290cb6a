"""Which AWS permissions this configuration needs, and whether the instance role has them.

How each is asked, without changing anything:
- EC2 actions with `DryRun=True`: EC2 answers DryRunOperation when the caller may make the
  call and UnauthorizedOperation when not. moto honours DryRun behind its IAM enforcement the
  same way, so the tests see both answers.
- `ssm:GetParameter`: proven by the doctor's secret check, which reads the key.
- Auto Scaling has no dry run: the lifecycle actions are asked through
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
LIFECYCLE_ACTIONS = (
    "autoscaling:CompleteLifecycleAction",
    "autoscaling:RecordLifecycleActionHeartbeat",
)


@dataclass(frozen=True)
class Permission:
    action: str  # "ec2:ModifyNetworkInterfaceAttribute"
    why: str  # the setting or check that needs it


def needed(config: Config) -> list[Permission]:
    """What doctor's own EC2 checks read, then what each configured [aws]/[ha] feature calls."""
    out = [
        Permission("ec2:DescribeNetworkInterfaceAttribute", "the source/destination check"),
        Permission("ec2:DescribeNetworkInterfaces", "the security group check"),
        Permission("ec2:DescribeSecurityGroups", "the security group check"),
    ]
    if config.packet_path.mode == "route":
        out.append(Permission("ec2:DescribeRouteTables", "the route check"))
    aws = config.aws
    if aws.disable_source_dest_check:
        out.append(
            Permission("ec2:ModifyNetworkInterfaceAttribute", "aws.disable_source_dest_check")
        )
    if config.ha is not None and config.ha.route_tables:
        out.append(Permission("ec2:ReplaceRoute", "ha.route_tables"))
    if config.soracom.auth_key_ssm_parameter:
        out.append(Permission("ssm:GetParameter", "soracom.auth_key_ssm_parameter"))
    hooks = [
        name
        for name, value in (
            ("aws.launch_lifecycle_hook", aws.launch_lifecycle_hook),
            ("aws.termination_lifecycle_hook", aws.termination_lifecycle_hook),
        )
        if value
    ]
    if hooks:
        out += [Permission(action, " and ".join(hooks)) for action in LIFECYCLE_ACTIONS]
    return out


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
    if action == "ec2:ModifyNetworkInterfaceAttribute":
        return dry_run(
            ec2.modify_network_interface_attribute,
            NetworkInterfaceId=s.eni_id,
            SourceDestCheck={"Value": False},
        )
    if action == "ec2:ReplaceRoute":
        if s.device_subnet is None or config.ha is None:
            return None, "the device subnet is not known (the API was not reached)"
        answers = [
            dry_run(
                ec2.replace_route,
                RouteTableId=table,
                DestinationCidrBlock=str(s.device_subnet),
                NetworkInterfaceId=s.eni_id,
            )
            for table in config.ha.route_tables
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
    to_simulate = [p for p in wanted if p.action.startswith("autoscaling:")]
    simulated = simulate(make_client, [p.action for p in to_simulate]) if to_simulate else {}
    for p in wanted:
        if p.action.startswith("ec2:"):
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
