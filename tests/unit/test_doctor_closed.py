"""The doctor's closed-network checks (packet_path.closed = true) against moto's server on
127.0.0.1: each allowed destination followed from the peer subnet's route table (S3 via the
internet gateway fails, via its gateway endpoint passes; a NAT gateway fails; a missing
endpoint fails), the interface endpoints' security groups (one refusing the peer fails), their
private DNS, and SSM's Route 53 inbound resolver. Nothing reaches AWS."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from helpers.aws_fakes import Moto, offline_aws_env

from gatepeer.aws.clients import AwsTarget, client
from gatepeer.aws.ec2 import IngressRule
from gatepeer.aws.imds import InstanceFacts
from gatepeer.config import Config, PacketPathConfig
from gatepeer.doctor import closed, closed_aws
from gatepeer.doctor.judgments import Check

REGION = "ap-northeast-1"
S3 = f"com.amazonaws.{REGION}.s3"
VPC_CIDR = "198.18.0.0/16"
DEVICES = IPv4Network("198.19.0.0/16")


@dataclasses.dataclass
class Vpc:
    ec2: Any
    target: AwsTarget
    facts: InstanceFacts
    table: str
    igw: str
    peer_group: str

    def make_client(self, service: str) -> Any:
        return client(service, self.target)

    def check(self, mode: str = "nat", **packet_path: Any) -> list[Check]:
        config = Config(packet_path=PacketPathConfig(mode=mode, closed=True, **packet_path))  # type: ignore[arg-type]
        return closed_aws.run(config, self.facts, self.make_client, device_subnet=DEVICES)

    def interface_endpoint(self, service: str, group: str, private_dns: bool = True) -> str:
        return str(
            self.ec2.create_vpc_endpoint(
                VpcId=self.facts.vpc_id,
                ServiceName=f"com.amazonaws.{REGION}.{service}",
                VpcEndpointType="Interface",
                SubnetIds=[self.facts.subnet_id],
                SecurityGroupIds=[group],
                PrivateDnsEnabled=private_dns,
            )["VpcEndpoint"]["VpcEndpointId"]
        )

    def group(self, name: str) -> str:
        return str(
            self.ec2.create_security_group(
                GroupName=name, Description=name, VpcId=self.facts.vpc_id
            )["GroupId"]
        )


@pytest.fixture
def vpc(moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Vpc:
    """A VPC whose peer subnet's table sends everything else to an internet gateway."""
    offline_aws_env(monkeypatch, tmp_path)
    moto.reset()
    target = AwsTarget(REGION, endpoint_url=moto.url)
    ec2 = client("ec2", target)
    vpc_id = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
    for attribute in ("EnableDnsSupport", "EnableDnsHostnames"):
        ec2.modify_vpc_attribute(VpcId=vpc_id, **{attribute: {"Value": True}})
    subnet = ec2.create_subnet(VpcId=vpc_id, CidrBlock="198.18.0.0/24")["Subnet"]["SubnetId"]
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc_id)
    table = ec2.create_route_table(VpcId=vpc_id)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=subnet)
    ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    group = ec2.create_security_group(GroupName="peer", Description="peer", VpcId=vpc_id)["GroupId"]
    eni = ec2.create_network_interface(SubnetId=subnet, Groups=[group])["NetworkInterface"]
    facts = InstanceFacts(
        instance_id="i-0123456789abcdef0",
        region=REGION,
        availability_zone=f"{REGION}a",
        mac="02:00:00:00:00:01",
        eni_id=eni["NetworkInterfaceId"],
        private_ipv4=IPv4Address(eni["PrivateIpAddress"]),
        subnet_id=subnet,
        subnet_cidr=IPv4Network("198.18.0.0/24"),
        vpc_id=vpc_id,
        imds_version=2,
        vpc_cidrs=(IPv4Network(VPC_CIDR),),
    )
    return Vpc(ec2, target, facts, table, igw, group)


