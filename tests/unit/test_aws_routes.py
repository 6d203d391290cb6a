"""[aws] route_tables (a single peer's VPC route follows its ENI), [aws]
remove_stale_registrations (a replaced instance's registration goes), and the IMDS endpoint
from AWS_EC2_METADATA_SERVICE_ENDPOINT: the config keys, the pure decisions, and the calls
against moto's server on 127.0.0.1 (nothing reaches AWS)."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from helpers.aws_fakes import ENI, MAC, Moto, offline_aws_env, running_imds
from helpers.config_files import soracom_section, write_config, write_key

from gatepeer.aws import AwsError, report
from gatepeer.aws.imds import ImdsError, resolve_endpoint
from gatepeer.aws.integration import AwsIntegration, InstanceFactsSource
from gatepeer.aws.routes import RouteKeeper, RouteSeen, decide
from gatepeer.aws.stale import candidates, stale_addresses, sweep
from gatepeer.config import AwsConfig, Config, ConfigError, load
from gatepeer.desired_state import Endpoint, GateView

REGION = "ap-northeast-1"
DEVICES = IPv4Network("198.19.0.0/16")
VPC_CIDR = "198.18.0.0/16"


# ---- config ----------------------------------------------------------------------------------


def aws_config(tmp_path: Path, aws: str, extra: str = "") -> Config:
    key = write_key(tmp_path / "key")
    return load(write_config(tmp_path, soracom_section(key) + extra + "[aws]\n" + aws))


def test_route_tables_and_stale_sweep_parse(tmp_path: Path) -> None:
    cfg = aws_config(
        tmp_path,
        'route_tables = ["rtb-0a1b2c3d", "rtb-0123456789abcdef0"]\n'
        "remove_stale_registrations = true\n",
    )
    assert cfg.aws.route_tables == ("rtb-0a1b2c3d", "rtb-0123456789abcdef0")
    assert cfg.aws.remove_stale_registrations is True
    assert cfg.aws.any_api_feature


@pytest.mark.parametrize(
    ("aws", "extra", "message"),
    [
        ('route_tables = ["eni-0a1b2c3d"]\n', "", "aws.route_tables: not a route table id"),
        ('route_tables = "rtb-0a1b2c3d"\n', "", "aws.route_tables: must be a list"),
        (
            'route_tables = ["rtb-0a1b2c3d", "rtb-0a1b2c3d"]\n',
            "",
            "aws.route_tables: lists a route table twice",
        ),
        (
            'route_tables = ["rtb-0a1b2c3d"]\n',
            '[packet_path]\nmode = "nat"\n',
            "aws.route_tables: routes the device subnet to this peer, which only route mode "
            'forwards; set packet_path.mode = "route" or remove it',
        ),
        (
            'route_tables = ["rtb-0a1b2c3d"]\n',
            '[ha]\npeer_address = "198.18.0.11"\n',
            "aws.route_tables: an HA pair moves routes with ha.route_tables",
        ),
        ("remove_stale_registrations = 1\n", "", "aws.remove_stale_registrations: must be"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, aws: str, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        aws_config(tmp_path, aws, extra)
    assert str(err.value).startswith(message), str(err.value)


# ---- the IMDS endpoint -----------------------------------------------------------------------


def test_imds_endpoint_file_then_environment_then_default() -> None:
    env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://198.18.0.253:8080/"}
    assert resolve_endpoint("http://127.0.0.1:1", env) == "http://127.0.0.1:1"
    assert resolve_endpoint(None, env) == "http://198.18.0.253:8080"
    assert resolve_endpoint(None, {}) == "http://169.254.169.254"
    with pytest.raises(ImdsError, match="^AWS_EC2_METADATA_SERVICE_ENDPOINT: must be http://"):
        resolve_endpoint(None, {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "https://x/latest"})


def ec2_sys(tmp_path: Path) -> Path:
    dmi = tmp_path / "sys" / "class" / "dmi" / "id"
    dmi.mkdir(parents=True)
    (dmi / "sys_vendor").write_text("Amazon EC2\n")
    return tmp_path / "sys"


def test_instance_facts_come_from_the_environments_endpoint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No imds_endpoint in the file: the variable botocore honours is where IMDS is asked."""
    with running_imds() as imds:
        imds.behaviour.data[f"{ENI}/vpc-ipv4-cidr-blocks"] = "198.18.0.0/16\n203.0.113.0/24"
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url)
        facts = InstanceFactsSource(AwsConfig(), sys_root=ec2_sys(tmp_path)).get()
        assert facts is not None and facts.mac == MAC
        assert facts.vpc_cidrs == (IPv4Network("198.18.0.0/16"), IPv4Network("203.0.113.0/24"))
        assert imds.gets(), "nothing asked the fake IMDS"


# ---- routes: the decision --------------------------------------------------------------------


