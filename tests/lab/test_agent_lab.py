"""The agent end to end in the lab: `gatepeer apply`, `run`, `down` in the gate peer namespace,
against the SORACOM API emulator, with real traffic from the VPC host to the devices.

Every test builds its own lab (make_lab) and removes it, even on failure; a daemon a test
starts (agent_daemon) is stopped by its pid before its lab goes. Timing assertions are loose
deadlines ("repaired before the next interval could have run"), never speed claims: the
numbers live in bench/README.md.
"""

from __future__ import annotations

import ipaddress
import json
import re
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import AgentDaemon, LabHandle
from helpers.lab_checks import (
    ZERO_MAC,
    api_calls,
    customer_peers,
    flood_entries,
    inner_address,
    vxlan,
    wait_for,
)

from gatepeer.lab.network import netns

pytestmark = pytest.mark.netns

PEER_OUTER = "198.18.0.10"
# A VPG endpoint address the API starts announcing in place of an old one (nothing answers it).
NEW_ENDPOINT = "198.18.1.99"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def lab(make_lab: Callable[..., LabHandle]) -> LabHandle:
    """A default lab whose VPG sends the devices' outbound traffic (and so their replies to the
    VPC host) to the gate peer: Junction redirection to the inner address the emulator gives the
    first gate peer, set through the API before the agent registers, until the agent manages
    it. Without it the replies take the VPG's own NATed way out and never come back."""
    h = make_lab()
    h.set_redirection(first_peer_inner(h))
    h.control("reset_counts")  # the tests count the agent's own API calls
    return h


def first_peer_inner(h: LabHandle) -> str:
    """The inner address the emulator gives the first gate peer: the first one after the VPG
    endpoints' in the device subnet."""
    return str(h.layout.device_subnet.network_address + len(h.layout.endpoints) + 1)


def ping(h: LabHandle, role: str, target: Any, count: int = 1) -> bool:
    proc = h.run(
        role, "ping", "-n", "-q", "-c", str(count), "-i", "0.1", "-W", "2", str(target), check=False
    )
    return proc.returncode == 0


