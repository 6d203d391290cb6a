"""The CloudFormation stack (deploy/cloudformation/gatepeer.yaml): cfn-lint, then deployed into
moto's CloudFormation for each parameter combination that matters, and what it made inspected:
the security group's rules, the role's policy (equal to `gatepeer aws policy` for the config the
launch template writes), the Auto Scaling groups, the user-data (cloud-init's schema check and
`gatepeer config check` on the TOML it writes).

moto gaps, tested on the template itself instead: moto ignores the groups'
LifecycleHookSpecificationList (and has no AWS::AutoScaling::LifecycleHook resource type), the
role's ManagedPolicyArns, and a network interface's GroupSet and SourceDestCheck (it reads
SecurityGroups, which AWS::EC2::NetworkInterface does not have). It also leaves a null where
`AWS::NoValue` drops a list item, and keeps the stack's inline policy as Python's repr of it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import subprocess
import sys
import tomllib
from ipaddress import IPv4Address, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from helpers.stack_moto import (
    AUTH_KEY_ID,
    AUTH_KEY_PARAMETER,
    CONFIG_PATH,
    MOTO_ACCOUNT,
    PEER_TOML,
    REGION,
    SUBNET_CIDRS,
    TEMPLATE,
    VPC_CIDR,
    VPG_ENDPOINTS,
    Deployment,
    MotoNetwork,
    client,
    cloud_config,
    deploy_stack,
    moto_network,
    parsed,
    written_toml,
)

from gatepeer import config as cfg
from gatepeer.aws.ec2 import assign_private_address
from gatepeer.aws.permissions import Account, iam_table, policy

REPO = Path(__file__).resolve().parents[2]


# (Mode, Peers, Redirection): nat needs redirection (the template's rule says so).
COMBOS = [
    ("route", "single", "self"),
    ("route", "single", "unmanaged"),
    ("nat", "single", "self"),
    ("route", "pair", "self"),
    ("route", "pair", "unmanaged"),
    ("nat", "pair", "self"),
]


def combo_id(combo: tuple[str, str, str]) -> str:
    return "-".join(combo)


@pytest.fixture(scope="module")
def network(moto: Any) -> MotoNetwork:
    return moto_network(moto.url)


@pytest.fixture(scope="module")
def stacks(moto: Any, network: MotoNetwork) -> dict[tuple[str, str, str], Deployment]:
    """One stack per combination, deployed once for the module."""
    return {
        combo: deploy_stack(
            moto.url, network.parameters(Mode=combo[0], Peers=combo[1], Redirection=combo[2])
        )
        for combo in COMBOS
    }


# ---- the template, statically --------------------------------------------------------------


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("cfn-lint")
    argv = [str(exe)] if exe.exists() else [shutil.which("cfn-lint") or "cfn-lint"]
    return subprocess.run([*argv, str(path)], capture_output=True, text=True)


def test_template_passes_cfn_lint() -> None:
    proc = cfn_lint(TEMPLATE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cfn_lint_sees_a_broken_template(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace('      MinSize: "1"\n', "", 1))
    proc = cfn_lint(broken)
    assert proc.returncode != 0 and "MinSize" in proc.stdout


def template() -> Any:
    from cfnlint.decode import cfn_yaml

    return cfn_yaml.load(str(TEMPLATE))


def test_lifecycle_hooks_hold_launch_until_healthy_and_termination_until_unregistered() -> None:
    """In the group itself (so the first instance is held too), named as the user-data names
    them. Checked on the template: moto does not create lifecycle hooks from a stack."""
    groups = {
        name: r["Properties"]
        for name, r in template()["Resources"].items()
        if r["Type"] == "AWS::AutoScaling::AutoScalingGroup"
    }
    assert sorted(groups) == ["PeerAGroup", "PeerBGroup", "PeerGroup"]
    for props in groups.values():
        hooks = {h["LifecycleTransition"]: h for h in props["LifecycleHookSpecificationList"]}
        launch = hooks["autoscaling:EC2_INSTANCE_LAUNCHING"]
        terminate = hooks["autoscaling:EC2_INSTANCE_TERMINATING"]
        assert launch["LifecycleHookName"] == "gatepeer-launch"
        assert launch["DefaultResult"] == "ABANDON"
        assert terminate["LifecycleHookName"] == "gatepeer-terminate"
        assert terminate["DefaultResult"] == "CONTINUE"
        # gatepeer heartbeats every 60 s while it waits: the hook must outlast that.
        assert launch["HeartbeatTimeout"] > 60 and terminate["HeartbeatTimeout"] > 60
        assert (props["MinSize"], props["MaxSize"], props["DesiredCapacity"]) == ("1", "1", "1")


def test_rules_refuse_nat_without_redirection_and_a_pair_in_one_subnet() -> None:
    """CloudFormation checks Rules before it makes anything (moto does not run them)."""
    rules = template()["Rules"]
    nat = rules["NatNeedsRedirection"]
    assert nat["RuleCondition"] == {"Fn::Equals": [{"Ref": "Mode"}, "nat"]}
    assert nat["Assertions"][0]["Assert"] == {"Fn::Equals": [{"Ref": "Redirection"}, "self"]}
    pair = rules["PairNeedsTwoSubnets"]
    assert {"Fn::Equals": [{"Ref": "Peers"}, "pair"]} in pair["RuleCondition"]["Fn::And"]
    assert "SubnetIds" in json.dumps(pair["Assertions"])


def test_rules_keep_the_moving_nat_address_to_a_pair_and_free_it_from_two_subnets() -> None:
    """SnatAddress needs a pair, and a pair with it may sit in one subnet (the address is a
    secondary private address of that subnet)."""
    rules = template()["Rules"]
    snat = rules["SnatAddressNeedsPair"]
    assert snat["RuleCondition"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "SnatAddress"}, ""]}]}
    assert snat["Assertions"][0]["Assert"] == {"Fn::Equals": [{"Ref": "Peers"}, "pair"]}
    two = rules["PairNeedsTwoSubnets"]["RuleCondition"]
    assert {"Fn::Equals": [{"Ref": "SnatAddress"}, ""]} in two["Fn::And"]


def test_operator_access_attaches_session_manager_policy_only_when_asked() -> None:
    t = template()
    assert t["Conditions"]["OperatorSsm"] == {"Fn::Equals": [{"Ref": "OperatorAccess"}, "ssm"]}
    arns = t["Resources"]["PeerRole"]["Properties"]["ManagedPolicyArns"]
    assert arns == {
        "Fn::If": [
            "OperatorSsm",
            [{"Fn::Sub": "arn:${AWS::Partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"}],
            {"Ref": "AWS::NoValue"},
        ]
    }


# ---- what the stack made in moto ----------------------------------------------------------


def ingress(moto: Any, group_id: str) -> set[tuple[str, Any, Any, str]]:
    """(protocol, from, to, source) of each rule; source is a CIDR or a group id."""
    ec2 = client(moto.url, "ec2")
    group = ec2.describe_security_groups(GroupIds=[group_id])["SecurityGroups"][0]
    out = set()
    for rule in group["IpPermissions"]:
        ports = (rule.get("FromPort"), rule.get("ToPort"))
        for r in rule.get("IpRanges", []):
            out.add((rule["IpProtocol"], *ports, r["CidrIp"]))
        for g in rule.get("UserIdGroupPairs", []):
            out.add((rule["IpProtocol"], *ports, g["GroupId"]))
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_security_group_admits_exactly_what_the_mode_needs(
    moto: Any, stacks: dict[Any, Deployment], combo: tuple[str, str, str]
) -> None:
    mode, peers, _ = combo
    group_id = stacks[combo].outputs["SecurityGroupId"]
    rules = ingress(moto, group_id)
    want = {("udp", 4789, 4789, f"{ep}/32") for ep in VPG_ENDPOINTS}
    if mode == "route":
        # VPC hosts' connections to devices arrive at the ENI with their own source.
        want.add(("-1", None, None, VPC_CIDR))
    if peers == "pair":
        want.add(("112", -1, -1, group_id))
        # conntrackd's sync (UDP, ha.sync_port's default) from the other peer only.
        want.add(("udp", 3780, 3780, group_id))
    assert rules == want


def statements(document: dict[str, Any] | str) -> list[dict[str, Any]]:
    """The policy's statements with lists sorted and single values as lists; moto's null
    for an `AWS::NoValue` statement dropped."""

    def as_list(value: Any) -> list[Any]:
        return sorted(value) if isinstance(value, list) else [value]

    if isinstance(document, str):  # moto keeps a stack's policy as Python's repr of it
        document = ast.literal_eval(document)
    out = []
    for s in document["Statement"]:
        if s is None:
            continue
        s = dict(s, Action=as_list(s["Action"]), Resource=as_list(s["Resource"]))
        if "Condition" in s:
            s["Condition"] = {
                op: {k: as_list(v) for k, v in keys.items()} for op, keys in s["Condition"].items()
            }
        out.append(s)
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_role_policy_is_what_gatepeer_aws_policy_prints_for_the_rendered_config(
    moto: Any, stacks: dict[Any, Deployment], combo: tuple[str, str, str]
) -> None:
    stack = stacks[combo]
    iam = client(moto.url, "iam")
    role = stack.outputs["RoleName"]
    assert iam.list_role_policies(RoleName=role)["PolicyNames"] == ["gatepeer"]
    made = iam.get_role_policy(RoleName=role, PolicyName="gatepeer")["PolicyDocument"]
    configs = [parsed(written_toml(u)) for u in stack.user_data_by_template.values()]
    assert len(configs) == (2 if combo[1] == "pair" else 1)
    want = policy(configs, Account(partition="aws", region=REGION, account=MOTO_ACCOUNT))
    assert statements(made) == statements(want)


def test_policy_check_sees_a_missing_action(moto: Any, stacks: dict[Any, Deployment]) -> None:
    """The comparison above can fail: a config with one feature more asks for more."""
    stack = stacks[("nat", "single", "self")]
    made = client(moto.url, "iam").get_role_policy(
        RoleName=stack.outputs["RoleName"], PolicyName="gatepeer"
    )["PolicyDocument"]
    config = parsed(written_toml(stack.user_data))
    more = dataclasses.replace(config, packet_path=cfg.PacketPathConfig(mode="route"))
    want = policy([more], Account(partition="aws", region=REGION, account=MOTO_ACCOUNT))
    assert statements(made) != statements(want)


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_groups_of_one_launch_from_the_stack_templates(
    moto: Any, network: MotoNetwork, stacks: dict[Any, Deployment], combo: tuple[str, str, str]
) -> None:
    stack = stacks[combo]
    names = stack.outputs["AutoScalingGroupNames"].split(",")
    autoscaling = client(moto.url, "autoscaling")
    groups = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=names)
    by_name = {g["AutoScalingGroupName"]: g for g in groups["AutoScalingGroups"]}
    if combo[1] == "single":
        assert names == [f"{stack.stack_name}-peer"]
        expected = {names[0]: ("PeerLaunchTemplate", set(network.subnet_ids))}
    else:
        assert names == [f"{stack.stack_name}-peer-a", f"{stack.stack_name}-peer-b"]
        expected = {
            names[0]: ("PeerALaunchTemplate", {network.subnet_ids[0]}),
            names[1]: ("PeerBLaunchTemplate", {network.subnet_ids[1]}),
        }
    for name, (template_id, subnets) in expected.items():
        group = by_name[name]
        assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)
        assert group["LaunchTemplate"]["LaunchTemplateId"] == stack.resources[template_id]
        assert set(group["VPCZoneIdentifier"].split(",")) == subnets
        assert len(group["Instances"]) == 1


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_user_data_writes_the_config_the_parameters_choose(
    stacks: dict[Any, Deployment], network: MotoNetwork, combo: tuple[str, str, str]
) -> None:
    mode, peers, redirection = combo
    stack = stacks[combo]
    for template_id, user_data in stack.user_data_by_template.items():
        doc = cloud_config(user_data)
        assert ["systemctl", "enable", "--now", "--no-block", "gatepeer.service"] in doc["runcmd"]
        # A pair syncs its connections with the image's conntrackd and elects its master with
        # the image's keepalived; a single peer leaves both off.
        for service in ("conntrackd.service", "keepalived.service"):
            enable = ["systemctl", "enable", "--now", "--no-block", service]
            assert (enable in doc["runcmd"]) == (peers == "pair"), service
        # The secret is never in the user-data: only the SSM parameter's name.
        assert [f["path"] for f in doc["write_files"]] == [CONFIG_PATH]
        config = tomllib.loads(written_toml(user_data))
        assert config["soracom"] == {
            "endpoint": "https://api.soracom.io",
            "auth_key_id": AUTH_KEY_ID,
            "auth_key_ssm_parameter": AUTH_KEY_PARAMETER,
            "vpg_id": "vpg-stacktest",
            "redirection": redirection,
        }
        assert config["packet_path"] == {"mode": mode}
        assert config["tunnel"] == {"mtu": 1500}
        aws = config["aws"]
        suffix = {"PeerLaunchTemplate": "", "PeerALaunchTemplate": "-a"}.get(template_id, "-b")
        assert aws["autoscaling_group"] == f"{stack.stack_name}-peer{suffix}"
        assert aws["launch_lifecycle_hook"] == "gatepeer-launch"
        assert aws["termination_lifecycle_hook"] == "gatepeer-terminate"
        assert aws["disable_source_dest_check"] is True
        assert aws["remove_stale_registrations"] is True
        tables = [network.route_table_id] if mode == "route" else None
        if peers == "single":
            assert "ha" not in config
            assert aws.get("route_tables") == tables
        else:
            assert "route_tables" not in aws  # [ha] route_tables is the master's claim
            assert config["ha"].get("route_tables") == tables
            assert ip_address(config["ha"]["peer_address"]) in ip_network(VPC_CIDR)


def test_pair_peers_launch_on_the_interfaces_whose_addresses_the_other_names(
    moto: Any, stacks: dict[Any, Deployment], network: MotoNetwork
) -> None:
    """Each peer's group launches it on a network interface the stack made in its subnet (a
    replacement comes back on it), and each peer's [ha] peer_address is the other's."""
    stack = stacks[("route", "pair", "self")]
    ec2 = client(moto.url, "ec2")
    enis = stack.outputs["PeerNetworkInterfaces"].split(",")
    assert enis == [
        stack.resources["PeerANetworkInterface"],
        stack.resources["PeerBNetworkInterface"],
    ]
    described = {
        e["NetworkInterfaceId"]: e
        for e in ec2.describe_network_interfaces(NetworkInterfaceIds=enis)["NetworkInterfaces"]
    }
    addresses = [described[e]["PrivateIpAddress"] for e in enis]
    for index, template_id in enumerate(("PeerALaunchTemplate", "PeerBLaunchTemplate")):
        eni = described[enis[index]]
        assert eni["SubnetId"] == network.subnet_ids[index]
        assert ip_address(addresses[index]) in ip_network(SUBNET_CIDRS[index])
        versions = ec2.describe_launch_template_versions(
            LaunchTemplateId=stack.resources[template_id]
        )
        data = versions["LaunchTemplateVersions"][-1]["LaunchTemplateData"]
        (spec,) = data["NetworkInterfaces"]
        assert spec["DeviceIndex"] == 0
        assert spec["NetworkInterfaceId"] == enis[index]
        assert spec["DeleteOnTermination"] is False
        assert "SecurityGroupIds" not in data  # the interface carries the group
        config = tomllib.loads(written_toml(stack.user_data_by_template[template_id]))
        assert config["ha"]["peer_address"] == addresses[1 - index]


def test_pair_with_a_nat_address_shares_one_subnet_and_can_move_the_address(
    moto: Any, network: MotoNetwork, tmp_path: Path
) -> None:
    """SnatAddress (ha.snat_address): both peers in the first subnet, both configs name the
    address, the role may move it (and nothing more than gatepeer asks for), the group admits
    the VPC hosts' replies at whichever peer holds it, and either ENI can take it."""
    snat = "198.18.0.200"
    stack = deploy_stack(moto.url, network.parameters(Mode="nat", Peers="pair", SnatAddress=snat))
    ec2 = client(moto.url, "ec2")
    enis = stack.outputs["PeerNetworkInterfaces"].split(",")
    described = ec2.describe_network_interfaces(NetworkInterfaceIds=enis)["NetworkInterfaces"]
    assert {e["SubnetId"] for e in described} == {network.subnet_ids[0]}
    names = stack.outputs["AutoScalingGroupNames"].split(",")
    groups = client(moto.url, "autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=names
    )["AutoScalingGroups"]
    assert [g["VPCZoneIdentifier"] for g in groups] == [network.subnet_ids[0]] * 2

    texts = list(stack.user_data_by_template.values())
    assert [tomllib.loads(written_toml(t))["ha"]["snat_address"] for t in texts] == [snat] * 2
    for text in texts:
        path = tmp_path / "gatepeer.toml"
        path.write_text(written_toml(text))
        proc = gatepeer("config", "check", "--json", "--config", str(path))
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["ha"]["snat_address"] == snat

    iam = client(moto.url, "iam")
    made = iam.get_role_policy(RoleName=stack.outputs["RoleName"], PolicyName="gatepeer")
    want = policy(
        [parsed(written_toml(t)) for t in texts],
        Account(partition="aws", region=REGION, account=MOTO_ACCOUNT),
    )
    assert statements(made["PolicyDocument"]) == statements(want)
    assert any("ec2:AssignPrivateIpAddresses" in s["Action"] for s in statements(want))

    group_id = stack.outputs["SecurityGroupId"]
    assert ("-1", None, None, VPC_CIDR) in ingress(moto, group_id)

    # moto ignores AllowReassignment (the old holder keeps the address too) and does not
    # check the subnet: here only "the ENI now holds it" can be seen.
    for holder in (enis[0], enis[1]):
        assign_private_address(ec2, holder, IPv4Address(snat))
        (eni,) = ec2.describe_network_interfaces(NetworkInterfaceIds=[holder])["NetworkInterfaces"]
        assert snat in {a["PrivateIpAddress"] for a in eni["PrivateIpAddresses"]}


