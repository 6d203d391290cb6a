"""EC2 detection from DMI, and IMDSv2 against a fake IMDS of the test's own on 127.0.0.1:
the token flow, a refused PUT, a timeout, the unreachable case, and the agent's fallback."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from helpers.aws_fakes import ENI, INSTANCE, MAC, TOKEN, FakeImds, closed_port_url, running_imds

from gatepeer.aws import integration
from gatepeer.aws.detect import ec2_evidence, on_ec2
from gatepeer.aws.imds import Imds, ImdsError
from gatepeer.aws.integration import InstanceFactsSource
from gatepeer.config import AwsConfig, PacketPathConfig
from gatepeer.desired_state import HostFacts

SHORT = 0.3  # seconds: the fake answers in microseconds, a "slow" fake sleeps past this


def sysfs(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "sys" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return tmp_path / "sys"


@pytest.fixture
def fake_imds() -> Iterator[FakeImds]:
    with running_imds() as server:
        yield server


EC2_NITRO = {"class/dmi/id/board_vendor": "Amazon EC2", "class/dmi/id/sys_vendor": "Amazon EC2"}


# ---- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (EC2_NITRO, "board_vendor"),
        ({"class/dmi/id/sys_vendor": "Amazon EC2"}, "sys_vendor"),
        ({"class/dmi/id/bios_version": "4.11.amazon"}, "bios_version"),
        ({"hypervisor/type": "xen", "hypervisor/uuid": "ec2e1916-9099-7caf-fd21"}, "uuid"),
        ({"class/dmi/id/sys_vendor": "Xen", "class/dmi/id/product_uuid": "EC2E1916-90"}, "uuid"),
    ],
)
def test_ec2_detected_from_dmi(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    evidence = ec2_evidence(sysfs(tmp_path, files))
    assert evidence is not None and expected in evidence


@pytest.mark.parametrize(
    "files",
    [
        {},  # no DMI at all (a container, this test machine)
        {"class/dmi/id/sys_vendor": "QEMU", "class/dmi/id/board_vendor": "Red Hat"},
        # A UUID that happens to start "ec2" on a host that is not Xen: not enough.
        {"class/dmi/id/sys_vendor": "Dell Inc.", "class/dmi/id/product_uuid": "ec2a0000-1111"},
    ],
)
def test_not_ec2(tmp_path: Path, files: dict[str, str]) -> None:
    assert not on_ec2(sysfs(tmp_path, files))


# ---- IMDSv2 --------------------------------------------------------------------------------


def test_token_flow_gives_the_instance_facts(fake_imds: FakeImds) -> None:
    facts = Imds(fake_imds.url, timeout=SHORT).instance_facts()
    assert facts.instance_id == INSTANCE["instance-id"]
    assert facts.region == "ap-northeast-1"
    assert facts.availability_zone == "ap-northeast-1a"
    assert facts.mac == MAC
    assert facts.eni_id == INSTANCE[f"{ENI}/interface-id"]
    assert facts.private_ipv4 == IPv4Address("198.18.0.10")  # the first (primary) address
    assert facts.subnet_id == "subnet-0123abcd"
    assert facts.subnet_cidr == IPv4Network("198.18.0.0/24")
    assert facts.vpc_id == "vpc-0123abcd"
    assert facts.imds_version == 2 and facts.note is None
    requests = fake_imds.behaviour.requests
    # One token (PUT with a TTL), then every GET carries it.
    puts = [r for r in requests if r[0] == "PUT"]
    assert len(puts) == 1 and puts[0][1] == "/latest/api/token"
    assert int(puts[0][2]["x-aws-ec2-metadata-token-ttl-seconds"]) > 0
    gets = fake_imds.gets()
    assert len(gets) >= 8
    assert all(h.get("x-aws-ec2-metadata-token") == TOKEN for _, h in gets)
    assert all(h.get("user-agent", "").startswith("gatepeer/") for _, h in gets)


def test_vpc_cidr_blocks_are_read_one_a_line(fake_imds: FakeImds) -> None:
    facts = Imds(fake_imds.url, timeout=SHORT).instance_facts()
    assert facts.vpc_cidrs == (IPv4Network("198.18.0.0/16"), IPv4Network("203.0.113.0/24"))
    # Unusable or absent: none (the underlay's prefix stands in), never a failure.
    fake_imds.behaviour.data[f"{ENI}/vpc-ipv4-cidr-blocks"] = "198.18.0.0/33"
    assert Imds(fake_imds.url, timeout=SHORT).instance_facts().vpc_cidrs == ()
    del fake_imds.behaviour.data[f"{ENI}/vpc-ipv4-cidr-blocks"]
    assert Imds(fake_imds.url, timeout=SHORT).instance_facts().vpc_cidrs == ()


def test_region_falls_back_to_the_zone(fake_imds: FakeImds) -> None:
    del fake_imds.behaviour.data["placement/region"]
    assert Imds(fake_imds.url, timeout=SHORT).instance_facts().region == "ap-northeast-1"


def test_expired_token_is_renewed(fake_imds: FakeImds) -> None:
    imds = Imds(fake_imds.url, timeout=SHORT)
    assert imds.get("instance-id") == INSTANCE["instance-id"]
    fake_imds.behaviour.valid_tokens = {"a-newer-token"}  # the old one now gets 401
    with pytest.raises(ImdsError, match="refused a fresh token"):
        imds.get("instance-id")
    puts = [r for r in fake_imds.behaviour.requests if r[0] == "PUT"]
    assert len(puts) == 2  # it asked again rather than giving up at the first 401


def test_refused_put_falls_back_to_imdsv1_and_says_so(
    fake_imds: FakeImds, caplog: pytest.LogCaptureFixture
) -> None:
    fake_imds.behaviour.token = "refuse"
    fake_imds.behaviour.require_token = False  # an instance that still allows IMDSv1
    with caplog.at_level(logging.WARNING, logger="gatepeer.aws.imds"):
        facts = Imds(fake_imds.url, timeout=SHORT).instance_facts()
    assert facts.instance_id == INSTANCE["instance-id"]
    assert facts.imds_version == 1
    assert facts.note is not None and "IMDSv1" in facts.note
    assert "refused an IMDSv2 token (HTTP 403): falling back to IMDSv1" in caplog.text
    assert all("x-aws-ec2-metadata-token" not in h for _, h in fake_imds.gets())


def test_refused_put_when_imdsv2_is_required_is_a_clear_error(fake_imds: FakeImds) -> None:
    fake_imds.behaviour.token = "refuse"
    with pytest.raises(ImdsError) as err:
        Imds(fake_imds.url, timeout=SHORT).instance_facts()
    assert err.value.kind == "refused"
    assert "requires IMDSv2 (HTTP 401) but refused to issue a token" in str(err.value)
    assert "\n" not in str(err.value)


def test_token_timeout_names_the_hop_limit(fake_imds: FakeImds) -> None:
    fake_imds.behaviour.token = "slow"
    fake_imds.behaviour.slow_s = SHORT * 4
    with pytest.raises(ImdsError) as err:
        Imds(fake_imds.url, timeout=SHORT).instance_facts()
    assert err.value.kind == "timeout"
    message = str(err.value)
    assert f"{fake_imds.url}/latest/api/token: no answer within {SHORT:g}s" in message
    assert "hop limit to 2" in message
    assert fake_imds.gets() == []  # no IMDSv1 request after a timed-out token


def test_unreachable_endpoint_is_a_clear_error() -> None:
    url = closed_port_url()
    with pytest.raises(ImdsError) as err:
        Imds(url, timeout=SHORT).instance_facts()
    assert err.value.kind == "unreachable"
    assert f"IMDS at {url}/latest/api/token unreachable" in str(err.value)


def test_not_in_an_autoscaling_group(fake_imds: FakeImds) -> None:
    imds = Imds(fake_imds.url, timeout=SHORT)
    assert imds.target_lifecycle_state() is None
    fake_imds.behaviour.data["autoscaling/target-lifecycle-state"] = "Terminated"
    assert imds.target_lifecycle_state() == "Terminated"


def test_a_missing_item_is_named(fake_imds: FakeImds) -> None:
    fake_imds.behaviour.data = {}  # everything 404s: missing, not an error of the server
    with pytest.raises(ImdsError, match="has no instance-id") as err:
        Imds(fake_imds.url, timeout=SHORT).instance_facts()
    assert err.value.kind == "missing"


def test_server_errors_are_retried_then_reported(fake_imds: FakeImds) -> None:
    imds = Imds(fake_imds.url, timeout=SHORT, attempts=2)
    fake_imds.behaviour.fail_next = [503]  # IMDS throttling once: the retry gets the answer
    assert imds.get("instance-id") == INSTANCE["instance-id"]
    fake_imds.behaviour.fail_next = [503, 503]
    with pytest.raises(ImdsError, match=r"instance-id answered HTTP 503$") as err:
        imds.get("instance-id")
    assert err.value.kind == "http"


# ---- the agent's source of instance facts --------------------------------------------------


def source(tmp_path: Path, url: str, sys_files: dict[str, str], **kw: Any) -> InstanceFactsSource:
    aws = AwsConfig(imds_endpoint=url, imds_timeout=SHORT)
    return InstanceFactsSource(aws, sys_root=sysfs(tmp_path, sys_files), **kw)


def test_off_ec2_imds_is_never_asked(tmp_path: Path, fake_imds: FakeImds) -> None:
    src = source(tmp_path, fake_imds.url, {"class/dmi/id/sys_vendor": "QEMU"})
    assert src.get() is None
    assert fake_imds.behaviour.requests == []
    assert "not an EC2 instance" in src.why_missing()
    with pytest.raises(Exception, match="aws.region: not set"):
        src.region()


def test_on_ec2_facts_are_asked_once(tmp_path: Path, fake_imds: FakeImds) -> None:
    src = source(tmp_path, fake_imds.url, EC2_NITRO)
    first = src.get()
    count = len(fake_imds.behaviour.requests)
    assert first is not None and src.get() is first
    assert len(fake_imds.behaviour.requests) == count
    assert src.region() == "ap-northeast-1"


def test_failure_is_logged_and_retried_later(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    src = source(tmp_path, closed_port_url(), EC2_NITRO, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="gatepeer.aws.integration"):
        assert src.get() is None
    assert "instance facts from IMDS unavailable" in caplog.text
    assert src.error is not None and "unreachable" in src.error
    caplog.clear()
    now[0] += integration.FACTS_RETRY_S / 2
    assert src.get() is None
    assert caplog.text == ""  # not asked again yet
    now[0] += integration.FACTS_RETRY_S
    assert src.get() is None
    assert "unavailable" in caplog.text


# What the netlink reader learns for the VPC when nothing else tells: the underlay's prefix.
UNDERLAY_PREFIX = (IPv4Network("192.0.2.0/24"),)


class RecordingNetlink:
    """Stands in for kernel.netlink.Netlink: records what host_facts was asked."""

    def __init__(self, links: dict[str, str]) -> None:
        self.links = links  # MAC -> name
        self.asked: list[tuple[str | None, IPv4Address | None]] = []

    def interface_with_mac(self, mac: str) -> str | None:
        return self.links.get(mac)

    def host_facts(self, underlay: str | None, local: IPv4Address | None) -> HostFacts:
        self.asked.append((underlay, local))
        return HostFacts(
            underlay=underlay or "eth-default",
            underlay_index=2,
            underlay_mtu=9001,
            local_address=local or IPv4Address("192.0.2.99"),
            vpc_networks=UNDERLAY_PREFIX,
            vpc_networks_source="underlay",
        )

    def close(self) -> None:
        pass


def agent_with(tmp_path: Path, url: str, netlink: RecordingNetlink, **tunnel: Any) -> Any:
    from helpers.plan_inputs import make_config

    from gatepeer.agent import Agent
    from gatepeer.config import AgentConfig

    config = make_config()
    config = dataclasses.replace(
        config,
        tunnel=dataclasses.replace(config.tunnel, **tunnel),
        agent=AgentConfig(state_file=tmp_path / "state.json", gate_cache=None),
        aws=AwsConfig(imds_endpoint=url, imds_timeout=SHORT),
    )
    agent = Agent(config, netlink=netlink)  # type: ignore[arg-type]
    agent.instance = InstanceFactsSource(config.aws, sys_root=sysfs(tmp_path, EC2_NITRO))
    agent._flowtable_supported = False
    return agent


def test_agent_takes_underlay_and_address_from_imds(tmp_path: Path, fake_imds: FakeImds) -> None:
    netlink = RecordingNetlink({MAC: "ens5"})
    facts = agent_with(tmp_path, fake_imds.url, netlink, underlay_interface=None).host_facts()
    assert netlink.asked == [("ens5", IPv4Address("198.18.0.10"))]
    assert facts.underlay == "ens5" and facts.local_address == IPv4Address("198.18.0.10")


def test_agent_settings_win_over_imds(tmp_path: Path, fake_imds: FakeImds) -> None:
    netlink = RecordingNetlink({MAC: "ens5"})
    agent = agent_with(
        tmp_path,
        fake_imds.url,
        netlink,
        underlay_interface="eth9",
        local_address=IPv4Address("203.0.113.5"),
    )
    vpc = (IPv4Network("192.0.2.0/24"),)
    agent.config = dataclasses.replace(agent.config, packet_path=PacketPathConfig(vpc_cidrs=vpc))
    facts = agent.host_facts()
    assert netlink.asked == [("eth9", IPv4Address("203.0.113.5"))]
    assert fake_imds.behaviour.requests == []  # all three set: nothing to ask
    assert (facts.vpc_networks, facts.vpc_networks_source) == (vpc, "config")


def test_vpc_cidrs_come_from_imds_else_the_underlay(tmp_path: Path, fake_imds: FakeImds) -> None:
    """Route mode's "inside the VPC": the VPC's CIDR blocks from IMDS on EC2; off EC2 (or
    without the IMDS item) the underlay's connected prefix, as the netlink reader found it."""
    agent = agent_with(tmp_path, fake_imds.url, RecordingNetlink({MAC: "ens5"}))
    facts = agent.host_facts()
    assert facts.vpc_networks == (IPv4Network("198.18.0.0/16"), IPv4Network("203.0.113.0/24"))
    assert facts.vpc_networks_source == "imds"
    assert agent.state()["packet_path"]["vpc_cidrs_source"] == "imds"
    del fake_imds.behaviour.data[f"{ENI}/vpc-ipv4-cidr-blocks"]
    agent = agent_with(tmp_path, fake_imds.url, RecordingNetlink({MAC: "ens5"}))
    facts = agent.host_facts()
    assert (facts.vpc_networks, facts.vpc_networks_source) == (UNDERLAY_PREFIX, "underlay")


def test_agent_falls_back_to_the_default_route_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    netlink = RecordingNetlink({MAC: "ens5"})
    agent = agent_with(tmp_path, closed_port_url(), netlink, underlay_interface=None)
    with caplog.at_level(logging.WARNING):
        facts = agent.host_facts()
    assert netlink.asked == [(None, None)]  # the default route decides, as off EC2
    assert facts.underlay == "eth-default"
    assert "instance facts from IMDS unavailable" in caplog.text and "unreachable" in caplog.text
