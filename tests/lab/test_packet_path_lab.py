"""The packet path end to end in the lab: `gatepeer apply` in the gate peer namespace, then real
traffic between the VPC side and the devices (route and nat mode), the nftables guards
(foreign VXLAN, spoofed inner sources), MSS clamping without PMTU discovery, and the neighbour
table at 20,000 devices.

Every test builds its own lab (make_lab removes it even on failure); every process a test starts
is stopped by its pid.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LabHandle
from helpers.packet_path import (
    DEVICE,
    PEER,
    VPC_HOST,
    connect_and_see,
    peer_counters,
    popen,
)

from gatepeer.desired_state import neighbour_thresholds
from gatepeer.lab.network import netns

pytestmark = pytest.mark.netns

VPG1_OUTER = "198.18.1.11"
VNI = 10


def apply(lab: LabHandle, mode: str, allowed: list[str] | None = None) -> None:
    lab.set_config("packet_path", "mode", json.dumps(mode))
    if allowed is not None:
        lab.set_config("packet_path", "allowed_destinations", json.dumps(allowed))
    proc = lab.gatepeer("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lab.set_redirection("peer")  # devices' outbound traffic through the peer (not yet agent's)


# ----------------------------------------------------------------------------- modes


def test_nat_mode_device_reaches_vpc_server_as_the_peer(make_lab) -> None:
    lab = make_lab()
    apply(lab, "nat")
    before = peer_counters(lab)
    seen, reply = connect_and_see(lab, "vpc", VPC_HOST, "dev", DEVICE)
    assert seen == PEER, f"nat mode: the VPC server saw {seen}, not the gate peer"
    assert reply == f"seen {PEER}", "the reply did not reach the device"
    assert peer_counters(lab)["masqueraded_flows"] > before["masqueraded_flows"]


def test_nat_mode_reaches_a_destination_with_no_route_back(make_lab) -> None:
    # The fabric has no route to the device subnet: only NAT makes the internet host reachable.
    lab = make_lab()
    apply(lab, "nat", ["198.51.100.0/24", "198.18.0.0/24"])
    seen, reply = connect_and_see(lab, "fabric", "198.51.100.1", "dev", DEVICE)
    assert seen == PEER and reply == f"seen {PEER}"


def test_route_mode_keeps_real_addresses_both_ways(make_lab) -> None:
    lab = make_lab()
    apply(lab, "route")
    seen, reply = connect_and_see(lab, "dev", DEVICE, "vpc", VPC_HOST)
    assert seen == VPC_HOST and reply == f"seen {VPC_HOST}", "VPC -> device"
    seen, reply = connect_and_see(lab, "vpc", VPC_HOST, "dev", DEVICE)
    assert seen == DEVICE and reply == f"seen {DEVICE}", "device -> VPC"
    assert peer_counters(lab)["masqueraded_flows"] == 0


# ----------------------------------------------------------------------------- guards

# Sends one VXLAN datagram (UDP payload = VXLAN header + inner frame) from argv[1] to the peer.
SEND_VXLAN = """
import socket, sys
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
src, vni, dst_mac, inner_src, count = sys.argv[1:6]
vni, count = int(vni), int(count)
frame = VXLAN(vni=vni, flags=0x08) / Ether(src="02:00:00:00:66:66", dst=dst_mac) / IP(
    src=inner_src, dst="198.18.0.20") / UDP(sport=1234, dport=9) / (b"x" * 32)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((src, 0))
for _ in range(count):
    s.sendto(bytes(frame), ("198.18.0.10", 4789))
