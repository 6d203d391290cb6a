"""Crash consistency in the lab (issue 9, "Must show" 2): SIGKILL the agent at random moments
during `gatepeer apply` (inside registration too) and during `gatepeer run`, then start it again
and check that it converges with nothing doubled or left over.

Each cycle starts the peer from one of three points (converged; kernel state gone, as after a
reboot; not registered and no kernel state, as on a fresh instance), starts the agent, and kills
it after a random delay (seeded: the seed is printed, and GATEPEER_CRASH_SEED replays a run).
Each API answer is delayed, so registration is a window a kill can hit; half the applies that
have work to do are killed the moment their registration reaches the API or vxlan0 appears.
After each kill:

- `gatepeer apply` exits 0 (and, every fourth cycle, a second one changes nothing);
- the emulator holds exactly one registration for this peer, no cycle registered more than
  once, and the inner address changed only in cycles that unregistered first;
- vxlan0 is the only vxlan link, has one address (the inner one) and one flood entry per VPG
  endpoint; the nftables table accepts exactly the endpoints; no other table exists;
- state.json and the gate cache parse, and no temporary file of theirs is left behind.

Prints a FIGURES line: kills per agent command and where they landed.
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import LabHandle, gatepeer_command

from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import PEER_ADDR

pytestmark = [pytest.mark.netns, pytest.mark.slow]

ZERO_MAC = "00:00:00:00:00:00"
PEER_OUTER = str(PEER_ADDR)
APPLY_KILLS = 40
RUN_KILLS = 12
# Each API answer this late: a fresh apply spends ~1 s in five calls, registration included.
API_LATENCY_MS = 150
STARTS = ("converged", "kernel-wiped", "fresh")


@dataclass
class Cycle:
    command: str
    start: str
    delay: float
    landed: str = ""


def wipe_kernel(lab: LabHandle) -> None:
    lab.run("peer", "ip", "link", "del", "dev", "vxlan0", check=False)
    lab.run("peer", "nft", "delete", "table", "inet", "gatepeer", check=False)


def unregister(lab: LabHandle) -> None:
    api = lab.api()
    if any(p.get("outerIpAddress") == PEER_OUTER for p in api.list_gate_peers()):
        api.unregister_gate_peer(PEER_OUTER)


def spawn(lab: LabHandle, *args: str) -> subprocess.Popen[bytes]:
    # `ip netns exec` execs in place: the pid is the agent's own.
    return subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("peer"), "env", f"GATEPEER_CONFIG={lab.paths.config}",
         *gatepeer_command(), *args],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def settle_emulator(lab: LabHandle, timeout: float = 5) -> dict[str, Any]:
    """The emulator's state once every request it counted has been answered: a request the
    killed agent left in flight still completes on the emulator's side (as on the real API)."""
    deadline = time.monotonic() + timeout
    while True:
        state = lab.state()
        if sum(state["counts"].values()) <= len(state["recent"]) or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


