"""Agent.reconcile against a fake kernel: the paths the lab cannot reach."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from test_plan import FACTS, GATE, converged, make_config

from gatepeer import ruleset
from gatepeer.agent import Agent
from gatepeer.config import AgentConfig, Config
from gatepeer.kernel import nftables
from gatepeer.plan import Action, CreateLink, LoadRuleset, SetSysctl
from gatepeer.state import DesiredState, ObservedState, desired_state

CONNTRACK_MAX = "net/netfilter/nf_conntrack_max"


class FakeKernel:
    """Observes what it was told; conntrack's keys appear once a ruleset has loaded, as on a
    fresh instance where the first `ct state` rule loads nf_conntrack."""

    def __init__(self, desired: DesiredState) -> None:
        self.desired = desired
        self.applied: list[Action] = []
        self.conntrack_loaded = False
        self.sysctls: dict[str, int] = {}

    def host_facts(self, *_: Any) -> Any:
        return FACTS

    def observe(self, name: str, sysctls: Any) -> ObservedState:
        if not self.applied:
            return ObservedState(
                link=None,
                addresses=frozenset(),
                fdb=frozenset(),
                sysctls=tuple(
                    (s.path, None if "netfilter" in s.path else 0) for s in self.desired.sysctls
                ),
            )
        values = []
        for s in self.desired.sysctls:
            if "netfilter" in s.path and not self.conntrack_loaded:
                values.append((s.path, None))
            else:
                values.append((s.path, self.sysctls.get(s.path, s.value)))
        return dataclasses.replace(converged(self.desired), sysctls=tuple(values))

    def apply(self, action: Action) -> None:
        self.applied.append(action)
        if isinstance(action, SetSysctl):
            self.sysctls[action.setting.path] = action.setting.value

    def close(self) -> None:
        pass


@pytest.fixture
def fake_nft(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    loaded: list[str] = []
    monkeypatch.setattr(nftables, "nft_available", lambda: True)
    monkeypatch.setattr(nftables, "flowtable_supported", lambda netns=None: False)
    monkeypatch.setattr(nftables, "current", lambda netns=None: None)
    monkeypatch.setattr(
        nftables, "load", lambda spec, netns=None, counters=None: loaded.append("x")
    )
    return loaded


def agent_for(tmp_path: Path, kernel: FakeKernel) -> Agent:
    config: Config = make_config()
    config = dataclasses.replace(
        config,
        agent=AgentConfig(state_file=tmp_path / "state.json", gate_cache=tmp_path / "gate.json"),
    )
    agent = Agent(config, netlink=kernel)  # type: ignore[arg-type]
    agent.gate = GATE
    return agent


def test_first_apply_sets_conntrack_keys_that_appear_only_after_the_ruleset(
    tmp_path: Path, fake_nft: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = FakeKernel(desired_state(make_config(), FACTS, GATE))
    agent = agent_for(tmp_path, kernel)
    # Once the ruleset is loaded, conntrack's keys exist with the kernel's smaller defaults.
    original_apply = agent.apply_action

    def apply(action: Action) -> None:
        original_apply(action)
        if isinstance(action, LoadRuleset):
            kernel.applied.append(action)  # nft actions do not pass through netlink
            kernel.conntrack_loaded = True
            kernel.sysctls[CONNTRACK_MAX] = 65536

    monkeypatch.setattr(agent, "apply_action", apply)
    monkeypatch.setattr(nftables, "current", lambda netns=None: _rendered(kernel))
    result = agent.reconcile(refresh=False)
    assert result.health == "ok", result.reasons
    assert isinstance(result.actions[0], CreateLink)
    late = [
        a for a in result.actions if isinstance(a, SetSysctl) and a.setting.path == CONNTRACK_MAX
    ]
    assert len(late) == 1 and late[0].was == 65536
    assert kernel.sysctls[CONNTRACK_MAX] == late[0].setting.value


def _rendered(kernel: FakeKernel) -> str | None:
    # The table exists once a LoadRuleset went through.
    if any(isinstance(a, LoadRuleset) for a in kernel.applied):
        spec = kernel.desired.packet_path
        assert spec is not None
        return ruleset.render(spec)
    return None
