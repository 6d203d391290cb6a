"""Deploy deploy/cloudformation/gatepeer.yaml into a moto endpoint and read back what it made.

Used by tests/delivery/test_stack.py and by the boot rehearsal (which boots an image with the
user-data the stack renders). Nothing here reaches AWS: every client is given the moto URL as
its endpoint and moto's dummy credentials.

    from helpers.stack_moto import deploy_stack, moto_network
    net = moto_network(moto.url)
    stack = deploy_stack(moto.url, net.parameters(Mode="route"))
    stack.user_data            # the single peer's #cloud-config, decoded

or in one call, `rendered_user_data(moto.url, SoracomApiEndpoint="http://198.18.0.1:8080")`.
"""

from __future__ import annotations

import base64
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gatepeer import config as cfg

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "cloudformation" / "gatepeer.yaml"
REGION = "us-east-1"
# The VPC the stack is deployed into: benchmarking addresses only (198.18.0.0/15).
VPC_CIDR = "198.18.0.0/16"
SUBNET_CIDRS = ("198.18.0.0/24", "198.18.1.0/24")
# Stand-ins for the VPG's endpoint outer addresses (real ones are in 100.64.0.0/10).
VPG_ENDPOINTS = ("203.0.113.11", "203.0.113.12")
AUTH_KEY_ID = "keyId-stacktest"
AUTH_KEY_PARAMETER = "/gatepeer/auth-key"
MOTO_ACCOUNT = "123456789012"
CONFIG_PATH = "/etc/gatepeer/gatepeer.toml"


def client(endpoint_url: str, service: str, region: str = REGION) -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@dataclass(frozen=True)
class MotoNetwork:
    """A VPC with two subnets and one route table in moto, and a usable AMI id."""

    vpc_id: str
    subnet_ids: tuple[str, str]
    route_table_id: str
    image_id: str

    def parameters(self, **overrides: str) -> dict[str, str]:
        """Every parameter the template needs, for a single route-mode peer; override any."""
        out = {
            "VpcId": self.vpc_id,
            "VpcCidr": VPC_CIDR,
            "SubnetIds": ",".join(self.subnet_ids),
            "RouteTableIds": self.route_table_id,
            "VpgId": "vpg-stacktest",
            "VpgEndpoints": ",".join(VPG_ENDPOINTS),
            "AuthKeyId": AUTH_KEY_ID,
            "AuthKeySsmParameter": AUTH_KEY_PARAMETER,
            "ImageId": self.image_id,
            "Mode": "route",
            "Redirection": "self",
            "Peers": "single",
        }
        out.update(overrides)
        return out


def moto_network(endpoint_url: str, region: str = REGION) -> MotoNetwork:
    ec2 = client(endpoint_url, "ec2", region)
    vpc = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
    zones = [z["ZoneName"] for z in ec2.describe_availability_zones()["AvailabilityZones"]]
    subnets = tuple(
        ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=zones[i % len(zones)])[
            "Subnet"
        ]["SubnetId"]
        for i, cidr in enumerate(SUBNET_CIDRS)
    )
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return MotoNetwork(vpc, (subnets[0], subnets[1]), table, image)


@dataclass
class Deployment:
    stack_name: str
    region: str
    parameters: dict[str, str]
    outputs: dict[str, str]
    resources: dict[str, str]  # logical id -> physical id
    # Launch template logical id -> its user-data, decoded (PeerLaunchTemplate, or the pair's).
    user_data_by_template: dict[str, str] = field(default_factory=dict)

    @property
    def user_data(self) -> str:
        """The single peer's user-data (a pair: peer A's)."""
        for name in ("PeerLaunchTemplate", "PeerALaunchTemplate"):
            if name in self.user_data_by_template:
                return self.user_data_by_template[name]
        raise KeyError("the stack made no launch template")


def deploy_stack(
    endpoint_url: str,
    parameters: Mapping[str, str],
    *,
    stack_name: str | None = None,
    region: str = REGION,
) -> Deployment:
    """Create the stack in moto, wait for it, and read back its launch templates' user-data.
    Raises AssertionError with the stack's events when the creation fails."""
    cfn = client(endpoint_url, "cloudformation", region)
    name = stack_name or f"gp-{secrets.token_hex(3)}"
    cfn.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
        Capabilities=["CAPABILITY_IAM"],
    )
    stack = cfn.describe_stacks(StackName=name)["Stacks"][0]
    if stack["StackStatus"] != "CREATE_COMPLETE":
        events = cfn.describe_stack_events(StackName=name)["StackEvents"]
        reasons = [
            f"{e.get('LogicalResourceId')}: {e.get('ResourceStatusReason')}"
            for e in events
            if "FAILED" in e.get("ResourceStatus", "")
        ]
        raise AssertionError(f"stack {name}: {stack['StackStatus']}: {reasons}")
    # moto also lists the resources a condition left out, without ids: skipped.
    resources = {
        r["LogicalResourceId"]: r.get("PhysicalResourceId", "")
        for r in cfn.describe_stack_resources(StackName=name)["StackResources"]
        if "LogicalResourceId" in r
    }
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    deployment = Deployment(name, region, dict(parameters), outputs, resources)
    ec2 = client(endpoint_url, "ec2", region)
    for logical, physical in resources.items():
        if not logical.endswith("LaunchTemplate"):
            continue
        versions = ec2.describe_launch_template_versions(LaunchTemplateId=physical)
        data = versions["LaunchTemplateVersions"][-1]["LaunchTemplateData"]
        deployment.user_data_by_template[logical] = base64.b64decode(data["UserData"]).decode()
    return deployment


def rendered_user_data(endpoint_url: str, **parameters: str) -> str:
    """A fresh VPC in moto, the stack deployed into it with these parameters (the rest as
    MotoNetwork.parameters gives them), and the single peer's user-data (a pair: peer A's)."""
    network = moto_network(endpoint_url)
    return deploy_stack(endpoint_url, network.parameters(**parameters)).user_data


# ---- reading what the stack rendered -------------------------------------------------------


def parsed(toml_text: str) -> cfg.Config:
    """The Config a TOML text gives."""
    return cfg.parse(tomllib.loads(toml_text))


def cloud_config(user_data: str) -> dict[str, Any]:
    assert user_data.startswith("#cloud-config\n")
    return dict(yaml.safe_load(user_data))


def written_toml(user_data: str) -> str:
    """The gatepeer.toml a #cloud-config's write_files puts in place."""
    files = {f["path"]: f for f in cloud_config(user_data)["write_files"]}
    return str(files[CONFIG_PATH]["content"])


# One peer of a pair (route mode, route tables claimed by the master), without the new keys.
PEER_TOML = """
[soracom]
auth_key_id = "keyId-x"
auth_key_ssm_parameter = "/gatepeer/auth-key"
vpg_id = "vpg-x"
[aws]
autoscaling_group = "{group}"
launch_lifecycle_hook = "gatepeer-launch"
[ha]
peer_address = "{other}"
route_tables = ["rtb-0123abcd"]
"""
