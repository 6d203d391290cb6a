"""The policy `gatepeer aws policy` prints, enforced by moto's IAM: its actions cover every
call doctor's permission check asks for (EC2 dry runs), and the check names what a narrower
policy lacks.

moto checks actions only: it evaluates every EC2 call against the resource "*" and does not
know the ec2:RouteTableID condition, so a statement scoped to an ARN never matches there. The
documents are widened to "*" before moto sees them (`actions_only`); their scoping is checked
by shape in test_stack.py."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from ipaddress import IPv4Network
from typing import Any

import pytest
from helpers.stack_moto import (
    MOTO_ACCOUNT,
    PEER_TOML,
    REGION,
    MotoNetwork,
    client,
    moto_network,
    parsed,
    rendered_user_data,
    written_toml,
)

from gatepeer.aws.permissions import Account, Subject, policy, verify

DEVICE_SUBNET = IPv4Network("10.128.0.0/9")  # only named in dry runs: nothing is routed


@pytest.fixture(scope="module")
def network(moto: Any) -> MotoNetwork:
    return moto_network(moto.url)


@pytest.fixture
def subject(moto: Any, network: MotoNetwork) -> Subject:
    ec2 = client(moto.url, "ec2")
    eni = ec2.create_network_interface(SubnetId=network.subnet_ids[0])["NetworkInterface"]
    return Subject(eni["NetworkInterfaceId"], network.vpc_id, DEVICE_SUBNET)


@pytest.fixture
def as_user(moto: Any) -> Iterator[Any]:
    """as_user(policy_document) -> a client factory with a new IAM user's keys, that policy
    its only one; moto enforces IAM until the test ends."""
    import boto3

    iam = client(moto.url, "iam")
    made = []

    def make(document: dict[str, Any]) -> Any:
        name = f"peer-{secrets.token_hex(3)}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(document))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        made.append(name)
        session = boto3.session.Session(
            aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
        )
        moto.enforce_iam(True)
        return lambda service: session.client(service, region_name=REGION, endpoint_url=moto.url)

    try:
        yield make
    finally:
        moto.enforce_iam(False)


def actions_only(document: dict[str, Any]) -> dict[str, Any]:
    statements = [
        {k: v for k, v in s.items() if k != "Condition"} | {"Resource": "*"}
        for s in document["Statement"]
    ]
    return {**document, "Statement": statements}


def pair_config(table: str) -> Any:
    return parsed(PEER_TOML.format(group="g", other="198.18.0.9").replace("rtb-0123abcd", table))


def test_printed_policy_grants_every_call_doctor_asks_for(
    network: MotoNetwork, subject: Subject, as_user: Any
) -> None:
    config = pair_config(network.route_table_id)
    document = policy([config], Account(partition="aws", region=REGION, account=MOTO_ACCOUNT))
    verdict = verify(config, subject, as_user(actions_only(document)), ssm_read=True)
    assert verdict.denied == []
    for action in ("ec2:CreateRoute", "ec2:ReplaceRoute", "ec2:DescribeNetworkInterfaces"):
        assert action in verdict.allowed


def test_a_policy_without_create_route_is_named_by_the_check(
    network: MotoNetwork, subject: Subject, as_user: Any
) -> None:
    config = pair_config(network.route_table_id)
    document = policy([config], Account(partition="aws", region=REGION, account=MOTO_ACCOUNT))
    for statement in document["Statement"]:
        if statement["Sid"] == "RouteTables":
            statement["Action"] = ["ec2:ReplaceRoute"]
    verdict = verify(config, subject, as_user(actions_only(document)), ssm_read=True)
    assert [(p.action, p.why) for p in verdict.denied] == [("ec2:CreateRoute", "ha.route_tables")]


@pytest.mark.parametrize("mode", ["route", "nat"])
def test_stack_config_policy_grants_every_call_doctor_asks_for(
    moto: Any, network: MotoNetwork, subject: Subject, as_user: Any, mode: str
) -> None:
    """The single peer's config as the stack writes it (source/destination check, hooks, the
    route table, stale registrations)."""
    config = parsed(written_toml(rendered_user_data(moto.url, Mode=mode)))
    document = policy([config], Account(partition="aws", region=REGION, account=MOTO_ACCOUNT))
    verdict = verify(config, subject, as_user(actions_only(document)), ssm_read=True)
    assert verdict.denied == []
    assert "ec2:ModifyNetworkInterfaceAttribute" in verdict.allowed


def test_snat_address_needs_assign_private_ip_addresses(
    network: MotoNetwork, subject: Subject, as_user: Any
) -> None:
    """The printed policy has the master's move of ha.snat_address. EC2's
    AssignPrivateIpAddresses takes no DryRun, so the check asks IAM's simulation, which moto
    lacks: not verified, never taken for missing (tests/unit/test_ha_snat.py simulates both
    answers)."""
    import dataclasses
    from ipaddress import IPv4Address

    base = pair_config(network.route_table_id)
    config = dataclasses.replace(
        base, ha=dataclasses.replace(base.ha, snat_address=IPv4Address("198.18.0.200"))
    )
    document = policy([config], Account(partition="aws", region=REGION, account=MOTO_ACCOUNT))
    (interface,) = [s for s in document["Statement"] if s["Sid"] == "NetworkInterface"]
    actions = interface["Action"]
    assert "ec2:AssignPrivateIpAddresses" in ([actions] if isinstance(actions, str) else actions)
    verdict = verify(config, subject, as_user(actions_only(document)), ssm_read=True)
    assert verdict.denied == []
    unverified = dict(verdict.unverified)
    assert unverified["ec2:AssignPrivateIpAddresses"].startswith("iam:SimulatePrincipalPolicy")