"""


def peer_vxlan_mac(lab: LabHandle) -> str:
    return str(netns.ip_json(lab.ns("peer"), "link", "show", "dev", "vxlan0")[0]["address"])


def wait_for(predicate, timeout: float = 5) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_vxlan_from_a_foreign_address_is_dropped_and_counted(make_lab) -> None:
    lab = make_lab()
    apply(lab, "route")
    evil = lab.ns("evil")  # `{prefix}-*`: lab down removes it too, even if we do not
    fab = lab.ns("fabric")
    subprocess.run(["ip", "netns", "add", evil], check=True)
    try:
        subprocess.run(
            ["ip", "-n", fab, "link", "add", "to-evil", "type", "veth",
             "peer", "name", "eth0", "netns", evil],
            check=True,
        )  # fmt: skip
        subprocess.run(["ip", "-n", fab, "link", "set", "to-evil", "master", "vpcbr", "up"],
                       check=True)  # fmt: skip
        subprocess.run(["ip", "-n", evil, "addr", "add", "198.18.0.66/24", "dev", "eth0"],
                       check=True)  # fmt: skip
        subprocess.run(["ip", "-n", evil, "link", "set", "eth0", "up"], check=True)
        before = peer_counters(lab)
        rx_before = netns.link_stats(lab.ns("peer"), "vxlan0")["rx_packets"]
        subprocess.run(
            ["ip", "netns", "exec", evil, sys.executable, "-c", SEND_VXLAN, "198.18.0.66",
             str(VNI), peer_vxlan_mac(lab), DEVICE, "5"],
            check=True, timeout=30,
        )  # fmt: skip
        assert wait_for(
            lambda: (
                peer_counters(lab)["vxlan_foreign_dropped"] >= before["vxlan_foreign_dropped"] + 5
            )
        ), f"vxlan_foreign_dropped did not grow by 5: {before} -> {peer_counters(lab)}"
        assert netns.link_stats(lab.ns("peer"), "vxlan0")["rx_packets"] == rx_before, (
            "a foreign VXLAN packet reached vxlan0"
        )
    finally:
        subprocess.run(["ip", "-n", fab, "link", "del", "to-evil"], capture_output=True)
        subprocess.run(["ip", "netns", "delete", evil], capture_output=True)


def test_inner_source_outside_the_device_subnet_is_dropped_and_counted(make_lab) -> None:
    lab = make_lab()
    apply(lab, "route")
    before = peer_counters(lab)
    rx_before = netns.link_stats(lab.ns("peer"), "vxlan0")["rx_packets"]
    lab.run(
        "vpg1", sys.executable, "-c", SEND_VXLAN, VPG1_OUTER, str(VNI), peer_vxlan_mac(lab),
        "203.0.113.5", "5", timeout=30,
    )  # fmt: skip
    assert wait_for(
        lambda: peer_counters(lab)["spoofed_source_dropped"] >= before["spoofed_source_dropped"] + 5
    ), f"spoofed_source_dropped did not grow by 5: {before} -> {peer_counters(lab)}"
    after = peer_counters(lab)
    # Accepted by the input chain (a real endpoint), decapsulated, then dropped by prerouting.
    assert after["vxlan_accepted"] >= before["vxlan_accepted"] + 5
    assert netns.link_stats(lab.ns("peer"), "vxlan0")["rx_packets"] >= rx_before + 5


# ----------------------------------------------------------------------------- MSS clamp


def test_mss_is_clamped_so_a_9001_mtu_host_reaches_a_1500_path_without_pmtud(
    make_lab, tmp_path: Path
) -> None:
    lab = make_lab()
    apply(lab, "route")
    # The VPC host never learns the path MTU: frag-needed is dropped before it arrives.
    nft = (
        "table ip nopmtud {\n chain input {\n  type filter hook input priority -10;\n"
        "  icmp type destination-unreachable icmp code frag-needed counter drop\n }\n}\n"
    )
    subprocess.run(["ip", "netns", "exec", lab.ns("vpc"), "nft", "-f", "-"], input=nft,
                   text=True, check=True)  # fmt: skip
    with (
        popen(lab, "dev", "iperf3", "-s", "-1", "-B", DEVICE) as server,
        popen(
            lab, "dev", "tcpdump", "-i", "any", "-nn", "-l", "-c", "2",
            f"tcp[tcpflags] & tcp-syn != 0 and src host {VPC_HOST}",
        ) as dump,
    ):  # fmt: skip
        assert dump.stderr is not None
        while "listening" not in (line := dump.stderr.readline()):
            assert line, "tcpdump exited before listening"
        time.sleep(0.3)  # iperf3 -s is listening by now
        client = lab.run(
            "vpc", "iperf3", "-c", DEVICE, "-n", "8M", "--connect-timeout", "3000", "-J",
            check=False, timeout=30,
        )  # fmt: skip
        assert client.returncode == 0, client.stdout[-2000:] + client.stderr
        report = json.loads(client.stdout)
        received = report["end"]["sum_received"]["bytes"]
        sent = report["end"]["sum_sent"]["bytes"]
        assert sent >= 8 * 1024 * 1024, f"only {sent} bytes sent"
        # The receiver's sum stops at its last interval (short of the tail); the server's exit
        # status below says the whole stream arrived.
        assert received > 0
        assert server.wait(timeout=10) == 0
        out, _ = dump.communicate(timeout=10)
    mss = [int(m) for m in re.findall(r"\bmss (\d+)", out)]
    assert mss, f"no SYN seen at the device:\n{out}"
    assert all(m <= 1460 for m in mss), f"MSS at the device not clamped: {mss}"
    # Without the clamp the VPC host would have offered 9001 - 40.
    assert 8961 not in mss

    # Devices advertise 1460 themselves, so at a 1500-byte tunnel the clamp changes little for
    # VPC -> device. It matters when the tunnel is narrower than the devices' links: at 1400,
    # the SYN-ACK's 1460 must reach the VPC host as 1360 (rt mtu takes the smaller of both
    # routes), else its 1500-byte packets die at the peer and the frag-needed never arrives.
    lab.set_config("tunnel", "mtu", "1400")
    proc = lab.gatepeer("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert transfer(lab, timeout=20), "no transfer through a clamped 1400-byte tunnel"
    # The clamp's own chain (the forward chain sends SYNs there).
    listing = lab.run("peer", "nft", "-a", "list", "chain", "inet", "gatepeer", "clamp_mss").stdout
    handles = re.findall(r"maxseg size set rt mtu # handle (\d+)", listing)
    assert len(handles) == 2, listing
    for handle in handles:
        lab.run("peer", "nft", "delete", "rule", "inet", "gatepeer", "clamp_mss", "handle", handle)
    assert not transfer(lab, timeout=8), (
        "the transfer worked without the clamp: test proves nothing"
    )


def transfer(lab: LabHandle, timeout: float) -> bool:
    """8 MB VPC host -> device with iperf3; False when it stalls past `timeout`."""
    with popen(lab, "dev", "iperf3", "-s", "-1", "-B", DEVICE):
        time.sleep(0.3)
        try:
            # `ip netns exec` execs iperf3: the timeout kills iperf3 itself.
            proc = lab.run("vpc", "iperf3", "-c", DEVICE, "-n", "8M", check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


# ----------------------------------------------------------------------------- neighbours

THRESH = [f"net/ipv4/neigh/default/gc_thresh{i}" for i in (1, 2, 3)]
KERNEL_DEFAULTS = (128, 512, 1024)
MANY = 20_000

# One UDP datagram to each of argv[1] addresses from 198.19.130.0 upwards.
SPRAY = """
import ipaddress, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
base = int(ipaddress.IPv4Address("198.19.130.0"))
for i in range(int(sys.argv[1])):
    s.sendto(b"n", (str(ipaddress.IPv4Address(base + i)), 9))
