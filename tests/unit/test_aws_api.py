"""SSM and EC2 against moto in server mode on 127.0.0.1: the auth key from a SecureString
(found, missing, access denied), the source/destination check, and the VPC routes."""

from __future__ import annotations

import dataclasses
import json
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from helpers.aws_fakes import Moto, offline_aws_env

from gatepeer.agent import make_client
from gatepeer.aws.clients import AwsTarget, client
from gatepeer.aws.ec2 import (
    Ec2Error,
    device_subnet_routes,
    disable_source_dest_check,
    source_dest_check,
    table_of_subnet,
)
from gatepeer.aws.integration import InstanceFactsSource
from gatepeer.aws.ssm import SsmParameterError, auth_key_reader, read_secure_string
from gatepeer.config import AgentConfig, AwsConfig, Config, SoracomConfig
from gatepeer.lab.emulator.model import EmulatorSettings
from gatepeer.lab.emulator.service import Emulator
from gatepeer.soracom import AuthenticationError

REGION = "ap-northeast-1"
PARAMETER = "/gatepeer/auth-key"
SECRET = "secret-from-ssm-9c1f2e7a5b3d4c6e"
DEVICE_SUBNET = IPv4Network("10.128.0.0/9")
MOTO_IMAGE = "ami-12c6146b"  # one of the images moto knows (listing them all is slow)


@pytest.fixture
def target(moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AwsTarget:
    offline_aws_env(monkeypatch, tmp_path)
    moto.reset()
    return AwsTarget(REGION, endpoint_url=moto.url)


# ---- SSM -------------------------------------------------------------------------------------


def put_key(target: AwsTarget, value: str = SECRET, kind: str = "SecureString") -> None:
    client("ssm", target).put_parameter(Name=PARAMETER, Value=value, Type=kind)


def test_secure_string_found_and_decrypted(target: AwsTarget) -> None:
    put_key(target, SECRET + "\n")
    assert read_secure_string(client("ssm", target), PARAMETER) == SECRET


def test_missing_parameter_is_one_line_naming_it(target: AwsTarget) -> None:
    with pytest.raises(SsmParameterError) as err:
        read_secure_string(client("ssm", target), PARAMETER)
    message = str(err.value)
    assert message.startswith(f"SSM parameter {PARAMETER}: not found")
    assert "\n" not in message


def test_plain_string_is_refused(target: AwsTarget) -> None:
    put_key(target, kind="String")
    with pytest.raises(SsmParameterError, match="is a String, not a SecureString") as err:
        read_secure_string(client("ssm", target), PARAMETER)
    assert SECRET not in str(err.value)


def test_access_denied_is_one_line_naming_the_parameter_and_permission(
    moto: Moto, target: AwsTarget
) -> None:
    put_key(target)
    # A role that may describe instances and nothing else; moto checks IAM from here on.
    iam = client("iam", target)
    iam.create_user(UserName="peer")
    iam.put_user_policy(
        UserName="peer",
        PolicyName="no-ssm",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {"Effect": "Allow", "Action": "ec2:DescribeInstances", "Resource": "*"}
                ],
            }
        ),
    )
    key = iam.create_access_key(UserName="peer")["AccessKey"]
    import boto3

    ssm = boto3.session.Session(
        aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
    ).client("ssm", region_name=REGION, endpoint_url=target.endpoint_url)
    moto.enforce_iam(True)
    try:
        with pytest.raises(SsmParameterError) as err:
            read_secure_string(ssm, PARAMETER)
    finally:
        moto.enforce_iam(False)
    message = str(err.value)
    assert message.startswith(f"SSM parameter {PARAMETER}: access denied")
    assert "ssm:GetParameter" in message and "\n" not in message


