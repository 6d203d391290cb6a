"""The lab: namespaces, emulator process, the hand-made gate peer, and `gatepeer lab` itself.

Every test here needs root and `ip netns` (the lab's pure parts: tests/unit/test_lab_layout.py);
each uses its own prefix and the fixtures remove it, failing the test if anything is left behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from conftest import LabHandle, new_prefix

from gatepeer.lab import control
from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import (
    INTERNET_ADDR,
    VPC_HOST_ADDR,
    VPG_NAT_TABLE,
)
from gatepeer.lab.network.vpg import (
    endpoint_fdb,
    endpoint_gateway,
)
from gatepeer.lab.processes.emulator_process import emulator_pid
from gatepeer.lab.processes.traffic import iperf
from gatepeer.lab.record import Paths

# ----------------------------------------------------------------------------- helpers


def _ping(h: LabHandle, role: str, target: Any, count: int = 1) -> bool:
    proc = h.run(
        role, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", str(target), check=False
    )
    return proc.returncode == 0


def _stats(h: LabHandle, role: str) -> dict[str, int]:
    return netns.link_stats(h.ns(role), "vxlan0")


def _vxlan(h: LabHandle, role: str) -> dict[str, Any]:
    details = netns.link_details(h.ns(role), "vxlan0")
    assert details is not None, f"{h.ns(role)} has no vxlan0"
    return dict(details["linkinfo"]["info_data"])


def _vxlan_ifindex(h: LabHandle, ns: str) -> int:
    details = netns.link_details(ns, "vxlan0")
    assert details is not None, f"{ns} has no vxlan0"
    return int(details["ifindex"])


def _return_route(h: LabHandle, role: str) -> str:
    return netns.ip(h.ns(role), "route", "show", "default", "table", "100").stdout.strip()


def _gate_peer_inner(h: LabHandle) -> ipaddress.IPv4Interface:
    addrs = netns.ip_json(h.ns("peer"), "-4", "addr", "show", "dev", "vxlan0")
    info = addrs[0]["addr_info"][0]
    return ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")


# ----------------------------------------------------------------------------- lifecycle


@pytest.mark.netns
def test_up_up_down_up_down_each_work_and_leave_nothing(make_lab: Callable[..., LabHandle]) -> None:
    h = make_lab(up=False)
    first = h.cli("up")
    h.remember_emulator()
    assert first.exit_code == 0, first.output
    assert set(control.lab_namespaces(h.prefix)) == set(h.layout.namespaces)
    pid = emulator_pid(h.paths)
    assert pid is not None
    assert stat.S_IMODE(h.paths.auth_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(h.paths.dir.stat().st_mode) == 0o700
    assert tomllib.loads(h.paths.config.read_text())["soracom"]["vpg_id"]
    # The emulator answers on the host and, from the gate peer, inside the lab.
    assert h.state()["settings"]["vxlan_id"] == 10
    inside = h.run("peer", sys.executable, "-c", _FETCH_STATE, check=False)
    assert inside.returncode == 0 and '"vxlan_id": 10' in inside.stdout, inside.stderr
    for word in (h.ns("peer"), "203.0.113.10:8080", h.control_url, str(h.paths.config)):
        assert word in first.output

    vxlan_ids = {ep.ns: _vxlan_ifindex(h, ep.ns) for ep in h.layout.endpoints}
    again = h.cli("up")
    assert again.exit_code == 0, again.output
    assert "kept" in again.output
    assert emulator_pid(h.paths) == pid
    # Nothing was re-created: the same links, so no packet was lost.
    assert {ep.ns: _vxlan_ifindex(h, ep.ns) for ep in h.layout.endpoints} == vxlan_ids
    assert h.cli("status").exit_code == 0

    down = h.cli("down")
    assert down.exit_code == 0, down.output
    assert h.leftovers() == []
    assert h.cli("status").exit_code == 1

    assert h.cli("up").exit_code == 0
    h.remember_emulator()
    assert h.cli("down").exit_code == 0
    assert h.leftovers() == []
    nothing = h.cli("down")
    assert nothing.exit_code == 0 and "nothing to remove" in nothing.output


_FETCH_STATE = (
    "import urllib.request;"
    "print(urllib.request.urlopen('http://203.0.113.10:8080/_emulator/state', timeout=5)"
    ".read().decode())"
)


@pytest.mark.netns
def test_down_cleans_a_crashed_half_built_lab(make_lab: Callable[..., LabHandle]) -> None:
    h = make_lab(up=False)
    for role in ("fabric", "vpg1", "dev"):
        netns.add_netns(h.ns(role))
    netns.ip(h.ns("vpg1"), "link", "add", "eth0", "type", "veth", "peer", "name", "x")
    h.paths.dir.mkdir(parents=True)
    # A stale pid file naming a live process that is not the emulator: it must survive.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        h.paths.emulator_pid.write_text(f"{bystander.pid}\n")
        result = h.cli("down")
        assert result.exit_code == 0, result.output
        assert bystander.poll() is None, "lab down killed a process that was not its emulator"
        assert h.leftovers() == []
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.netns
def test_killed_emulator_and_lost_namespace_are_repaired_by_up(
    make_lab: Callable[..., LabHandle],
) -> None:
    h = make_lab(baseline=True)
    device = h.layout.devices[0]
    assert _ping(h, "vpc", device)
    pid = emulator_pid(h.paths)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the emulator this test started, by its pid
    netns.delete_netns(h.ns("vpg2"))
    deadline = time.monotonic() + 5
    while emulator_pid(h.paths) is not None and time.monotonic() < deadline:
        time.sleep(0.05)

    st = h.cli("status")
    assert st.exit_code == 1
    assert "not running" in st.output and h.ns("vpg2") in st.output

    repaired = h.cli("up", "--baseline")
    h.remember_emulator()
    assert repaired.exit_code == 0, repaired.output
    assert "started the emulator" in repaired.output
    assert set(control.lab_namespaces(h.prefix)) == set(h.layout.namespaces)
    assert _ping(h, "vpc", device)
    # The re-created endpoint floods to the gate peer again, and only to it.
    assert endpoint_fdb(h.ns("vpg2")) == ["198.18.0.10"]


# ----------------------------------------------------------------------------- data path


@pytest.mark.netns
def test_baseline_gate_peer_carries_vpc_traffic_through_vxlan(baseline_lab: LabHandle) -> None:
    h = baseline_lab
    layout = h.layout
    peer_vxlan = _vxlan(h, "peer")
    assert (peer_vxlan["id"], peer_vxlan["port"], peer_vxlan["local"]) == (10, 4789, "198.18.0.10")
    assert peer_vxlan["port_range"] == {"low": 4789, "high": 4789}
    assert sorted(
        e["dst"] for e in netns.bridge_json(h.ns("peer"), "fdb", "show", "dev", "vxlan0")
    ) == ["198.18.1.11", "198.18.1.12"]

    before = _stats(h, "peer")
    for device in layout.devices:
        assert _ping(h, "vpc", device), f"VPC host cannot reach device {device}"
    after = _stats(h, "peer")
    # Requests out and replies back, both encapsulated by the gate peer's vxlan0.
    assert after["tx_packets"] - before["tx_packets"] >= len(layout.devices)
    assert after["rx_packets"] - before["rx_packets"] >= len(layout.devices)

    # Each VPG endpoint answers on its own inner address, through its own vxlan0.
    for ep in layout.endpoints:
        role = f"vpg{ep.index}"
        ep_before = _stats(h, role)
        assert _ping(h, "peer", ep.inner), f"gate peer cannot reach {ep.inner}"
        ep_after = _stats(h, role)
        assert ep_after["rx_packets"] > ep_before["rx_packets"]
        assert ep_after["tx_packets"] > ep_before["tx_packets"]

    # The devices' own traffic comes back through the tunnel too (ping from a device address):
    # to the VPC host it works; to the internet host it needs NAT, which the baseline lacks.
    device = str(layout.devices[0])
    assert (
        h.run("dev", "ping", "-c1", "-W2", "-I", device, "198.18.0.20", check=False).returncode == 0
    )
    assert h.run("dev", "ping", "-c1", "-W1", "-I", device, "198.51.100.1", check=False).returncode
    assert _ping(h, "peer", INTERNET_ADDR)

    # Without the tunnel there is no path: the devices are reachable only through it.
    netns.ip(h.ns("peer"), "link", "set", "dev", "vxlan0", "down")
    assert not _ping(h, "vpc", layout.devices[0])
    netns.ip(h.ns("peer"), "link", "set", "dev", "vxlan0", "up")
    assert _ping(h, "vpc", layout.devices[0], count=2)

    assert shutil.which("iperf3"), "the TCP check needs iperf3 (Debian package iperf3)"
    ok, detail = iperf(layout, h.paths, str(layout.devices[0]), seconds=1)
    assert ok, detail
    assert not h.paths.iperf_pid.exists()


@pytest.mark.netns
def test_non_default_vni_and_a_slash_24_device_subnet(make_lab: Callable[..., LabHandle]) -> None:
    h = make_lab(vni=4711, device_subnet="198.19.5.0/24", baseline=True)
    layout = h.layout
    assert layout.vni == 4711
    assert _vxlan(h, "peer")["id"] == 4711
    for ep in layout.endpoints:
        assert _vxlan(h, f"vpg{ep.index}")["id"] == 4711
    inner = _gate_peer_inner(h)
    assert inner.network == ipaddress.IPv4Network("198.19.5.0/24")
    assert inner.ip not in [ep.inner for ep in layout.endpoints]
    assert [str(d) for d in layout.devices] == [f"198.19.5.{i}" for i in range(129, 133)]
    for device in layout.devices:
        assert _ping(h, "vpc", device), f"VPC host cannot reach device {device}"
    for ep in layout.endpoints:
        assert _ping(h, "peer", ep.inner)


@pytest.mark.netns
def test_register_and_unregister_follow_into_every_endpoint(lab: LabHandle) -> None:
    endpoints = lab.layout.endpoints
    assert all(endpoint_fdb(ep.ns) == [] for ep in endpoints)

    api = lab.api()
    api.register_gate_peer("198.18.0.10")
    for ep in endpoints:
        assert endpoint_fdb(ep.ns) == ["198.18.0.10"]

    api.register_gate_peer("198.18.0.11")
    for ep in endpoints:
        assert sorted(endpoint_fdb(ep.ns)) == ["198.18.0.10", "198.18.0.11"]

    api.unregister_gate_peer("198.18.0.10")
    for ep in endpoints:
        assert endpoint_fdb(ep.ns) == ["198.18.0.11"]

    api.unregister_gate_peer("198.18.0.11")
    for ep in endpoints:
        assert endpoint_fdb(ep.ns) == []
    assert lab.state()["peers"] == []
    # Registering is not redirecting: the devices' outbound traffic never moved to a peer.
    assert all(endpoint_gateway(ep.ns) is None for ep in endpoints)


# One TCP connection to argv[1]:argv[2]: prints "ready", then the address that connected.
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(8)
print("ready", flush=True)
c, a = s.accept()
print(a[0], flush=True)
c.close()
"""
CLIENT = """
import socket, sys
socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3,
                         source_address=(sys.argv[3], 0)).close()
"""


