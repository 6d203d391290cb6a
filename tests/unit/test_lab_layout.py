"""The lab without root: its address plan and the refusals of its layout, the configs it writes
for the agent and an HA pair, the VPG stand-in's peers, redirection and NAT rules, and
`gatepeer lab redirect`'s refusals of bad usage. Building labs: tests/lab/test_lab.py.
"""

from __future__ import annotations

import ipaddress
import tomllib
from typing import Any

import pytest
from conftest import new_prefix

from gatepeer.lab.network.build import render_vpg_nat
from gatepeer.lab.network.layout import (
    ALLOWED_NETS,
    API_ADDR,
    DEVICES_LINK,
    INTERNET_ADDR,
    PEER_ADDR,
    RESERVED_NET,
    VPC_HOST_ADDR,
    Layout,
)
from gatepeer.lab.network.netns import LabError
from gatepeer.lab.network.vpg import (
    customer_peers,
    redirection_gateway,
)
from gatepeer.lab.record import Credentials, Paths, render_config

# ----------------------------------------------------------------------------- pure: layout


def test_default_layout_is_the_documented_address_plan() -> None:
    layout = Layout(prefix="gplab")
    assert layout.namespaces == [
        "gplab-fabric",
        "gplab-peer",
        "gplab-vpc",
        "gplab-vpg1",
        "gplab-vpg2",
        "gplab-dev",
    ]
    eps = layout.endpoints
    assert [(str(e.outer), str(e.inner)) for e in eps] == [
        ("198.18.1.11", "198.19.0.1"),
        ("198.18.1.12", "198.19.0.2"),
    ]
    assert [(str(e.link_addr), str(e.dev_link_addr)) for e in eps] == [
        ("198.18.2.1", "198.18.2.2"),
        ("198.18.2.5", "198.18.2.6"),
    ]
    assert [str(d) for d in layout.devices] == [f"198.19.128.{i}" for i in range(1, 5)]
    assert str(layout.device_half) == "198.19.128.0/17"


def test_small_subnet_layout_keeps_devices_in_the_upper_half() -> None:
    layout = Layout(prefix="gt0001", vni=4711, device_subnet=ipaddress.IPv4Network("198.19.5.0/24"))
    assert [str(e.inner) for e in layout.endpoints] == ["198.19.5.1", "198.19.5.2"]
    assert [str(d) for d in layout.devices] == [f"198.19.5.{i}" for i in range(129, 133)]