def wait_for_registration(lab: LabHandle, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while proc.poll() is None and time.monotonic() < deadline:
        if lab.state()["counts"].get("registerGatePeer"):
            return
        time.sleep(0.01)


def wait_for_link(lab: LabHandle, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    show = ["ip", "-n", lab.ns("peer"), "link", "show", "dev", "vxlan0"]
    while proc.poll() is None and time.monotonic() < deadline:
        if subprocess.run(show, capture_output=True, check=False).returncode == 0:
            return


def vxlan_links(lab: LabHandle) -> list[str]:
    return [
        str(x["ifname"])
        for x in netns.ip_json(lab.ns("peer"), "-d", "link", "show", "type", "vxlan")
    ]


def where_it_landed(
    lab: LabHandle, cycle: Cycle, killed: int, at_kill: dict[str, Any], before: dict[str, Any]
) -> str:
    counts, recent = at_kill["counts"], at_kill["recent"]
    register_sent = counts.get("registerGatePeer", 0)
    register_answered = any(r["operation"] == "registerGatePeer" for r in recent)
    state = lab.agent_state() or {}
    if register_sent and not register_answered:
        return "inside registration (request in flight)"
    if state.get("pid") == killed:
        return "after its state file was written" + (
            " (daemon loop)" if cycle.command == "run" else ""
        )
    kernel_now = (netns.link_details(lab.ns("peer"), "vxlan0") or {}).get("ifindex"), has_table(lab)
    if kernel_now != before["kernel"]:
        return "applying to the kernel"
    if register_answered:
        return "between registration and the kernel"
    if sum(counts.values()):
        return "asking the API"
    return "start-up (before the first API call)"


def has_table(lab: LabHandle) -> bool:
    return lab.run("peer", "nft", "list", "table", "inet", "gatepeer", check=False).returncode == 0


def check_converged(
    lab: LabHandle, cycle: Cycle, before: dict[str, Any], i: int, *, noop_check: bool
) -> None:
    where = f"cycle {i} ({cycle})"
    first = lab.gatepeer("apply")
    assert first.returncode == 0, f"{where}: apply after the kill: {first.stdout}{first.stderr}"
    if noop_check:
        again = lab.gatepeer("apply")
        assert again.returncode == 0 and "nothing to change" in again.stdout, (
            f"{where}: not converged after one apply:\n{again.stdout}{again.stderr}"
        )
    emulator = lab.state()
    peers = emulator["peers"]
    assert [p["outer_ip"] for p in peers] == [PEER_OUTER], f"{where}: registrations {peers}"
    registered = [
        r for r in emulator["recent"]
        if r["operation"] == "registerGatePeer" and r["status"] in (200, 201)
    ]  # fmt: skip
    assert len(registered) <= (1 if cycle.start == "fresh" else 0), (
        f"{where}: registered {len(registered)} times"
    )
    inner = peers[0]["inner_ip"]
    if cycle.start != "fresh":
        assert inner == before["inner"], (
            f"{where}: inner address moved {before['inner']} -> {inner}"
        )

    assert vxlan_links(lab) == ["vxlan0"], f"{where}: vxlan links {vxlan_links(lab)}"
    addrs = [
        a["local"]
        for e in netns.ip_json(lab.ns("peer"), "-4", "addr", "show", "dev", "vxlan0")
        for a in e.get("addr_info", [])
    ]
    assert addrs == [inner], f"{where}: vxlan0 addresses {addrs}, want [{inner}]"
    rows = netns.bridge_json(lab.ns("peer"), "fdb", "show", "dev", "vxlan0")
    flood = sorted(str(r["dst"]) for r in rows if r.get("mac") == ZERO_MAC)
    endpoints = sorted(str(ep.outer) for ep in lab.layout.endpoints)
    assert flood == endpoints, f"{where}: flood entries {flood}, want {endpoints}"
    ruleset = lab.run("peer", "nft", "list", "tables").stdout.split("\n")
    assert [t for t in ruleset if t.strip()] == ["table inet gatepeer"], f"{where}: {ruleset}"
    listing = lab.run("peer", "nft", "list", "set", "inet", "gatepeer", "vpg_endpoints").stdout
    match = re.search(r"elements = \{([^}]*)\}", listing, re.S)
    assert match and sorted(a.strip() for a in match.group(1).split(",")) == endpoints, listing

    for path in (lab.paths.state_file, lab.paths.gate_cache):
        data = json.loads(path.read_text())  # whole, valid JSON
        assert isinstance(data, dict) and data.get("format") == 1, f"{where}: {path}: {data}"
    strays = [
        p.name
        for p in lab.paths.dir.iterdir()
        if p.name.startswith((".state", ".gate"))
        and p.name.endswith(".tmp")
        or p.name.startswith(".state-")  # the old temporary name
    ]
    assert not strays, f"{where}: half-written files left behind: {strays}"


def test_sigkill_at_random_moments_always_converges_on_the_next_start(
    make_lab: Callable[..., LabHandle],
) -> None:
    seed = int(os.environ.get("GATEPEER_CRASH_SEED") or secrets.randbits(32))
    print(f"\ncrash seed {seed} (GATEPEER_CRASH_SEED={seed} replays it)")
    rng = random.Random(seed)
    lab = make_lab()
    lab.set_config("agent", "reconcile_interval", '"1s"')
    first = lab.gatepeer("apply")
    assert first.returncode == 0, first.stdout + first.stderr

    landed: dict[str, collections.Counter[str]] = {"apply": collections.Counter(),
                                                   "run": collections.Counter()}  # fmt: skip
    finished_first = collections.Counter[str]()
    plan = ["apply"] * APPLY_KILLS + ["run"] * RUN_KILLS
    rng.shuffle(plan)
    kills = 0
    i = 0
    started = time.monotonic()
    while plan:
        i += 1
        command = plan[0]
        start = rng.choice(STARTS)
        # apply: start-up (~0.3 s) plus up to five slow calls; run: its first reconcile, and
        # the loop that follows it.
        longest = {"converged": 0.8, "kernel-wiped": 1.0, "fresh": 1.3}[start]
        delay = rng.uniform(0.05, longest) if command == "apply" else rng.uniform(0.05, 2.0)
        cycle = Cycle(command, start, round(delay, 3))
        inner_before = lab.state()["peers"][0]["inner_ip"]
        if start != "converged":
            wipe_kernel(lab)
        if start == "fresh":
            unregister(lab)
        lab.control("reset_counts")
        lab.control("faults", {"latency_ms": API_LATENCY_MS})
        before = {
            "inner": inner_before,
            "kernel": ((netns.link_details(lab.ns("peer"), "vxlan0") or {}).get("ifindex"),
                       has_table(lab)),
        }  # fmt: skip
        # Half the fresh applies are killed the moment their registration reaches the API:
        # random delays alone hit that 150 ms window too rarely to count on.
        # Likewise half the applies after a wipe die the moment vxlan0 appears, in the middle
        # of building the kernel state.
        targeted = None
        if command == "apply" and start != "converged" and rng.random() < 0.5:
            targeted = "registration" if start == "fresh" else "link"
            cycle.delay = -1.0
        proc = spawn(lab, command) if command == "apply" else spawn(lab, "run", "-v")
        try:
            if targeted == "registration":
                wait_for_registration(lab, proc)
            elif targeted == "link":
                wait_for_link(lab, proc)
            else:
                time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        at_kill = lab.state()  # before in-flight requests complete
        if proc.returncode != -signal.SIGKILL:
            assert command == "apply", f"gatepeer run exited {proc.returncode} on its own"
            finished_first[command] += 1
            cycle.landed = f"finished first (exit {proc.returncode})"
            lab.control("reset_faults")
        else:
            kills += 1
            plan.pop(0)
            lab.control("reset_faults")
            settle_emulator(lab)
            cycle.landed = where_it_landed(lab, cycle, proc.pid, at_kill, before)
            landed[command][cycle.landed] += 1
        # A second apply that must change nothing: every few cycles (each costs a start-up).
        check_converged(lab, cycle, before, i, noop_check=i % 4 == 0 or len(plan) <= 1)
        assert i < (APPLY_KILLS + RUN_KILLS) * 2, "too many runs finished before their kill"

    figures = {
        "seed": seed,
        "kills": kills,
        "cycles": i,
        "finished_before_the_kill": dict(finished_first),
        "seconds": round(time.monotonic() - started, 1),
        "landed": {k: dict(v) for k, v in landed.items()},
    }
    print("FIGURES " + json.dumps(figures))
    assert kills >= 50
    assert landed["apply"]["inside registration (request in flight)"] > 0, (
        f"no kill landed inside registration: {figures}"
    )
