"""Issue 8 on the real kernel: Junction redirection managed by the agent decides whether the
devices' traffic crosses the gate peer, and poisoned API answers never reach the kernel.

The lab's emulated VPG follows the emulator's redirection as SORACOM's does: device traffic that
leaves the device subnet goes over the tunnel to the redirection gateway while one is enabled,
else out of the VPG's own source-NATed path (198.18.3.(10+N)). The lab's config says
`redirection = "self"`; the tests that need it otherwise say "unmanaged".

Every lab is removed at the end, even on failure (make_lab, or the module's own fixture for the
poisoned answers); a daemon a test starts is stopped by its pid first.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import AgentDaemon, LabHandle, new_prefix
from helpers.lab_checks import (
    api_calls,
    customer_peers,
    flood_entries,
    inner_address,
    vxlan,
    wait_for,
)
from helpers.packet_path import (
    DEVICE,
    PEER,
    PORT,
    SERVER,
    VPC_HOST,
    connect_and_see,
    peer_counters,
    popen,
)

from gatepeer.lab.network import netns

pytestmark = pytest.mark.netns

# A gateway in the device subnet that no peer owns: "someone else's" redirection.
ELSEWHERE = "198.19.0.200"
ENDPOINT1 = "198.18.1.11"  # the lab's first VPG endpoint (outer address)

LOG_LINE = re.compile(r"^gatepeer: (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")

# A connection attempt that reports instead of raising: "connected" or "no reply".
TRY_CONNECT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[4]),
                                 source_address=(sys.argv[3], 0))
except OSError as exc:
    print("no reply:", type(exc).__name__)
else:
    print("connected", s.recv(200).decode())
"""


# ----------------------------------------------------------------------------- helpers


def vpg_redirection(lab: LabHandle) -> dict[str, Any] | None:
    """The emulator's true redirection (answer overrides do not show here)."""
    value = lab.state().get("redirection")
    return {"enabled": value["enabled"], "gateway": value["gateway"]} if value else None


def vpg_id(lab: LabHandle) -> str:
    return str(lab.state()["settings"]["vpg_id"])


def peer_inner(lab: LabHandle) -> str:
    """The inner address the emulator registered for the lab's gate peer."""
    rows = [p for p in customer_peers(lab) if p["outer_ip"] == PEER]
    assert rows, f"{PEER} is not registered: {customer_peers(lab)}"
    return str(rows[0]["inner_ip"])


def verdict(proc: subprocess.CompletedProcess[str]) -> str:
    """The command's own one-line reason: the last line of stderr, after any log lines."""
    lines = proc.stderr.splitlines()
    assert lines, f"nothing on stderr:\n{proc.stdout}"
    last = lines[-1]
    assert last.startswith("gatepeer: ") and not LOG_LINE.match(last), proc.stderr
    return last


def assert_no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert all(ln.startswith("gatepeer: ") for ln in proc.stderr.splitlines()), proc.stderr


def try_connect(lab: LabHandle, server_role: str, server_addr: str, client_role: str,
                source: str) -> str:  # fmt: skip
    """A TCP connection attempt (3 s) to a one-shot server: "connected seen ADDR" or "no reply"."""
    with popen(lab, server_role, sys.executable, "-c", SERVER, server_addr, str(PORT)) as srv:
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "ready"
        proc = lab.run(
            client_role, sys.executable, "-c", TRY_CONNECT, server_addr, str(PORT), source, "3",
            timeout=15,
        )  # fmt: skip
        return proc.stdout.strip()


def status(lab: LabHandle) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`gatepeer status` as text, and its --json document (whose exit code must agree)."""
    text = lab.gatepeer("status")
    as_json = lab.gatepeer("status", "--json")
    assert as_json.returncode == text.returncode, as_json.stderr
    return text, dict(json.loads(as_json.stdout))


def tunnel_snapshot(lab: LabHandle) -> dict[str, Any]:
    """What the applied view put in the kernel: vxlan0's identity, VNI, address, FDB, routes."""
    details = vxlan(lab)
    assert details is not None, "vxlan0 is missing"
    routes = netns.ip_json(lab.ns("peer"), "-4", "route", "show", "dev", "vxlan0")
    return {
        "ifindex": details["ifindex"],
        "vni": details["linkinfo"]["info_data"]["id"],
        "address": str(inner_address(lab)),
        "flood": flood_entries(lab),
        "routes": sorted(r["dst"] for r in routes),
    }


