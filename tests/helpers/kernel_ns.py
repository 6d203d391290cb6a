"""One network namespace for a test, without the lab: a veth pair as the underlay, the agent's
code run in a thread that has entered it (`call`), and iproute2 views of what is there."""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from conftest import new_prefix

from gatepeer.agent import Agent
from gatepeer.config import AgentConfig, Config, TunnelConfig
from gatepeer.desired_state import GateView, IPv4Address
from gatepeer.lab.network import netns
from helpers.plan_inputs import GATE

T = TypeVar("T")
UNDERLAY = "gpu0"
LOCAL = IPv4Address("192.0.2.10")


@dataclasses.dataclass
class Namespace:
    name: str
    state_dir: Path

    def call(self, fn: Callable[[], T]) -> T:
        return netns.call_in_netns(self.name, fn)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return netns.ip(self.name, *args, check=check)

    def link(self, name: str) -> dict[str, Any] | None:
        return netns.link_details(self.name, name)

    def addresses(self, name: str) -> list[str]:
        rows = netns.ip_json(self.name, "-4", "addr", "show", "dev", name)
        return [f"{a['local']}/{a['prefixlen']}" for r in rows for a in r.get("addr_info", [])]

    def sysctl(self, dotted: str) -> int:
        return int(netns.read_sysctl(self.name, dotted))

    def config(self, **tunnel: Any) -> Config:
        return dataclasses.replace(
            Config(),
            tunnel=dataclasses.replace(
                TunnelConfig(),
                underlay_interface=UNDERLAY,
                local_address=LOCAL,
                mtu="auto",
                **tunnel,
            ),
            agent=AgentConfig(state_file=self.state_dir / "state.json", gate_cache=None),
        )

    def agent(self, gate: GateView = GATE, **tunnel: Any) -> Agent:
        """An agent whose netlink socket lives in this namespace; call its methods in `call`."""
        agent = self.call(lambda: Agent(self.config(**tunnel)))
        agent.gate = dataclasses.replace(gate, outer=LOCAL)
        return agent


@contextmanager
def namespace(tmp_path: Path) -> Iterator[Namespace]:
    """A fresh namespace with the underlay up; deleted at the end, even on failure."""
    name = f"{new_prefix()}-k"
    netns.run(["ip", "netns", "add", name])
    try:
        netns.ip(name, "link", "set", "lo", "up")
        netns.ip(name, "link", "add", UNDERLAY, "type", "veth", "peer", "name", "gpu1")
        netns.ip(name, "addr", "add", f"{LOCAL}/24", "dev", UNDERLAY)
        for link in (UNDERLAY, "gpu1"):
            netns.ip(name, "link", "set", link, "up")
        yield Namespace(name, tmp_path)
    finally:
        netns.run(["ip", "netns", "delete", name], check=False)
