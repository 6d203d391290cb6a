"""Issue 9, "Must show" 3: hostile packets against the gate peer, in the lab.

One lab (route mode, `gatepeer apply` in the peer namespace) for the whole module. The packets
are crafted with scapy in this process and sent from the lab's own namespaces through raw
sockets opened there (`netns.call_in_netns`), so no scapy process starts per class. Each class
sends a batch and then checks:

- nothing arrived where it must not: a UDP socket on the VPC host, a UDP socket and a TCP
  listener on the peer (on 0.0.0.0, standing for sshd and the metrics port), the peer's TCP
  input segments, and vxlan0's received packets where the class must not be decapsulated;
- the nftables counter of the class moved by exactly the number of packets sent;
- the metric for that class (the packet path collector over the peer's live counters) moved
  by the same number.

Every class has a control that must get through (the same packet made well formed, or sent
from a VPG endpoint), so "nothing arrived" cannot pass because the packets were wrong for
some other reason. Addresses are the lab's (198.18.0.0/15 and TEST-NET); every socket is
closed and the lab is removed at the end, even on failure.
"""

from __future__ import annotations

import itertools
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import LabHandle, new_prefix

from gatepeer.kernel.nftables import counters
from gatepeer.lab.network import netns

pytestmark = pytest.mark.netns

PEER = "198.18.0.10"  # the gate peer's VPC address (local address of the tunnel)
VPC_HOST = "198.18.0.20"
FABRIC = "198.18.0.1"  # the VPC router: on the underlay, but not a VPG endpoint
EVIL = "198.18.0.66"  # a host of the test's own on the VPC's segment, no netfilter at all
VPG1 = "198.18.1.11"  # a VPG endpoint's outer address
DEVICE = "198.19.128.1"
OUTSIDE = "203.0.113.5"  # an inner source outside the device subnet (198.19.0.0/16)
VNI = 10
OTHER_VNI = 4711
VXLAN_PORT = 4789
VPC_PORT = 9001  # the VPC host's UDP socket
SERVICE_UDP = 8053  # the peer's own services, bound to 0.0.0.0
SERVICE_TCP = 8022
N = 20  # packets per class
# IP identifications: each datagram its own, or the kernel would reassemble fragments of
# different datagrams (same addresses, protocol and id) as one.
_IDS = itertools.count(1000)


# ---- the lab, once for the module ------------------------------------------------------------