def _seen_by_vpc_host(h: LabHandle, device: str, port: int) -> str:
    """A TCP connection from `device` to the VPC host: the source address the host saw."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", h.ns("vpc"), sys.executable, "-c", SERVER,
         str(VPC_HOST_ADDR), str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        client = h.run(
            "dev", sys.executable, "-c", CLIENT, str(VPC_HOST_ADDR), str(port), device,
            check=False, timeout=10,
        )  # fmt: skip
        assert client.returncode == 0, f"device {device} could not connect: {client.stderr}"
        return server.stdout.readline().strip()
    finally:
        if server.poll() is None:
            server.terminate()
        server.wait(timeout=5)


def _forwarded(h: LabHandle, role: str) -> int:
    """IP datagrams the namespace forwarded (Ip: ForwDatagrams of /proc/net/snmp)."""
    lines = [ln.split() for ln in h.run(role, "cat", "/proc/net/snmp").stdout.splitlines()]
    names, values = (ln for ln in lines if ln and ln[0] == "Ip:")
    return int(values[names.index("ForwDatagrams")])


def _vpg_dropped_replies(h: LabHandle) -> int:
    total = 0
    for ep in h.layout.endpoints:
        ruleset = h.run(f"vpg{ep.index}", "nft", "list", "table", "ip", VPG_NAT_TABLE)
        for line in ruleset.stdout.splitlines():
            if line.strip().endswith("drop") and "packets" in line:
                total += int(line.split("packets")[1].split()[0])
    return total


@pytest.mark.netns
def test_redirection_decides_whether_device_traffic_goes_through_the_peer(
    baseline_lab: LabHandle,
) -> None:
    h = baseline_lab
    device = str(h.layout.devices[0])
    inner = str(_gate_peer_inner(h).ip)
    first_nat = str(h.layout.endpoints[0].nat_addr)
    # The hand-made bring-up set redirection to the peer, as SORACOM's guide has a person do.
    assert h.state()["redirection"]["gateway"] == inner
    assert all(endpoint_gateway(ep.ns) == inner for ep in h.layout.endpoints)

    # Redirected: the device's connection goes through the peer (route mode: real addresses).
    forwarded = _forwarded(h, "peer")
    assert _seen_by_vpc_host(h, device, 8001) == device
    assert _forwarded(h, "peer") > forwarded
    assert _ping(h, "vpc", device)

    # Unset: the VPG's own way out, NATed to its address; the peer forwards nothing, and a
    # connection the VPC host opens gets no reply (the reply leaves the VPG's way: dropped).
    off = h.cli("redirect", "--off")
    assert off.exit_code == 0 and "redirection off" in off.output
    assert all(endpoint_gateway(ep.ns) is None for ep in h.layout.endpoints)
    forwarded = _forwarded(h, "peer")
    assert _seen_by_vpc_host(h, device, 8002) == first_nat
    assert _forwarded(h, "peer") == forwarded
    dropped = _vpg_dropped_replies(h)
    assert not _ping(h, "vpc", device, count=2)
    assert _vpg_dropped_replies(h) > dropped
    status = h.cli("status")
    assert "redirection: off" in status.output and "its NAT way out" in status.output

    # Set again at run time: the path moves back before the API call is answered.
    on = h.cli("redirect", "peer")
    assert on.exit_code == 0 and f"goes to {inner}" in on.output
    assert all(endpoint_gateway(ep.ns) == inner for ep in h.layout.endpoints)
    forwarded = _forwarded(h, "peer")
    assert _seen_by_vpc_host(h, device, 8003) == device
    assert _forwarded(h, "peer") > forwarded
    assert f"redirection: on, gateway {inner}" in h.cli("status").output

    # A gateway nobody holds: the traffic goes into the tunnel and nowhere, never the NAT way.
    assert h.cli("redirect", "198.19.0.99").exit_code == 0
    assert all(endpoint_gateway(ep.ns) == "198.19.0.99" for ep in h.layout.endpoints)
    assert not _ping(h, "dev", "198.18.0.20")  # from the devices link address: no answer

    # Closing and reopening Gate, and a VPG endpoint's tunnel re-created by `lab up`, keep the
    # redirection (the kernel drops routes through a tunnel that goes down).
    assert h.cli("redirect", inner).exit_code == 0
    _control(h, "settings", {"gate_opened": False})
    assert all(endpoint_gateway(ep.ns) is None for ep in h.layout.endpoints)
    _control(h, "settings", {"gate_opened": True})
    assert all(endpoint_gateway(ep.ns) == inner for ep in h.layout.endpoints)
    assert _seen_by_vpc_host(h, device, 8004) == device
    netns.ip(h.ns("vpg1"), "link", "del", "dev", "vxlan0")
    assert h.cli("up").exit_code == 0
    assert all(endpoint_gateway(ep.ns) == inner for ep in h.layout.endpoints)


@pytest.mark.netns
def test_redirection_survives_a_vni_change(lab: LabHandle) -> None:
    lab.set_redirection("198.19.0.3")
    _control(lab, "settings", {"vxlan_id": 21})
    assert all(_vxlan(lab, f"vpg{ep.index}")["id"] == 21 for ep in lab.layout.endpoints)
    assert all(endpoint_gateway(ep.ns) == "198.19.0.3" for ep in lab.layout.endpoints)
    lab.set_redirection(None)
    assert all(endpoint_gateway(ep.ns) is None for ep in lab.layout.endpoints)


@pytest.mark.netns
def test_vni_change_and_gate_close_in_the_emulator_reach_the_endpoints(lab: LabHandle) -> None:
    _control(lab, "settings", {"vxlan_id": 20})
    for ep in lab.layout.endpoints:
        assert _vxlan(lab, f"vpg{ep.index}")["id"] == 20
    # lab.json follows, so a later `lab up` keeps the new VNI instead of reverting it.
    assert lab.layout.vni == 20
    again = lab.cli("up")
    assert again.exit_code == 0 and "kept" in again.output
    assert all(_vxlan(lab, f"vpg{ep.index}")["id"] == 20 for ep in lab.layout.endpoints)

    # Closing Gate takes the endpoints' tunnels down (and `lab up` leaves them so).
    _control(lab, "settings", {"gate_opened": False})
    assert not any(_vxlan_up(lab, ep.ns) for ep in lab.layout.endpoints)
    assert lab.cli("up").exit_code == 0
    assert not any(_vxlan_up(lab, ep.ns) for ep in lab.layout.endpoints)
    _control(lab, "settings", {"gate_opened": True})
    assert all(_vxlan_up(lab, ep.ns) for ep in lab.layout.endpoints)


def _control(h: LabHandle, name: str, body: dict[str, Any]) -> None:
    req = urllib.request.Request(
        f"{h.control_url}/_emulator/{name}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def _vxlan_up(h: LabHandle, ns: str) -> bool:
    details = netns.link_details(ns, "vxlan0")
    assert details is not None
    return "UP" in details["flags"]


# ----------------------------------------------------------------------------- CLI


@pytest.mark.netns
def test_demo_runs_traffic_and_reports_it(make_lab: Callable[..., LabHandle]) -> None:
    for tool, package in (("iperf3", "iperf3"), ("ping", "iputils-ping")):
        assert shutil.which(tool), f"the demo needs {tool} (Debian package {package})"
    h = make_lab(up=False)
    result = h.cli("demo", "--teardown")
    assert result.exit_code == 0, result.output
    # The real agent brought the gate peer up (one-shot apply), not the hand-made script.
    assert "gatepeer apply --config" in result.output
    assert "converged:" in result.output and "one-shot" in result.output
    assert "handmade_gate_init.sh" not in result.output
    assert "went through the gate peer's vxlan0" in result.output
    # The agent (redirection = "self") pointed the VPG's redirection at the peer itself.
    assert 'redirection = "self"' in result.output
    assert "Junction redirection on" in result.output
    assert "TCP transfer" in result.output and "everything works" in result.output
    assert h.leftovers() == []


@pytest.mark.netns
def test_redirect_on_a_lab_that_is_not_up_fails_with_exit_1() -> None:
    from click.testing import CliRunner

    from gatepeer.lab.cli import lab

    result = CliRunner().invoke(lab, ["redirect", "peer", "--prefix", new_prefix()])
    assert result.exit_code == 1
    assert "is not up" in result.output


@pytest.mark.netns
def test_up_refuses_a_device_subnet_outside_the_lab_ranges() -> None:
    from click.testing import CliRunner

    from gatepeer.lab.cli import lab

    prefix = new_prefix()
    result = CliRunner().invoke(lab, ["up", "--prefix", prefix, "--device-subnet", "10.0.0.0/8"])
    assert result.exit_code == 2
    assert "must lie inside" in result.output
    assert control.lab_namespaces(prefix) == []
    assert not Paths.for_prefix(prefix).dir.exists()