def test_pair_network_interfaces_forward_in_the_peer_group() -> None:
    """Checked on the template: moto's stack interface takes neither property."""
    resources = template()["Resources"]
    for name in ("PeerANetworkInterface", "PeerBNetworkInterface"):
        props = resources[name]["Properties"]
        assert props["SourceDestCheck"] is False
        assert props["GroupSet"] == [{"Fn::GetAtt": ["PeerSecurityGroup", "GroupId"]}]


def test_route_mode_without_route_tables_manages_none(moto: Any, network: MotoNetwork) -> None:
    stack = deploy_stack(moto.url, network.parameters(RouteTableIds=""))
    config = tomllib.loads(written_toml(stack.user_data))
    assert "route_tables" not in config["aws"]
    made = client(moto.url, "iam").get_role_policy(
        RoleName=stack.outputs["RoleName"], PolicyName="gatepeer"
    )["PolicyDocument"]
    assert "RouteTables" not in [s["Sid"] for s in statements(made)]


def test_rendered_user_data_in_one_call(moto: Any) -> None:
    """The boot rehearsal's entry point: its own VPC, the emulator's API, route mode."""
    from helpers.stack_moto import rendered_user_data

    text = rendered_user_data(moto.url, SoracomApiEndpoint="http://198.18.0.1:8080")
    config = tomllib.loads(written_toml(text))
    assert config["soracom"]["endpoint"] == "http://198.18.0.1:8080"
    assert config["packet_path"]["mode"] == "route"
    assert len(config["aws"]["route_tables"]) == 1


