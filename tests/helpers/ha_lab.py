"""Looking at a running two-peer lab's HA pair (`lab up --peers 2`, `lab ha start`): roles from
each daemon's state.json, the VPG's redirection gateway, who holds the pair's NAT address, and
the conntrack tables (the kernel's, and conntrackd's external cache) of the flows to one port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatepeer.config import load
from gatepeer.ha import verdict
from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import GatePeer, Layout
from gatepeer.lab.network.vpg import endpoint_gateway
from gatepeer.lab.processes import ha_pair
from gatepeer.lab.processes.pids import pid_alive, read_pid, runs
from gatepeer.lab.record import Paths

# A flow as both tables print it: the original direction's addresses and ports.
FLOW_RE = re.compile(
    r"^(?P<proto>tcp|udp)\s.*?src=(?P<src>\S+) dst=(?P<dst>\S+) sport=(?P<sport>\d+) "
    r"dport=(?P<dport>\d+)"
)
Flow = tuple[str, str, str, int, int]  # protocol, source, destination, ports
SPLIT_TABLE = "halab_split"  # the split-brain tests' table in a peer's namespace


@dataclass
class HaLab:
    layout: Layout
    paths: Paths
    advert: float = 1.0

    @property
    def peers(self) -> list[GatePeer]:
        return self.layout.gate_peers

    def state(self, peer: GatePeer) -> dict[str, Any]:
        return ha_pair.agent_state(self.paths, peer.index) or {}

    def role(self, peer: GatePeer) -> str:
        return str((self.state(peer).get("ha") or {}).get("role", "unknown"))

    def claims(self, peer: GatePeer) -> int:
        return int((self.state(peer).get("ha") or {}).get("claims") or 0)

    def inner(self, peer: GatePeer) -> str:
        return str(self.state(peer)["gate"]["inner"]).split("/")[0]

    def gateway(self) -> str | None:
        return endpoint_gateway(self.layout.endpoints[0].ns)

    def holder(self) -> GatePeer | None:
        """The peer the VPG sends the devices' traffic to."""
        gateway = self.gateway()
        return next((p for p in self.peers if self.inner(p) == gateway), None)

    def addresses(self, peer: GatePeer) -> list[str]:
        links = netns.ip_json(peer.ns, "addr", "show", "dev", "eth0")
        return [str(a["local"]) for link in links for a in link.get("addr_info", [])]

    def nat_holders(self, snat: str) -> list[GatePeer]:
        return [p for p in self.peers if snat in self.addresses(p)]

    def ha_times(self, peer: GatePeer) -> tuple[float | None, float | None]:
        """(since, claimed_at) from the peer's state.json: when its daemon read the last role
        change from keepalived's FIFO, and when its last claim succeeded (wall clock)."""
        ha = self.state(peer).get("ha") or {}
        since, claimed = ha.get("since"), ha.get("claimed_at")
        return (
            float(since) if isinstance(since, int | float) else None,
            float(claimed) if isinstance(claimed, int | float) else None,
        )

    def timeline(self, peer: GatePeer, origin: float) -> str:
        """When `peer` read MASTER and when its claim was answered, relative to `origin` (a
        wall-clock event such as the cut): where a takeover's seconds go."""
        since, claimed = self.ha_times(peer)

        def rel(at: float | None) -> str:
            return "?" if at is None else f"{at - origin:+.3f} s"

        return f"{peer.ns} read {self.role(peer)} at {rel(since)}, claimed at {rel(claimed)}"

    def keep_logs(self, folder: Path) -> None:
        """Copy the pair's logs (keepalived, gatepeer, conntrackd) to `folder`, for tracing."""
        folder.mkdir(parents=True, exist_ok=True)
        for p in self.peers:
            for name in ("keepalived.log", "gatepeer.log", "conntrackd.log"):
                path = self.paths.peer_file(p.index, name)
                if path.exists():
                    shutil.copy(path, folder / f"{self.layout.prefix}-peer{p.index}-{name}")

    def logs(self) -> str:
        out = []
        for p in self.peers:
            for name in ("keepalived.log", "gatepeer.log", "conntrackd.log"):
                path = self.paths.peer_file(p.index, name)
                text = path.read_text(errors="replace")[-1500:] if path.exists() else "(none)"
                out.append(f"--- {p.ns} {name}\n{text}")
        return "\n".join(out)

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                roles = {p.ns: self.role(p) for p in self.peers}
                raise AssertionError(
                    f"{what}: not within {timeout} s; roles {roles}, gateway {self.gateway()}\n"
                    + self.logs()
                )
            time.sleep(0.02)
        return time.monotonic() - started

    def check_passes(self, peer: GatePeer) -> bool:
        """The daemon's verdict for keepalived's check (`state.ha-check` beside its state
        file) says ok."""
        # verdict.path's rule, on the state file the lab gave the peer (no config to load).
        found = self.paths.peer_state_file(peer.index).with_suffix(f".{verdict.CHECK_FILE}")
        try:
            parsed = verdict.parse(found.read_text())
        except OSError:
            return False
        return parsed is not None and not parsed[2]

    def settled(self, timeout: float = 30) -> tuple[GatePeer, GatePeer]:
        """One master holding the gateway, one backup, both passing their check: (master,
        backup). A peer whose check failed (a cut just mended) can be backup while keepalived
        still counts the failures: stopping the master then hands the role to a peer that goes
        FAULT a moment later. So after a failing verdict turns ok this also waits for keepalived
        to have counted `check_rise` passes."""

        def one_master() -> bool:
            if sorted(self.role(p) for p in self.peers) != ["backup", "master"]:
                return False
            master = next(p for p in self.peers if self.role(p) == "master")
            return self.holder() == master and self.claims(master) >= 1

        failing = [p for p in self.peers if not self.check_passes(p)]
        if failing:
            self.wait(lambda: all(self.check_passes(p) for p in self.peers), timeout, "checks pass")
            ha = load(self.paths.peer_config(failing[0].index)).ha
            assert ha is not None
            time.sleep((ha.check_rise + 1) * ha.check_interval)
        self.wait(one_master, timeout, "one master holding the gateway, one backup")
        master = next(p for p in self.peers if self.role(p) == "master")
        return master, next(p for p in self.peers if p != master)

    def set_advert(self, seconds: float) -> None:
        """ha.advert_interval in both configs; keepalived restarted on both (backup first, so
        the master's role is not handed over)."""
        if seconds == self.advert:
            return
        for p in self.peers:
            ha_pair.stop_keepalived(self.paths, p.index)
        for p in self.peers:
            config = self.paths.peer_config(p.index)
            config.write_text(
                re.sub(
                    r'(?m)^advert_interval = ".*"$',
                    f'advert_interval = "{seconds:g}s"',
                    config.read_text(),
                )
            )
            ha_pair.start_keepalived(self.paths, p)
        self.advert = seconds

    def block_vrrp(self, peer: GatePeer) -> None:
        """Drop VRRP (IP protocol 112) arriving at this peer, in a table of the test's own: one
        half of a split brain."""
        ruleset = (
            f"table ip {SPLIT_TABLE} {{\n"
            "  chain input { type filter hook input priority -10; ip protocol vrrp drop; }\n"
            "}\n"
        )
        netns.run(netns.exec_in(peer.ns, ["nft", "-f", "-"]), input=ruleset)

    def unblock_vrrp(self, peer: GatePeer) -> None:
        netns.run(
            netns.exec_in(peer.ns, ["nft", "delete", "table", "ip", SPLIT_TABLE]), check=False
        )

    def cut(self, peer: GatePeer) -> None:
        """The VPC side of the peer's ENI goes down (carrier lost; its own routes stay)."""
        netns.ip(self.layout.fabric_ns, "link", "set", "dev", peer.fabric_port, "down")

    def mend(self, peer: GatePeer) -> None:
        netns.ip(self.layout.fabric_ns, "link", "set", "dev", peer.fabric_port, "up")

    def kill_agent(self, peer: GatePeer) -> int:
        """SIGKILL to the peer's `gatepeer run` (a crash, an OOM kill: nothing of it runs
        again), by the pid the lab recorded, after checking its command line."""
        pid = read_pid(self.paths.peer_file(peer.index, "gatepeer.pid"))
        assert runs(pid, "gatepeer", str(self.paths.peer_config(peer.index))), pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        self.wait(lambda: not pid_alive(pid), 10, f"gatepeer run (pid {pid}) gone")
        return pid

    # ---- conntrack --------------------------------------------------------------------------

    def kernel_flows(self, peer: GatePeer, port: int) -> set[Flow]:
        """The kernel's conntrack entries of flows to `port` on this peer."""
        out = netns.run(netns.exec_in(peer.ns, ["conntrack", "-L"]), check=False).stdout
        return flows_to(out, port)

    def external_flows(self, peer: GatePeer, port: int) -> set[Flow]:
        """conntrackd's external cache (the other peer's flows) on this peer."""
        conf = self.paths.peer_file(peer.index, "conntrackd.conf")
        cmd = [ha_pair.conntrackd_binary(), "-C", str(conf), "-e"]
        return flows_to(netns.run(netns.exec_in(peer.ns, cmd), check=False).stdout, port)


def flows_to(text: str, port: int) -> set[Flow]:
    flows = set()
    for line in text.splitlines():
        m = FLOW_RE.match(line.strip())
        if m and int(m["dport"]) == port:
            flows.add((m["proto"], m["src"], m["dst"], int(m["sport"]), int(m["dport"])))
    return flows
