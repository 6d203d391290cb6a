"""Route mode and device traffic leaving the VPC (issue 16, item 3), on the real kernel.

Route mode with Junction redirection to the peer: every device flow leaving the device subnet
comes to the peer. Device <-> VPC traffic keeps the devices' addresses and is never tracked;
traffic to anything outside the VPC (here an "outside" host behind the lab's VPC router, as a
NAT gateway's path would be) leaves with the peer's address, so it needs no return route. With
`outside_vpc = "route"` the outside host sees the device's address and, with no route back for
the device subnet, its answer is lost: the failure the masquerade default avoids.

The outside host is built here (a namespace and a veth pair to the lab's VPC router, in
TEST-NET-1) and removed at the end even on failure; the lab is make_lab's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from conftest import LabHandle
from helpers.packet_path import (
    DEVICE,
    PEER,
    PORT,
    SERVER,
    VPC_HOST,
    connect_and_see,
    peer_counters,
)

from gatepeer.lab.network import netns

pytestmark = pytest.mark.netns

OUTSIDE_ROUTER = "192.0.2.1"  # the lab's VPC router, on the new link
OUTSIDE_HOST = "192.0.2.10"
# A connection attempt that reports instead of raising: "connected ..." or "no reply ...".
TRY_CONNECT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3,
                                 source_address=(sys.argv[3], 0))
except OSError as exc:
    print("no reply:", type(exc).__name__)
else:
    print("connected", s.recv(200).decode())
"""


@pytest.fixture
def outside(make_lab) -> Iterator[tuple[LabHandle, str]]:
    """A lab in route mode with redirection to the peer, and an outside host behind its VPC
    router: (lab, the outside host's namespace)."""
    lab = make_lab()
    ns = f"gpout{uuid.uuid4().hex[:6]}"
    fabric = lab.ns("fabric")
    netns.add_netns(ns)
    try:
        netns.ip(fabric, "link", "add", "to-out", "type", "veth", "peer", "name", "eth0",
                 "netns", ns)  # fmt: skip
        netns.ip(fabric, "addr", "add", f"{OUTSIDE_ROUTER}/24", "dev", "to-out")
        netns.ip(fabric, "link", "set", "to-out", "up")
        netns.ip(ns, "link", "set", "lo", "up")
        netns.ip(ns, "addr", "add", f"{OUTSIDE_HOST}/24", "dev", "eth0")
        netns.ip(ns, "link", "set", "eth0", "up")
        netns.ip(ns, "route", "add", "default", "via", OUTSIDE_ROUTER)
        lab.set_config("packet_path", "mode", json.dumps("route"))
        yield lab, ns
    finally:
        netns.delete_netns(ns)  # takes the veth pair with it


def apply(lab: LabHandle, outside_vpc: str) -> None:
    lab.set_config("packet_path", "outside_vpc", json.dumps(outside_vpc))
    proc = lab.gatepeer("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lab.set_redirection("peer")


def outside_sees(lab: LabHandle, ns: str) -> tuple[str, str]:
    """A TCP connection from the device to the outside host: the address the outside host
    accepted, and what the device got back."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, OUTSIDE_HOST, str(PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = lab.run(
            "dev", sys.executable, "-c", TRY_CONNECT, OUTSIDE_HOST, str(PORT), DEVICE,
            check=False, timeout=15,
        )  # fmt: skip
        line = server.stdout.readline().split()  # the accept happens before the answer is lost
        assert line[:1] == ["peer"], (line, client.stdout, client.stderr)
        return line[1], client.stdout.strip()
    finally:
        if server.poll() is None:
            server.terminate()  # ours, by its Popen handle
            server.wait(timeout=5)


def tracked_flows(lab: LabHandle) -> str:
    return str(lab.run("peer", "conntrack", "-L", "-n", check=False).stdout)


def test_route_mode_masquerades_only_what_leaves_the_vpc(
    outside: tuple[LabHandle, str],
) -> None:
    lab, ns = outside
    apply(lab, "masquerade")
    status = json.loads(lab.gatepeer("status", "--json").stdout)
    # Not EC2: the VPC is the underlay's connected prefix, and status says so.
    assert status["packet_path"]["vpc_cidrs"] == "198.18.0.0/24 (from underlay)"
    before = peer_counters(lab)["masqueraded_flows"]

    seen, reply = outside_sees(lab, ns)
    assert seen == PEER, f"the outside host saw {seen}, not the gate peer"
    assert reply == f"connected seen {PEER}", "the answer did not reach the device"
    assert peer_counters(lab)["masqueraded_flows"] == before + 1

    # The VPC sees the device's own address, both ways, and masquerades nothing more.
    seen, reply = connect_and_see(lab, "vpc", VPC_HOST, "dev", DEVICE)
    assert seen == DEVICE and reply == f"seen {DEVICE}", "device -> VPC"
    seen, reply = connect_and_see(lab, "dev", DEVICE, "vpc", VPC_HOST)
    assert seen == VPC_HOST and reply == f"seen {VPC_HOST}", "VPC -> device"
    assert peer_counters(lab)["masqueraded_flows"] == before + 1

    # conntrack engaged for the outside flow only: device <-> VPC traffic is never tracked.
    flows = tracked_flows(lab)
    assert f"dst={OUTSIDE_HOST}" in flows, flows
    assert VPC_HOST not in flows, flows


# In the outside host: the source address of every TCP opening to PORT (the handshake never
# completes without a return route, so the server's accept cannot tell).
WATCH = f"""
table ip watch {{
    set seen {{
        type ipv4_addr
        flags dynamic
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        tcp dport {PORT} tcp flags syn add @seen {{ ip saddr }}
    }}
}}
"""


def test_route_outside_vpc_keeps_device_addresses_and_needs_a_return_route(
    outside: tuple[LabHandle, str],
) -> None:
    lab, ns = outside
    apply(lab, "route")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=WATCH, text=True,
                   check=True)  # fmt: skip
    client = lab.run(
        "dev", sys.executable, "-c", TRY_CONNECT, OUTSIDE_HOST, str(PORT), DEVICE,
        check=False, timeout=15,
    )  # fmt: skip
    seen = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "set", "ip", "watch", "seen"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    elements = json.loads(seen)["nftables"][1]["set"].get("elem", [])
    # The device's own address reaches the outside host; the VPC router has no route back for
    # the device subnet (a NAT gateway's subnet without one), so no answer comes back.
    assert elements == [DEVICE], seen
    assert client.stdout.startswith("no reply"), client.stdout + client.stderr
    assert peer_counters(lab)["masqueraded_flows"] == 0
