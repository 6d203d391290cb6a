"""The stack's closed-network parts (deploy/cloudformation/gatepeer.yaml, all optional): an S3
gateway endpoint on the peers' route tables, the SSM interface endpoints with private DNS and
a security group admitting the peers (nat) and the device subnet (route), a Route 53 inbound
resolver. Deployed into moto's CloudFormation and judged by the doctor's own closed-network
judgments; the resolver on the template itself (moto's CloudFormation has no
AWS::Route53Resolver::ResolverEndpoint)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from helpers.stack_moto import REGION, MotoNetwork, client, deploy_stack, moto_network

from gatepeer.aws.ec2 import ingress_rules
from gatepeer.config import Config, PacketPathConfig
from gatepeer.doctor import closed
from gatepeer.doctor.closed_aws import destinations as closed_destinations
from gatepeer.doctor.closed_aws import subnet_route_table, vpc_endpoints

S3 = f"com.amazonaws.{REGION}.s3"
DEVICES = "198.19.0.0/16"
CLOSED_PARTS = (
    "S3Endpoint",
    "EndpointSecurityGroup",
    "SsmEndpoint",
    "SsmMessagesEndpoint",
    "Ec2MessagesEndpoint",
)


@pytest.fixture(scope="module")
def network(moto: Any) -> MotoNetwork:
    """The stack's VPC, its first subnet on the route table, everything else to the internet."""
    net = moto_network(moto.url)
    ec2 = client(moto.url, "ec2")
    ec2.associate_route_table(RouteTableId=net.route_table_id, SubnetId=net.subnet_ids[0])
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=net.vpc_id)
    ec2.create_route(
        RouteTableId=net.route_table_id, DestinationCidrBlock="0.0.0.0/0", GatewayId=igw
    )
    return net


def template() -> Any:
    from cfnlint.decode import cfn_yaml
    from helpers.stack_moto import TEMPLATE

    return cfn_yaml.load(str(TEMPLATE))


def s3_route(moto: Any, network: MotoNetwork) -> closed.Check:
    ec2 = client(moto.url, "ec2")
    table = subnet_route_table(ec2, network.vpc_id, network.subnet_ids[0])
    assert table is not None and table.table_id == network.route_table_id
    config = Config(packet_path=PacketPathConfig(mode="nat", closed=True, allowed_names=(S3,)))
    (destination,) = closed_destinations(ec2, config)
    return closed.judge_destination(table, destination)


def test_without_the_options_nothing_is_made_and_s3_leaks(moto: Any, network: MotoNetwork) -> None:
    stack = deploy_stack(moto.url, network.parameters(Mode="nat"))
    assert not [p for p in CLOSED_PARTS if stack.resources.get(p)]
    check = s3_route(moto, network)
    assert check.status == "fail" and "internet gateway" in check.detail, check


def test_the_options_make_a_closed_network_doctor_accepts(moto: Any, network: MotoNetwork) -> None:
    stack = deploy_stack(
        moto.url,
        network.parameters(
            Mode="nat",
            S3GatewayEndpoint="create",
            EndpointRouteTableIds=network.route_table_id,
            SsmEndpoints="create",
            DeviceSubnetCidr=DEVICES,
        ),
    )
    assert all(stack.resources.get(p) for p in CLOSED_PARTS), stack.resources
    ec2 = client(moto.url, "ec2")

    # S3 through the gateway endpoint's prefix-list route: inside.
    check = s3_route(moto, network)
    assert check.status == "ok" and stack.resources["S3Endpoint"] in check.detail, check

    # The SSM endpoints: private DNS, the endpoints' group admits the peers' group and the
    # device subnet.
    endpoints = [
        e
        for e in vpc_endpoints(ec2, network.vpc_id, ())
        if e.endpoint_id in stack.outputs["SsmEndpointIds"].split(",")
    ]
    assert sorted(e.short_service for e in endpoints) == ["ec2messages", "ssm", "ssmmessages"]
    assert all(e.private_dns for e in endpoints)
    group = stack.resources["EndpointSecurityGroup"]
    peer_group = stack.outputs["SecurityGroupId"]
    assert all(e.groups == (group,) for e in endpoints)
    rules = ingress_rules(ec2, [group])
    nat = closed.judge_endpoint_groups(
        endpoints,
        rules,
        mode="nat",
        peer=IPv4Address("198.18.0.10"),
        peer_groups=[peer_group],
        device_subnet=None,
    )
    assert nat.status == "ok", nat
    route = closed.judge_endpoint_groups(
        endpoints,
        rules,
        mode="route",
        peer=IPv4Address("198.18.0.10"),
        peer_groups=[],
        device_subnet=IPv4Network(DEVICES),
    )
    assert route.status == "ok", route
    # Without the device subnet's rule route mode is refused: the judgment can fail.
    only_peers = [r for r in rules if IPv4Network(DEVICES) not in r.sources]
    refused = closed.judge_endpoint_groups(
        endpoints,
        only_peers,
        mode="route",
        peer=IPv4Address("198.18.0.10"),
        peer_groups=[],
        device_subnet=IPv4Network(DEVICES),
    )
    assert refused.status == "fail"


def test_interface_endpoints_and_the_resolver_use_the_endpoints_group() -> None:
    resources = template()["Resources"]
    for name in ("SsmEndpoint", "SsmMessagesEndpoint", "Ec2MessagesEndpoint"):
        props = resources[name]["Properties"]
        assert props["VpcEndpointType"] == "Interface" and props["PrivateDnsEnabled"] is True
        assert props["SecurityGroupIds"] == [{"Fn::GetAtt": ["EndpointSecurityGroup", "GroupId"]}]
    resolver = resources["InboundResolverEndpoint"]
    assert resolver["Condition"] == "HasResolver"
    assert resolver["Type"] == "AWS::Route53Resolver::ResolverEndpoint"
    props = resolver["Properties"]
    assert props["Direction"] == "INBOUND" and len(props["IpAddresses"]) == 2
    assert props["SecurityGroupIds"] == [{"Fn::GetAtt": ["EndpointSecurityGroup", "GroupId"]}]
    dns = [
        r
        for r in resources["EndpointSecurityGroup"]["Properties"]["SecurityGroupIngress"]
        if r["FromPort"] == 53
    ]
    assert {r["IpProtocol"] for r in dns} == {"udp", "tcp"}


def test_s3_endpoint_needs_route_tables() -> None:
    """CloudFormation checks Rules before it makes anything (moto does not run them)."""
    rule = template()["Rules"]["S3EndpointNeedsRouteTables"]
    assert rule["RuleCondition"] == {"Fn::Equals": [{"Ref": "S3GatewayEndpoint"}, "create"]}
    assert "EndpointRouteTableIds" in str(rule["Assertions"][0]["Assert"])