def named(checks: list[Check], name: str) -> list[Check]:
    return [c for c in checks if c.name == name]


def test_s3_through_the_internet_gateway_fails_naming_table_destination_target(vpc: Vpc) -> None:
    (route,) = named(vpc.check(allowed_names=(S3,)), closed.ROUTE)
    assert route.status == "fail", route
    assert S3 in route.detail and vpc.table in route.detail and vpc.igw in route.detail
    assert "internet gateway" in route.detail


def test_s3_through_its_gateway_endpoint_is_inside(vpc: Vpc) -> None:
    endpoint = vpc.ec2.create_vpc_endpoint(
        VpcId=vpc.facts.vpc_id, ServiceName=S3, VpcEndpointType="Gateway", RouteTableIds=[vpc.table]
    )["VpcEndpoint"]["VpcEndpointId"]
    (route,) = named(vpc.check(allowed_names=(S3, endpoint)), closed.ROUTE)[:1]
    checks = named(vpc.check(allowed_names=(S3, endpoint)), closed.ROUTE)
    assert [c.status for c in checks] == ["ok", "ok"], checks
    assert f"gateway endpoint {endpoint}" in route.detail


def test_vpc_local_passes_and_a_nat_gateway_fails(vpc: Vpc) -> None:
    inside = named(vpc.check(allowed_destinations=(IPv4Network("198.18.5.0/24"),)), closed.ROUTE)
    assert [c.status for c in inside] == ["ok"] and "VPC-local" in inside[0].detail
    eip = vpc.ec2.allocate_address(Domain="vpc")["AllocationId"]
    nat = vpc.ec2.create_nat_gateway(SubnetId=vpc.facts.subnet_id, AllocationId=eip)["NatGateway"][
        "NatGatewayId"
    ]
    vpc.ec2.replace_route(
        RouteTableId=vpc.table, DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat
    )
    out = named(vpc.check(allowed_destinations=(IPv4Network("203.0.113.0/24"),)), closed.ROUTE)
    assert out[0].status == "fail" and nat in out[0].detail and "NAT gateway" in out[0].detail


def test_a_missing_endpoint_fails(vpc: Vpc) -> None:
    missing = "vpce-0123456789abcdef0"
    (route,) = named(vpc.check(allowed_names=(missing,)), closed.ROUTE)
    assert route.status == "fail" and route.detail.startswith(missing), route


def test_an_endpoint_group_refusing_the_peer_fails_and_admitting_it_passes(vpc: Vpc) -> None:
    group = vpc.group("endpoints")
    endpoint = vpc.interface_endpoint("ssm", group)
    sg = named(vpc.check(allowed_names=(endpoint,)), closed.ENDPOINT_SG)[0]
    assert (
        sg.status == "fail" and endpoint in sg.detail and str(vpc.facts.private_ipv4) in sg.detail
    )
    vpc.ec2.authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 443,
                "ToPort": 443,
                "UserIdGroupPairs": [{"GroupId": vpc.peer_group}],
            }
        ],
    )
    assert named(vpc.check(allowed_names=(endpoint,)), closed.ENDPOINT_SG)[0].status == "ok"
    # Route mode: the devices' own addresses arrive, and the group admits only the peer.
    route_mode = named(vpc.check(mode="route", outside_vpc="route"), closed.ENDPOINT_SG)[0]
    assert route_mode.status == "fail" and str(DEVICES) in route_mode.detail


def test_private_dns_off_fails(vpc: Vpc) -> None:
    endpoint = vpc.interface_endpoint("ssmmessages", vpc.group("e"), private_dns=False)
    dns = named(vpc.check(), closed.ENDPOINT_DNS)[0]
    assert dns.status == "fail" and endpoint in dns.detail


