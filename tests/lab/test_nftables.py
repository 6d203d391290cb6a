"""The nftables I/O: loading, reading back and counting with the real `nft`, in network
namespaces this test creates and always removes; where conntrack's sizing can be set.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from helpers.ruleset_specs import ALLOW, CASES, EP1, EP3, PLAIN, VNI, WITH_FLOWTABLE, spec

from gatepeer import ruleset as rs
from gatepeer.kernel import nftables as nf

ROOT = Path(__file__).resolve().parents[2]

needs_nft = pytest.mark.skipif(
    shutil.which("nft") is None, reason="needs nftables (`nft` not found)"
)


# ---- the kernel ------------------------------------------------------------------------------


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def _new_netns() -> str:
    name = f"gtnf{secrets.token_hex(4)}"
    _run("ip", "netns", "add", name)
    _run("ip", "-n", name, "link", "set", "lo", "up")
    # No IPv6 chatter (router solicitations, MLD) to muddle the counters.
    _run(
        "ip",
        "netns",
        "exec",
        name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    )
    return name


def _stand_ins(ns: str) -> None:
    """vxlan0 and eth0 as a veth pair: what the flowtable names must exist on most kernels."""
    _run("ip", "-n", ns, "link", "add", "vxlan0", "type", "veth", "peer", "name", "eth0")


@pytest.fixture
def ns() -> Iterator[str]:
    name = _new_netns()
    try:
        yield name
    finally:
        _run("ip", "netns", "delete", name, check=False)


@pytest.fixture(scope="module")
def check_ns() -> Iterator[str]:
    name = _new_netns()
    try:
        _stand_ins(name)
        yield name
    finally:
        _run("ip", "netns", "delete", name, check=False)


def _nft(ns: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], input=stdin, capture_output=True, text=True
    )


@pytest.mark.netns
@needs_nft
@pytest.mark.parametrize("name", PLAIN)
def test_check_mode_accepts_transaction(check_ns: str, name: str) -> None:
    proc = _nft(check_ns, "-c", "-f", "-", stdin=rs.transaction(CASES[name]))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.netns
@needs_nft
@pytest.mark.parametrize("name", PLAIN)
def test_kernel_lists_back_what_was_rendered(check_ns: str, name: str) -> None:
    nf.load(CASES[name], check_ns)
    try:
        assert rs.change_needed(CASES[name], nf.current(check_ns)) == "none"
    finally:
        nf.remove(check_ns)


@pytest.mark.netns
@needs_nft
@pytest.mark.parametrize(("tunnel", "underlay"), [("vxlan0", "zeth0"), ("a0", "eth0")])
def test_dispatch_map_lists_back_equal_whatever_the_names(
    check_ns: str, tunnel: str, underlay: str
) -> None:
    # nft lists a verdict map's interface names in the kernel's key order, not the text's
    # ("zeth0" before "vxlan0"): taken for a difference, the table would reload forever.
    want = spec(mode="nat", tunnel=tunnel, underlay=underlay)
    nf.load(want, check_ns)
    try:
        listed = nf.current(check_ns)
        assert listed is not None and "vmap {" in listed
        assert rs.change_needed(want, listed) == "none"
    finally:
        nf.remove(check_ns)


@pytest.mark.netns
@needs_nft
@pytest.mark.parametrize("name", WITH_FLOWTABLE)
def test_check_mode_flowtable_agrees_with_probe(check_ns: str, name: str) -> None:
    proc = _nft(check_ns, "-c", "-f", "-", stdin=rs.transaction(CASES[name]))
    assert (proc.returncode == 0) == nf.flowtable_supported(check_ns), proc.stderr


@pytest.mark.netns
@needs_nft
def test_flowtable_probe_matches_a_real_load(ns: str) -> None:
    _stand_ins(ns)
    _nft(ns, "add", "table", "inet", "other")
    before = _nft(ns, "list", "ruleset").stdout
    supported = nf.flowtable_supported.__wrapped__(ns)  # uncached: run the probe here
    assert _nft(ns, "list", "ruleset").stdout == before, "the probe left something behind"

    base = spec(mode="nat", allowed_destinations=ALLOW)
    nf.load(base, ns)
    with_ft = spec(mode="nat", allowed_destinations=ALLOW, flowtable=True)
    try:
        nf.load(with_ft, ns)
        loaded = True
    except nf.NftError as exc:
        loaded = False
        assert "flowtable" in str(exc)
    assert supported == loaded
    # Either way the table is exactly one of the two: a failed load changes nothing.
    assert nf.is_converged(with_ft if loaded else base, ns)


@pytest.mark.netns
@needs_nft
def test_lifecycle(ns: str) -> None:
    _nft(
        ns,
        "-f",
        "-",
        stdin="table inet other {\n\tchain c {\n\t\tip saddr 192.0.2.1 accept\n\t}\n}\n",
    )
    other = _nft(ns, "list", "table", "inet", "other").stdout
    services = (("tcp", 22), ("tcp", 8080), ("udp", 53))
    want = spec(mode="nat", allowed_destinations=ALLOW, host_services=services)

    assert nf.current(ns) is None
    assert not nf.is_converged(want, ns)
    assert nf.counters(ns) == {}
    nf.remove(ns)  # absent: no error

    nf.load(want, ns)
    text = nf.current(ns)
    assert text is not None
    assert rs.canonical(text) == rs.canonical(rs.comparable(want))
    assert nf.is_converged(want, ns)
    assert rs.loaded_spec_hash(text) == rs.spec_hash(want)

    # Reload: same result, other table untouched, counters carried over when asked.
    nf.load(want, ns, counters={"vxlan_foreign_dropped": (4, 200)})
    assert nf.is_converged(want, ns)
    assert nf.counters(ns)["vxlan_foreign_dropped"] == (4, 200)
    assert set(nf.counters(ns)) == set(rs.COUNTERS)

    # Endpoints change without a reload: the counters stay.
    moved = spec(
        mode="nat", allowed_destinations=ALLOW, host_services=services, endpoints=frozenset({EP3})
    )
    assert rs.change_needed(moved, nf.current(ns)) == "sets"
    nf.update_endpoints(moved.endpoints, ns)
    assert nf.is_converged(moved, ns)
    assert nf.counters(ns)["vxlan_foreign_dropped"] == (4, 200)
    nf.update_endpoints([], ns)
    assert nf.is_converged(
        spec(mode="nat", allowed_destinations=ALLOW, host_services=services, endpoints=frozenset()),
        ns,
    )
    nf.update_endpoints(want.endpoints, ns)
    assert nf.is_converged(want, ns)

    # Hand edits are seen.
    _nft(ns, "add", "element", "inet", "gatepeer", "vpg_endpoints", "{ 198.18.0.99 }")
    assert rs.change_needed(want, nf.current(ns)) == "sets"
    nf.update_endpoints(want.endpoints, ns)
    assert nf.is_converged(want, ns)
    _nft(ns, "flush", "chain", "inet", "gatepeer", "forward")
    assert rs.change_needed(want, nf.current(ns)) == "reload"
    assert any(
        "ct state established,related accept" in ln for ln in rs.describe(want, nf.current(ns))
    )
    _nft(ns, "add", "rule", "inet", "gatepeer", "input", "tcp", "dport", "22", "drop")
    assert not nf.is_converged(want, ns)
    nf.load(want, ns)
    assert nf.is_converged(want, ns)

    nf.remove(ns)
    assert nf.current(ns) is None
    nf.remove(ns)
    assert _nft(ns, "list", "table", "inet", "other").stdout == other
    assert _nft(ns, "list", "tables").stdout.split("\n")[:-1] == ["table inet other"]


@pytest.mark.netns
@needs_nft
def test_errors_carry_nft_stderr(ns: str) -> None:
    with pytest.raises(nf.NftError, match="updating set vpg_endpoints failed: .*No such file"):
        nf.update_endpoints([EP1], ns)
    # A missing namespace is an error, not "no table".
    with pytest.raises(nf.NftError, match="Cannot open network namespace"):
        nf.current(f"{ns}-missing")


@pytest.mark.netns
def test_conntrack_max_is_read_only_outside_the_initial_namespace(ns: str) -> None:
    code = (
        "from gatepeer.kernel import nftables as nf; "
        "from gatepeer.desired_state import conntrack_sysctls; "
        "print('\\n'.join(nf.unwritable(conntrack_sysctls(50000, 8))))"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.splitlines()
    if not Path("/proc/sys/net/netfilter/nf_conntrack_max").exists():
        pytest.skip("needs conntrack (no /proc/sys/net/netfilter/nf_conntrack_max)")
    assert [ln.split(":")[0] for ln in out] == [
        "net/netfilter/nf_conntrack_buckets",
        "net/netfilter/nf_conntrack_max",
    ]
    assert all("read-only in this network namespace" in ln for ln in out)


# ---- real packets ------------------------------------------------------------------------------


def _vxlan_header(vni: int) -> bytes:
    """Eight bytes, as a VXLAN packet starts: the I flag, then the VNI."""
    return bytes([0x08, 0, 0, 0]) + (vni << 8).to_bytes(4, "big")


def _send_udp(ns: str, src: str, dst: str, port: int, payload: bytes = b"gatepeer") -> None:
    code = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.bind((sys.argv[1], 0)); "
        "s.sendto(bytes.fromhex(sys.argv[4]), (sys.argv[2], int(sys.argv[3])))"
    )
    _run("ip", "netns", "exec", ns, sys.executable, "-c", code, src, dst, str(port), payload.hex())


def _wait_for(ns: str, name: str, packets: int) -> tuple[int, int]:
    deadline = time.monotonic() + 3
    while True:
        got = nf.counters(ns)[name]
        if got[0] >= packets or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """The gate peer's namespace and a neighbour's, joined as underlay (eth0) and tunnel
    (vxlan0, a veth stand-in: the checks key on the name, not on decapsulation)."""
    peer, other = _new_netns(), None
    try:
        other = _new_netns()
        for a, b in (("eth0", "up0"), ("vxlan0", "dev0")):
            _run(
                "ip",
                "-n",
                peer,
                "link",
                "add",
                a,
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                other,
            )
            _run("ip", "-n", peer, "link", "set", a, "up")
            _run("ip", "-n", other, "link", "set", b, "up")
        _run("ip", "-n", peer, "addr", "add", "198.18.0.1/24", "dev", "eth0")
        _run("ip", "-n", other, "addr", "add", "198.18.0.2/24", "dev", "up0")
        _run("ip", "-n", other, "addr", "add", f"{EP1}/32", "dev", "up0")
        _run("ip", "-n", peer, "addr", "add", "198.19.0.1/16", "dev", "vxlan0")
        _run("ip", "-n", other, "addr", "add", "198.19.0.2/16", "dev", "dev0")
        _run("ip", "-n", other, "addr", "add", "203.0.113.9/32", "dev", "dev0")
        # No ARP for the spoofed source: the gate peer would not answer one (no route back).
        link = _run("ip", "-n", peer, "-br", "link", "show", "vxlan0").stdout.split()
        _run("ip", "-n", other, "neigh", "replace", "198.19.0.1", "lladdr", link[2], "dev", "dev0")
        yield peer, other
    finally:
        for name in (peer, other):
            if name:
                _run("ip", "netns", "delete", name, check=False)


@pytest.mark.netns
@needs_nft
def test_packets_are_counted(pair: tuple[str, str]) -> None:
    peer, other = pair
    nf.load(spec(endpoints=frozenset({EP1})), peer)

    inner = bytes(14)  # the least a VXLAN packet carries: an inner Ethernet header
    ours = _vxlan_header(VNI) + inner
    _send_udp(other, "198.18.0.2", "198.18.0.1", 4789, ours)  # not a VPG endpoint
    assert _wait_for(peer, "vxlan_foreign_dropped", 1) == (1, 50)  # 20 IP + 8 UDP + 22 payload
    _send_udp(other, str(EP1), "198.18.0.1", 4789, ours)
    assert _wait_for(peer, "vxlan_accepted", 1) == (1, 50)
    assert nf.counters(peer)["vxlan_foreign_dropped"] == (1, 50)
    # From an endpoint but malformed: no room for an inner frame; flags without the I flag.
    _send_udp(other, str(EP1), "198.18.0.1", 4789, _vxlan_header(VNI))
    assert _wait_for(peer, "vxlan_malformed_dropped", 1) == (1, 36)
    _send_udp(other, str(EP1), "198.18.0.1", 4789, bytes(4) + ours[4:])
    assert _wait_for(peer, "vxlan_malformed_dropped", 2) == (2, 86)
    # Another VNI is another VXLAN user's: not ours to accept or drop, only counted.
    _send_udp(other, "198.18.0.2", "198.18.0.1", 4789, _vxlan_header(VNI + 1) + inner)
    assert _wait_for(peer, "vxlan_other_vni", 1) == (1, 50)

    _send_udp(other, "198.19.0.2", "198.19.0.1", 9)  # a device, to a port not listed
    assert _wait_for(peer, "host_service_dropped", 1) == (1, 36)
    _send_udp(other, "203.0.113.9", "198.19.0.1", 9)  # outside the device subnet
    assert _wait_for(peer, "spoofed_source_dropped", 1) == (1, 36)
    assert nf.counters(peer)["host_service_dropped"] == (1, 36)  # spoofed: dropped before
    assert nf.counters(peer)["vxlan_foreign_dropped"] == (1, 50)
    assert nf.counters(peer)["vxlan_accepted"] == (1, 50)


def _vxlan(ns: str, name: str, vni: int, local: str, remote: str, dev: str, inner: str) -> None:
    _run("ip", "-n", ns, "link", "add", name, "type", "vxlan", "id", str(vni), "local", local,
         "remote", remote, "dev", dev, "dstport", "4789")  # fmt: skip
    _run("ip", "-n", ns, "addr", "add", inner, "dev", name)
    _run("ip", "-n", ns, "link", "set", name, "up")


@pytest.mark.netns
@needs_nft
@pytest.mark.parametrize(
    ("peer_dev", "other_dev", "net"),
    [("eth0", "up0", "198.18.0"), ("eth1", "up1", "198.18.5")],
    ids=["underlay-other-address", "other-interface"],
)
def test_another_vxlan_user_on_the_same_port_is_untouched(
    pair: tuple[str, str], peer_dev: str, other_dev: str, net: str
) -> None:
    # Issue 9, hole 2: a second VXLAN (another VNI, port 4789 too: Docker overlay, flannel)
    # on another local address, of the underlay or of another interface.
    peer, other = pair
    if peer_dev != "eth0":
        _run("ip", "-n", peer, "link", "add", peer_dev, "type", "veth", "peer", "name",
             other_dev, "netns", other)  # fmt: skip
        _run("ip", "-n", peer, "link", "set", peer_dev, "up")
        _run("ip", "-n", other, "link", "set", other_dev, "up")
    here, there = f"{net}.5", f"{net}.6"
    _run("ip", "-n", peer, "addr", "add", f"{here}/24", "dev", peer_dev)
    _run("ip", "-n", other, "addr", "add", f"{there}/24", "dev", other_dev)
    _vxlan(peer, "vxlan9", 99, here, there, peer_dev, "192.0.2.1/30")
    _vxlan(other, "vxlan9", 99, there, here, other_dev, "192.0.2.2/30")
    nf.load(spec(endpoints=frozenset({EP1})), peer)

    ping = _run("ip", "netns", "exec", other, "ping", "-n", "-q", "-c", "2", "-i", "0.2",
                "-W", "2", "192.0.2.1", check=False)  # fmt: skip
    assert ping.returncode == 0, f"the other VXLAN is cut off:\n{ping.stdout}{ping.stderr}"
    assert nf.counters(peer)["vxlan_foreign_dropped"] == (0, 0)
    # Our VNI to that address is still ours: the kernel would hand it to our vxlan link.
    _send_udp(other, there, here, 4789, _vxlan_header(VNI))
    assert _wait_for(peer, "vxlan_foreign_dropped", 1) == (1, 36)


# ---- per-device traffic and set updates, through a routing peer ---------------------------------

DEVICE_ADDR, VPC_HOST_ADDR, OUTSIDE = "198.19.0.5", "198.18.0.20", "203.0.113.9"


@pytest.fixture
def router() -> Iterator[tuple[str, str, str]]:
    """A device, the gate peer and a VPC host, each in a namespace: device -- vxlan0 (a veth
    stand-in) -- peer -- eth0 -- VPC host, which also holds an address outside the VPC."""
    made: list[str] = []
    try:
        dev, peer, vpc = (_new_netns() for _ in range(3))
        made += [dev, peer, vpc]
        for here, there, a, b in ((peer, dev, "vxlan0", "dev0"), (peer, vpc, "eth0", "up0")):
            _run("ip", "-n", here, "link", "add", a, "type", "veth", "peer", "name", b,
                 "netns", there)  # fmt: skip
            _run("ip", "-n", here, "link", "set", a, "up")
            _run("ip", "-n", there, "link", "set", b, "up")
        _run("ip", "-n", peer, "addr", "add", "198.19.0.1/16", "dev", "vxlan0")
        _run("ip", "-n", peer, "addr", "add", "198.18.0.1/24", "dev", "eth0")
        _run("ip", "-n", peer, "route", "add", "203.0.113.0/24", "via", VPC_HOST_ADDR)
        _run("ip", "netns", "exec", peer, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        _run("ip", "-n", dev, "addr", "add", f"{DEVICE_ADDR}/16", "dev", "dev0")
        _run("ip", "-n", dev, "route", "add", "default", "via", "198.19.0.1")
        _run("ip", "-n", vpc, "addr", "add", f"{VPC_HOST_ADDR}/24", "dev", "up0")
        _run("ip", "-n", vpc, "addr", "add", f"{OUTSIDE}/32", "dev", "up0")
        _run("ip", "-n", vpc, "route", "add", "198.19.0.0/16", "via", "198.18.0.1")
        yield dev, peer, vpc
    finally:
        for name in made:
            _run("ip", "netns", "delete", name, check=False)


def _ping(ns: str, target: str, count: int, interval: str = "0.05") -> tuple[int, int]:
    """(sent, received) of `ping -c count`; 84-byte IP packets each way."""
    proc = _run("ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", interval,
                "-W", "1", target, check=False)  # fmt: skip
    found = re.search(r"(\d+) packets transmitted, (\d+) received", proc.stdout)
    assert found, proc.stdout + proc.stderr
    return int(found.group(1)), int(found.group(2))


VPC_ONLY = (IPv4Network("198.18.0.0/24"),)


@pytest.mark.netns
@needs_nft
@pytest.mark.parametrize("mode", ["route", "nat"])
def test_device_traffic_counts_known_packets_each_way(
    router: tuple[str, str, str], mode: str
) -> None:
    dev, peer, vpc = router
    assert nf.device_traffic(peer) == {}  # no table yet
    nf.load(spec(mode=mode, device_counters=True, vpc_networks=VPC_ONLY), peer)
    assert nf.device_traffic(peer) == {}  # nobody seen yet
    assert _ping(dev, VPC_HOST_ADDR, 3) == (3, 3)  # 3 requests out, 3 replies back
    expected = 3
    if mode == "route":  # the VPC host can open flows to a device; in nat mode it cannot
        assert _ping(vpc, DEVICE_ADDR, 2) == (2, 2)
        expected += 2
    time.sleep(2.2)
    traffic = nf.device_traffic(peer)
    device = IPv4Address(DEVICE_ADDR)
    assert list(traffic) == [device]
    seen = traffic[device]
    assert (seen.packets_from_device, seen.bytes_from_device) == (expected, expected * 84)
    assert (seen.packets_to_device, seen.bytes_to_device) == (expected, expected * 84)
    # The kernel says whole seconds left of the timeout: 2.2 s ago reads as 2 or 3.
    assert seen.last_packet_age_s is not None and 1 <= seen.last_packet_age_s <= 4
    # The counts are kernel state, not configuration: the table is still converged.
    assert nf.is_converged(spec(mode=mode, device_counters=True, vpc_networks=VPC_ONLY), peer)


@pytest.mark.netns
@needs_nft
def test_allowed_destinations_swap_loses_nothing_for_a_flow_in_both(
    router: tuple[str, str, str],
) -> None:
    dev, peer, _vpc = router
    old = spec(
        closed=True,
        vpc_networks=VPC_ONLY,
        allowed_destinations=(IPv4Network(f"{OUTSIDE}/32"), IPv4Network("203.0.113.64/26")),
    )
    new = replace(
        old, allowed_destinations=(IPv4Network(f"{OUTSIDE}/32"), IPv4Network("192.0.2.0/24"))
    )
    nf.load(old, peer)
    assert _ping(dev, OUTSIDE, 2) == (2, 2)
    # A stream to the address in both sets (closed: every packet is judged by the set, not
    # only a flow's first) while the elements are swapped back and forth.
    stream = subprocess.Popen(
        ["ip", "netns", "exec", dev, "ping", "-n", "-q", "-c", "1500", "-i", "0.002", "-W", "1",
         OUTSIDE],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    swaps = 0
    try:
        while stream.poll() is None and swaps < 200:
            target = new if swaps % 2 == 0 else old
            assert rs.change_needed(target, nf.current(peer)) == "sets"
            nf.update_sets(target, peer)
            swaps += 1
        out, _ = stream.communicate(timeout=30)
    finally:
        if stream.poll() is None:
            stream.kill()  # ours, by its handle
            stream.wait()
    found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert found, out
    assert swaps >= 10, f"only {swaps} swaps during the stream"
    assert (int(found.group(1)), int(found.group(2))) == (1500, 1500), out
    assert nf.counters(peer)["closed_dropped"] == (0, 0)
    # The test can fail: with the address in neither set, the same stream is dropped, counted.
    gone = replace(old, allowed_destinations=(IPv4Network("192.0.2.0/24"),))
    nf.update_sets(gone, peer)
    assert nf.is_converged(gone, peer)
    assert _ping(dev, OUTSIDE, 3, "0.2") == (3, 0)
    assert nf.counters(peer)["closed_dropped"] == (3, 252)
    assert _ping(dev, VPC_HOST_ADDR, 1) == (1, 1)  # the VPC stays open


# ---- conntrack's events with conntrackd's sync -------------------------------------------------


_SERVER = (
    "import socket, sys; s = socket.socket(); "
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 7009)); "
    "s.listen(); print('ready', flush=True); c, _ = s.accept(); c.sendall(c.recv(64)); "
    "c.close(); s.close()"
)
_CLIENT = (
    "import socket, sys; c = socket.create_connection((sys.argv[1], 7009), timeout=5); "
    "c.sendall(b'gatepeer'); assert c.recv(64) == b'gatepeer'; c.close()"
)


def _flow_events(dev: str, peer: str, vpc: str) -> list[str]:
    """The kinds of conntrack event the peer raised for one TCP connection device -> VPC host,
    its echo and close, then its entry deleted: e.g. ["NEW", "UPDATE/ASSURED", "DESTROY"]."""
    watch = subprocess.Popen(
        ["ip", "netns", "exec", peer, "conntrack", "-E", "-p", "tcp", "--orig-port-dst", "7009"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    server = subprocess.Popen(
        ["ip", "netns", "exec", vpc, sys.executable, "-c", _SERVER, VPC_HOST_ADDR],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # conntrack -E subscribed
        _run("ip", "netns", "exec", dev, sys.executable, "-c", _CLIENT, VPC_HOST_ADDR)
        server.wait(10)
        time.sleep(0.2)  # FIN_WAIT... TIME_WAIT reached: every state change raised
        _run("ip", "netns", "exec", peer, "conntrack", "-D", "-p", "tcp", "--orig-port-dst",
             "7009")  # fmt: skip
        time.sleep(0.3)
    finally:
        for proc in (server, watch):
            if proc.poll() is None:
                proc.terminate()  # its own pid: `ip netns exec` execs
                proc.wait(5)
    out = watch.stdout.read() if watch.stdout else ""
    kinds = re.finditer(r"^\s*\[(NEW|UPDATE|DESTROY)\](.*)$", out, re.M)
    # An UPDATE of a flow that is assured by then says so (the first such is it becoming so).
    return [k + ("/ASSURED" if k == "UPDATE" and "[ASSURED]" in rest else "") for k, rest in
            (m.groups() for m in kinds)]  # fmt: skip


@pytest.mark.netns
@needs_nft
@pytest.mark.skipif(shutil.which("conntrack") is None, reason="needs conntrack (conntrack-tools)")
def test_sync_events_leave_a_flow_its_start_establishment_and_end(
    router: tuple[str, str, str],
) -> None:
    """conntrackd pays per event: with `sync_events` the peer raises NEW, one UPDATE (the
    flow becoming assured, which carries its ESTABLISHED state and NAT to the other peer) and
    DESTROY for a TCP connection, where without it every state change is an UPDATE too."""
    dev, peer, vpc = router
    nat = spec(mode="nat", endpoints=frozenset({EP1}))
    nf.load(nat, peer)
    every = _flow_events(dev, peer, vpc)
    nf.load(replace(nat, sync_events=True), peer)
    limited = _flow_events(dev, peer, vpc)
    updates = [k for k in every if k.startswith("UPDATE")]
    assert every[0] == "NEW" and every[-1] == "DESTROY" and len(updates) >= 3, every
    assert limited == ["NEW", "UPDATE/ASSURED", "DESTROY"], limited
