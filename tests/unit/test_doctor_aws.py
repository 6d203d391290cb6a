"""The doctor's EC2 checks against moto in server mode and a fake IMDS, both on 127.0.0.1: a
well set up instance passes; a security group without UDP 4789 or (route mode) without the
VPC's traffic forwarded to devices, the source/destination check on and a missing route each
fail, naming what to add; a NAT gateway's subnet with no route back for devices' own addresses
is a warning; a missing IAM permission is a warning naming it; off EC2 every AWS check is
skipped without a request."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from helpers.aws_fakes import ENI, FakeImds, Moto, offline_aws_env, running_imds

from gatepeer.aws.clients import AwsTarget, client
from gatepeer.aws.integration import InstanceFactsSource
from gatepeer.aws.permissions import principal_arn
from gatepeer.config import AwsConfig, Config, PacketPathConfig, SoracomConfig
from gatepeer.doctor import aws as checks

REGION = "ap-northeast-1"
DEVICE_SUBNET = IPv4Network("10.128.0.0/9")
VPC_CIDR = "198.18.0.0/16"
ENDPOINTS = (IPv4Address("100.64.10.1"), IPv4Address("100.64.10.2"))
MOTO_IMAGE = "ami-12c6146b"


@pytest.fixture
def imds() -> Iterator[FakeImds]:
    with running_imds() as server:
        yield server


@dataclasses.dataclass
class Instance:
    """A VPC in moto, one instance in it, and the fake IMDS telling its facts."""

    ec2: Any
    make_client: Callable[[str], Any]
    vpc_id: str
    subnet_id: str
    eni_id: str
    instance_id: str
    group_id: str
    main_table: str
    sys_root: Path
    imds_url: str

    def source(self, aws: AwsConfig | None = None) -> InstanceFactsSource:
        aws = aws or AwsConfig(imds_endpoint=self.imds_url)
        return InstanceFactsSource(aws, sys_root=self.sys_root)

    def healthy(self) -> None:
        """What a working route-mode peer has: 4789 open to the endpoints and everything from
        the VPC (forwarded to devices), the check off, the route."""
        self.ec2.authorize_security_group_ingress(
            GroupId=self.group_id, IpPermissions=udp_rule(4789, *ENDPOINTS)
        )
        self.ec2.authorize_security_group_ingress(
            GroupId=self.group_id, IpPermissions=[all_traffic_rule(VPC_CIDR)]
        )
        self.ec2.modify_network_interface_attribute(
            NetworkInterfaceId=self.eni_id, SourceDestCheck={"Value": False}
        )
        self.ec2.create_route(
            RouteTableId=self.main_table,
            DestinationCidrBlock=str(DEVICE_SUBNET),
            NetworkInterfaceId=self.eni_id,
        )


def ec2_root(tmp_path: Path) -> Path:
    """A /sys whose DMI says Amazon EC2 (what a Nitro instance shows)."""
    dmi = tmp_path / "sys" / "class" / "dmi" / "id"
    dmi.mkdir(parents=True)
    (dmi / "sys_vendor").write_text("Amazon EC2\n")
    return tmp_path / "sys"


@pytest.fixture
def instance(
    moto: Moto, imds: FakeImds, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Instance:
    offline_aws_env(monkeypatch, tmp_path)
    moto.reset()
    target = AwsTarget(REGION, endpoint_url=moto.url)
    ec2 = client("ec2", target)
    vpc_id = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="198.18.0.0/24")["Subnet"]["SubnetId"]
    group_id = ec2.create_security_group(
        GroupName="gatepeer", Description="gate peer", VpcId=vpc_id
    )["GroupId"]
    found = ec2.run_instances(
        ImageId=MOTO_IMAGE,
        MinCount=1,
        MaxCount=1,
        SubnetId=subnet_id,
        InstanceType="t3.micro",
        SecurityGroupIds=[group_id],
    )["Instances"][0]
    eni = found["NetworkInterfaces"][0]
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])
    main = next(
        t["RouteTableId"]
        for t in tables["RouteTables"]
        if any(a.get("Main") for a in t["Associations"])
    )
    mac = eni["MacAddress"].lower()
    eni_path = f"network/interfaces/macs/{mac}"
    imds.behaviour.data = {
        "instance-id": found["InstanceId"],
        "placement/availability-zone": f"{REGION}a",
        "placement/region": REGION,
        "mac": mac,
        f"{eni_path}/local-ipv4s": eni["PrivateIpAddress"],
        f"{eni_path}/subnet-ipv4-cidr-block": "198.18.0.0/24",
        f"{eni_path}/interface-id": eni["NetworkInterfaceId"],
        f"{eni_path}/subnet-id": subnet_id,
        f"{eni_path}/vpc-id": vpc_id,
        f"{eni_path}/vpc-ipv4-cidr-blocks": VPC_CIDR,
    }
    assert ENI not in imds.behaviour.data  # the fixture's own MAC, not aws_fakes' default
    return Instance(
        ec2=ec2,
        make_client=lambda service: client(service, target),
        vpc_id=vpc_id,
        subnet_id=subnet_id,
        eni_id=eni["NetworkInterfaceId"],
        instance_id=found["InstanceId"],
        group_id=group_id,
        main_table=main,
        sys_root=ec2_root(tmp_path),
        imds_url=imds.url,
    )


def run(
    inst: Instance,
    config: Config | None = None,
    make_client: Callable[[str], Any] | None = None,
) -> dict[str, tuple[str, str]]:
    config = config or Config()
    results = checks.run(
        config,
        inst.source(dataclasses.replace(config.aws, imds_endpoint=inst.imds_url)),
        endpoints=ENDPOINTS,
        device_subnet=DEVICE_SUBNET,
        ssm_read=None,
        make_client=make_client or inst.make_client,
    )
    return {name: (status, detail) for status, name, detail in results}


def test_a_well_set_up_instance_passes_every_aws_check(instance: Instance) -> None:
    instance.healthy()
    found = run(instance)
    want = dict.fromkeys(checks.NAMES, "ok")
    want[checks.RETURN_PATH] = "skip"  # redirection is not managed: no internet traffic here
    assert {name: s for name, (s, _) in found.items()} == want
    assert instance.group_id in found[checks.SECURITY_GROUP][1]
    assert instance.main_table in found[checks.ROUTE][1]
    assert "ec2:DescribeRouteTables" in found[checks.IAM][1]


def all_traffic_rule(cidr: str, protocol: str = "-1", port: int | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"IpProtocol": protocol, "IpRanges": [{"CidrIp": cidr}]}
    if port is not None:
        rule.update(FromPort=port, ToPort=port)
    return rule


def test_route_mode_needs_the_vpcs_traffic_admitted_for_the_devices(instance: Instance) -> None:
    """Issue 16 item 2: EC2 applies the ENI's groups to what VPC hosts send to devices through
    this peer; UDP 4789 alone passes the VXLAN but drops cloud-to-device connections."""
    instance.healthy()
    instance.ec2.revoke_security_group_ingress(
        GroupId=instance.group_id, IpPermissions=[all_traffic_rule(VPC_CIDR)]
    )
    status, detail = run(instance)[checks.SECURITY_GROUP]
    assert status == "fail", detail
    assert instance.group_id in detail and VPC_CIDR in detail
    assert "add an inbound rule for all traffic from 198.18.0.0/16" in detail
    # nat mode: devices are reached only through the tunnel, nothing is forwarded to them.
    nat = Config(packet_path=PacketPathConfig(mode="nat"))
    assert run(instance, nat)[checks.SECURITY_GROUP][0] == "ok"
    # Only SSH from the VPC: said, as a warning naming the group.
    instance.ec2.authorize_security_group_ingress(
        GroupId=instance.group_id, IpPermissions=[all_traffic_rule(VPC_CIDR, "tcp", 22)]
    )
    status, detail = run(instance)[checks.SECURITY_GROUP]
    assert status == "warn" and "admit only some protocols or ports" in detail
    assert instance.group_id in detail


def test_return_path_for_devices_own_addresses_is_checked_at_the_nat_gateways(
    instance: Instance,
) -> None:
    instance.healthy()
    ec2 = instance.ec2
    public = ec2.create_subnet(VpcId=instance.vpc_id, CidrBlock="198.18.9.0/24")["Subnet"]
    table = ec2.create_route_table(VpcId=instance.vpc_id)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=public["SubnetId"])
    allocation = ec2.allocate_address(Domain="vpc")["AllocationId"]
    nat_id = ec2.create_nat_gateway(SubnetId=public["SubnetId"], AllocationId=allocation)[
        "NatGateway"
    ]["NatGatewayId"]
    routed = Config(
        soracom=SoracomConfig(redirection="self"),
        packet_path=PacketPathConfig(outside_vpc="route"),
    )
    status, detail = run(instance, routed)[checks.RETURN_PATH]
    assert status == "warn", detail
    assert nat_id in detail and public["SubnetId"] in detail and table in detail
    assert f"add a route {DEVICE_SUBNET} -> {instance.eni_id}" in detail
    ec2.create_route(
        RouteTableId=table,
        DestinationCidrBlock=str(DEVICE_SUBNET),
        NetworkInterfaceId=instance.eni_id,
    )
    status, detail = run(instance, routed)[checks.RETURN_PATH]
    assert status == "ok" and nat_id in detail
    # The default masquerades what leaves the VPC: no return route is needed, nothing read.
    masquerading = Config(soracom=SoracomConfig(redirection="self"))
    status, detail = run(instance, masquerading)[checks.RETURN_PATH]
    assert status == "skip" and "masquerade" in detail


def udp_rule(port: int, *sources: IPv4Address) -> list[dict[str, Any]]:
    """IpPermissions for UDP `port` from each source's /32."""
    ranges = [{"CidrIp": f"{s}/32"} for s in sources]
    return [{"IpProtocol": "udp", "FromPort": port, "ToPort": port, "IpRanges": ranges}]