def underlay_route(lab: LabHandle) -> str:
    """The device the peer's default route leaves by (for an address beyond the lab's VPC)."""
    rows = netns.ip_json(lab.ns("peer"), "-4", "route", "get", "203.0.113.1")
    return str(rows[0]["dev"])


def saved_views(lab: LabHandle) -> tuple[Any, Any]:
    """The gate view in state.json and in the gate cache."""
    state = lab.agent_state() or {}
    cache = json.loads(lab.paths.gate_cache.read_text())
    return state.get("gate"), cache.get("gate")


# ----------------------------------------------------------------------------- 1. nat mode


def test_nat_mode_device_traffic_crosses_the_peer_only_with_redirection_to_it(
    make_lab: Callable[..., LabHandle], agent_daemon: Callable[..., AgentDaemon]
) -> None:
    lab = make_lab()
    lab.set_config("packet_path", "mode", '"nat"')
    lab.set_config("soracom", "redirection", '"unmanaged"')

    # Unmanaged and unset: apply builds the tunnel but says the devices' traffic bypasses it.
    proc = lab.gatepeer("apply")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "converged:" in proc.stdout
    reason = verdict(proc)
    assert reason.startswith("gatepeer: degraded: "), reason
    assert "packet_path.mode is nat" in reason and "redirection gateway is not set" in reason
    assert vpg_redirection(lab) is None
    assert api_calls(lab, "setRedirectionConfiguration") == 0

    before, rx = peer_counters(lab), netns.link_stats(lab.ns("peer"), "vxlan0")["rx_packets"]
    seen, reply = connect_and_see(lab, "vpc", VPC_HOST, "dev", DEVICE)
    vpg_nat = {str(ep.nat_addr) for ep in lab.layout.endpoints}
    assert seen in vpg_nat, f"without redirection the VPC server saw {seen}, not the VPG's NAT"
    assert reply == f"seen {seen}"
    assert peer_counters(lab)["masqueraded_flows"] == before["masqueraded_flows"]
    assert netns.link_stats(lab.ns("peer"), "vxlan0")["rx_packets"] == rx, (
        "device traffic reached the peer's tunnel without redirection"
    )

    # With the daemon running, the redirection is the only thing status complains about.
    daemon = agent_daemon(lab, ready=False)
    state = daemon.wait_state(lambda s: s["health"] == "degraded", what="degraded")
    assert len(state["reasons"]) == 1 and "redirection" in state["reasons"][0], state["reasons"]
    text, doc = status(lab)
    assert text.returncode == 1, text.stdout + text.stderr
    assert "DEGRADED" in text.stdout
    assert "packet_path.mode is nat but the VPG's redirection gateway is not set" in text.stdout
    assert re.search(r"^redirection .*gateway not set, not this peer", text.stdout, re.M)
    assert (doc["health"], doc["exit_code"]) == ("degraded", 1)
    assert [r for r in doc["reasons"] if "redirection gateway" in r] == doc["reasons"]
    assert doc["redirection"]["mode"] == "unmanaged"
    assert doc["redirection"]["gateway"] is None and doc["redirection"]["is_self"] is False

    # "self": the agent points the redirection at its inner address; the traffic follows.
    lab.set_config("soracom", "redirection", '"self"')
    daemon.signal(signal.SIGHUP)
    inner = peer_inner(lab)
    daemon.wait_state(
        lambda s: s["health"] == "ok" and (s["gate"]["redirection"] or {}).get("gateway") == inner,
        what="ok, redirection here",
    )
    assert vpg_redirection(lab) == {"enabled": True, "gateway": inner}
    before = peer_counters(lab)
    seen, reply = connect_and_see(lab, "vpc", VPC_HOST, "dev", DEVICE)
    assert seen == PEER, f"with redirection the VPC server saw {seen}, not the gate peer"
    assert reply == f"seen {PEER}"
    assert peer_counters(lab)["masqueraded_flows"] > before["masqueraded_flows"]
    text, doc = status(lab)
    assert text.returncode == 0, text.stdout
    assert (doc["health"], doc["redirection"]["is_self"]) == ("ok", True)
    assert doc["redirection"]["gateway"] == inner
    assert re.search(rf"^redirection .*gateway {inner} \(this peer\)", text.stdout, re.M)