@dataclass
class Hostile:
    lab: LabHandle
    peer_mac: str  # vxlan0's: inner frames must be addressed to it to be routed at all
    inner: str  # the peer's inner address
    vpc_udp: socket.socket
    peer_udp: socket.socket
    peer_tcp: socket.socket

    @property
    def peer_ns(self) -> str:
        return self.lab.ns("peer")


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    from gatepeer.lab import control

    lab = LabHandle(prefix=new_prefix())
    opened: list[socket.socket] = []
    try:
        result = lab.cli("up")
        lab.remember_emulator()
        assert result.exit_code == 0, result.output
        lab.set_config("packet_path", "mode", '"route"')
        add_evil_host(lab)
        proc = lab.gatepeer("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr

        def udp_socket(port: int) -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", port))
            s.setblocking(False)
            return s

        def tcp_listener(port: int) -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(8)
            s.setblocking(False)
            return s

        vpc_udp = netns.call_in_netns(lab.ns("vpc"), lambda: udp_socket(VPC_PORT))
        opened.append(vpc_udp)
        peer_udp = netns.call_in_netns(lab.ns("peer"), lambda: udp_socket(SERVICE_UDP))
        opened.append(peer_udp)
        peer_tcp = netns.call_in_netns(lab.ns("peer"), lambda: tcp_listener(SERVICE_TCP))
        opened.append(peer_tcp)
        link = netns.ip_json(lab.ns("peer"), "-4", "addr", "show", "dev", "vxlan0")[0]
        yield Hostile(
            lab=lab,
            peer_mac=str(netns.ip_json(lab.ns("peer"), "link", "show", "vxlan0")[0]["address"]),
            inner=str(link["addr_info"][0]["local"]),
            vpc_udp=vpc_udp,
            peer_udp=peer_udp,
            peer_tcp=peer_tcp,
        )
    finally:
        for s in opened:
            s.close()
        lab.remember_emulator()
        control.down(lab.prefix)
        assert not lab.leftovers(), f"lab teardown left things behind: {lab.leftovers()}"


def add_evil_host(lab: LabHandle) -> None:
    """A namespace on the VPC's segment (the fabric's bridge) with no netfilter: the lab's
    namespaces track connections, and a namespace that tracks reassembles its own outgoing
    fragments before they leave, so an incomplete train sent from there never leaves at all.
    Named `{prefix}-evil`, so removing the lab removes it too."""
    evil, fabric = lab.ns("evil"), lab.ns("fabric")
    subprocess.run(["ip", "netns", "add", evil], check=True)
    netns.ip(fabric, "link", "add", "to-evil", "type", "veth", "peer", "name", "eth0",
             "netns", evil)  # fmt: skip
    netns.ip(fabric, "link", "set", "to-evil", "master", "vpcbr", "up")
    netns.ip(evil, "addr", "add", f"{EVIL}/24", "dev", "eth0")
    netns.ip(evil, "link", "set", "eth0", "up")
    netns.ip(evil, "route", "add", "default", "via", FABRIC)


# ---- crafting (scapy, imported once) and sending ---------------------------------------------


def scapy() -> Any:
    import scapy.all  # noqa: F401  (registers the layer bindings, VXLAN's on 4789 included)
    from scapy import layers

    return layers


def vxlan(h: Hostile, inner: Any, *, vni: int = VNI, flags: int = 0x08) -> Any:
    """A VXLAN payload: the header, then an Ethernet frame to the peer's vxlan0."""
    L = scapy()
    return (
        L.vxlan.VXLAN(vni=vni, flags=flags)
        / L.l2.Ether(src="02:00:00:00:66:66", dst=h.peer_mac)
        / inner
    )


def inner_udp(src: str, dst: str, dport: int) -> Any:
    L = scapy()
    return (
        L.inet.IP(src=src, dst=dst, id=next(_IDS))
        / L.inet.UDP(sport=40000, dport=dport)
        / (b"h" * 32)
    )


def inner_syn(src: str, dst: str, dport: int) -> Any:
    L = scapy()
    return L.inet.IP(src=src, dst=dst) / L.inet.TCP(sport=40001, dport=dport, flags="S")


def outer(src: str, payload: Any) -> Any:
    """The whole outer IPv4 packet, from `src` to the peer's tunnel port."""
    L = scapy()
    udp = L.inet.UDP(sport=50000, dport=VXLAN_PORT)
    return L.inet.IP(src=src, dst=PEER, id=next(_IDS)) / udp / payload


def outer_raw(src: str, payload: bytes) -> Any:
    """An outer packet carrying `payload` bytes as is (too short to parse as VXLAN)."""
    L = scapy()
    return L.inet.IP(src=src, dst=PEER) / L.inet.UDP(sport=50000, dport=VXLAN_PORT) / payload


def fragments(packet: Any, size: int = 256) -> list[Any]:
    L = scapy()
    return list(L.inet.fragment(L.inet.IP(bytes(packet)), fragsize=size))


def send(h: Hostile, role: str, packets: list[Any]) -> None:
    """Send whole IPv4 packets (header included) from a raw socket opened in `role`'s
    namespace: the kernel routes them there as that namespace's own traffic."""
    wire = [bytes(p) for p in packets]

    def emit() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
            for data in wire:
                s.sendto(data, (socket.inet_ntoa(data[16:20]), 0))

    netns.call_in_netns(h.lab.ns(role), emit)


# ---- what arrived, what was counted ----------------------------------------------------------


def drain(s: socket.socket) -> int:
    """How many datagrams wait on `s` (and take them), or connections for a listener."""
    got = 0
    while select.select([s], [], [], 0)[0]:
        if s.type == socket.SOCK_STREAM:
            s.accept()[0].close()
        else:
            s.recv(65535)
        got += 1
    return got


def tcp_in_segments(h: Hostile) -> int:
    """TCP segments the peer's stack received (Tcp InSegs): a SYN that reached a listener,
    or a closed port, is one; nothing else in the peer namespace speaks TCP here."""

    def read() -> int:
        lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
        tcp = [ln.split() for ln in lines if ln.startswith("Tcp:")]
        return int(tcp[1][tcp[0].index("InSegs")])

    return netns.call_in_netns(h.peer_ns, read)


def vxlan0_rx(h: Hostile) -> int:
    return netns.link_stats(h.peer_ns, "vxlan0")["rx_packets"]


def nft_packets(h: Hostile) -> dict[str, int]:
    return {name: p for name, (p, _b) in counters(netns=h.peer_ns).items()}


def metric_packets(h: Hostile) -> dict[str, float]:
    """The packet path collector's samples over the peer's live counters, by label value."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import CollectorRegistry

    from gatepeer.metrics.collectors import PacketPathCollector
    from gatepeer.state_document import StateSummary

    class Agent:
        def summary(self) -> StateSummary:
            return StateSummary()

    class PeerCounters:
        def counters(self) -> Mapping[str, tuple[int, int]]:
            return counters(netns=h.peer_ns)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PacketPathCollector(Agent(), PeerCounters()))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (
                "gatepeer_packet_path_dropped_packets_total",
                "gatepeer_packet_path_counted_packets_total",
            ):
                label = sample.labels.get("reason") or sample.labels["class"]
                found[label] = sample.value
    return found


@dataclass
class Snapshot:
    nft: dict[str, int]
    metric: dict[str, float]
    rx: int
    tcp_in: int


def snapshot(h: Hostile) -> Snapshot:
    return Snapshot(nft_packets(h), metric_packets(h), vxlan0_rx(h), tcp_in_segments(h))


def wait_counter(h: Hostile, name: str, at_least: int, timeout: float = 5) -> int:
    deadline = time.monotonic() + timeout
    while True:
        got = nft_packets(h)[name]
        if got >= at_least or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def settle() -> None:
    # Packets sent through veths are processed at once; a short pause lets the last of a
    # batch reach a socket before the "nothing arrived" checks look.
    time.sleep(0.2)


def arrived(h: Hostile) -> dict[str, int]:
    return {
        "vpc_host": drain(h.vpc_udp),
        "peer_udp_service": drain(h.peer_udp),
        "peer_tcp_service": drain(h.peer_tcp),
    }


NOTHING = {"vpc_host": 0, "peer_udp_service": 0, "peer_tcp_service": 0}


def assert_class(
    h: Hostile,
    before: Snapshot,
    counter: str,
    label: str,
    sent: int,
    *,
    decapsulated: bool = False,
) -> Snapshot:
    """The counter and its metric moved by exactly `sent`; nothing reached a socket or the
    peer's TCP; vxlan0 decapsulated nothing unless the class lives inside the tunnel."""
    got = wait_counter(h, counter, before.nft[counter] + sent)
    settle()
    after = snapshot(h)
    assert got - before.nft[counter] == sent, f"{counter}: {before.nft} -> {after.nft}"
    assert after.nft[counter] - before.nft[counter] == sent, "counted more than was sent"
    assert after.metric[label] - before.metric[label] == sent, (
        f"metric {label}: {before.metric} -> {after.metric}"
    )
    assert arrived(h) == NOTHING, f"a {label} packet got through"
    assert after.tcp_in == before.tcp_in, "a crafted TCP segment reached the peer's stack"
    if not decapsulated:
        assert after.rx == before.rx, f"a {label} packet was decapsulated by vxlan0"
    return after


def control(h: Hostile, role: str, packets: list[Any], where: str, expect: int) -> None:
    """The well-formed twin must arrive: proves the hostile batch failed for its flaw only."""
    arrived(h)  # start from empty sockets
    send(h, role, packets)
    deadline = time.monotonic() + 5
    total = 0
    while total < expect and time.monotonic() < deadline:
        total += arrived(h)[where]
        time.sleep(0.02)
    assert total == expect, f"control: {total} of {expect} reached {where}"


def to_vpc(src: str = DEVICE) -> Any:
    return inner_udp(src, VPC_HOST, VPC_PORT)


# ---- the classes -----------------------------------------------------------------------------


def test_control_well_formed_vxlan_from_an_endpoint_reaches_the_vpc_untracked(
    hostile: Hostile,
) -> None:
    h = hostile
    before = snapshot(h)
    control(h, "vpg1", [outer(VPG1, vxlan(h, to_vpc()))] * N, "vpc_host", N)
    assert nft_packets(h)["vxlan_accepted"] - before.nft["vxlan_accepted"] >= N
    # Route mode leaves forwarded device traffic out of connection tracking.
    if shutil.which("conntrack"):
        listed = h.lab.run("peer", "conntrack", "-L", "-p", "udp", "--dport", str(VPC_PORT))
        assert listed.stdout.strip() == "", f"route mode tracked a forwarded flow: {listed}"


def test_vxlan_from_a_non_endpoint(hostile: Hostile) -> None:
    h = hostile
    before = snapshot(h)
    send(h, "fabric", [outer(FABRIC, vxlan(h, to_vpc()))] * N)
    assert_class(h, before, "vxlan_foreign_dropped", "vxlan_foreign_source", N)


def test_wrong_vni_is_counted_and_left_to_its_owner(hostile: Hostile) -> None:
    h = hostile
    before = snapshot(h)
    send(h, "vpg1", [outer(VPG1, vxlan(h, to_vpc(), vni=VNI + 1))] * N)
    after = assert_class(h, before, "vxlan_other_vni", "vxlan_other_vni", N)
    assert after.nft["vxlan_accepted"] == before.nft["vxlan_accepted"]

    # Another VXLAN user on the same port (Docker overlay, flannel) still gets its packets:
    # counted, never dropped.
    ns = h.peer_ns
    netns.ip(ns, "link", "add", "vxother", "type", "vxlan", "id", str(OTHER_VNI),
             "dstport", str(VXLAN_PORT), "dev", "eth0")  # fmt: skip
    try:
        netns.ip(ns, "link", "set", "vxother", "up")
        rx = netns.link_stats(ns, "vxother")["rx_packets"]
        before = snapshot(h)
        send(h, "fabric", [outer(FABRIC, vxlan(h, to_vpc(), vni=OTHER_VNI))] * N)
        assert_class(h, before, "vxlan_other_vni", "vxlan_other_vni", N)
        assert netns.link_stats(ns, "vxother")["rx_packets"] - rx == N
    finally:
        netns.ip(ns, "link", "del", "vxother", check=False)


def test_truncated_and_malformed_vxlan_headers(hostile: Hostile) -> None:
    h = hostile
    L = scapy()
    good = bytes(vxlan(h, to_vpc()))
    header = bytes(L.vxlan.VXLAN(vni=VNI, flags=0x08))
    batch = [
        outer_raw(VPG1, b""),  # no VXLAN header at all
        outer_raw(VPG1, header[:4]),  # half a header
        outer_raw(VPG1, header),  # a header and no inner frame
        outer_raw(VPG1, header + good[8:18]),  # a header and a cut inner Ethernet header
        outer(VPG1, vxlan(h, to_vpc(), flags=0x00)),  # the I flag unset
        outer(VPG1, vxlan(h, to_vpc(), flags=0x0C)),  # a reserved flag set
    ]
    before = snapshot(h)
    send(h, "vpg1", batch * (N // len(batch) + 1))
    sent = len(batch) * (N // len(batch) + 1)
    after = assert_class(h, before, "vxlan_malformed_dropped", "vxlan_malformed", sent)
    assert after.nft["vxlan_accepted"] == before.nft["vxlan_accepted"]


def test_inner_sources_outside_the_device_subnet(hostile: Hostile) -> None:
    h = hostile
    batch = [
        outer(VPG1, vxlan(h, to_vpc(OUTSIDE))),
        outer(VPG1, vxlan(h, inner_udp(OUTSIDE, h.inner, SERVICE_UDP))),
        outer(VPG1, vxlan(h, inner_syn(VPC_HOST, PEER, SERVICE_TCP))),  # a VPC address
    ]
    before = snapshot(h)
    send(h, "vpg1", batch * (N // len(batch) + 1))
    sent = len(batch) * (N // len(batch) + 1)
    # Accepted as VXLAN (a real endpoint) and decapsulated, then dropped on the inner side.
    after = assert_class(
        h, before, "spoofed_source_dropped", "spoofed_inner_source", sent, decapsulated=True
    )
    assert after.nft["host_service_dropped"] == before.nft["host_service_dropped"]


def test_device_packets_to_the_peers_own_services(hostile: Hostile) -> None:
    h = hostile

    # The control: the services answer on the VPC side.
    def from_vpc() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", (PEER, SERVICE_UDP))
        socket.create_connection((PEER, SERVICE_TCP), timeout=5).close()

    netns.call_in_netns(h.lab.ns("vpc"), from_vpc)
    deadline = time.monotonic() + 5
    seen = {"peer_udp_service": 0, "peer_tcp_service": 0}
    while sum(seen.values()) < 2 and time.monotonic() < deadline:
        got = arrived(h)
        for k in seen:
            seen[k] += got[k]
        time.sleep(0.02)
    assert seen == {"peer_udp_service": 1, "peer_tcp_service": 1}, seen

    batch = [
        outer(VPG1, vxlan(h, inner_udp(DEVICE, address, SERVICE_UDP)))
        for address in (h.inner, PEER)
    ] + [
        outer(VPG1, vxlan(h, inner_syn(DEVICE, address, SERVICE_TCP)))
        for address in (h.inner, PEER)
    ]
    before = snapshot(h)
    send(h, "vpg1", batch * (N // len(batch)))
    sent = len(batch) * (N // len(batch))
    assert_class(
        h, before, "host_service_dropped", "host_service_not_allowed", sent, decapsulated=True
    )


def test_outer_fragments_are_counted_and_judged_whole(hostile: Hostile) -> None:
    h = hostile
    # A VXLAN packet big enough to be cut in two by a path with a small MTU.
    big = inner_udp(DEVICE, VPC_HOST, VPC_PORT) / (b"f" * 300)

    # The control: an endpoint's fragmented VXLAN is reassembled and delivered (RFC 7348 lets
    # a VTEP drop fragments; dropping them would break a path with a smaller MTU).
    before = snapshot(h)
    pieces = fragments(outer(VPG1, vxlan(h, big)))
    assert len(pieces) == 2
    control(h, "vpg1", pieces * N, "vpc_host", N)
    counted = wait_counter(h, "outer_fragments", before.nft["outer_fragments"] + 2 * N)
    assert counted - before.nft["outer_fragments"] == 2 * N
    assert metric_packets(h)["outer_fragment"] - before.metric["outer_fragment"] == 2 * N

    # From a non-endpoint: every fragment counted, the reassembled datagram dropped as foreign.
    before = snapshot(h)
    send(h, "evil", fragments(outer(EVIL, vxlan(h, big))) * N)
    after = assert_class(h, before, "vxlan_foreign_dropped", "vxlan_foreign_source", N)
    assert after.nft["outer_fragments"] - before.nft["outer_fragments"] == 2 * N

    # Never completed (first pieces only, or last pieces only), even with an endpoint's source:
    # counted, held by the kernel until its reassembly timer expires, delivered to nothing.
    trains = [fragments(outer(VPG1, vxlan(h, big))) for _ in range(N)]
    before = snapshot(h)
    send(h, "evil", [t[0] for t in trains[: N // 2]] + [t[1] for t in trains[N // 2 :]])
    after = assert_class(h, before, "outer_fragments", "outer_fragment", N)
    assert after.nft["vxlan_accepted"] == before.nft["vxlan_accepted"]


def test_inner_fragments_cannot_sneak_past_the_host_service_filter(hostile: Hostile) -> None:
    # Tiny inner fragments (the UDP header in one, the rest in others): the kernel reassembles
    # them before the packet path's chains, which then judge the whole datagram.
    h = hostile
    pieces = fragments(inner_udp(DEVICE, h.inner, SERVICE_UDP) / (b"s" * 64), size=16)
    assert len(pieces) > 2
    before = snapshot(h)
    send(h, "vpg1", [outer(VPG1, vxlan(h, piece)) for piece in pieces] * N)
    assert_class(
        h, before, "host_service_dropped", "host_service_not_allowed", N, decapsulated=True
    )


def test_every_class_has_its_own_metric_label(hostile: Hostile) -> None:
    labels = set(metric_packets(hostile))
    assert {
        "vxlan_foreign_source",
        "vxlan_malformed",
        "spoofed_inner_source",
        "host_service_not_allowed",
        "vxlan_other_vni",
        "outer_fragment",
    } <= labels, sorted(labels)