def test_security_group_without_4789_fails_naming_the_endpoint(instance: Instance) -> None:
    instance.healthy()
    instance.ec2.revoke_security_group_ingress(
        GroupId=instance.group_id, IpPermissions=udp_rule(4789, ENDPOINTS[1])
    )
    # A rule for another port from that endpoint does not help.
    instance.ec2.authorize_security_group_ingress(
        GroupId=instance.group_id, IpPermissions=udp_rule(4790, ENDPOINTS[1])
    )
    status, detail = run(instance)[checks.SECURITY_GROUP]
    assert status == "fail"
    assert str(ENDPOINTS[1]) in detail and str(ENDPOINTS[0]) not in detail
    assert "UDP 4789" in detail and instance.group_id in detail


def test_source_dest_check_on_fails_with_the_command_that_turns_it_off(
    instance: Instance,
) -> None:
    instance.healthy()
    instance.ec2.modify_network_interface_attribute(
        NetworkInterfaceId=instance.eni_id, SourceDestCheck={"Value": True}
    )
    status, detail = run(instance)[checks.SOURCE_DEST]
    assert status == "fail"
    assert instance.eni_id in detail and "--no-source-dest-check" in detail


def test_missing_route_fails_in_route_mode_and_is_skipped_in_nat_mode(instance: Instance) -> None:
    instance.healthy()
    instance.ec2.delete_route(
        RouteTableId=instance.main_table, DestinationCidrBlock=str(DEVICE_SUBNET)
    )
    status, detail = run(instance)[checks.ROUTE]
    assert status == "fail"
    assert str(DEVICE_SUBNET) in detail and instance.eni_id in detail and instance.vpc_id in detail
    nat = Config(packet_path=PacketPathConfig(mode="nat"))
    assert run(instance, nat)[checks.ROUTE][0] == "skip"