def test_decide_creates_replaces_or_leaves() -> None:
    eni = "eni-0new"
    changes = decide(
        {
            "rtb-missing": None,
            "rtb-elsewhere": RouteSeen("eni-0old", "active"),
            "rtb-blackhole": RouteSeen(eni, "blackhole"),
            "rtb-right": RouteSeen(eni, "active"),
        },
        DEVICES,
        eni,
    )
    assert [(c.table_id, c.action) for c in changes] == [
        ("rtb-missing", "create"),
        ("rtb-elsewhere", "replace"),
        ("rtb-blackhole", "replace"),
    ]
    assert changes[0].command() == (
        "aws ec2 create-route --route-table-id rtb-missing --destination-cidr-block "
        "198.19.0.0/16 --network-interface-id eni-0new"
    )
    assert "was eni-0old" in changes[1].describe()


# ---- routes and the sweep on moto ------------------------------------------------------------


class Vpc:
    """A VPC in moto: a subnet, ENIs by address, route tables."""

    def __init__(self, moto: Moto) -> None:
        import boto3

        moto.reset()
        self.ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=moto.url)
        self.vpc = self.ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
        self.subnet = self.ec2.create_subnet(VpcId=self.vpc, CidrBlock="198.18.0.0/24")["Subnet"][
            "SubnetId"
        ]

    def eni(self, address: str) -> str:
        answer = self.ec2.create_network_interface(SubnetId=self.subnet, PrivateIpAddress=address)
        return str(answer["NetworkInterface"]["NetworkInterfaceId"])

    def table(self) -> str:
        return str(self.ec2.create_route_table(VpcId=self.vpc)["RouteTable"]["RouteTableId"])

    def target(self, table: str) -> str | None:
        (answer,) = self.ec2.describe_route_tables(RouteTableIds=[table])["RouteTables"]
        for route in answer["Routes"]:
            if route.get("DestinationCidrBlock") == str(DEVICES):
                return str(route.get("NetworkInterfaceId"))
        return None


@pytest.fixture
def vpc(moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Vpc]:
    offline_aws_env(monkeypatch, tmp_path)
    yield Vpc(moto)


def test_route_keeper_creates_replaces_and_then_leaves_alone(vpc: Vpc) -> None:
    old, new = vpc.eni("198.18.0.10"), vpc.eni("198.18.0.12")
    empty, taken = vpc.table(), vpc.table()
    vpc.ec2.create_route(
        RouteTableId=taken, DestinationCidrBlock=str(DEVICES), NetworkInterfaceId=old
    )
    now = [0.0]
    keeper = RouteKeeper((empty, taken), clock=lambda: now[0])
    changes = keeper.keep(vpc.ec2, DEVICES, new)
    assert [(c.table_id, c.action) for c in changes] == [(empty, "create"), (taken, "replace")]
    assert vpc.target(empty) == vpc.target(taken) == new
    assert keeper.claim.tables == {empty: "created", taken: "replaced"}
    assert not keeper.due(DEVICES, new)  # a right answer is trusted for a while
    now[0] += 11
    assert keeper.due(DEVICES, new)
    assert keeper.keep(vpc.ec2, DEVICES, new) == []
    assert keeper.claim.tables == {empty: "ok", taken: "ok"} and keeper.claim.error is None
    assert keeper.due(DEVICES, "eni-0other")  # a new ENI is checked at once


def test_route_keeper_names_an_unknown_table(vpc: Vpc) -> None:
    keeper = RouteKeeper(("rtb-0deadbeef",))
    with pytest.raises(AwsError, match="rtb-0deadbeef"):
        keeper.keep(vpc.ec2, DEVICES, vpc.eni("198.18.0.10"))
    assert keeper.claim.error and "rtb-0deadbeef" in keeper.claim.error
    line = report.line({"route_tables": keeper.claim.to_json()})
    assert line is not None and "routes FAILING" in line


