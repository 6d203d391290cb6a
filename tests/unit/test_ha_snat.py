"""`ha.snat_address`: what only the host can check (its own address, the VPC's networks) names
the key; the address reaches the nftables table's spec (PacketPathSpec.snat_address, rendered by
gatepeer/ruleset.py); without it the spec is today's."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address
from typing import Any

import pytest
from helpers.plan_inputs import FACTS, GATE

from gatepeer.config import Config, HaConfig, PacketPathConfig
from gatepeer.desired_state import DesiredStateError, desired_state, snat_address

SNAT = IPv4Address("198.18.0.12")


def config(snat: IPv4Address | None) -> Config:
    return Config(
        packet_path=PacketPathConfig(mode="nat"),
        ha=HaConfig(peer_address=IPv4Address("198.18.0.11"), snat_address=snat),
    )


def test_snat_address_passes_the_host_checks() -> None:
    assert snat_address(config(SNAT), FACTS) == SNAT
    assert snat_address(config(None), FACTS) is None
    assert snat_address(Config(), FACTS) is None  # no [ha] at all


def test_snat_address_that_is_this_host_names_the_key() -> None:
    with pytest.raises(DesiredStateError, match=r"^ha\.snat_address: 198\.18\.0\.10 is this host"):
        snat_address(config(FACTS.local_address), FACTS)


def test_snat_address_outside_the_vpc_names_the_key_and_where_the_networks_came_from() -> None:
    with pytest.raises(DesiredStateError) as info:
        desired_state(config(IPv4Address("203.0.113.5")), FACTS, GATE)
    assert str(info.value) == (
        "ha.snat_address: 203.0.113.5 is outside the VPC networks this host sees "
        "(198.18.0.0/16, from underlay); it must be in the peers' VPC subnet"
    )
    unknown = dataclasses.replace(FACTS, vpc_networks=(), vpc_networks_source=None)
    assert snat_address(config(IPv4Address("203.0.113.5")), unknown) == IPv4Address("203.0.113.5")


def test_the_table_spec_gets_snat_address_only_when_set() -> None:
    """The NAT address reaches the table's spec when configured; without it the spec's field is
    None, so the table is exactly today's (masquerade)."""
    assert desired_state(config(SNAT), FACTS, GATE).packet_path.snat_address == SNAT
    assert desired_state(config(None), FACTS, GATE).packet_path.snat_address is None


def test_snat_address_makes_tcp_tracking_liberal() -> None:
    """With a NAT address that moves, conntrack tracks TCP liberally (a peer sees only part of
    a flow's segments during a failover); without it the kernel's default stays."""

    def liberal(snat: IPv4Address | None) -> int | None:
        wanted = {s.path: s.value for s in desired_state(config(snat), FACTS, GATE).sysctls}
        return wanted.get("net/netfilter/nf_conntrack_tcp_be_liberal")

    assert liberal(SNAT) == 1
    assert liberal(None) is None


def test_the_permission_check_simulates_assign_private_ip_addresses() -> None:
    """EC2's AssignPrivateIpAddresses takes no DryRun: the check asks IAM's simulation for it
    and reports its answer, allowed or denied."""
    from ipaddress import IPv4Network

    from gatepeer.aws.permissions import Subject, verify

    asked: list[list[str]] = []

    def make_client(decision: str) -> Any:
        class Fake:
            def get_caller_identity(self) -> dict[str, str]:
                return {"Arn": "arn:aws:sts::123456789012:assumed-role/peer/i-1"}

            def simulate_principal_policy(self, **kwargs: Any) -> dict[str, Any]:
                asked.append(kwargs["ActionNames"])
                return {
                    "EvaluationResults": [
                        {"EvalActionName": a, "EvalDecision": decision}
                        for a in kwargs["ActionNames"]
                    ]
                }

            def __getattr__(self, name: str) -> Any:
                def dry_run(**kwargs: Any) -> None:  # EC2 dry runs answer "allowed"
                    return None

                return dry_run

        return lambda service: Fake()

    cfg = config(SNAT)
    subject = Subject("eni-0123", "vpc-0123", IPv4Network("198.19.0.0/16"))
    allowed = verify(cfg, subject, make_client("allowed"), ssm_read=None)
    assert "ec2:AssignPrivateIpAddresses" in allowed.allowed
    assert asked[-1] == ["ec2:AssignPrivateIpAddresses"]
    denied = verify(cfg, subject, make_client("implicitDeny"), ssm_read=None)
    assert [(p.action, p.why) for p in denied.denied] == [
        ("ec2:AssignPrivateIpAddresses", "ha.snat_address")
    ]


def test_the_table_spec_limits_conntrack_events_only_with_the_sync() -> None:
    """conntrackd's sync asks the table for fewer events per flow; without [ha], or with
    `conntrack_sync = false`, no event is held back."""
    synced = config(SNAT)
    assert synced.ha is not None and synced.ha.conntrack_sync  # the default
    assert desired_state(synced, FACTS, GATE).packet_path.sync_events is True
    unsynced = dataclasses.replace(synced, ha=dataclasses.replace(synced.ha, conntrack_sync=False))
    assert desired_state(unsynced, FACTS, GATE).packet_path.sync_events is False
    single = Config(packet_path=PacketPathConfig(mode="nat"))
    assert desired_state(single, FACTS, GATE).packet_path.sync_events is False