def test_missing_permission_is_a_warning_naming_it(moto: Moto, instance: Instance) -> None:
    instance.healthy()
    iam = instance.make_client("iam")
    iam.create_user(UserName="peer")
    describes = [
        "ec2:DescribeNetworkInterfaceAttribute",
        "ec2:DescribeNetworkInterfaces",
        "ec2:DescribeSecurityGroups",
        "ec2:DescribeRouteTables",
    ]
    iam.put_user_policy(
        UserName="peer",
        PolicyName="describe-only",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": describes, "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="peer")["AccessKey"]
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
    )

    def as_peer(service: str) -> Any:
        return session.client(service, region_name=REGION, endpoint_url=moto.url)

    config = Config(
        aws=AwsConfig(
            disable_source_dest_check=True,
            autoscaling_group="gatepeer",
            launch_lifecycle_hook="gatepeer-launch",
        )
    )
    moto.enforce_iam(True)
    try:
        found = run(instance, config, as_peer)
    finally:
        moto.enforce_iam(False)
    status, detail = found[checks.IAM]
    assert status == "warn"
    assert "ec2:ModifyNetworkInterfaceAttribute (for aws.disable_source_dest_check)" in detail
    assert "ec2:DescribeRouteTables" not in detail  # allowed
    # The checks that only describe still ran with the role's rights.
    assert found[checks.SECURITY_GROUP][0] == "ok" and found[checks.ROUTE][0] == "ok"