def test_reader_is_lazy_and_asks_each_time(target: AwsTarget) -> None:
    asked: list[int] = []

    def where() -> AwsTarget:
        asked.append(1)
        return target

    read = auth_key_reader(PARAMETER, where)
    assert asked == []  # nothing resolved (no IMDS, no region) until the key is needed
    put_key(target)
    assert read() == SECRET
    client("ssm", target).put_parameter(
        Name=PARAMETER, Value="rotated-key", Type="SecureString", Overwrite=True
    )
    assert read() == "rotated-key"  # not cached: a rotation is picked up at the next login
    assert asked == [1]


def test_no_region_off_ec2_names_the_parameter_and_the_setting(tmp_path: Path) -> None:
    """Off EC2 with no aws.region there is nothing to ask: no request, a one-line error."""
    config = dataclasses.replace(
        Config(),
        soracom=SoracomConfig(auth_key_file=None, auth_key_ssm_parameter=PARAMETER),
    )
    from gatepeer.aws.integration import ssm_key_reader

    read = ssm_key_reader(config, InstanceFactsSource(config.aws, sys_root=tmp_path))
    with pytest.raises(SsmParameterError) as err:
        read()
    message = str(err.value)
    assert message.startswith(f"SSM parameter {PARAMETER}: aws.region: not set")
    assert "not an EC2 instance" in message and "\n" not in message