def test_iot_data_needs_a_private_hosted_zone_not_private_dns(vpc: Vpc) -> None:
    """AWS gives IoT Core's data endpoint no private DNS: doctor looks for a private hosted zone
    for iot.<region>.amazonaws.com associated with the VPC instead of failing a correct setup."""
    endpoint = vpc.interface_endpoint("iot.data", vpc.group("iot"), private_dns=False)
    dns = named(vpc.check(), closed.ENDPOINT_DNS)[0]
    assert dns.status == "fail" and endpoint in dns.detail, dns
    assert f"iot.{REGION}.amazonaws.com" in dns.detail and "hosted zone" in dns.detail
    vpc.make_client("route53").create_hosted_zone(
        Name=f"iot.{REGION}.amazonaws.com",
        CallerReference="closed-test",
        HostedZoneConfig={"Comment": "IoT data endpoint", "PrivateZone": True},
        VPC={"VPCRegion": REGION, "VPCId": vpc.facts.vpc_id},
    )
    dns = named(vpc.check(), closed.ENDPOINT_DNS)[0]
    assert dns.status == "ok" and "private hosted zone" in dns.detail, dns


def test_a_hosted_zone_for_another_domain_does_not_count() -> None:
    iot = closed.Endpoint(
        "vpce-0", "Interface", f"com.amazonaws.{REGION}.iot.data", "available", False
    )
    assert iot.zone_service == f"iot.{REGION}.amazonaws.com"
    other = closed.judge_endpoint_dns([iot], True, True, ["example.internal."])
    below = closed.judge_endpoint_dns([iot], True, True, [f"a1b2-ats.iot.{REGION}.amazonaws.com."])
    unread = closed.judge_endpoint_dns([iot], True, True, None)
    assert (other.status, below.status, unread.status) == ("fail", "ok", "warn")


def test_ssm_needs_an_inbound_resolver(vpc: Vpc) -> None:
    group = vpc.group("endpoints")
    for service in closed.SSM_SERVICES:
        vpc.interface_endpoint(service, group)
    resolver = named(vpc.check(), closed.RESOLVER)[0]
    assert resolver.status == "fail" and "inbound resolver" in resolver.detail
    second = vpc.ec2.create_subnet(
        VpcId=vpc.facts.vpc_id, CidrBlock="198.18.1.0/24", AvailabilityZone=f"{REGION}c"
    )["Subnet"]["SubnetId"]
    made = vpc.make_client("route53resolver").create_resolver_endpoint(
        CreatorRequestId="closed-test",
        Name="devices",
        SecurityGroupIds=[group],
        Direction="INBOUND",
        IpAddresses=[{"SubnetId": vpc.facts.subnet_id}, {"SubnetId": second}],
    )["ResolverEndpoint"]["Id"]
    resolver = named(vpc.check(), closed.RESOLVER)[0]
    assert resolver.status == "ok" and made in resolver.detail, resolver


def test_not_closed_adds_no_check(vpc: Vpc) -> None:
    config = Config(packet_path=PacketPathConfig(allowed_names=(S3,)))
    assert closed_aws.run(config, vpc.facts, vpc.make_client, device_subnet=DEVICES) == []


# ---- pure: following a prefix ------------------------------------------------------------------


def test_a_longer_route_inside_the_destination_is_followed_too() -> None:
    table = closed.RouteTable(
        "rtb-1",
        (
            closed.TableRoute("local", IPv4Network(VPC_CIDR)),
            closed.TableRoute("tgw-1", IPv4Network("203.0.113.0/24")),
            closed.TableRoute("igw-1", IPv4Network("203.0.113.128/25")),
        ),
    )
    got = closed.judge_destination(
        table, closed.Destination("203.0.113.0/24", (IPv4Network("203.0.113.0/24"),))
    )
    assert got.status == "fail" and "203.0.113.128/25 via internet gateway igw-1" in got.detail
    blackhole = closed.RouteTable(
        "rtb-2", (closed.TableRoute("tgw-1", IPv4Network("0.0.0.0/0"), state="blackhole"),)
    )
    assert (
        closed.judge_destination(
            blackhole, closed.Destination("x", (IPv4Network("192.0.2.0/24"),))
        ).status
        == "fail"
    )
    appliance = closed.RouteTable("rtb-3", (closed.TableRoute("eni-1", IPv4Network("0.0.0.0/0")),))
    assert (
        closed.judge_destination(
            appliance, closed.Destination("x", (IPv4Network("192.0.2.0/24"),))
        ).status
        == "warn"
    )
    none = closed.RouteTable("rtb-4", ())
    got = closed.judge_destination(none, closed.Destination("x", (IPv4Network("192.0.2.0/24"),)))
    assert got.status == "fail" and "no route" in got.detail