def test_lifecycle_permissions_that_cannot_be_simulated_are_not_verified_not_missing(
    instance: Instance,
) -> None:
    instance.healthy()
    config = Config(
        aws=AwsConfig(autoscaling_group="gatepeer", termination_lifecycle_hook="gatepeer-term")
    )
    status, detail = run(instance, config)[checks.IAM]
    # moto has no iam:SimulatePrincipalPolicy: said, and not taken for a missing permission.
    assert status == "ok"
    assert "not verified: autoscaling:CompleteLifecycleAction" in detail


def test_a_describe_denied_is_a_warning_not_a_crash(moto: Moto, instance: Instance) -> None:
    iam = instance.make_client("iam")
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
    )
    moto.enforce_iam(True)
    try:
        found = run(
            instance,
            make_client=lambda s: session.client(s, region_name=REGION, endpoint_url=moto.url),
        )
    finally:
        moto.enforce_iam(False)
    # Every check that reads is a warning; the return path reads nothing in this config.
    assert {s for n, (s, _) in found.items() if n != checks.RETURN_PATH} == {"warn"}
    assert found[checks.RETURN_PATH][0] == "skip"
    assert "ec2:DescribeNetworkInterfaceAttribute" in found[checks.SOURCE_DEST][1]
    assert "ec2:DescribeSecurityGroups" in found[checks.IAM][1]


def test_off_ec2_every_aws_check_is_skipped_without_a_request(
    imds: FakeImds, tmp_path: Path
) -> None:
    asked: list[str] = []

    def no_client(service: str) -> Any:
        asked.append(service)
        raise AssertionError("no AWS client off EC2")

    source = InstanceFactsSource(AwsConfig(imds_endpoint=imds.url), sys_root=tmp_path)
    results = checks.run(
        Config(),
        source,
        endpoints=ENDPOINTS,
        device_subnet=DEVICE_SUBNET,
        ssm_read=None,
        make_client=no_client,
    )
    assert [(s, n) for s, n, _ in results] == [("skip", n) for n in checks.NAMES]
    assert asked == [] and imds.behaviour.requests == []


def test_imds_unreachable_on_ec2_is_a_warning(tmp_path: Path) -> None:
    from helpers.aws_fakes import closed_port_url

    source = InstanceFactsSource(
        AwsConfig(imds_endpoint=closed_port_url(), imds_timeout=0.2), sys_root=ec2_root(tmp_path)
    )
    results = checks.run(
        Config(), source, endpoints=ENDPOINTS, device_subnet=DEVICE_SUBNET, ssm_read=None
    )
    assert {s for s, _, _ in results} == {"warn"}
    assert all("IMDS" in d for _, _, d in results)


def test_principal_arn_of_an_instance_role_session() -> None:
    session = "arn:aws:sts::123456789012:assumed-role/gatepeer-peer/i-0123456789abcdef0"
    assert principal_arn(session) == "arn:aws:iam::123456789012:role/gatepeer-peer"
    user = "arn:aws:iam::123456789012:user/peer"
    assert principal_arn(user) == user
