"""The HA master's claim (gatepeer.ha.claim) and how [ha] changes who manages the redirection:
the reconcile never posts it with [ha] (so two peers with redirection = "self" cannot take the
gateway from each other), the master's claim does, with its inner address or the virtual
address; route mode points the route tables at this instance's ENI (moto on 127.0.0.1)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from helpers.aws_fakes import Moto, offline_aws_env

from gatepeer import redirection
from gatepeer.config import Config, HaConfig, SoracomConfig
from gatepeer.desired_state import Endpoint, GateView, Redirection
from gatepeer.ha.claim import ClaimError, GatewayClaim, RouteTarget

VPG = "vpg-1"
INNER = IPv4Interface("10.128.0.5/9")
VIP = IPv4Address("10.128.0.100")
PEER_INNER = IPv4Address("10.128.0.6")
MOTO_IMAGE = "ami-12c6146b"


def gate(gateway: IPv4Address | None = None) -> GateView:
    return GateView(
        vpg_id=VPG,
        vni=10,
        device_subnet=IPv4Network("10.128.0.0/9"),
        gate_opened=True,
        inner=INNER,
        endpoints=(Endpoint(IPv4Address("100.64.0.1"), None),),
        outer=IPv4Address("198.18.0.10"),
        redirection=Redirection(True, gateway) if gateway else None,
    )


def config(*, ha: bool = True, vip: bool = False, tables: tuple[str, ...] = ()) -> Config:
    return Config(
        soracom=SoracomConfig(vpg_id=VPG, redirection="self"),
        ha=HaConfig(
            peer_address=IPv4Address("198.18.0.11"),
            virtual_address=VIP if vip else None,
            route_tables=tables,
        )
        if ha
        else None,
    )


class FakeApi:
    def __init__(self, fail: int = 0) -> None:
        self.posts: list[tuple[str, str]] = []
        self.fail = fail

    def set_redirection(self, vpg_id: str, gateway: str) -> None:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("HTTP 503")
        self.posts.append((vpg_id, gateway))


def test_with_ha_the_reconcile_never_posts_the_redirection_even_with_self() -> None:
    # The backup sees the gateway on the other peer: no post, and no degraded finding.
    elsewhere = gate(PEER_INNER)
    assert redirection.wanted_change(config(ha=False), elsewhere) == Redirection(True, INNER.ip)
    assert redirection.wanted_change(config(), elsewhere) is None
    assert redirection.findings("nat", "self", elsewhere) != []
    assert redirection.findings("nat", "self", elsewhere, ha=config().ha) == []


def test_claim_gateway_is_the_inner_address_or_the_virtual_one() -> None:
    assert redirection.claim_gateway(config(), gate()) == INNER.ip
    assert redirection.claim_gateway(config(vip=True), gate()) == VIP
    assert redirection.points_here(gate(VIP)) is False
    assert redirection.points_here(gate(VIP), VIP) is True
    assert redirection.points_here(gate(INNER.ip), VIP) is True


def test_the_claim_posts_this_peers_gateway() -> None:
    api = FakeApi()
    cfg = config()
    claim = GatewayClaim(lambda: cfg, lambda: gate(PEER_INNER), api)
    claim()
    assert api.posts == [(VPG, str(INNER.ip))]
    cfg = config(vip=True)
    claim()
    assert api.posts[-1] == (VPG, str(VIP))
    assert claim.done == [f"redirection gateway {VIP}"]


def test_no_gate_view_yet_is_a_claim_error_the_coordinator_retries() -> None:
    api = FakeApi()
    claim = GatewayClaim(config, lambda: None, api)
    with pytest.raises(ClaimError, match="no gate view yet"):
        claim()
    assert api.posts == []


def test_route_tables_without_ec2_access_fail_the_claim_after_the_redirection() -> None:
    api = FakeApi()
    claim = GatewayClaim(lambda: config(tables=("rtb-1",)), gate, api)
    with pytest.raises(ClaimError, match="ha.route_tables"):
        claim()
    assert api.posts == [(VPG, str(INNER.ip))]


# ---- route mode against moto ------------------------------------------------------------


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    server = Moto()
    try:
        yield server
    finally:
        server.stop()


@dataclasses.dataclass
class TwoInstances:
    ec2: Any
    tables: tuple[str, str]
    enis: tuple[str, str]


@pytest.fixture
def vpc(moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> TwoInstances:
    from gatepeer.aws.clients import AwsTarget, client

    offline_aws_env(monkeypatch, tmp_path)
    moto.reset()
    ec2 = client("ec2", AwsTarget("ap-northeast-1", endpoint_url=moto.url))
    vpc_id = ec2.create_vpc(CidrBlock="198.18.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc_id, CidrBlock="198.18.0.0/24")["Subnet"]["SubnetId"]
    enis = []
    for _ in range(2):
        instance = ec2.run_instances(
            ImageId=MOTO_IMAGE, MinCount=1, MaxCount=1, SubnetId=subnet, InstanceType="t3.micro"
        )["Instances"][0]
        enis.append(instance["NetworkInterfaces"][0]["NetworkInterfaceId"])
    tables = [ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"] for _ in "ab"]
    # Table a already sends the device subnet to the other instance; table b has no route.
    ec2.create_route(
        RouteTableId=tables[0], DestinationCidrBlock=str(INNER.network), NetworkInterfaceId=enis[1]
    )
    return TwoInstances(ec2, (tables[0], tables[1]), (enis[0], enis[1]))


def route_target(ec2: Any, table: str) -> str | None:
    answer = ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"][0]
    for route in answer["Routes"]:
        if route.get("DestinationCidrBlock") == str(INNER.network):
            return str(route.get("NetworkInterfaceId"))
    return None


def test_route_mode_points_every_table_at_this_eni(vpc: TwoInstances) -> None:
    api = FakeApi()
    claim = GatewayClaim(
        lambda: config(tables=vpc.tables),
        gate,
        api,
        route_target=lambda: RouteTarget(vpc.ec2, vpc.enis[0]),
    )
    claim()
    assert [route_target(vpc.ec2, t) for t in vpc.tables] == [vpc.enis[0], vpc.enis[0]]
    assert [d.rsplit("(", 1)[1] for d in claim.done[1:]] == ["replaced)", "created)"]
    claim()  # again (a re-assertion): the same routes, replaced in place
    assert [route_target(vpc.ec2, t) for t in vpc.tables] == [vpc.enis[0], vpc.enis[0]]


def test_a_missing_route_table_names_the_call_and_the_table(vpc: TwoInstances) -> None:
    from gatepeer.aws.ec2 import Ec2Error

    claim = GatewayClaim(
        lambda: config(tables=("rtb-00000000000000000",)),
        gate,
        FakeApi(),
        route_target=lambda: RouteTarget(vpc.ec2, vpc.enis[0]),
    )
    with pytest.raises(Ec2Error, match="ec2:(Replace|Create)Route on rtb-00000000000000000"):
        claim()


def secondary_addresses(ec2: Any, eni: str) -> list[str]:
    answer = ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])["NetworkInterfaces"][0]
    return [a["PrivateIpAddress"] for a in answer["PrivateIpAddresses"] if not a.get("Primary")]


def test_snat_address_moves_to_this_eni_before_the_redirection(vpc: TwoInstances) -> None:
    """On EC2 the master takes the NAT address from the other peer's ENI (AllowReassignment),
    first: the VPC must deliver replies here before the devices' traffic arrives."""
    snat = IPv4Address("198.18.0.200")
    vpc.ec2.assign_private_ip_addresses(
        NetworkInterfaceId=vpc.enis[1], PrivateIpAddresses=[str(snat)]
    )
    cfg = dataclasses.replace(
        config(),
        ha=dataclasses.replace(config().ha, snat_address=snat),  # type: ignore[arg-type]
    )
    api = FakeApi()
    calls: list[dict[str, Any]] = []

    class Recording:
        """The moto client, recording the assignment's arguments (moto assigns the address
        but does not take it off the other ENI, which EC2 does with AllowReassignment)."""

        def assign_private_ip_addresses(self, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return vpc.ec2.assign_private_ip_addresses(**kwargs)

    claim = GatewayClaim(
        lambda: cfg, gate, api, address_target=lambda: RouteTarget(Recording(), vpc.enis[0])
    )
    claim()
    assert secondary_addresses(vpc.ec2, vpc.enis[0]) == [str(snat)]
    assert calls == [
        {
            "NetworkInterfaceId": vpc.enis[0],
            "PrivateIpAddresses": [str(snat)],
            "AllowReassignment": True,
        }
    ]
    assert claim.done[0] == f"snat_address {snat} -> {vpc.enis[0]}"
    assert claim.done[1].startswith("redirection gateway")
    claim()  # a re-assertion: the ENI already holds it, and that is fine
    assert secondary_addresses(vpc.ec2, vpc.enis[0]) == [str(snat)]


def test_off_ec2_the_snat_address_is_held_and_announced_alone() -> None:
    cfg = dataclasses.replace(
        config(),
        ha=dataclasses.replace(config().ha, snat_address=IPv4Address("198.18.0.200")),  # type: ignore[arg-type]
    )
    api = FakeApi()
    announced: list[str] = []
    claim = GatewayClaim(
        lambda: cfg,
        gate,
        api,
        address_target=lambda: None,
        announce=lambda: announced.append("hold") or [],
    )
    claim()
    assert announced == ["hold"]
    assert claim.done == [
        "snat_address 198.18.0.200 held and announced",
        f"redirection gateway {INNER.ip}",
    ]
    assert api.posts == [(VPG, str(INNER.ip))]


def test_a_nat_address_that_cannot_be_held_fails_the_claim_before_the_redirection() -> None:
    """The coordinator retries the whole claim; the gateway does not move to a master that
    cannot take the replies."""
    cfg = dataclasses.replace(
        config(),
        ha=dataclasses.replace(config().ha, snat_address=IPv4Address("198.18.0.200")),  # type: ignore[arg-type]
    )
    api = FakeApi()
    claim = GatewayClaim(
        lambda: cfg, gate, api, announce=lambda: ["ha.snat_address 198.18.0.200: no interface x"]
    )
    with pytest.raises(ClaimError, match=r"^ha\.snat_address 198\.18\.0\.200: no interface x$"):
        claim()
    assert api.posts == []


# ---- the daemon's wiring ------------------------------------------------------------------


def ha_daemon_config(tmp_path: Path, fifo: Path) -> Config:
    from gatepeer.config import parse

    return parse(
        {
            "soracom": {"auth_key_id": "keyId-test", "vpg_id": "vpg-test", "redirection": "self"},
            "agent": {
                "state_file": str(tmp_path / "state.json"),
                "gate_cache": "",
                "reconcile_interval": "1h",
            },
            "metrics": {"listen": ""},
            "ha": {
                "peer_address": "198.18.0.11",
                "notify_fifo": str(fifo),
                # A conntrackd config nobody wrote: every conntrackd command fails, harmlessly.
                "conntrackd_config": str(tmp_path / "no-conntrackd.conf"),
            },
        }
    )


def test_the_daemon_reads_the_fifo_and_records_the_role_in_its_state(tmp_path: Path) -> None:
    import json
    import os
    import time

    from gatepeer.agent import ReconcileResult
    from gatepeer.daemon import Daemon

    fifo = tmp_path / "keepalived.fifo"
    config = ha_daemon_config(tmp_path, fifo)
    daemon = Daemon(config, lambda: config)
    assert daemon.ha is not None and daemon.agent.ha_view is not None
    seen: list[dict[str, Any]] = []

    def step(now: float, next_refresh: float, interval: float) -> tuple[ReconcileResult, float]:
        # The FIFO exists before the first reconcile: keepalived (started after us) writes.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, b'INSTANCE "gatepeer" MASTER 150\n')
        os.close(fd)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                state = json.loads((tmp_path / "state.json").read_text())
            except FileNotFoundError:
                state = {}
            ha = state.get("ha") or {}
            if ha.get("claim_error") and ha.get("sync"):
                seen.append(ha)
                break
            time.sleep(0.05)
        daemon.stopping = True
        daemon.wake.set()  # as the SIGTERM handler does
        return ReconcileResult([], "ok", [], [], 0.001), now + interval

    daemon.step = step  # type: ignore[method-assign]
    assert daemon.run() == 0
    # Master, and the claim failed for want of a gate view: said, and retried while master.
    assert seen and seen[0]["role"] == "master" and seen[0]["priority"] == 150
    assert "no gate view yet" in seen[0]["claim_error"]
    # conntrackd's handover ran on becoming master (it failed: no conntrackd here), and its
    # sync is read and recorded.
    assert seen[0]["handover_error"].startswith("conntrackd -c (commit the external cache")
    assert seen[0]["sync"]["error"].startswith("conntrackd -s")
    assert fifo.exists()  # the FIFO stays for keepalived; only our reader closed


def test_a_notify_fifo_that_cannot_be_made_stops_the_daemon_with_exit_1(tmp_path: Path) -> None:
    from gatepeer.daemon import Daemon

    config = ha_daemon_config(tmp_path, tmp_path / "missing-dir" / "keepalived.fifo")
    daemon = Daemon(config, lambda: config)
    assert daemon.run() == 1


# ---- the master keeps its claim true ------------------------------------------------------


def test_claim_lost_only_from_a_view_fetched_after_the_claim() -> None:
    from gatepeer.ha.claim import claim_lost

    cfg = config()
    # Fetched before our claim: it still shows the old gateway, which proves nothing.
    assert claim_lost(cfg, gate(PEER_INNER), fetched_at=10.0, claimed_at=11.0) is None
    assert claim_lost(cfg, gate(PEER_INNER), fetched_at=10.0, claimed_at=None) is None
    # Fetched after it: ours is right, or someone wrote after us.
    assert claim_lost(cfg, gate(INNER.ip), fetched_at=12.0, claimed_at=11.0) is None
    why = claim_lost(cfg, gate(PEER_INNER), fetched_at=12.0, claimed_at=11.0)
    assert why is not None and str(PEER_INNER) in why and str(INNER.ip) in why
    assert claim_lost(cfg, gate(None), fetched_at=12.0, claimed_at=11.0) is not None
    # vip mode: the virtual address is the gateway to keep.
    assert claim_lost(config(vip=True), gate(VIP), fetched_at=12.0, claimed_at=11.0) is None
    assert claim_lost(config(vip=True), gate(INNER.ip), fetched_at=12.0, claimed_at=11.0)


def test_reassert_claims_again_only_as_master() -> None:
    from gatepeer.ha.fifo import Event
    from gatepeer.ha.role import Coordinator

    claims: list[int] = []
    now = [100.0]
    coordinator = Coordinator(lambda: claims.append(1), clock=lambda: now[0])
    assert coordinator.reassert("test") is False  # unknown role: nothing
    coordinator.handle([Event("INSTANCE", "gatepeer", "BACKUP", 100)])
    assert coordinator.reassert("test") is False and claims == []
    coordinator.handle([Event("INSTANCE", "gatepeer", "MASTER", 100)])
    assert claims == [1]
    assert coordinator.reassert("gateway elsewhere") is True
    coordinator.tick()
    assert claims == [1, 1] and coordinator.view().claims == 2


def test_the_eni_is_found_by_its_vpc_address_in_the_route_tables_vpc(vpc: TwoInstances) -> None:
    """Route mode without IMDS (IMDS off, or the lab): the ENI that holds this host's VPC
    address in the VPC of the first route table."""
    from gatepeer.aws.ec2 import Ec2Error, eni_of_address

    for eni in vpc.enis:
        answer = vpc.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni])
        address = answer["NetworkInterfaces"][0]["PrivateIpAddress"]
        assert eni_of_address(vpc.ec2, vpc.tables[0], address) == eni
    with pytest.raises(Ec2Error, match="0 network interfaces hold this address"):
        eni_of_address(vpc.ec2, vpc.tables[0], "198.18.0.250")


def test_the_daemon_moves_snat_address_through_ec2_only_on_ec2(tmp_path: Path) -> None:
    from gatepeer.daemon import Daemon

    config = ha_daemon_config(tmp_path, tmp_path / "keepalived.fifo")
    daemon = Daemon(config, lambda: config)

    class Instance:
        def __init__(self, on_ec2: bool, facts: object | None) -> None:
            self._on_ec2, self._facts = on_ec2, facts

        def on_ec2(self) -> bool:
            return self._on_ec2

        def get(self) -> object | None:
            return self._facts

        def why_missing(self) -> str:
            return "IMDS timed out"

    target = RouteTarget(object(), "eni-0123")
    daemon._route_target = lambda: target  # type: ignore[method-assign]
    daemon.agent.instance = Instance(False, None)  # type: ignore[assignment]
    assert daemon._address_target() is None  # the lab, a host with L2: keepalived's alone
    daemon.agent.instance = Instance(True, None)  # type: ignore[assignment]
    with pytest.raises(ClaimError, match=r"^ha\.snat_address: .*unknown \(IMDS timed out\)"):
        daemon._address_target()
    daemon.agent.instance = Instance(True, object())  # type: ignore[assignment]
    assert daemon._address_target() is target
