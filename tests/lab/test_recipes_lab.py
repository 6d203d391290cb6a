"""The closed-network recipes of docs/recipes/, their data path in the lab (issue 20).

Each test stands in for the recipe's AWS side (tests/helpers/recipe_lab.py): moto's EC2 in the
lab's fabric holds the VPC, the S3 gateway endpoint's prefix list and the interface endpoints; a
services host carries each endpoint's address as moto gave it; dnsmasq on the lab's VPC host
answers the services' private names (the Route 53 inbound resolver a SIM group's custom DNS
points at). The gate peer runs in nat mode with `packet_path.closed = true` and the recipe's
allowed destinations by AWS name, resolved by gatepeer itself through moto (boto3's
AWS_ENDPOINT_URL_EC2). A device resolves the service's name through the stand-in and connects
through the peer; the service sees the peer's address. A destination outside the list (the
lab's internet stand-in) is refused and counted.

Every lab is make_lab's (removed even on failure); every process is stopped by its pid.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
import yaml
from conftest import LabHandle
from helpers import recipe_lab
from helpers.packet_path import DEVICE, PEER, peer_counters
from helpers.recipe_lab import REGION, S3_HOST

from gatepeer.lab.network.layout import INTERNET_ADDR, VPC_NET

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
HTTPS = 443
MQTT_TLS = 8883
# What the closed network must refuse: the lab's internet stand-in, on the fabric router.
OUTSIDE = str(INTERNET_ADDR)
# What a closed peer counts when it refuses device traffic.
REFUSED_COUNTER = "closed_dropped"
# The VPC as the lab's peer knows it (its underlay's prefix). The recipes' Route 53 inbound
# resolver (the lab's VPC host) sits in it: a closed peer admits it without a listing.
VPC = str(VPC_NET)


@pytest.fixture
def lab(make_lab) -> Iterator[LabHandle]:  # type: ignore[no-untyped-def]
    """A lab with moto's EC2 in its fabric."""
    handle = make_lab()
    with recipe_lab.moto_ec2(handle):
        yield handle


def closed_nat(lab: LabHandle, allowed: list[str]) -> None:
    """The recipes' packet path: nat mode, closed, the allowed destinations as given; the
    names resolved in moto's region, the resolved set kept in the lab's folder."""
    lab.set_config("packet_path", "mode", json.dumps("nat"))
    lab.set_config("packet_path", "closed", "true")
    lab.set_config("packet_path", "allowed_destinations", json.dumps(allowed))
    cache = lab.paths.dir / "destinations.json"
    lab.set_config("packet_path", "destinations_cache", json.dumps(str(cache)))
    lab.set_config("aws", "region", json.dumps(REGION))
    apply(lab)