class PingStream:
    """A continuous ping from a lab namespace, started now; `wait()` gives (sent, received)."""

    def __init__(self, h: LabHandle, role: str, target: Any, interval: float, count: int) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", h.ns(role), "ping", "-n", "-q"]
            + ["-i", f"{interval:g}", "-c", str(count), "-W", "1", str(target)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait(self, timeout: float = 60) -> tuple[int, int]:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()  # ours, by its Popen handle
                self.proc.wait()
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert match, f"no ping summary:\n{out}"
        return int(match.group(1)), int(match.group(2))


def nft_table(h: LabHandle) -> str | None:
    """The agent's nftables table in the peer namespace, as `nft list` prints it; None if absent."""
    proc = h.run("peer", "nft", "list", "table", "inet", "gatepeer", check=False)
    return proc.stdout if proc.returncode == 0 else None


def nft_endpoints(h: LabHandle) -> set[str]:
    """Addresses in the table's vpg_endpoints set (VXLAN is accepted only from these)."""
    text = nft_table(h) or ""
    match = re.search(r"set vpg_endpoints \{[^}]*?elements = \{([^}]*)\}", text, re.S)
    return {a.strip() for a in match.group(1).split(",")} if match else set()


def sysctl(h: LabHandle, dotted: str) -> str:
    return h.run("peer", "sysctl", "-n", dotted).stdout.strip()


def converged(h: LabHandle) -> bool:
    """vxlan0 up with its inner address and one flood entry per VPG endpoint."""
    details = vxlan(h)
    if details is None or "UP" not in details["flags"]:
        return False
    endpoints = {str(ep.outer) for ep in h.layout.endpoints}
    return flood_entries(h) == endpoints and inner_address(h) is not None


def assert_nothing_changed(h: LabHandle) -> None:
    """The gate peer is as `lab up` left it: no tunnel, no registration, kernel untouched."""
    assert vxlan(h) is None, "vxlan0 was created"
    assert customer_peers(h) == [], "the peer was registered"
    assert api_calls(h, "registerGatePeer") == 0
    assert sysctl(h, "net.ipv4.ip_forward") == "0"
    assert nft_table(h) is None, "the nftables table was loaded"
    assert h.agent_state() is None, "state.json was written"


# ----------------------------------------------------------------------------- apply


def test_one_apply_from_nothing_connects_the_vpc_to_the_devices(lab: LabHandle) -> None:
    layout = lab.layout
    assert vxlan(lab) is None and customer_peers(lab) == []
    assert not ping(lab, "vpc", layout.devices[0]), "devices reachable before the agent ran"

    first = lab.gatepeer("apply")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "converged:" in first.stdout

    details = vxlan(lab)
    assert details is not None
    data = details["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["local"]) == (10, 4789, PEER_OUTER)
    assert data["port_range"] == {"low": 4789, "high": 4789}
    assert flood_entries(lab) == {str(ep.outer) for ep in layout.endpoints}
    assert sysctl(lab, "net.ipv4.ip_forward") == "1"
    # VXLAN is accepted from the VPG's endpoints only.
    assert nft_endpoints(lab) == {str(ep.outer) for ep in layout.endpoints}

    # Exactly one registration for this instance, and it points the VPG endpoints at us.
    peers = customer_peers(lab)
    assert [p["outer_ip"] for p in peers] == [PEER_OUTER]
    inner = inner_address(lab)
    assert inner is not None and str(inner.ip) == peers[0]["inner_ip"]
    assert inner.network == layout.device_subnet
    assert api_calls(lab, "registerGatePeer") == 1
    for ep in layout.endpoints:
        assert netns.bridge_json(ep.ns, "fdb", "show", "dev", "vxlan0")[0]["dst"] == PEER_OUTER

    before = netns.link_stats(lab.ns("peer"), "vxlan0")
    for device in layout.devices:
        assert ping(lab, "vpc", device), f"VPC host cannot reach device {device}"
    after = netns.link_stats(lab.ns("peer"), "vxlan0")
    # Requests encapsulated out, replies decapsulated in: the traffic used the tunnel.
    assert after["tx_packets"] - before["tx_packets"] >= len(layout.devices)
    assert after["rx_packets"] - before["rx_packets"] >= len(layout.devices)
    for ep in layout.endpoints:
        assert ping(lab, "peer", ep.inner), f"gate peer cannot reach endpoint {ep.inner}"

    again = lab.gatepeer("apply")
    assert again.returncode == 0, again.stdout + again.stderr
    assert api_calls(lab, "registerGatePeer") == 1, "a second apply registered again"
    assert customer_peers(lab) == peers


def test_second_apply_changes_nothing_and_loses_no_packet(lab: LabHandle) -> None:
    first = lab.gatepeer("apply")
    assert first.returncode == 0, first.stdout + first.stderr
    device = lab.layout.devices[0]
    assert ping(lab, "vpc", device, count=2)
    details = vxlan(lab)
    assert details is not None
    ifindex, mac = details["ifindex"], details["address"]

    # 300 packets 10 ms apart (3 s) while apply runs three times.
    stream = PingStream(lab, "vpc", device, interval=0.01, count=300)
    outputs = []
    for _ in range(3):
        proc = lab.gatepeer("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        outputs.append(proc.stdout)
    sent, received = stream.wait()

    for out in outputs:
        assert "nothing to change" in out
        assert "+ " not in out, f"a converged apply changed something:\n{out}"
    assert (sent, received) == (300, 300), f"lost {sent - received} of {sent} packets"
    details = vxlan(lab)
    assert details is not None
    assert (details["ifindex"], details["address"]) == (ifindex, mac), "vxlan0 was re-created"
    assert api_calls(lab, "registerGatePeer") == 1


def test_non_default_vni_and_a_slash_24_device_subnet_come_from_the_api(
    make_lab: Callable[..., LabHandle],
) -> None:
    h = make_lab(vni=4711, device_subnet="198.19.5.0/24")
    assert h.state()["settings"]["vxlan_id"] == 4711
    # Nothing in the agent's config says 4711 or /24: both come from the API.
    assert "4711" not in h.paths.config.read_text()

    proc = h.gatepeer("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    h.set_redirection("peer")
    details = vxlan(h)
    assert details is not None and details["linkinfo"]["info_data"]["id"] == 4711
    inner = inner_address(h)
    assert inner is not None
    assert inner.network == ipaddress.IPv4Network("198.19.5.0/24")
    assert inner.ip not in [ep.inner for ep in h.layout.endpoints]
    for device in h.layout.devices:
        assert ping(h, "vpc", device), f"VPC host cannot reach device {device}"


def test_dry_run_prints_the_commands_and_changes_nothing(lab: LabHandle) -> None:
    proc = lab.gatepeer("apply", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(
        r"^ip link add vxlan0 .*type vxlan id 10 local 198\.18\.0\.10 dev eth0", out, re.M
    )
    for ep in lab.layout.endpoints:
        assert f"bridge fdb append {ZERO_MAC} dev vxlan0 dst {ep.outer}" in out
    assert "ip link set vxlan0 up" in out
    assert "sysctl -w net.ipv4.ip_forward=1" in out
    # The API's changes print from the plan too, as the `soracom` CLI lines that make them.
    assert re.search(
        rf"^soracom vpg register-gate-peer --vpg-id \S+ --outer-ip-address {PEER_OUTER}\b",
        out,
        re.M,
    ), out
    assert "dry run: nothing changed" in out
    assert_nothing_changed(lab)


def test_down_removes_vxlan0_and_down_unregister_the_registration(lab: LabHandle) -> None:
    assert lab.gatepeer("apply").returncode == 0

    down = lab.gatepeer("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "removed vxlan0" in down.stdout
    assert vxlan(lab) is None
    assert nft_table(lab) is None
    assert [p["outer_ip"] for p in customer_peers(lab)] == [PEER_OUTER], "down unregistered"

    unregister = lab.gatepeer("down", "--unregister")
    assert unregister.returncode == 0, unregister.stdout + unregister.stderr
    assert f"unregistered {PEER_OUTER}" in unregister.stdout
    assert customer_peers(lab) == []
    # The emulated VPG stops sending to us, as the real one does.
    for ep in lab.layout.endpoints:
        assert netns.bridge_json(ep.ns, "fdb", "show", "dev", "vxlan0") == []

    again = lab.gatepeer("down", "--unregister")
    assert again.returncode == 0
    assert "was not registered" in again.stdout


# ----------------------------------------------------------------------------- bad config


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        # EC2's (and the lab's) 9001-byte underlay carries at most 8951 inside VXLAN.
        ("tunnel", "mtu", "9000"),
        ("tunnel", "underlay_interface", '"eth9"'),
        ("tunnel", "colour", '"blue"'),
        ("agent", "reconcile_interval", '"soon"'),
        ("soracom", "auth_key", '"inline-secret"'),
    ],
    ids=["mtu-over-underlay", "unknown-underlay", "unknown-key", "bad-duration", "inline-secret"],
)
def test_bad_config_exits_2_with_one_line_naming_the_key_and_changes_nothing(
    lab: LabHandle, section: str, key: str, value: str
) -> None:
    lab.set_config(section, key, value)
    proc = lab.gatepeer("apply")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{section}.{key}" in lines[0]
    assert "inline-secret" not in proc.stderr + proc.stdout
    assert_nothing_changed(lab)
    assert api_calls(lab, "auth") == 0, "a bad config reached the API"


def test_mtu_too_large_for_this_underlay_exits_2_without_registering(lab: LabHandle) -> None:
    # An ENI with 1500 bytes (no jumbo frames on this path): tunnel.mtu 1500 needs 1550.
    lab.run("peer", "ip", "link", "set", "dev", "eth0", "mtu", "1500")
    proc = lab.gatepeer("apply")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "tunnel.mtu" in proc.stderr
    assert vxlan(lab) is None
    assert customer_peers(lab) == [], "registered before refusing the config"


def test_mtu_too_large_for_this_underlay_is_reported_in_one_line(lab: LabHandle) -> None:
    lab.run("peer", "ip", "link", "set", "dev", "eth0", "mtu", "1500")
    proc = lab.gatepeer("apply")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tunnel.mtu" in lines[0], proc.stderr


# ----------------------------------------------------------------------------- the daemon


def test_daemon_follows_an_endpoint_replacement_without_stopping_traffic(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    interval = 2.0
    lab.set_config("agent", "reconcile_interval", '"2s"')
    daemon = agent_daemon(lab)
    layout = lab.layout
    old, kept = layout.endpoints  # the API replaces `old` by NEW_ENDPOINT and keeps `kept`
    device = layout.devices[0]

    # Make the traffic use the surviving endpoint in both directions, so that "traffic does
    # not stop" is about the path the agent must leave alone:
    # - peer -> device: both endpoints answer ARP for the devices (proxy ARP) with their own
    #   MAC, and whichever answer came last sits in the peer's neighbour entry. Pin it to the
    #   kept endpoint's MAC: frames for that MAC go to the kept endpoint only (its learned FDB
    #   entry, or the flood entries, where the other endpoint drops a MAC that is not its own).
    # - device -> VPC: the devices namespace answers through the first endpoint (route
    #   metric); prefer the kept one. (Once replaced, the old endpoint's VXLAN is dropped by
    #   the agent's nftables filter anyway: only the kept path can carry the stream.)
    kept_vxlan = netns.link_details(kept.ns, "vxlan0")
    assert kept_vxlan is not None
    lab.run("peer", "ip", "neigh", "replace", str(device), "lladdr", kept_vxlan["address"],
            "dev", "vxlan0", "nud", "permanent")  # fmt: skip
    lab.run("dev", "ip", "route", "replace", "default", "via", str(kept.link_addr),
            "dev", kept.dev_ifname, "metric", "50")  # fmt: skip
    assert ping(lab, "vpc", device, count=2)
    ifindex = vxlan(lab)["ifindex"]  # type: ignore[index]

    # 500 packets 10 ms apart (5 s): the change, one interval, and the old endpoint gone.
    stream = PingStream(lab, "vpc", device, interval=0.01, count=500)
    time.sleep(1)
    kept_rx = netns.link_stats(kept.ns, "vxlan0")["rx_packets"]
    lab.control(
        "settings",
        {
            "endpoints": [
                {"outer_ip": NEW_ENDPOINT, "inner_ip": "198.19.0.99"},
                {"outer_ip": str(kept.outer), "inner_ip": str(kept.inner)},
            ]
        },
    )
    took = wait_for(lambda: flood_entries(lab) == {NEW_ENDPOINT, str(kept.outer)}, timeout=15)
    # The old endpoint really goes away: nothing may depend on it any more.
    netns.ip(old.ns, "link", "set", "dev", "vxlan0", "down")
    sent, received = stream.wait()

    assert took is not None, f"FDB never followed the API: {flood_entries(lab)}\n{daemon.log()}"
    # The timer fires every interval; the change lands anywhere in between.
    assert took < interval + 1.5, f"FDB followed the API only after {took:.1f}s"
    assert nft_endpoints(lab) == {NEW_ENDPOINT, str(kept.outer)}
    assert sent - received <= 2, f"lost {sent - received} of {sent} packets through {kept.outer}"
    assert netns.link_stats(kept.ns, "vxlan0")["rx_packets"] - kept_rx >= received // 2
    assert vxlan(lab)["ifindex"] == ifindex, "vxlan0 was re-created"  # type: ignore[index]
    log = daemon.log()
    added = log.index(f"bridge fdb append {ZERO_MAC} dev vxlan0 dst {NEW_ENDPOINT}")
    removed = log.index(f"bridge fdb del {ZERO_MAC} dev vxlan0 dst {old.outer}")
    assert added < removed, "the new endpoint was added after the old one was removed"
    assert f"dst {kept.outer}" not in log[added:], "the kept endpoint's entry was touched"


def test_daemon_repairs_hand_deletions_on_the_kernel_event(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    # An hour between timer reconciles: whatever is repaired within seconds was repaired by
    # the kernel event.
    lab.set_config("agent", "reconcile_interval", '"1h"')
    daemon = agent_daemon(lab)
    assert converged(lab)
    refreshes = api_calls(lab, "getVirtualPrivateGateway")
    ep = lab.layout.endpoints[0]

    lab.run("peer", "bridge", "fdb", "del", ZERO_MAC, "dev", "vxlan0", "dst", str(ep.outer))
    took_fdb = wait_for(lambda: str(ep.outer) in flood_entries(lab), timeout=5)
    assert took_fdb is not None, f"flood entry not repaired:\n{daemon.log()}"

    old = vxlan(lab)
    assert old is not None
    lab.run("peer", "ip", "link", "del", "dev", "vxlan0")
    took_link = wait_for(lambda: converged(lab), timeout=5)
    assert took_link is not None, f"vxlan0 not repaired:\n{daemon.log()}"
    new = vxlan(lab)
    assert new is not None and new["ifindex"] != old["ifindex"]
    # Same MAC: the VPG endpoints' ARP entries for our inner address stay right.
    assert new["address"] == old["address"]
    assert ping(lab, "vpc", lab.layout.devices[0], count=2)

    assert "kernel event" in daemon.log()
    assert api_calls(lab, "getVirtualPrivateGateway") == refreshes, "repairs waited for the API"
    assert daemon.wait_state(lambda s: s["health"] == "ok")["health"] == "ok"


def test_api_failures_degrade_health_but_keep_the_data_path(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    lab.set_config("agent", "reconcile_interval", '"2s"')
    daemon = agent_daemon(lab)
    device = lab.layout.devices[0]
    ifindex = vxlan(lab)["ifindex"]  # type: ignore[index]

    lab.control("faults", {"fail_next": 1_000_000, "fail_status": 503})
    # A refresh retries with backoff before it gives up: allow a few of them.
    state = daemon.wait_state(lambda s: s["health"] == "degraded", timeout=40, what="degraded")
    assert any("SORACOM API" in r and "503" in r for r in state["reasons"]), state["reasons"]
    assert converged(lab) and vxlan(lab)["ifindex"] == ifindex  # type: ignore[index]
    assert ping(lab, "vpc", device, count=5), "the data path stopped while the API failed"

    lab.control("reset_faults")
    state = daemon.wait_state(
        lambda s: s["health"] == "ok" and not s["reasons"], timeout=40, what="ok again"
    )
    assert state["gate_error"] is None
    assert ping(lab, "vpc", device, count=2)
    assert vxlan(lab)["ifindex"] == ifindex  # type: ignore[index]


def test_sigterm_stops_the_daemon_and_leaves_traffic_flowing(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    daemon = agent_daemon(lab)
    device = lab.layout.devices[0]
    assert ping(lab, "vpc", device, count=2)

    stream = PingStream(lab, "vpc", device, interval=0.01, count=200)
    time.sleep(0.5)
    daemon.signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=15) == 0, daemon.log()
    sent, received = stream.wait()

    assert "the data path stays up" in daemon.log()
    assert (sent, received) == (200, 200), f"lost {sent - received} packets around SIGTERM"
    details = vxlan(lab)
    assert details is not None and "UP" in details["flags"]
    assert converged(lab)
    assert ping(lab, "vpc", device, count=2)


def test_sighup_keeps_a_broken_config_out_and_applies_a_fixed_one(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    lab.set_config("agent", "reconcile_interval", '"1h"')
    daemon = agent_daemon(lab)
    assert vxlan(lab)["mtu"] == 1500  # type: ignore[index]

    lab.set_config("tunnel", "mtu", "99999")
    before = daemon.state()["counters"]["reconciles"]  # type: ignore[index]
    daemon.signal(signal.SIGHUP)
    daemon.wait_log("reload refused")
    # SIGHUP also reconciles at once, still with the old config.
    state = daemon.wait_state(lambda s: s["counters"]["reconciles"] > before, what="a reconcile")
    assert state["health"] == "ok", state["reasons"]
    assert daemon.running()
    assert vxlan(lab)["mtu"] == 1500  # type: ignore[index]

    lab.set_config("tunnel", "mtu", "1400")
    daemon.signal(signal.SIGHUP)
    took = wait_for(lambda: vxlan(lab)["mtu"] == 1400, timeout=10)  # type: ignore[index]
    assert took is not None, daemon.log()
    assert "configuration reloaded" in daemon.log()
    daemon.wait_state(lambda s: s["health"] == "ok")
    assert ping(lab, "vpc", lab.layout.devices[0], count=2)


def test_kernel_event_repair_does_not_wait_for_a_slow_api(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    lab.set_config("agent", "reconcile_interval", '"1h"')
    daemon = agent_daemon(lab)
    ep = lab.layout.endpoints[0]
    lab.control("faults", {"latency_ms": 4000})
    try:
        # SIGHUP refreshes from the API as the timer would, but at a moment the test knows:
        # the reloaded agent logs in again, so the refresh takes three slow calls (~12 s).
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("configuration reloaded")
        time.sleep(0.5)
        lab.run("peer", "bridge", "fdb", "del", ZERO_MAC, "dev", "vxlan0", "dst", str(ep.outer))
        took = wait_for(lambda: str(ep.outer) in flood_entries(lab), timeout=2)
    finally:
        lab.control("reset_faults")
    assert took is not None, "the flood entry stayed deleted while the API was slow"


def test_devices_behind_a_replaced_endpoint_move_to_a_surviving_one_at_once(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    lab.set_config("agent", "reconcile_interval", '"2s"')
    agent_daemon(lab)
    old, kept = lab.layout.endpoints
    device = str(lab.layout.devices[0])
    # The peer's ARP entry for the device holds the MAC of the endpoint that answered last;
    # make that the one the API is about to drop, as an ordinary ARP answer would (reachable,
    # not permanent). Replies from the devices come back through the kept endpoint.
    old_vxlan = netns.link_details(old.ns, "vxlan0")
    assert old_vxlan is not None
    lab.run("dev", "ip", "route", "replace", "default", "via", str(kept.link_addr),
            "dev", kept.dev_ifname, "metric", "50")  # fmt: skip
    lab.run("peer", "ip", "neigh", "replace", device, "lladdr", old_vxlan["address"],
            "dev", "vxlan0", "nud", "reachable")  # fmt: skip
    assert ping(lab, "vpc", device)

    lab.control(
        "settings",
        {
            "endpoints": [
                {"outer_ip": NEW_ENDPOINT, "inner_ip": "198.19.0.99"},
                {"outer_ip": str(kept.outer), "inner_ip": str(kept.inner)},
            ]
        },
    )
    assert wait_for(lambda: str(old.outer) not in flood_entries(lab), timeout=10) is not None
    netns.ip(old.ns, "link", "set", "dev", "vxlan0", "down")  # the old endpoint is gone
    took = wait_for(lambda: ping(lab, "vpc", device), timeout=3, step=0.1)
    assert took is not None, "devices behind the dropped endpoint still unreachable after 3 s"


def test_a_gap_in_the_tunnel_does_not_redirect_vpc_hosts_away_from_the_peer(
    lab: LabHandle,
) -> None:
    assert lab.gatepeer("apply").returncode == 0
    device = str(lab.layout.devices[0])
    assert ping(lab, "vpc", device)
    lab.run("peer", "ip", "link", "del", "dev", "vxlan0")
    # Traffic during the gap (a host that keeps sending: the first redirect only makes it
    # resolve the VPC router's address, a later one sticks).
    assert not ping(lab, "vpc", device, count=3)
    assert lab.gatepeer("apply").returncode == 0
    assert converged(lab)
    took = wait_for(lambda: ping(lab, "vpc", device), timeout=3, step=0.1)
    route = lab.run("vpc", "ip", "route", "get", device).stdout
    assert took is not None, f"VPC host still cut off once vxlan0 is back: {route}"


def test_down_refuses_while_the_daemon_keeps_the_peer_up(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    daemon = agent_daemon(lab)
    daemon.wait_state(lambda s: s["health"] == "ok")
    proc = lab.gatepeer("down")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stop it first" in proc.stderr
    assert vxlan(lab) is not None


def test_daemon_restores_a_hand_edited_ruleset_on_the_nftables_event(
    lab: LabHandle, agent_daemon: Callable[..., AgentDaemon]
) -> None:
    lab.set_config("agent", "reconcile_interval", '"1h"')  # only the event path can pass
    daemon = agent_daemon(lab)
    daemon.wait_state(lambda s: s["health"] == "ok")
    lab.run("peer", "nft", "flush", "chain", "inet", "gatepeer", "input")

    def restored() -> bool:
        chain = lab.run("peer", "nft", "list", "chain", "inet", "gatepeer", "input").stdout
        return "vxlan_accepted" in chain

    assert wait_for(restored, timeout=5) is not None, daemon.log()


def test_after_a_reboot_with_the_api_down_the_tunnel_comes_up_from_the_gate_cache(
    lab: LabHandle,
) -> None:
    assert lab.gatepeer("apply").returncode == 0
    cache = lab.paths.gate_cache
    assert json.loads(cache.read_text())["gate"]["inner"].endswith("/16")
    # A reboot: the kernel state and /run are gone, /var/lib (the cache) is not.
    lab.run("peer", "ip", "link", "del", "dev", "vxlan0")
    lab.run("peer", "nft", "delete", "table", "inet", "gatepeer")
    lab.paths.state_file.unlink()
    lab.control("faults", {"fail_next": 1000, "fail_status": 503})
    try:
        proc = lab.gatepeer("apply")
    finally:
        lab.control("reset_faults")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # degraded: the API is down
    assert "SORACOM API" in proc.stderr
    assert vxlan(lab) is not None
    assert ping(lab, "vpc", lab.layout.devices[0], count=2)


def test_down_unregister_forgets_the_gate_cache(lab: LabHandle) -> None:
    assert lab.gatepeer("apply").returncode == 0
    assert lab.paths.gate_cache.exists()
    assert lab.gatepeer("down", "--unregister").returncode == 0
    assert not lab.paths.gate_cache.exists()
