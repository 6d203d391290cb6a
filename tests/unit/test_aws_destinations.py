"""packet_path.allowed_destinations by AWS name (gatepeer.aws.destinations): the config keys,
each kind of name resolved against moto's server on 127.0.0.1 (reached through
AWS_ENDPOINT_URL, as any boto3 client), the set kept on disk and the last good set kept when
EC2 cannot be reached. Nothing reaches AWS."""

from __future__ import annotations

from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from helpers.aws_fakes import Moto, closed_port_url, offline_aws_env
from helpers.config_files import soracom_section, write_config, write_key

from gatepeer.aws.clients import AwsTarget, client
from gatepeer.aws.destinations import (
    DestinationError,
    DestinationResolver,
    is_aws_name,
    resolve_entry,
)
from gatepeer.config import Config, ConfigError, load

REGION = "ap-northeast-1"
S3_LIST = f"com.amazonaws.{REGION}.s3"


def packet_path(tmp_path: Path, body: str) -> Config:
    key = write_key(tmp_path / "key")
    return load(write_config(tmp_path, soracom_section(key) + "[packet_path]\n" + body))


# ---- config ----------------------------------------------------------------------------------


def test_names_and_prefixes_are_told_apart(tmp_path: Path) -> None:
    pp = packet_path(
        tmp_path,
        'allowed_destinations = ["198.18.0.0/16", "pl-0123456789abcdef0", '
        f'"{S3_LIST}", "vpce-0123456789abcdef0", "pl-0123456789abcdef0"]\n'
        'closed = true\ndestinations_refresh = "10m"\ndestinations_cache = "/tmp/x.json"\n',
    ).packet_path
    assert pp.allowed_destinations == (IPv4Network("198.18.0.0/16"),)
    assert pp.allowed_names == ("pl-0123456789abcdef0", S3_LIST, "vpce-0123456789abcdef0")
    assert pp.closed is True
    assert pp.destinations_refresh == 600.0
    assert pp.destinations_cache == Path("/tmp/x.json")