@pytest.mark.parametrize(("given", "written"), [("1450", 1450), ("auto", "auto")])
def test_tunnel_mtu_for_an_inter_region_peering(
    moto: Any, network: MotoNetwork, given: str, written: int | str
) -> None:
    stack = deploy_stack(moto.url, network.parameters(TunnelMtu=given, Peers="pair"))
    for user_data in stack.user_data_by_template.values():
        assert tomllib.loads(written_toml(user_data))["tunnel"] == {"mtu": written}


def test_optional_key_pair_metrics_source_and_api_endpoint(
    moto: Any, network: MotoNetwork, tmp_path: Path
) -> None:
    client(moto.url, "ec2").create_key_pair(KeyName="operator")
    stack = deploy_stack(
        moto.url,
        network.parameters(
            KeyName="operator",
            MetricsSourceCidr="198.18.5.0/24",
            SoracomApiEndpoint="http://198.18.0.1:8080",
        ),
    )
    data = client(moto.url, "ec2").describe_launch_template_versions(
        LaunchTemplateId=stack.resources["PeerLaunchTemplate"]
    )["LaunchTemplateVersions"][-1]["LaunchTemplateData"]
    assert data["KeyName"] == "operator"
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert ("tcp", 8479, 8479, "198.18.5.0/24") in ingress(moto, stack.outputs["SecurityGroupId"])
    config = tomllib.loads(written_toml(stack.user_data))
    assert config["soracom"]["endpoint"] == "http://198.18.0.1:8080"
    # What the boot rehearsal boots with: gatepeer accepts plain http to a private address.
    path = tmp_path / "gatepeer.toml"

    def check(text: str) -> subprocess.CompletedProcess[str]:
        path.write_text(text)
        return gatepeer("config", "check", "--config", str(path))

    proc = check(written_toml(stack.user_data))
    assert proc.returncode == 0, proc.stderr