def test_a_prefix_list_route_counts_for_each_entry() -> None:
    table = closed.RouteTable(
        "rtb-1",
        (
            closed.TableRoute("igw-1", IPv4Network("0.0.0.0/0")),
            closed.TableRoute("vpce-1", prefix_list_id="pl-1"),
        ),
        {"pl-1": (IPv4Network("52.216.0.0/15"),)},
    )
    got = closed.judge_destination(table, closed.Destination(S3, (IPv4Network("52.216.0.0/15"),)))
    assert got.status == "ok" and "vpce-1" in got.detail


def test_endpoint_group_by_cidr() -> None:
    endpoint = closed.Endpoint(
        "vpce-1", "Interface", f"com.amazonaws.{REGION}.ssm", "available", True, ("sg-e",)
    )
    peer = IPv4Address("198.18.0.10")
    rule = IngressRule("sg-e", "tcp", 443, 443, (IPv4Network("198.18.0.0/24"),))
    ok = closed.judge_endpoint_groups(
        [endpoint], [rule], mode="nat", peer=peer, peer_groups=(), device_subnet=None
    )
    assert ok.status == "ok"
    udp = dataclasses.replace(rule, protocol="udp")
    refused = closed.judge_endpoint_groups(
        [endpoint], [udp], mode="nat", peer=peer, peer_groups=(), device_subnet=None
    )
    assert refused.status == "fail"


def test_off_ec2_the_closed_checks_are_skipped_and_absent_when_not_closed(tmp_path: Path) -> None:
    from gatepeer.aws.integration import InstanceFactsSource
    from gatepeer.config import AwsConfig
    from gatepeer.doctor import aws as checks

    source = InstanceFactsSource(AwsConfig(), sys_root=tmp_path)  # no DMI: not EC2
    config = Config(packet_path=PacketPathConfig(closed=True))
    out = checks.run(config, source, endpoints=(), device_subnet=None, ssm_read=None)
    assert {c.name for c in out if c.status == "skip"} >= set(closed.NAMES)
    plain = checks.run(Config(), source, endpoints=(), device_subnet=None, ssm_read=None)
    assert not {c.name for c in plain} & set(closed.NAMES)


def test_the_iam_check_asks_for_the_closed_network_calls(vpc: Vpc) -> None:
    """EC2's by DryRun (moto answers DryRunOperation); Route 53 Resolver's by simulation,
    which moto does not offer: reported as not verified, never as missing."""
    from gatepeer.aws.permissions import Subject, verify

    config = Config(
        packet_path=PacketPathConfig(closed=True, allowed_names=("pl-0123456789abcdef0",))
    )
    subject = Subject(vpc.facts.eni_id, vpc.facts.vpc_id, DEVICES)
    verdict = verify(config, subject, vpc.make_client, ssm_read=None)
    for action in (
        "ec2:DescribeVpcEndpoints",
        "ec2:DescribeManagedPrefixLists",
        "ec2:GetManagedPrefixListEntries",
        "ec2:DescribeVpcAttribute",
    ):
        assert action in verdict.allowed, (action, verdict)
    assert "route53resolver:ListResolverEndpoints" in dict(verdict.unverified)
    assert not verdict.denied