def test_defaults_keep_todays_behaviour(tmp_path: Path) -> None:
    pp = packet_path(tmp_path, "").packet_path
    assert (pp.allowed_names, pp.closed) == ((), False)
    assert pp.destinations_cache == Path("/var/lib/gatepeer/destinations.json")
    assert packet_path(tmp_path, 'destinations_cache = ""\n').packet_path.destinations_cache is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('allowed_destinations = ["pl-xyz"]\n', "got 'pl-xyz'"),
        ('allowed_destinations = ["vpce-12"]\n', "VPC endpoint id (vpce-...), got 'vpce-12'"),
        ('allowed_destinations = ["com.amazonaws"]\n', "got 'com.amazonaws'"),
        ('allowed_destinations = ["198.18.0.1/16"]\n', "host bits must be zero"),
        ('allowed_destinations = "pl-0123456789abcdef0"\n', "must be a list"),
        ('closed = "yes"\n', "packet_path.closed"),
        ('destinations_refresh = "1s"\n', "packet_path.destinations_refresh"),
        ('destinations_cache = "rel.json"\n', "packet_path.destinations_cache: must be absolute"),
    ],
)
def test_bad_entries_name_the_key_and_value(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        packet_path(tmp_path, body)
    text = str(err.value)
    assert "\n" not in text
    assert all(part in text for part in message.split(": must be absolute")), text


def test_is_aws_name() -> None:
    assert is_aws_name("pl-0123456789abcdef0") and is_aws_name("vpce-0123abcd")
    assert is_aws_name("com.amazonaws.global.cloudfront.origin-facing")
    assert not is_aws_name("198.18.0.0/16") and not is_aws_name("pl-XYZ")


# ---- resolution on moto ------------------------------------------------------------------------


@pytest.fixture
def ec2(moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """An EC2 client made like the daemon's (no endpoint_url): AWS_ENDPOINT_URL leads to moto."""
    moto.reset()
    offline_aws_env(monkeypatch, tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    return client("ec2", AwsTarget(REGION))


def s3_entries(ec2: Any) -> tuple[IPv4Network, ...]:
    pl = ec2.describe_managed_prefix_lists(
        Filters=[{"Name": "prefix-list-name", "Values": [S3_LIST]}]
    )["PrefixLists"][0]["PrefixListId"]
    cidrs = ec2.get_managed_prefix_list_entries(PrefixListId=pl)["Entries"]
    return tuple(sorted(IPv4Network(e["Cidr"]) for e in cidrs))


def network(ec2: Any) -> tuple[str, str, str]:
    vpc = ec2.create_vpc(CidrBlock="198.18.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="198.18.1.0/24")["Subnet"]["SubnetId"]
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    return vpc, subnet, table


def interface_endpoint(ec2: Any, vpc: str, subnet: str, service: str = "ssm") -> str:
    return str(
        ec2.create_vpc_endpoint(
            VpcId=vpc,
            ServiceName=f"com.amazonaws.{REGION}.{service}",
            VpcEndpointType="Interface",
            SubnetIds=[subnet],
            PrivateDnsEnabled=True,
        )["VpcEndpoint"]["VpcEndpointId"]
    )


def test_aws_managed_list_by_name_and_by_id(ec2: Any) -> None:
    want = s3_entries(ec2)
    assert want, "moto serves the S3 list with entries"
    assert resolve_entry(ec2, S3_LIST) == want
    pl = ec2.describe_managed_prefix_lists(
        Filters=[{"Name": "prefix-list-name", "Values": [S3_LIST]}]
    )["PrefixLists"][0]["PrefixListId"]
    assert resolve_entry(ec2, pl) == want


def test_customer_managed_list(ec2: Any) -> None:
    pl = ec2.create_managed_prefix_list(
        PrefixListName="devices-cloud",
        MaxEntries=5,
        AddressFamily="IPv4",
        Entries=[{"Cidr": "203.0.113.0/24"}, {"Cidr": "198.51.100.7/32"}],
    )["PrefixList"]["PrefixListId"]
    assert resolve_entry(ec2, pl) == (
        IPv4Network("198.51.100.7/32"),
        IPv4Network("203.0.113.0/24"),
    )


def test_interface_endpoint_is_its_addresses(ec2: Any) -> None:
    vpc, subnet, _ = network(ec2)
    endpoint = interface_endpoint(ec2, vpc, subnet)
    enis = ec2.describe_vpc_endpoints(VpcEndpointIds=[endpoint])["VpcEndpoints"][0][
        "NetworkInterfaceIds"
    ]
    address = ec2.describe_network_interfaces(NetworkInterfaceIds=enis)["NetworkInterfaces"][0][
        "PrivateIpAddress"
    ]
    assert resolve_entry(ec2, endpoint) == (IPv4Network(f"{address}/32"),)


def test_gateway_endpoint_is_its_services_list(ec2: Any) -> None:
    vpc, _, table = network(ec2)
    endpoint = ec2.create_vpc_endpoint(
        VpcId=vpc, ServiceName=S3_LIST, VpcEndpointType="Gateway", RouteTableIds=[table]
    )["VpcEndpoint"]["VpcEndpointId"]
    assert resolve_entry(ec2, endpoint) == s3_entries(ec2)


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ("com.amazonaws.eu-west-1.s3", "same-region only"),
        ("com.amazonaws.ap-northeast-1.nothing", "no managed prefix list has this name"),
        ("vpce-0123456789abcdef0", "DescribeVpcEndpoints"),
        # AWS answers InvalidPrefixListID.NotFound; moto an empty list.
        ("pl-0123456789abcdef0", "GetManagedPrefixListEntries|resolves to no IPv4 prefix"),
    ],
)
def test_errors_name_the_entry(ec2: Any, entry: str, says: str) -> None:
    with pytest.raises(DestinationError) as err:
        resolve_entry(ec2, entry)
    assert str(err.value).startswith(f"{entry}: ")
    assert any(part in str(err.value) for part in says.split("|")), err.value


# ---- the resolver: cadence, disk, last good set ------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_resolver_keeps_the_last_good_set_across_a_boot_without_the_api(
    ec2: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vpc, subnet, _ = network(ec2)
    endpoint = interface_endpoint(ec2, vpc, subnet)
    cache = tmp_path / "state" / "destinations.json"
    clock = Clock()
    entries = (S3_LIST, endpoint)
    resolver = DestinationResolver(
        entries, lambda: client("ec2", AwsTarget(REGION)), cache=cache, interval_s=300, clock=clock
    )
    assert resolver.unresolved() == entries and resolver.due()
    assert resolver.refresh() is True
    good = resolver.prefixes()
    assert set(s3_entries(ec2)) <= set(good) and len(good) == len(s3_entries(ec2)) + 1
    assert resolver.unresolved() == () and not resolver.due()
    assert cache.exists()
    clock.now += 300
    assert resolver.due() and resolver.refresh() is False  # nothing changed

    # A boot while EC2 cannot be reached: the kept set, and the error names each entry.
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_url())
    booted = DestinationResolver(
        entries, lambda: client("ec2", AwsTarget(REGION)), cache=cache, interval_s=300, clock=clock
    )
    assert booted.prefixes() == good
    assert booted.refresh() is False
    assert booted.prefixes() == good
    assert set(booted.state.errors) == set(entries)
    assert all(booted.state.errors[e].startswith(f"{e}: ") for e in entries)

    # An entry no longer configured is not carried over from the cache.
    only_s3 = DestinationResolver((S3_LIST,), lambda: None, cache=cache, interval_s=300)
    assert only_s3.prefixes() == tuple(sorted(set(s3_entries(ec2))))


def test_one_failing_entry_keeps_its_prefixes_the_others_move_on(ec2: Any, tmp_path: Path) -> None:
    pl = ec2.create_managed_prefix_list(
        PrefixListName="cloud",
        MaxEntries=5,
        AddressFamily="IPv4",
        Entries=[{"Cidr": "203.0.113.0/24"}],
    )["PrefixList"]
    vpc, subnet, _ = network(ec2)
    endpoint = interface_endpoint(ec2, vpc, subnet)
    resolver = DestinationResolver(
        (pl["PrefixListId"], endpoint), lambda: ec2, cache=tmp_path / "d.json", interval_s=60
    )
    resolver.refresh()
    before = resolver.state.by_entry[endpoint]
    ec2.delete_vpc_endpoints(VpcEndpointIds=[endpoint])
    ec2.modify_managed_prefix_list(
        PrefixListId=pl["PrefixListId"],
        CurrentVersion=pl["Version"],
        AddEntries=[{"Cidr": "198.51.100.0/24"}],
    )
    assert resolver.refresh() is True
    assert resolver.state.by_entry[endpoint] == before
    assert endpoint in resolver.state.errors
    assert IPv4Network("198.51.100.0/24") in resolver.prefixes()


# ---- IAM: the single source ------------------------------------------------------------------


def test_names_and_closed_need_their_describe_actions(tmp_path: Path) -> None:
    from gatepeer.aws.permissions import Account, needed, policy

    plain = {p.action for p in needed(packet_path(tmp_path, ""))}
    named = packet_path(tmp_path, f'allowed_destinations = ["{S3_LIST}"]\n')
    closed = packet_path(tmp_path, "closed = true\n")
    for_names = {p.action for p in needed(named)} - plain
    assert for_names == {
        "ec2:DescribeManagedPrefixLists",
        "ec2:GetManagedPrefixListEntries",
        "ec2:DescribeVpcEndpoints",
    }
    for_closed = {p.action for p in needed(closed)} - plain
    assert "route53resolver:ListResolverEndpoints" in for_closed
    assert "ec2:DescribeVpcEndpoints" in for_closed and "ec2:DescribeVpcAttribute" in for_closed
    # Describe-only: every new action lands in the Describe statement, on "*".
    statements = policy([named, closed], Account())["Statement"]
    describe = next(s for s in statements if s["Sid"] == "Describe")
    assert (for_names | for_closed) <= set(describe["Action"]) and describe["Resource"] == "*"
