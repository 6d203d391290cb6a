"""Bringing the lab's gate peer up: the hand-made baseline or the real agent."""

from __future__ import annotations

import ipaddress
import json
import sys
from typing import Any

from gatepeer.lab.api_client import lab_api
from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import PEER_ADDR
from gatepeer.lab.network.netns import LabError, ip
from gatepeer.lab.record import BASELINE_SCRIPT, LabInfo, LabRecord, Paths


def prefixlen(netmask: Any, fallback: int) -> int:
    if not netmask:
        return fallback
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        return fallback


def baseline_gate_peer(lab: LabInfo) -> dict[str, Any]:
    """Bring the gate peer up the hand-made way: register it through the API (as a person
    would with soracom-cli), then run bench/handmade_gate_init.sh in the peer namespace."""
    if not BASELINE_SCRIPT.exists():
        raise LabError(f"{BASELINE_SCRIPT}: the baseline script is not there (source tree only)")
    assert lab.host_url is not None
    record = LabRecord(lab.layout, lab.credentials, 0)
    api = lab_api(lab.paths, record, lab.host_url)
    outer = str(PEER_ADDR)
    mine = [p for p in api.list_gate_peers() if p.get("outerIpAddress") == outer]
    if not mine:
        api.register_gate_peer(outer)
    peers = api.list_gate_peers()
    me = next(p for p in peers if p.get("outerIpAddress") == outer)
    inner = str(me["innerIpAddress"])
    plen = prefixlen(me.get("netmask"), lab.layout.device_subnet.prefixlen)
    endpoints = [str(p["outerIpAddress"]) for p in peers if p.get("ownedByCustomer") is False]
    vpg = api.get_vpg()
    vni = int(vpg.get("gateVxlanId") or lab.layout.vni)
    cmd = ["bash", str(BASELINE_SCRIPT), "eth0", outer, f"{inner}/{plen}", str(vni), *endpoints]
    netns.run(netns.exec_in(lab.layout.peer_ns, cmd))
    # The hand-made setup's last step, as SORACOM's Gate guide has a person do it: Junction
    # redirection to the peer, without which devices' traffic never comes through it.
    api.set_redirection(inner, description="hand-made gate peer")
    # The VPG side may still hold the MAC of an earlier vxlan0 of this peer.
    for ep in lab.layout.endpoints:
        ip(ep.ns, "neigh", "flush", "dev", "vxlan0", check=False)
    return {
        "method": "baseline",
        "script": str(BASELINE_SCRIPT),
        "outer": outer,
        "inner": f"{inner}/{plen}",
        "vni": vni,
        "endpoints": endpoints,
        "redirection": inner,
        "command": " ".join(netns.exec_in(lab.layout.peer_ns, cmd)),
    }


def agent_command(paths: Paths, *args: str, index: int = 1) -> list[str]:
    """`gatepeer ARGS...` with this lab's config (gate peer `index`'s in an HA pair), as this
    interpreter runs it."""
    return [sys.executable, "-m", "gatepeer", *args, "--config", str(paths.peer_config(index))]


def agent_gate_peer(lab: LabInfo) -> dict[str, Any]:
    """Bring the gate peer up with the real agent: one `gatepeer apply` in the peer namespace
    with the lab's config (registers through the emulator, builds vxlan0, loads its nftables
    table, tunes the kernel, verifies). One-shot: nothing keeps it converged afterwards, which
    is `gatepeer run`'s job."""
    cmd = netns.exec_in(lab.layout.peer_ns, agent_command(lab.paths, "apply"))
    proc = netns.run(cmd, check=False, timeout=120)
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip())[-1500:]
        raise LabError(
            f"gatepeer apply in {lab.layout.peer_ns} failed (exit {proc.returncode}):\n{detail}"
        )
    try:
        gate = json.loads(lab.paths.state_file.read_text())["gate"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabError(
            f"{lab.paths.state_file}: no gate view after gatepeer apply ({exc})"
        ) from None
    # A vxlan0 the agent had to create anew (after a hand-made one) has another MAC than the
    # one the VPG side may remember.
    for ep in lab.layout.endpoints:
        ip(ep.ns, "neigh", "flush", "dev", "vxlan0", check=False)
    return {
        "method": "agent, one-shot `gatepeer apply`",
        "outer": str(gate["outer"]),
        "inner": str(gate["inner"]),
        "vni": int(gate["vni"]),
        "endpoints": [str(e["outer"]) for e in gate["endpoints"]],
        "command": " ".join(cmd),
        "output": proc.stdout.splitlines(),
    }