def apply(lab: LabHandle) -> None:
    proc = recipe_lab.gatepeer(lab, "apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lab.set_redirection("peer")  # the recipes' Junction redirection to the NATing peer


def allowed_ranges(lab: LabHandle) -> list[tuple[IPv4Address, IPv4Address]]:
    """The peer's nftables set of allowed destinations, as (first, last) address ranges (an
    interval set lists a prefix, a range of merged neighbours, or one address)."""
    out = lab.run("peer", "nft", "-j", "list", "set", "inet", "gatepeer", "allowed_destinations")
    found = []
    for item in json.loads(out.stdout)["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, dict) and "prefix" in elem:
                net = IPv4Network(f"{elem['prefix']['addr']}/{elem['prefix']['len']}")
                found.append((net.network_address, net.broadcast_address))
            elif isinstance(elem, dict) and "range" in elem:
                first, last = elem["range"]
                found.append((IPv4Address(first), IPv4Address(last)))
            else:
                found.append((IPv4Address(elem), IPv4Address(elem)))
    return found


def admitted(lab: LabHandle, *destinations: str) -> bool:
    """Every destination (an address or a prefix) lies inside the peer's allowed set."""
    ranges = allowed_ranges(lab)
    nets = [IPv4Network(d) for d in destinations]
    return all(
        any(a <= n.network_address and n.broadcast_address <= b for a, b in ranges) for n in nets
    )


def accepted(server) -> list[str]:  # type: ignore[no-untyped-def]
    """The next line of tcp_servers: [LOCAL:PORT, CLIENT]."""
    words = server.stdout.readline().split()
    assert words[:1] == ["peer"], words
    return list(words[1:])


def assert_refused_and_counted(lab: LabHandle) -> None:
    """A device's connection to a destination outside the list gets nothing, and the peer
    counts the drop."""
    before = peer_counters(lab)[REFUSED_COUNTER]
    outcome = recipe_lab.device_connects_to(lab, DEVICE, OUTSIDE, HTTPS)
    assert outcome.startswith("no reply"), outcome
    assert peer_counters(lab)[REFUSED_COUNTER] > before, peer_counters(lab)


def test_s3_through_the_gateway_endpoint_only(lab: LabHandle) -> None:
    pieces = recipe_lab.make_aws_pieces(lab, ())
    bucket = f"gatepeer-lab-bucket.s3.{REGION}.amazonaws.com"
    with (
        recipe_lab.services_host(lab, [str(S3_HOST)]) as svc,
        recipe_lab.tcp_servers(svc, [f"{S3_HOST}:{HTTPS}"]) as s3,
        recipe_lab.dns_stand_in(lab, {bucket: str(S3_HOST)}),
    ):
        closed_nat(lab, [pieces.s3_prefix_list_name])
        # The S3 list's entries (the lab's S3 range), resolved by the peer, are in its set.
        assert admitted(lab, *pieces.s3_cidrs), allowed_ranges(lab)
        resolved, outcome = recipe_lab.device_connects(lab, DEVICE, bucket, HTTPS)
        assert resolved == str(S3_HOST)
        assert outcome == f"connected seen {PEER}", "S3 must see the peer (a VPC source)"
        assert accepted(s3) == [f"{S3_HOST}:{HTTPS}", PEER]
        assert_refused_and_counted(lab)


# The SSM agent's three services, each through its own interface endpoint.
SSM_SERVICES = ("ssm", "ssmmessages", "ec2messages")


def test_ssm_through_interface_endpoints_and_the_inbound_resolver(lab: LabHandle) -> None:
    pieces = recipe_lab.make_aws_pieces(lab, SSM_SERVICES)
    addresses = {svc: pieces.endpoints[svc][1][0] for svc in SSM_SERVICES}
    names = {svc: f"{svc}.{REGION}.amazonaws.com" for svc in SSM_SERVICES}
    with (
        recipe_lab.services_host(lab, list(addresses.values())) as svc_ns,
        recipe_lab.tcp_servers(svc_ns, [f"{a}:{HTTPS}" for a in addresses.values()]) as server,
        recipe_lab.dns_stand_in(lab, {names[s]: addresses[s] for s in SSM_SERVICES}),
    ):
        endpoint_ids = [pieces.endpoints[s][0] for s in SSM_SERVICES]
        closed_nat(lab, [*endpoint_ids, pieces.s3_prefix_list_name])
        assert admitted(lab, *addresses.values(), *pieces.s3_cidrs), allowed_ranges(lab)
        for service in SSM_SERVICES:
            resolved, outcome = recipe_lab.device_connects(lab, DEVICE, names[service], HTTPS)
            assert resolved == addresses[service], service
            assert outcome == f"connected seen {PEER}", service
            assert accepted(server) == [f"{addresses[service]}:{HTTPS}", PEER], service
        # A name the resolver does not hold is not answered: the device cannot leak by name.
        resolved, _ = recipe_lab.device_connects(lab, DEVICE, "example.com", HTTPS)
        assert resolved.startswith("unresolved"), resolved
        assert_refused_and_counted(lab)


def test_iot_core_mqtt_and_websocket_through_the_iot_data_endpoint(lab: LabHandle) -> None:
    pieces = recipe_lab.make_aws_pieces(lab, ("iot.data",))
    vpce, (address, *_) = pieces.endpoints["iot.data"]
    # The account's ATS data endpoint, answered by the private hosted zone through the resolver.
    name = f"a1b2c3d4e5f6g7-ats.iot.{REGION}.amazonaws.com"
    with (
        recipe_lab.services_host(lab, [address]) as svc_ns,
        recipe_lab.tcp_servers(svc_ns, [f"{address}:{MQTT_TLS}", f"{address}:{HTTPS}"]) as iot,
        recipe_lab.dns_stand_in(lab, {name: address}),
    ):
        closed_nat(lab, [vpce])
        # The endpoint stands for its interfaces' addresses, nothing more of its subnet.
        assert admitted(lab, address), allowed_ranges(lab)
        neighbour = str(recipe_lab.ENDPOINT_SUBNET.broadcast_address - 1)
        before = peer_counters(lab)[REFUSED_COUNTER]
        outcome = recipe_lab.device_connects_to(lab, DEVICE, neighbour, MQTT_TLS)
        assert outcome.startswith("no reply"), outcome
        assert peer_counters(lab)[REFUSED_COUNTER] > before
        for port in (MQTT_TLS, HTTPS):  # MQTT over TLS; MQTT over WebSocket
            resolved, outcome = recipe_lab.device_connects(lab, DEVICE, name, port)
            assert (resolved, outcome) == (address, f"connected seen {PEER}"), port
            assert accepted(iot) == [f"{address}:{port}", PEER]
        assert_refused_and_counted(lab)


def non_ec2_example() -> dict:  # type: ignore[type-arg]
    """The TOML that cloud-init/non-ec2.yaml writes."""
    doc = yaml.safe_load((REPO / "cloud-init" / "non-ec2.yaml").read_text())
    files = {f["path"]: f["content"] for f in doc["write_files"]}
    return tomllib.loads(files["/etc/gatepeer/gatepeer.toml"])


def test_a_peer_outside_aws_from_the_non_ec2_example(lab: LabHandle) -> None:
    """docs/recipes/outside-aws.md: the non-EC2 example's packet path with the recipe's
    changes (nat mode, closed, the VNet and a private endpoint's subnet by prefix; no EC2 API),
    on the lab's peer, which has no IMDS either."""
    example = non_ec2_example()["packet_path"]
    assert "vpc_cidrs" in example, "the example no longer gives the VNet's address space"
    private_endpoint = str(recipe_lab.ENDPOINT_SUBNET.network_address + 10)
    lab.set_config("tunnel", "mtu", json.dumps(non_ec2_example()["tunnel"]["mtu"]))
    lab.set_config("packet_path", "mode", json.dumps("nat"))
    lab.set_config("packet_path", "closed", "true")
    lab.set_config("packet_path", "vpc_cidrs", json.dumps([VPC]))
    allowed = [str(recipe_lab.ENDPOINT_SUBNET)]  # the VNet is admitted as the VPC is
    lab.set_config("packet_path", "allowed_destinations", json.dumps(allowed))
    name = "gatepeerlab.blob.core.windows.net"
    with (
        recipe_lab.services_host(lab, [private_endpoint]) as svc_ns,
        recipe_lab.tcp_servers(svc_ns, [f"{private_endpoint}:{HTTPS}"]) as blob,
        recipe_lab.dns_stand_in(lab, {name: private_endpoint}),
    ):
        apply(lab)
        status = json.loads(recipe_lab.gatepeer(lab, "status", "--json").stdout)
        assert status["tunnel"]["mtu"] == 8951, status["tunnel"]  # "auto": the underlay's - 50
        resolved, outcome = recipe_lab.device_connects(lab, DEVICE, name, HTTPS)
        assert (resolved, outcome) == (private_endpoint, f"connected seen {PEER}")
        assert accepted(blob) == [f"{private_endpoint}:{HTTPS}", PEER]
        assert_refused_and_counted(lab)
    # Off EC2 doctor makes no AWS call: its closed-network checks are skipped, as the page says.
    doctor = recipe_lab.gatepeer(lab, "doctor").stdout
    for check in ("closed-route", "closed-endpoint-sg", "closed-endpoint-dns", "closed-resolver"):
        assert re.search(rf"^skip\s+{check}\s+not an EC2 instance", doctor, re.M), doctor