def test_every_lab_address_is_in_the_benchmark_or_test_net_ranges() -> None:
    layout = Layout(prefix="gt0001", endpoint_count=8, device_count=10)
    addrs = [PEER_ADDR, VPC_HOST_ADDR, API_ADDR, *layout.devices]
    addrs.append(INTERNET_ADDR)
    for ep in layout.endpoints:
        addrs += [ep.outer, ep.inner, ep.link_addr, ep.dev_link_addr]
    for addr in addrs:
        assert any(addr in net for net in ALLOWED_NETS), addr
    # Interface names fit IFNAMSIZ.
    names = ["vxlan0", "vpcbr", "sorabr", DEVICES_LINK, "to-peer", "to-vpc"]
    names += [ep.dev_ifname for ep in layout.endpoints]
    assert all(len(n) <= 15 for n in names)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prefix": "Bad-Prefix"}, "prefix"),
        ({"prefix": "waytoolongprefix"}, "prefix"),
        ({"device_subnet": ipaddress.IPv4Network("10.0.0.0/8")}, "must lie inside"),
        ({"device_subnet": ipaddress.IPv4Network("198.18.0.0/16")}, "overlaps"),
        ({"device_subnet": ipaddress.IPv4Network("203.0.113.0/24")}, "overlaps"),
        ({"device_subnet": ipaddress.IPv4Network("198.19.0.0/29")}, "too small"),
        ({"vni": 0}, "VNI"),
        ({"endpoint_count": 9}, "endpoints"),
    ],
)
def test_layout_refuses_what_the_lab_cannot_build(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(LabError, match=message):
        Layout(**changes)


def test_config_for_the_agent_is_valid_for_the_config_module(tmp_path: Any) -> None:
    paths = Paths(tmp_path)
    creds = Credentials.generate()
    text = render_config(paths, creds)
    data = tomllib.loads(text)
    assert data["soracom"] == {
        "endpoint": "http://203.0.113.10:8080",
        "auth_key_id": creds.auth_key_id,
        "auth_key_file": str(paths.auth_key),
        "vpg_id": creds.vpg_id,
        "redirection": "self",  # device traffic leaving the subnet must come through the peer
    }
    assert data["tunnel"] == {
        "interface": "vxlan0",
        "underlay_interface": "eth0",
        "local_address": "198.18.0.10",
    }
    assert data["agent"] == {
        "reconcile_interval": "30s",
        "state_file": str(paths.state_file),
        "gate_cache": str(paths.gate_cache),
    }
    config = pytest.importorskip("gatepeer.config")
    parsed = config.parse(data)
    assert str(parsed.tunnel.local_address) == "198.18.0.10"


def test_the_ha_pair_configs_point_at_each_other(tmp_path: Any) -> None:
    from gatepeer.config import parse

    paths = Paths(tmp_path)
    creds = Credentials.generate()
    layout = Layout(peer_count=2)
    assert [p.ns for p in layout.gate_peers] == ["gplab-peer", "gplab-peer2"]
    assert "gplab-peer2" in layout.namespaces
    assert Layout().namespaces == [n for n in layout.namespaces if n != "gplab-peer2"]
    first, second = (
        parse(tomllib.loads(render_config(paths, creds, p, pair=True))) for p in layout.gate_peers
    )
    assert first.ha is not None and second.ha is not None
    assert (str(first.tunnel.local_address), str(first.ha.peer_address)) == (
        "198.18.0.10",
        "198.18.0.11",
    )
    assert (str(second.tunnel.local_address), str(second.ha.peer_address)) == (
        "198.18.0.11",
        "198.18.0.10",
    )
    assert first.ha.priority > second.ha.priority
    assert first.ha.notify_fifo != second.ha.notify_fifo
    assert first.agent.state_file != second.agent.state_file
    assert first.packet_path.mode == second.packet_path.mode == "nat"
    # Connections survive a failover without extra steps: one moving NAT address, the sync on,
    # each peer's conntrackd with its own config and control socket.
    assert str(first.ha.snat_address) == str(second.ha.snat_address) == "198.18.0.12"
    assert first.ha.conntrack_sync and second.ha.conntrack_sync
    assert first.ha.conntrackd_socket != second.ha.conntrackd_socket
    assert first.ha.conntrackd_config != second.ha.conntrackd_config
    # A lab.json from before the pair existed reads as one peer.
    record = Layout().to_dict()
    del record["peer_count"]
    assert Layout.from_dict(record).peer_count == 1
    with pytest.raises(LabError, match="peers 3"):
        Layout(peer_count=3)


def test_customer_peers_reads_every_shape_and_skips_vpg_endpoints() -> None:
    from gatepeer.lab.emulator.model import Peer

    api_rows = [
        {"outerIpAddress": "198.18.1.11", "innerIpAddress": "198.19.0.1", "ownedByCustomer": False},
        {"outerIpAddress": "198.18.0.10", "innerIpAddress": "198.19.0.3", "ownedByCustomer": True},
    ]
    assert customer_peers(api_rows) == [("198.18.0.10", "198.19.0.3")]
    assert customer_peers([Peer("198.18.0.10", "198.19.0.3")]) == [("198.18.0.10", "198.19.0.3")]
    assert customer_peers([{"outer_ip": "198.18.0.11", "inner_ip": "198.19.0.4"}]) == [
        ("198.18.0.11", "198.19.0.4")
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "either GATEWAY or --off"),
        (["198.19.0.3", "--off"], "either GATEWAY or --off"),
        (["198.19.0"], "GATEWAY '198.19.0' is not an IPv4 address"),
        (["the-peer"], "is not an IPv4 address"),
    ],
)
def test_redirect_refuses_bad_usage_with_exit_2(args: list[str], message: str) -> None:
    from click.testing import CliRunner

    from gatepeer.lab.cli import lab

    prefix = new_prefix()
    result = CliRunner().invoke(lab, ["redirect", *args, "--prefix", prefix])
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("redirection", "gateway"),
    [
        ({"enabled": True, "gateway": "198.19.0.3"}, "198.19.0.3"),
        ({"enabled": False, "gateway": "198.19.0.3"}, None),
        ({"gateway": "198.19.0.3"}, None),  # enabled is what turns it on
        ({"enabled": True}, None),
        ({"enabled": "true", "gateway": "198.19.0.3"}, None),
        (None, None),
    ],
)
def test_only_an_enabled_redirection_with_a_gateway_moves_device_traffic(
    redirection: dict[str, Any] | None, gateway: str | None
) -> None:
    assert redirection_gateway(redirection) == gateway


def test_the_vpg_nat_table_snats_new_device_flows_and_drops_the_rest() -> None:
    ep = Layout().endpoints[1]
    assert str(ep.nat_addr) == "198.18.3.12"
    text = render_vpg_nat(ep)
    assert text.startswith("add table ip gatepeer_lab_vpg\ndelete table ip gatepeer_lab_vpg\n")
    rules = [ln.strip() for ln in text.splitlines() if ln.startswith("\t\t") and "type" not in ln]
    assert rules == [
        'iifname "to-dev" oifname "eth0" ct direction reply counter drop',
        'iifname "to-dev" oifname "eth0" ct state invalid counter drop',
        'iifname "to-dev" oifname "eth0" counter snat to 198.18.3.12',
    ]
    assert all(n.nat_addr in RESERVED_NET for n in Layout(endpoint_count=8).endpoints)