def test_soracom_login_with_the_key_from_ssm(
    target: AwsTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: config names the parameter; the client authenticates with its value and
    nothing writes it to disk."""
    import gatepeer.aws.ssm as ssm_module

    built: list[AwsTarget] = []

    def to_moto(service: str, wanted: AwsTarget) -> Any:
        built.append(wanted)
        return client(service, target)

    monkeypatch.setattr(ssm_module, "client", to_moto)
    settings = EmulatorSettings(auth_key=SECRET)
    with Emulator(settings) as emulator:
        config = dataclasses.replace(
            Config(),
            soracom=SoracomConfig(
                endpoint=emulator.start(),
                auth_key_id=settings.auth_key_id,
                auth_key_file=None,
                auth_key_ssm_parameter=PARAMETER,
                vpg_id=settings.vpg_id,
            ),
            aws=AwsConfig(region="eu-west-1"),
            agent=AgentConfig(state_file=tmp_path / "state.json", gate_cache=tmp_path / "g.json"),
        )
        instance = InstanceFactsSource(config.aws, sys_root=tmp_path)  # not EC2: region set
        api = make_client(config, instance=instance)
        with pytest.raises(AuthenticationError, match=f"SSM parameter {PARAMETER}: not found"):
            api.authenticate()
        put_key(target)
        api.authenticate()
        assert api.list_gate_peers(settings.vpg_id) is not None
    assert [t.region for t in built] == ["eu-west-1"]  # aws.region, not the instance's
    written = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET in p.read_text("latin-1")]
    assert written == []


# ---- EC2: the source/destination check ------------------------------------------------------


@dataclasses.dataclass
class Vpc:
    ec2: Any
    vpc_id: str
    subnet_id: str
    eni_id: str
    instance_id: str
    main_table: str


@pytest.fixture
def vpc(target: AwsTarget) -> Vpc:
    ec2 = client("ec2", target)
    vpc_id = ec2.create_vpc(CidrBlock="198.18.0.0/16")["Vpc"]["VpcId"]
    subnet_id = ec2.create_subnet(VpcId=vpc_id, CidrBlock="198.18.0.0/24")["Subnet"]["SubnetId"]
    instance = ec2.run_instances(
        ImageId=MOTO_IMAGE, MinCount=1, MaxCount=1, SubnetId=subnet_id, InstanceType="t3.micro"
    )["Instances"][0]
    eni_id = instance["NetworkInterfaces"][0]["NetworkInterfaceId"]
    tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])
    main = next(
        t["RouteTableId"]
        for t in tables["RouteTables"]
        if any(a.get("Main") for a in t["Associations"])
    )
    return Vpc(ec2, vpc_id, subnet_id, eni_id, instance["InstanceId"], main)


def test_source_dest_check_is_turned_off_once(vpc: Vpc) -> None:
    assert source_dest_check(vpc.ec2, vpc.eni_id) is True  # EC2's default
    assert disable_source_dest_check(vpc.ec2, vpc.eni_id) is True
    attribute = vpc.ec2.describe_network_interface_attribute(
        NetworkInterfaceId=vpc.eni_id, Attribute="sourceDestCheck"
    )
    assert attribute["SourceDestCheck"]["Value"] is False
    assert disable_source_dest_check(vpc.ec2, vpc.eni_id) is False  # already off: no change


def test_unknown_eni_names_the_call_and_the_eni(vpc: Vpc) -> None:
    with pytest.raises(Ec2Error) as err:
        disable_source_dest_check(vpc.ec2, "eni-00000000000000000")
    message = str(err.value)
    assert message.startswith("ec2:DescribeNetworkInterfaceAttribute on eni-00000000000000000:")
    assert "\n" not in message


# ---- EC2: routes toward the device subnet ---------------------------------------------------


def test_route_to_this_eni_is_found(vpc: Vpc) -> None:
    vpc.ec2.create_route(
        RouteTableId=vpc.main_table,
        DestinationCidrBlock=str(DEVICE_SUBNET),
        NetworkInterfaceId=vpc.eni_id,
    )
    routes = device_subnet_routes(vpc.ec2, vpc.vpc_id, DEVICE_SUBNET)
    route = table_of_subnet(routes, vpc.subnet_id)
    assert route is not None and route.main and route.table_id == vpc.main_table
    assert route.destination == DEVICE_SUBNET and route.target == vpc.eni_id
    assert route.points_to(vpc.eni_id, vpc.instance_id)


def test_missing_route_is_seen(vpc: Vpc) -> None:
    # Only the VPC's local route: nothing carries 10.128.0.0/9.
    assert device_subnet_routes(vpc.ec2, vpc.vpc_id, DEVICE_SUBNET) == []
    assert table_of_subnet([], vpc.subnet_id) is None


def test_subnet_table_wins_over_main_and_a_route_elsewhere_is_not_ours(vpc: Vpc) -> None:
    vpc.ec2.create_route(
        RouteTableId=vpc.main_table,
        DestinationCidrBlock=str(DEVICE_SUBNET),
        NetworkInterfaceId=vpc.eni_id,
    )
    own = vpc.ec2.create_route_table(VpcId=vpc.vpc_id)["RouteTable"]["RouteTableId"]
    vpc.ec2.associate_route_table(RouteTableId=own, SubnetId=vpc.subnet_id)
    gateway = vpc.ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    vpc.ec2.attach_internet_gateway(InternetGatewayId=gateway, VpcId=vpc.vpc_id)
    # A wider route in the subnet's own table sends the device subnet to the gateway.
    vpc.ec2.create_route(RouteTableId=own, DestinationCidrBlock="0.0.0.0/0", GatewayId=gateway)
    routes = device_subnet_routes(vpc.ec2, vpc.vpc_id, DEVICE_SUBNET)
    assert {r.table_id for r in routes} == {vpc.main_table, own}
    route = table_of_subnet(routes, vpc.subnet_id)
    assert route is not None and route.table_id == own
    assert route.destination == IPv4Network("0.0.0.0/0") and route.target == gateway
    assert not route.points_to(vpc.eni_id, vpc.instance_id)
    # A more specific route there to the instance is taken over the default.
    vpc.ec2.create_route(
        RouteTableId=own, DestinationCidrBlock="10.128.0.0/9", InstanceId=vpc.instance_id
    )
    route = table_of_subnet(device_subnet_routes(vpc.ec2, vpc.vpc_id, DEVICE_SUBNET), vpc.subnet_id)
    assert route is not None and route.points_to(vpc.eni_id, vpc.instance_id)