# ----------------------------------------------------------------------------- 2. route mode


def test_route_mode_vpc_hosts_and_devices_see_real_addresses_only_with_redirection(
    make_lab: Callable[..., LabHandle],
) -> None:
    lab = make_lab()
    lab.set_config("packet_path", "mode", '"route"')
    proc = lab.gatepeer("apply")  # the lab's config says redirection = "self"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert vpg_redirection(lab) == {"enabled": True, "gateway": peer_inner(lab)}

    seen, reply = connect_and_see(lab, "dev", DEVICE, "vpc", VPC_HOST)
    assert (seen, reply) == (VPC_HOST, f"seen {VPC_HOST}"), "VPC host -> device"
    seen, reply = connect_and_see(lab, "vpc", VPC_HOST, "dev", DEVICE)
    assert (seen, reply) == (DEVICE, f"seen {DEVICE}"), "device -> VPC host"
    assert peer_counters(lab)["masqueraded_flows"] == 0

    # Unmanaged and unset: the device's answers take the VPG's NATed way out, as on SORACOM.
    lab.set_config("soracom", "redirection", '"unmanaged"')
    lab.set_redirection(None)
    proc = lab.gatepeer("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr  # route mode: not a fault of ours
    assert vpg_redirection(lab) is None
    outcome = try_connect(lab, "dev", DEVICE, "vpc", VPC_HOST)
    assert outcome.startswith("no reply"), f"VPC host -> device without redirection: {outcome}"
    # The device still reaches the VPC, but as the VPG's NAT address, not its own.
    seen, _ = connect_and_see(lab, "vpc", VPC_HOST, "dev", DEVICE)
    assert seen in {str(ep.nat_addr) for ep in lab.layout.endpoints}, seen

    # Back to "self": the same connection works again (what failed was the redirection).
    lab.set_config("soracom", "redirection", '"self"')
    assert lab.gatepeer("apply").returncode == 0
    assert try_connect(lab, "dev", DEVICE, "vpc", VPC_HOST) == f"connected seen {VPC_HOST}"


# ----------------------------------------------------------------------------- 3. posted once


def several_refreshes(lab: LabHandle, daemon: AgentDaemon, count: int = 3) -> bool:
    """Wait until the daemon has read the VPG `count` more times (its timer's refreshes)."""
    reads = api_calls(lab, "getVirtualPrivateGateway")
    took = wait_for(
        lambda: api_calls(lab, "getVirtualPrivateGateway") >= reads + count,
        timeout=count * 3 + 10,
        step=0.2,
    )
    assert daemon.running(), daemon.log()
    return took is not None


def test_redirection_is_posted_once_and_again_only_when_changed(
    make_lab: Callable[..., LabHandle], agent_daemon: Callable[..., AgentDaemon]
) -> None:
    lab = make_lab()
    lab.set_config("agent", "reconcile_interval", '"1s"')
    daemon = agent_daemon(lab)
    inner = peer_inner(lab)
    # Several refreshes, each reading the VPG: one post, from the first.
    assert several_refreshes(lab, daemon)
    assert api_calls(lab, "setRedirectionConfiguration") == 1
    assert vpg_redirection(lab) == {"enabled": True, "gateway": inner}

    # Someone points it elsewhere (one post of theirs): the agent takes it back, once.
    assert lab.set_redirection(ELSEWHERE)["redirection"]["gateway"] == ELSEWHERE
    back = wait_for(lambda: vpg_redirection(lab) == {"enabled": True, "gateway": inner}, 15, 0.1)
    assert back is not None, f"the agent left the redirection elsewhere:\n{daemon.log()[-2000:]}"
    assert several_refreshes(lab, daemon)
    assert api_calls(lab, "setRedirectionConfiguration") == 3
    assert daemon.stop() == 0


def test_down_unregister_unsets_the_redirection_only_when_it_points_here(
    make_lab: Callable[..., LabHandle],
) -> None:
    lab = make_lab()
    assert lab.gatepeer("apply").returncode == 0
    inner = peer_inner(lab)
    assert vpg_redirection(lab) == {"enabled": True, "gateway": inner}

    down = lab.gatepeer("down", "--unregister")
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"unset the redirection of VPG {vpg_id(lab)} (it pointed at {inner})" in down.stdout
    assert vpg_redirection(lab) is None
    assert customer_peers(lab) == []
    assert api_calls(lab, "unsetRedirectionConfiguration") == 1

    # Registered again, but the redirection now points at another peer: left alone.
    assert lab.gatepeer("apply").returncode == 0
    lab.set_redirection(ELSEWHERE)
    down = lab.gatepeer("down", "--unregister")
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"left the redirection of VPG {vpg_id(lab)} alone" in down.stdout
    assert vpg_redirection(lab) == {"enabled": True, "gateway": ELSEWHERE}
    assert customer_peers(lab) == []
    assert api_calls(lab, "unsetRedirectionConfiguration") == 1


# ----------------------------------------------------------------------------- 4. poisoned answers


@pytest.fixture(scope="module")
def poison_lab() -> Iterator[LabHandle]:
    """One lab for every poisoned answer, with the good view applied once. Removed at the end
    (checked, as make_lab does), even when a case failed."""
    from gatepeer.lab import control

    lab = LabHandle(prefix=new_prefix())
    try:
        result = lab.cli("up")
        lab.remember_emulator()
        assert result.exit_code == 0, result.output
        proc = lab.gatepeer("apply")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield lab
    finally:
        lab.remember_emulator()
        control.down(lab.prefix)
        assert not lab.leftovers(), f"lab teardown left things behind: {lab.leftovers()}"


OWN = PEER  # listGatePeers row of this peer
POISONED: dict[str, tuple[dict[str, Any], str]] = {
    # name: (overrides, the field the refusal names)
    "netmask-slash-1": ({"peers": {OWN: {"netmask": "128.0.0.0"}}}, "netmask"),
    "netmask-prefix-length": ({"peers": {OWN: {"netmask": 8}}}, "netmask"),
    "inner-outside-device-subnet": (
        {"peers": {OWN: {"innerIpAddress": "198.51.100.7"}}},
        "innerIpAddress",
    ),
    "endpoint-unspecified": (
        {"peers": {ENDPOINT1: {"outerIpAddress": "0.0.0.0"}}},
        "outerIpAddress",
    ),
    "endpoint-multicast": (
        {"peers": {ENDPOINT1: {"outerIpAddress": "239.1.2.3"}}},
        "outerIpAddress",
    ),
    "endpoint-this-host": ({"peers": {ENDPOINT1: {"outerIpAddress": PEER}}}, "outerIpAddress"),
    "endpoint-loopback": (
        {"peers": {ENDPOINT1: {"outerIpAddress": "127.0.0.1"}}},
        "outerIpAddress",
    ),
    "endpoint-link-local": (
        {"peers": {ENDPOINT1: {"outerIpAddress": "169.254.1.1"}}},
        "outerIpAddress",
    ),
    "endpoint-not-a-string": ({"peers": {ENDPOINT1: {"outerIpAddress": 123}}}, "outerIpAddress"),
    "vni-0": ({"vpg": {"gateVxlanId": 0}}, "gateVxlanId"),
    "vni-2**24": ({"vpg": {"gateVxlanId": 2**24}}, "gateVxlanId"),
    "vni-not-a-number": ({"vpg": {"gateVxlanId": "ten"}}, "gateVxlanId"),
    "redirection-gateway-not-an-address": (
        {"vpg": {"redirection": {"enabled": True, "gateway": 5}}},
        "redirection.gateway",
    ),
    # Without deviceSubnetCidrRange the agent falls back to ueSubnetCidrRange, which is named.
    "no-device-subnet": (
        {"vpg_remove": ["deviceSubnetCidrRange", "ueSubnetCidrRange"]},
        "ueSubnetCidrRange",
    ),
}


@pytest.mark.parametrize(("overrides", "field"), POISONED.values(), ids=POISONED.keys())
def test_a_poisoned_answer_is_refused_and_the_good_view_stays_applied(
    poison_lab: LabHandle, overrides: dict[str, Any], field: str
) -> None:
    lab = poison_lab
    kernel, views = tunnel_snapshot(lab), saved_views(lab)
    assert underlay_route(lab) == "eth0"
    lab.control("overrides", overrides)
    try:
        proc = lab.gatepeer("apply")
    finally:
        lab.control("overrides", {})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert_no_traceback(proc)
    reason = verdict(proc)
    assert reason.startswith("gatepeer: degraded: "), reason
    assert "answer refused" in reason and field in reason, reason
    assert "nothing to change" in proc.stdout, "a refused answer changed the kernel"
    assert (lab.agent_state() or {})["api_refused_field"] == field

    assert tunnel_snapshot(lab) == kernel
    assert saved_views(lab) == views
    assert underlay_route(lab) == "eth0", "the host's default route left the underlay"

    # Cleared: the same apply passes again and the refusal is forgotten.
    again = lab.gatepeer("apply")
    assert again.returncode == 0, again.stdout + again.stderr
    assert (lab.agent_state() or {})["api_refused_field"] is None


def test_status_names_the_refused_answer_until_a_good_one_arrives(poison_lab: LabHandle) -> None:
    lab = poison_lab
    lab.control("overrides", POISONED["netmask-slash-1"][0])
    try:
        assert lab.gatepeer("apply").returncode == 1
    finally:
        lab.control("overrides", {})
    text, doc = status(lab)
    assert text.returncode == 1 and doc["health"] == "degraded", doc["reasons"]
    assert (doc["api"]["answer_refused"], doc["api"]["refused_field"]) == (True, "netmask")
    assert "listGatePeers answer refused: netmask '128.0.0.0'" in doc["api"]["error"]
    assert any("answer refused" in r and "netmask" in r for r in doc["reasons"])
    assert "answer refused" in text.stdout
    # The inner address keeps the device subnet's prefix, not /1.
    assert doc["registration"]["inner_address"].endswith(f"/{lab.layout.device_subnet.prefixlen}")

    assert lab.gatepeer("apply").returncode == 0
    _, doc = status(lab)
    assert doc["api"]["answer_refused"] is False and doc["api"]["refused_field"] is None


# Answers that look odd but are right: each must pass, or the checks refuse too much.
ACCEPTED: dict[str, dict[str, Any]] = {
    "vni-as-float": {"vpg": {"gateVxlanId": 10.0}},
    "only-ueSubnetCidrRange": {"vpg_remove": ["deviceSubnetCidrRange"]},
    "netmask-null": {"peers": {OWN: {"netmask": None}}},
}


@pytest.mark.parametrize("overrides", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_an_unusual_but_valid_answer_is_accepted(
    poison_lab: LabHandle, overrides: dict[str, Any]
) -> None:
    lab = poison_lab
    kernel = tunnel_snapshot(lab)
    lab.control("overrides", overrides)
    try:
        proc = lab.gatepeer("apply")
    finally:
        lab.control("overrides", {})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nothing to change" in proc.stdout
    assert tunnel_snapshot(lab) == kernel


# ----------------------------------------------------------------------------- 5. saved views


def test_a_view_saved_for_another_vpg_is_not_applied(make_lab: Callable[..., LabHandle]) -> None:
    lab = make_lab()
    assert lab.gatepeer("apply").returncode == 0
    right = vpg_id(lab)
    lab.set_config("soracom", "vpg_id", json.dumps(str(uuid.uuid4())))
    # As after a reboot: the tunnel is gone, the views of the old VPG are on disk.
    lab.run("peer", "ip", "link", "del", "dev", "vxlan0")

    proc = lab.gatepeer("apply")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert vxlan(lab) is None, "the old VPG's view was applied"
    assert (lab.agent_state() or {})["gate"] is None
    assert_no_traceback(proc)
    assert f"ignoring the gate view in {lab.paths.state_file}: it is for VPG {right}" in (
        proc.stderr
    )
    reason = verdict(proc)
    assert "no gate view yet" in reason, reason
    assert "404" in reason and "soracom.vpg_id" in reason
    assert "https://api.soracom.io" in reason and "https://g.api.soracom.io" in reason

    # Next time only the gate cache holds the old view: discarded all the same.
    proc = lab.gatepeer("apply")
    assert proc.returncode == 1
    assert vxlan(lab) is None, "the old VPG's view in the gate cache was applied"
    assert f"ignoring the gate view in {lab.paths.gate_cache}: it is for VPG {right}" in (
        proc.stderr
    )

    lab.set_config("soracom", "vpg_id", json.dumps(right))
    proc = lab.gatepeer("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert vxlan(lab) is not None


def test_down_unregister_after_the_address_changed_unregisters_the_recorded_one(
    make_lab: Callable[..., LabHandle],
) -> None:
    lab = make_lab()
    lab.set_config("tunnel", "local_address", None)  # the default route's address decides
    assert lab.gatepeer("apply").returncode == 0
    assert [p["outer_ip"] for p in customer_peers(lab)] == [PEER]

    # The host's address changes (a new ENI address, say): 198.18.0.10 -> 198.18.0.30.
    lab.run("peer", "ip", "addr", "del", f"{PEER}/24", "dev", "eth0")
    lab.run("peer", "ip", "addr", "add", "198.18.0.30/24", "dev", "eth0")
    lab.run("peer", "ip", "route", "replace", "default", "via", "198.18.0.1", "dev", "eth0")
    assert (
        netns.ip_json(lab.ns("peer"), "-4", "route", "get", "203.0.113.10")[0]["prefsrc"]
        == "198.18.0.30"
    )

    down = lab.gatepeer("down", "--unregister")
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"unregistered {PEER} from VPG" in down.stdout
    assert customer_peers(lab) == []
    assert vpg_redirection(lab) is None  # it pointed here: released too
    assert not lab.paths.gate_cache.exists()


def test_the_daemon_keeps_the_good_view_through_a_poisoned_answer(
    make_lab: Callable[..., LabHandle], agent_daemon: Callable[..., AgentDaemon]
) -> None:
    lab = make_lab()
    lab.set_config("agent", "reconcile_interval", '"1s"')
    daemon = agent_daemon(lab)
    kernel = tunnel_snapshot(lab)
    lab.control("overrides", POISONED["vni-0"][0])
    try:
        state = daemon.wait_state(
            lambda s: s["health"] == "degraded" and s["api_refused_field"] == "gateVxlanId",
            what="the refusal",
        )
        assert any("gateVxlanId 0" in r for r in state["reasons"]), state["reasons"]
        assert state["gate"]["vni"] == lab.layout.vni
        assert several_refreshes(lab, daemon, count=2)  # refused again and again, still intact
        assert tunnel_snapshot(lab) == kernel
        assert underlay_route(lab) == "eth0"
        assert "Traceback" not in daemon.log()
    finally:
        lab.control("overrides", {})
    daemon.wait_state(lambda s: s["health"] == "ok" and s["api_refused_field"] is None)
    assert tunnel_snapshot(lab) == kernel
