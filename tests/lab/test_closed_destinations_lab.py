"""The allow-list's AWS names end to end: resolved from moto's server on 127.0.0.1 (the
resolver's calls run in the test's own namespace, where moto listens), loaded into the
`allowed_destinations` set of a real nftables table in a namespace with packet_path.closed,
and a changed prefix list refilled into the set without reloading the table."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from helpers.aws_fakes import Moto, offline_aws_env
from helpers.kernel_ns import LOCAL, Namespace, namespace
from helpers.plan_inputs import GATE

from gatepeer.agent import Agent
from gatepeer.aws.clients import AwsTarget, client
from gatepeer.config import PacketPathConfig
from gatepeer.plan import LoadRuleset, UpdateEndpointSet

pytestmark = pytest.mark.netns

REGION = "ap-northeast-1"
VPC = IPv4Network("192.0.2.0/24")


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Namespace]:
    with namespace(tmp_path) as made:
        yield made


def allowed_set(ns: Namespace) -> set[IPv4Network]:
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns.name,
            "nft",
            "-j",
            "list",
            "set",
            "inet",
            "gatepeer",
            "allowed_destinations",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    found: set[IPv4Network] = set()
    for item in json.loads(proc.stdout)["nftables"]:
        for element in item.get("set", {}).get("elem", []):
            if isinstance(element, dict) and "prefix" in element:
                p = element["prefix"]
                found.add(IPv4Network(f"{p['addr']}/{p['len']}"))
            elif isinstance(element, str):
                found.add(IPv4Network(element))
    return found


def table_handle(ns: Namespace) -> int:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns.name, "nft", "-j", "list", "table", "inet", "gatepeer"],
        capture_output=True,
        text=True,
        check=True,
    )
    return next(i["table"]["handle"] for i in json.loads(proc.stdout)["nftables"] if "table" in i)


def test_names_resolved_on_moto_reach_the_kernel_set_and_refill_without_reload(
    moto: Moto, ns: Namespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    offline_aws_env(monkeypatch, tmp_path)
    moto.reset()
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    ec2 = client("ec2", AwsTarget(REGION))
    made = ec2.create_managed_prefix_list(
        PrefixListName="devices-cloud",
        MaxEntries=5,
        AddressFamily="IPv4",
        Entries=[{"Cidr": "203.0.113.0/25"}],
    )["PrefixList"]
    listed = made["PrefixListId"]
    config = dataclasses.replace(
        ns.config(),
        packet_path=PacketPathConfig(
            closed=True,
            outside_vpc="route",
            vpc_cidrs=(VPC,),
            allowed_names=(listed,),
            destinations_cache=tmp_path / "destinations.json",
        ),
    )
    monkeypatch.setattr("gatepeer.aws.integration.InstanceFactsSource.region", lambda self: REGION)
    agent: Agent = ns.call(lambda: Agent(config))
    agent.gate = dataclasses.replace(GATE, outer=LOCAL)
    try:
        # Resolved here, in the test's namespace (moto's), then reconciled in the peer's.
        assert agent.refresh_destinations() is True
        result = ns.call(lambda: agent.reconcile(refresh=False))
        assert result.health == "ok", result.reasons
        assert any(isinstance(a, LoadRuleset) for a in result.actions)
        assert allowed_set(ns) == {IPv4Network("203.0.113.0/25")}
        handle = table_handle(ns)

        ec2.modify_managed_prefix_list(
            PrefixListId=listed,
            CurrentVersion=made["Version"],
            AddEntries=[{"Cidr": "198.51.100.0/24"}],
        )
        assert agent.refresh_destinations(force=True) is True
        result = ns.call(lambda: agent.reconcile(refresh=False))
        assert result.health == "ok", result.reasons
        kinds = {type(a) for a in result.actions}
        assert UpdateEndpointSet in kinds and LoadRuleset not in kinds, result.actions
        assert allowed_set(ns) == {IPv4Network("203.0.113.0/25"), IPv4Network("198.51.100.0/24")}
        assert table_handle(ns) == handle  # refilled, not reloaded
    finally:
        ns.call(agent.close)


def test_a_boot_without_ec2_loads_the_kept_set(
    ns: Namespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from helpers.aws_fakes import closed_port_url

    from gatepeer import atomic_json
    from gatepeer.aws.destinations import ResolvedDestinations

    offline_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_url())
    listed = "pl-0123456789abcdef0"
    cache = tmp_path / "destinations.json"
    kept = ResolvedDestinations({listed: (IPv4Network("203.0.113.0/25"),)}, {listed: 1.0})
    atomic_json.write(cache, kept.to_json())
    config = dataclasses.replace(
        ns.config(),
        packet_path=PacketPathConfig(
            closed=True,
            outside_vpc="route",
            vpc_cidrs=(VPC,),
            allowed_names=(listed,),
            destinations_cache=cache,
        ),
    )
    monkeypatch.setattr("gatepeer.aws.integration.InstanceFactsSource.region", lambda self: REGION)
    agent: Agent = ns.call(lambda: Agent(config))
    agent.gate = dataclasses.replace(GATE, outer=LOCAL)
    try:
        assert agent.refresh_destinations() is False  # EC2 unreachable
        assert agent.destinations is not None and listed in agent.destinations.state.errors
        result = ns.call(lambda: agent.reconcile(refresh=False))
        assert result.health == "ok", result.reasons
        assert allowed_set(ns) == {IPv4Network("203.0.113.0/25")}
    finally:
        ns.call(agent.close)