class Peers:
    """The SORACOM side of the sweep: listGatePeers and unregisterGatePeer in memory."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.unregistered: list[str] = []

    def list_gate_peers(self, vpg_id: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]

    def unregister_gate_peer(self, vpg_id: str, outer_ip: str) -> None:
        self.unregistered.append(outer_ip)
        self.rows = [r for r in self.rows if r["outerIpAddress"] != outer_ip]


def rows() -> list[dict[str, Any]]:
    customer = [
        ("198.18.0.10", True),  # the replaced instance: in the VPC, no interface
        ("198.18.0.11", True),  # the other peer of a pair: its ENI exists
        ("198.18.0.12", True),  # this peer
        ("192.0.2.7", True),  # outside the VPC (on-premises): never touched
        ("100.64.1.1", False),  # the VPG's own endpoint
    ]
    return [{"outerIpAddress": a, "ownedByCustomer": c} for a, c in customer]


def test_candidates_and_stale_addresses_are_pure() -> None:
    found = candidates(rows(), IPv4Address("198.18.0.12"), [IPv4Network(VPC_CIDR)])
    assert found == [IPv4Address("198.18.0.10"), IPv4Address("198.18.0.11")]
    assert stale_addresses(found, {IPv4Address("198.18.0.11")}) == [IPv4Address("198.18.0.10")]


def test_sweep_unregisters_only_an_address_no_interface_holds(vpc: Vpc) -> None:
    vpc.eni("198.18.0.11")
    vpc.eni("198.18.0.12")
    api = Peers(rows())
    removed = sweep(
        api, vpc.ec2, "vpg-x", IPv4Address("198.18.0.12"), vpc.vpc, (IPv4Network(VPC_CIDR),)
    )
    assert removed == [IPv4Address("198.18.0.10")]
    assert api.unregistered == ["198.18.0.10"]
    # Nothing left to remove: a second sweep changes nothing.
    assert (
        sweep(api, vpc.ec2, "vpg-x", IPv4Address("198.18.0.12"), vpc.vpc, (IPv4Network(VPC_CIDR),))
        == []
    )
    with pytest.raises(AwsError, match="CIDR blocks are unknown"):
        sweep(api, vpc.ec2, "vpg-x", IPv4Address("198.18.0.12"), vpc.vpc, ())


# ---- the daemon's AWS side after a reconcile -------------------------------------------------


def gate_view(outer: str) -> GateView:
    return GateView(
        vpg_id="vpg-x",
        vni=10,
        device_subnet=DEVICES,
        gate_opened=True,
        inner=IPv4Interface("198.19.0.5/16"),
        endpoints=(Endpoint(IPv4Address("100.64.1.1"), None),),
        outer=IPv4Address(outer),
    )


def test_after_reconcile_points_the_route_and_sweeps_once(
    vpc: Vpc, moto: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A replacement instance (new ENI, new address): its first reconcile takes the route and
    removes the old registration; later reconciles leave both alone."""
    old = vpc.eni("198.18.0.10")
    table = vpc.table()
    vpc.ec2.create_route(
        RouteTableId=table, DestinationCidrBlock=str(DEVICES), NetworkInterfaceId=old
    )
    vpc.ec2.delete_network_interface(NetworkInterfaceId=old)  # the old instance is gone
    new = vpc.eni("198.18.0.12")
    vpc.eni("198.18.0.11")  # another peer's: it stays registered
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    with running_imds() as imds:
        b = imds.behaviour
        b.data.update(
            {
                "placement/region": REGION,
                f"{ENI}/interface-id": new,
                f"{ENI}/local-ipv4s": "198.18.0.12",
                f"{ENI}/vpc-id": vpc.vpc,
                f"{ENI}/vpc-ipv4-cidr-blocks": VPC_CIDR,
            }
        )
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url)
        config = aws_config(
            tmp_path, f'route_tables = ["{table}"]\nremove_stale_registrations = true\n'
        )
        api = Peers(rows())
        source = InstanceFactsSource(config.aws, sys_root=ec2_sys(tmp_path))
        integration = AwsIntegration.for_config(config, source, soracom=lambda: api)
        assert integration is not None
        integration.after_reconcile(True, gate_view("198.18.0.12"))
        assert vpc.target(table) == new
        assert api.unregistered == ["198.18.0.10"]
        state = integration.to_json()
        assert state["route_tables"]["tables"] == {table: "replaced"}
        assert state["stale_registrations"]["removed"] == ["198.18.0.10"]
        line = report.line(state)
        assert line is not None and f"-> {new}" in line and "removed: 198.18.0.10" in line
        # Someone registers the old address again: not swept until this peer re-registers.
        api.rows.append({"outerIpAddress": "198.18.0.10", "ownedByCustomer": True})
        integration.after_reconcile(True, gate_view("198.18.0.12"))
        assert api.unregistered == ["198.18.0.10"]


# ---- an answer botocore cannot parse ---------------------------------------------------------


def test_an_unparsable_answer_is_an_aws_error_not_a_crash() -> None:
    """moto (or a proxy) answering an HTML 500 page: botocore raises ResponseParserError, which
    is no BotoCoreError. It must arrive as the call's own error (the boot rehearsal found the
    daemon dying of it at the launch lifecycle action)."""
    from botocore.parsers import ResponseParserError

    from gatepeer.aws.lifecycle import Hook, LifecycleError, complete
    from gatepeer.aws.routes import routes_seen

    class Broken:
        def __getattr__(self, name: str) -> Any:
            def call(**kwargs: Any) -> Any:
                raise ResponseParserError("Unable to parse response, invalid XML received")

            return call

    with pytest.raises(LifecycleError, match="CompleteLifecycleAction"):
        complete(Broken(), Hook("group", "gatepeer-launch", "i-1"), "CONTINUE")
    with pytest.raises(AwsError, match="ec2:DescribeRouteTables"):
        routes_seen(Broken(), ("rtb-0a1b2c3d",), DEVICES)


def test_after_reconcile_never_raises(tmp_path: Path) -> None:
    config = aws_config(tmp_path, 'route_tables = ["rtb-0a1b2c3d"]\n')

    class Exploding(InstanceFactsSource):
        def get(self) -> Any:
            raise KeyError("a bug")

    integration = AwsIntegration.for_config(config, Exploding(config.aws))
    assert integration is not None
    integration.after_reconcile(True, gate_view("198.18.0.12"))
    assert integration.problem is not None and "KeyError" in integration.problem


# ---- what status shows -------------------------------------------------------------------------