# ---- the user-data, checked by the tools that read it -------------------------------------


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_user_data_passes_cloud_init_schema(
    stacks: dict[Any, Deployment], combo: tuple[str, str, str], tmp_path: Path
) -> None:
    if shutil.which("cloud-init") is None:
        pytest.skip("needs cloud-init (Debian package cloud-init)")
    for template_id, user_data in stacks[combo].user_data_by_template.items():
        path = tmp_path / f"{template_id}.yaml"
        path.write_text(user_data)
        proc = subprocess.run(
            ["cloud-init", "schema", "-c", str(path)], capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_user_data_config_passes_gatepeer_config_check(
    stacks: dict[Any, Deployment], combo: tuple[str, str, str], tmp_path: Path
) -> None:
    def check(text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "gatepeer.toml"
        path.write_text(text)
        return gatepeer("config", "check", "--json", "--config", str(path))

    for user_data in stacks[combo].user_data_by_template.values():
        proc = check(written_toml(user_data))
        assert proc.returncode == 0, proc.stderr
        effective = json.loads(proc.stdout)
        assert effective["packet_path"]["mode"] == combo[0]
        assert effective["soracom"]["redirection"] == combo[2]
        assert effective["soracom"]["auth_key_ssm_parameter"] == AUTH_KEY_PARAMETER
        assert effective["aws"]["launch_lifecycle_hook"] == "gatepeer-launch"
        assert ("ha" in effective) == (combo[1] == "pair")


# ---- gatepeer aws policy and the IAM tables ------------------------------------------------


def gatepeer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gatepeer", *args], capture_output=True, text=True, cwd=REPO
    )


def test_aws_policy_command_prints_the_stack_policy_for_both_peers_of_a_pair(
    moto: Any, stacks: dict[Any, Deployment], tmp_path: Path
) -> None:
    """What a pair's operator runs on the two rendered configs is the stack's role policy.
    (Before config.py knows [aws] remove_stale_registrations the configs are read without
    it: the pair's policy does not change, DescribeNetworkInterfaces is asked for anyway.)"""
    stack = stacks[("route", "pair", "self")]
    paths = []
    for template_id, user_data in stack.user_data_by_template.items():
        path = tmp_path / f"{template_id}.toml"

        def check(text: str, path: Path = path) -> subprocess.CompletedProcess[str]:
            path.write_text(text)
            return gatepeer("aws", "policy", "--config", str(path))

        path.write_text(written_toml(user_data))
        paths += ["--config", str(path)]
    proc = gatepeer("aws", "policy", *paths, "--region", REGION, "--account", MOTO_ACCOUNT)
    assert proc.returncode == 0, proc.stderr
    made = client(moto.url, "iam").get_role_policy(
        RoleName=stack.outputs["RoleName"], PolicyName="gatepeer"
    )["PolicyDocument"]
    assert statements(json.loads(proc.stdout)) == statements(made)


def test_aws_policy_command_merges_the_two_peers_of_a_pair(tmp_path: Path) -> None:
    paths = []
    for group, other in (("peer-a", "198.18.1.22"), ("peer-b", "198.18.0.21")):
        path = tmp_path / f"{group}.toml"
        path.write_text(PEER_TOML.format(group=group, other=other))
        paths += ["--config", str(path)]
    proc = gatepeer("aws", "policy", *paths, "--region", REGION, "--account", MOTO_ACCOUNT)
    assert proc.returncode == 0, proc.stderr
    by_sid = {s["Sid"]: s for s in json.loads(proc.stdout)["Statement"]}
    prefix = f"arn:aws:autoscaling:{REGION}:{MOTO_ACCOUNT}:autoScalingGroup:*:"
    assert by_sid["LifecycleHooks"]["Resource"] == [
        f"{prefix}autoScalingGroupName/peer-a",
        f"{prefix}autoScalingGroupName/peer-b",
    ]
    assert by_sid["RouteTables"]["Condition"] == {
        "StringEquals": {"ec2:RouteTableID": ["rtb-0123abcd"]}
    }
    # Each peer's region-less config takes the region given.
    assert by_sid["AuthKey"]["Resource"] == (
        f"arn:aws:ssm:{REGION}:{MOTO_ACCOUNT}:parameter/gatepeer/auth-key"
    )


def test_aws_policy_scopes_each_resource(tmp_path: Path) -> None:
    path = tmp_path / "gatepeer.toml"
    path.write_text(
        '[soracom]\nauth_key_id = "keyId-x"\nauth_key_ssm_parameter = "gatepeer-key"\n'
        'vpg_id = "vpg-x"\n[aws]\ndisable_source_dest_check = true\n'
        'autoscaling_group = "peers"\ntermination_lifecycle_hook = "bye"\n'
        '[ha]\npeer_address = "198.18.0.9"\nroute_tables = ["rtb-0123abcd"]\n'
    )
    proc = gatepeer("aws", "policy", "--config", str(path), "--partition", "aws-cn")
    assert proc.returncode == 0, proc.stderr
    by_sid = {s["Sid"]: s for s in json.loads(proc.stdout)["Statement"]}
    assert by_sid["Describe"]["Resource"] == "*"
    assert "ec2:DescribeNetworkInterfaceAttribute" in by_sid["Describe"]["Action"]
    assert by_sid["AuthKey"]["Resource"] == "arn:aws-cn:ssm:*:*:parameter/gatepeer-key"
    assert by_sid["RouteTables"]["Action"] == ["ec2:CreateRoute", "ec2:ReplaceRoute"]
    assert by_sid["RouteTables"]["Condition"] == {
        "StringEquals": {"ec2:RouteTableID": ["rtb-0123abcd"]}
    }
    assert by_sid["LifecycleHooks"]["Resource"].endswith(":autoScalingGroupName/peers")
    assert by_sid["NetworkInterface"]["Resource"] == "arn:aws-cn:ec2:*:*:network-interface/*"


def test_aws_policy_bad_config_is_one_line_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "gatepeer.toml"
    path.write_text(
        PEER_TOML.format(group="g", other="198.18.0.9") + '[packet_path]\nmode = "bridge"\n'
    )
    proc = gatepeer("aws", "policy", "--config", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and "packet_path.mode" in proc.stderr


IAM_TABLE_HEADER = "| setting | actions | resource |"


def test_iam_tables_in_the_docs_are_the_source_of_truth() -> None:
    """Every page with the IAM table (README.md, docs/*.md) has exactly the one
    `gatepeer aws policy --table` prints; docs/deploy.md has it."""
    table = iam_table()
    assert gatepeer("aws", "policy", "--table").stdout == table
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    with_table = [p for p in pages if IAM_TABLE_HEADER in p.read_text()]
    assert REPO / "docs" / "deploy.md" in with_table
    for page in with_table:
        assert table in page.read_text(), (
            f"{page.relative_to(REPO)}: its IAM table is not `gatepeer aws policy --table`"
        )


def test_route_tables_need_create_and_replace_and_describes_only_on_star() -> None:
    """Item 5 of issue 16: the master's claim creates the route when missing, and finds its
    ENI by address; Describe actions are never scoped to a resource."""
    from gatepeer.aws.permissions import needed

    pair = parsed(PEER_TOML.format(group="g", other="198.18.0.9"))
    by_action = {p.action: p for p in needed(pair)}
    for action in ("ec2:CreateRoute", "ec2:ReplaceRoute"):
        assert by_action[action].scope == "RouteTables"
        assert by_action[action].why == "ha.route_tables"
    assert by_action["ec2:DescribeNetworkInterfaces"].scope == "Describe"
    assert "ha.route_tables" in by_action["ec2:DescribeNetworkInterfaces"].why
    assert all(p.scope == "Describe" for p in needed(pair) if ":Describe" in p.action)
    single = parsed(
        PEER_TOML.format(group="g", other="198.18.0.9").split("[ha]")[0]
        + '[packet_path]\nmode = "nat"\n'
    )
    assert not {"ec2:CreateRoute", "ec2:ReplaceRoute", "ec2:DescribeRouteTables"} & {
        p.action for p in needed(single)
    }