"""


def read_thresholds() -> tuple[int, ...]:
    return tuple(int((Path("/proc/sys") / p).read_text()) for p in THRESH)


def write_thresholds(values: tuple[int, ...]) -> None:
    # gc_thresh3 first when raising and last when lowering keeps 1 <= 2 <= 3 meaningful.
    order = zip(THRESH, values, strict=True)
    for path, value in sorted(order, reverse=values[2] >= read_thresholds()[2]):
        (Path("/proc/sys") / path).write_text(str(value))


def table_fulls() -> int:
    """The arp_cache table_fulls counter (global; /proc/net/stat exists in the initial netns)."""
    lines = Path("/proc/net/stat/arp_cache").read_text().split("\n")
    col = lines[0].split().index("table_fulls")
    return sum(int(ln.split()[col], 16) for ln in lines[1:] if ln.strip())


def neigh_count(lab: LabHandle) -> int:
    out = lab.run("peer", "ip", "neigh", "show", "dev", "vxlan0").stdout
    return sum(1 for ln in out.splitlines() if "lladdr" in ln)


def spray(lab: LabHandle) -> tuple[int, int, int]:
    """Send to MANY device addresses; (table_fulls increase, resolved entries, delivered)."""
    lab.run("peer", "ip", "neigh", "flush", "dev", "vxlan0")
    lab.run("dev", "nft", "reset", "counters", "table", "ip", "sink")
    fulls = table_fulls()
    lab.run("vpc", sys.executable, "-c", SPRAY, str(MANY), timeout=60)
    time.sleep(4)  # ARP retries (1 s apart) settle
    delivered = lab.run("dev", "nft", "-j", "list", "counter", "ip", "sink", "seen").stdout
    packets = json.loads(delivered)["nftables"][1]["counter"]["packets"]
    return table_fulls() - fulls, neigh_count(lab), int(packets)


@pytest.mark.slow
def test_twenty_thousand_devices_fit_the_neighbour_table_once_tuned(make_lab) -> None:
    lab = make_lab()
    apply(lab, "route")
    # The devices' side counts (and drops, before routing) one packet per address.
    sink = (
        "table ip sink {\n counter seen {\n }\n chain pre {\n"
        "  type filter hook prerouting priority raw;\n"
        '  udp dport 9 counter name "seen" drop\n }\n}\n'
    )
    subprocess.run(["ip", "netns", "exec", lab.ns("dev"), "nft", "-f", "-"], input=sink,
                   text=True, check=True)  # fmt: skip
    saved = read_thresholds()
    try:
        write_thresholds(KERNEL_DEFAULTS)
        fulls, entries, delivered = spray(lab)
        assert fulls > 0, "the kernel defaults did not overflow"
        assert entries <= 1100, f"{entries} entries under a 1024 hard limit"
        assert delivered < MANY

        write_thresholds(neighbour_thresholds(50_000))
        fulls, entries, delivered = spray(lab)
        assert fulls == 0, f"neighbor table overflow {fulls} times with tuned thresholds"
        assert entries >= MANY * 0.99, f"only {entries} neighbour entries"
        assert delivered == MANY, f"{MANY - delivered} packets dropped"
    finally:
        lab.run("peer", "ip", "neigh", "flush", "dev", "vxlan0", check=False)
        write_thresholds(saved)
    assert read_thresholds() == saved
