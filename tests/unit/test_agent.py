"""Agent.reconcile against a fake kernel: the paths the lab cannot reach."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_kernel import FakeKernel
from helpers.plan_inputs import FACTS, GATE, converged, make_config

from gatepeer import atomic_json, redirection, ruleset
from gatepeer.agent import Agent
from gatepeer.config import AgentConfig, Config, PacketPathConfig, SoracomConfig
from gatepeer.desired_state import (
    DesiredState,
    IPv4Address,
    IPv4Interface,
    Redirection,
    desired_state,
)
from gatepeer.kernel import nftables
from gatepeer.lab.emulator.model import EmulatorSettings
from gatepeer.lab.emulator.service import Emulator
from gatepeer.plan import Action, CreateLink, LoadRuleset, SetSysctl
from gatepeer.soracom import SoracomClient, SoracomError

CONNTRACK_MAX = "net/netfilter/nf_conntrack_max"


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


def agent_for(tmp_path: Path, kernel: FakeKernel, config: Config | None = None) -> Agent:
    config = config or make_config()
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
    # nat mode tracks connections, so conntrack is sized (route mode leaves it alone).
    config = dataclasses.replace(make_config(), packet_path=PacketPathConfig(mode="nat"))
    kernel = FakeKernel(desired_state(config, FACTS, GATE))
    agent = agent_for(tmp_path, kernel, config)
    # nat mode is healthy only with the VPG's redirection pointing here.
    here = Redirection(enabled=True, gateway=GATE.inner.ip)
    agent.gate = dataclasses.replace(GATE, redirection=here)
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


# ---- against the in-process emulator: redirection, poisoned answers, down --unregister -------

AUTH_KEY = "secret-agent-test-key-0b9d8e7f6a5c"
EMU = EmulatorSettings(auth_key=AUTH_KEY)
EMU_GATE = dataclasses.replace(GATE, vpg_id=EMU.vpg_id)  # what the emulator assigns 198.18.0.10


class PoisonableClient(SoracomClient):
    """The real client; `vpg` and `peers` may rewrite an answer before the agent sees it."""

    vpg: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    peers: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None

    def get_virtual_private_gateway(self, vpg_id: str) -> dict[str, Any]:
        answer = super().get_virtual_private_gateway(vpg_id)
        return self.vpg(answer) if self.vpg else answer

    def list_gate_peers(self, vpg_id: str) -> list[dict[str, Any]]:
        answer = super().list_gate_peers(vpg_id)
        return self.peers(answer) if self.peers else answer

    refuse: set[str] = set()  # operations answered 400 instead of being sent

    def set_redirection(self, vpg_id: str, gateway: str) -> None:
        if "setRedirectionConfiguration" in self.refuse:
            raise SoracomError("setRedirectionConfiguration", 400, "Invalid gateway", "VPG0001")
        super().set_redirection(vpg_id, gateway)

    def unregister_gate_peer(self, vpg_id: str, outer_ip: str) -> None:
        if "unregisterGatePeer" in self.refuse:
            raise SoracomError("unregisterGatePeer", 500, "Internal error")
        super().unregister_gate_peer(vpg_id, outer_ip)


@pytest.fixture
def nft_table(fake_nft: list[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """nft as a table that holds what was last loaded."""
    table: list[str] = []
    monkeypatch.setattr(
        nftables,
        "load",
        lambda spec, netns=None, counters=None: table.append(ruleset.render(spec)),
    )
    monkeypatch.setattr(nftables, "current", lambda netns=None: table[-1] if table else None)
    return table


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(EMU)
    emu.base_url = emu.start()  # type: ignore[attr-defined]
    yield emu
    emu.stop()


def emu_agent(
    tmp_path: Path,
    emulator: Emulator,
    kernel: Any = None,
    *,
    redirection: str = "self",
    mode: str = "route",
    **soracom: Any,
) -> tuple[Agent, PoisonableClient]:
    config = make_config()
    config = dataclasses.replace(
        config,
        soracom=SoracomConfig(
            endpoint=emulator.base_url,  # type: ignore[attr-defined]
            auth_key_id=EMU.auth_key_id,
            vpg_id=EMU.vpg_id,
            redirection=redirection,  # type: ignore[arg-type]
            **soracom,
        ),
        agent=AgentConfig(state_file=tmp_path / "state.json", gate_cache=tmp_path / "gate.json"),
        packet_path=dataclasses.replace(config.packet_path, mode=mode),  # type: ignore[arg-type]
    )
    client = PoisonableClient(
        config.soracom.endpoint, EMU.auth_key_id, lambda: AUTH_KEY, sleep=lambda s: None
    )
    kernel = kernel or FakeKernel(desired_state(config, FACTS, EMU_GATE))
    return Agent(config, client=client, netlink=kernel), client


def test_redirection_is_posted_once_not_on_every_reconcile(
    tmp_path: Path, nft_table: list[str], emulator: Emulator
) -> None:
    agent, _ = emu_agent(tmp_path, emulator)
    for _ in range(3):
        result = agent.reconcile()
        assert result.health == "ok", result.reasons
    assert emulator.counts()["setRedirectionConfiguration"] == 1
    assert emulator.state()["redirection"] == {"enabled": True, "gateway": "198.19.0.3"}
    assert agent.gate is not None and redirection.points_here(agent.gate)
    # Someone points it elsewhere: the next reconcile that reads the VPG takes it back, once.
    agent.client.set_redirection(EMU.vpg_id, "198.19.0.9")
    agent.reconcile()
    agent.reconcile()
    assert emulator.counts()["setRedirectionConfiguration"] == 3  # ours, theirs, ours
    assert emulator.state()["redirection"]["gateway"] == "198.19.0.3"


def test_unmanaged_redirection_is_left_alone_and_nat_without_it_is_degraded(
    tmp_path: Path, nft_table: list[str], emulator: Emulator
) -> None:
    agent, _ = emu_agent(tmp_path, emulator, redirection="unmanaged", mode="nat")
    result = agent.reconcile()
    assert "setRedirectionConfiguration" not in emulator.counts()
    assert result.health == "degraded"
    assert any(r.startswith("packet_path.mode is nat but") for r in result.reasons), result.reasons
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["health"] == "degraded" and state["gate"]["redirection"] is None


def test_a_failed_set_redirection_is_degraded_and_retried(
    tmp_path: Path, nft_table: list[str], emulator: Emulator
) -> None:
    agent, client = emu_agent(tmp_path, emulator)
    client.refuse = {"setRedirectionConfiguration"}
    result = agent.reconcile()
    assert result.health == "degraded"
    assert any("setRedirectionConfiguration" in r for r in result.reasons), result.reasons
    assert any(r.startswith('soracom.redirection is "self"') for r in result.reasons)
    client.refuse = set()
    assert agent.reconcile().health == "ok"
    assert emulator.state()["redirection"]["gateway"] == "198.19.0.3"


def test_dry_run_says_it_would_set_the_redirection_and_does_not(
    tmp_path: Path, nft_table: list[str], emulator: Emulator
) -> None:
    agent, client = emu_agent(tmp_path, emulator)
    client.register_gate_peer(EMU.vpg_id, str(FACTS.local_address))
    result = agent.reconcile(dry_run=True)
    assert [a.command() for a in result.api_actions] == [
        f"soracom vpg set-redirection --vpg-id {EMU.vpg_id} "
        """--body '{"enabled":true,"gateway":"198.19.0.3"}'  # now not set"""
    ]
    assert "setRedirectionConfiguration" not in emulator.counts()
    assert emulator.state()["redirection"] is None


def _first(rows: list[dict[str, Any]], **changes: Any) -> list[dict[str, Any]]:
    """The list with the first VPG endpoint's row changed."""
    out = [dict(r) for r in rows]
    for row in out:
        if row["ownedByCustomer"] is False:
            row.update(changes)
            break
    return out


def _own(rows: list[dict[str, Any]], **changes: Any) -> list[dict[str, Any]]:
    out = [dict(r) for r in rows]
    for row in out:
        if row["ownedByCustomer"] is True:
            row.update(changes)
    return out


POISONED_ANSWERS: dict[str, tuple[Any, Any]] = {
    "inner-outside-subnet": (None, lambda r: _own(r, innerIpAddress="10.0.0.3")),
    "netmask-slash-1": (None, lambda r: _own(r, netmask="128.0.0.0")),
    "netmask-prefix-length": (None, lambda r: _own(r, netmask=24)),
    "endpoint-unspecified": (None, lambda r: _first(r, outerIpAddress="0.0.0.0")),
    "endpoint-multicast": (None, lambda r: _first(r, outerIpAddress="224.0.0.251")),
    "endpoint-loopback": (None, lambda r: _first(r, outerIpAddress="127.0.0.1")),
    "endpoint-link-local": (None, lambda r: _first(r, outerIpAddress="169.254.169.254")),
    "endpoint-this-host": (None, lambda r: _first(r, outerIpAddress=str(FACTS.local_address))),
    "vni-zero": (lambda v: {**v, "gateVxlanId": 0}, None),
    "vni-too-large": (lambda v: {**v, "gateVxlanId": 2**24}, None),
    "subnet-missing": (
        lambda v: {k: x for k, x in v.items() if not k.endswith("SubnetCidrRange")},
        None,
    ),
    "subnet-wrong-type": (lambda v: {**v, "deviceSubnetCidrRange": ["198.19.0.0/16"]}, None),
    "owned-by-customer-missing": (lambda v: v, lambda r: _first(r, ownedByCustomer=None)),
    "inner-with-crlf": (None, lambda r: _own(r, innerIpAddress="198.19.0.3\r\nX: y")),
}


@pytest.mark.parametrize("poison", POISONED_ANSWERS, ids=list(POISONED_ANSWERS))
def test_a_poisoned_answer_keeps_the_last_good_view_applied(
    tmp_path: Path,
    nft_table: list[str],
    emulator: Emulator,
    poison: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent, client = emu_agent(tmp_path, emulator)
    kernel = agent.netlink
    assert agent.reconcile().health == "ok"
    good = agent.gate
    assert good is not None and good.inner == EMU_GATE.inner
    cache = (tmp_path / "gate.json").read_text()
    applied = list(kernel.applied)  # type: ignore[attr-defined]
    client.vpg, client.peers = POISONED_ANSWERS[poison]
    caplog.clear()
    result = agent.reconcile()
    assert result.health == "degraded", result.reasons
    assert result.actions == []  # nothing on the kernel changes...
    assert kernel.applied == applied  # type: ignore[attr-defined]
    # ...so the tunnel keeps the device subnet's prefix and the default route its underlay.
    assert agent.desired().address == IPv4Interface("198.19.0.3/16")
    assert agent.gate == good
    refused = [r for r in result.reasons if "answer refused" in r]
    assert len(refused) == 1 and refused[0].isprintable(), result.reasons
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["gate"] == good.to_json() and state["api_answer_refused"] is True
    assert state["api_refused_field"] in POISONED_FIELDS
    assert state["health"] == "degraded"
    assert (tmp_path / "gate.json").read_text() == cache
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and all(r.exc_info is None for r in errors)
    assert all("\n" not in r.getMessage() and "\r" not in r.getMessage() for r in errors)
    # The answer heals: the refusal clears.
    client.vpg = client.peers = None
    assert agent.reconcile().health == "ok"
    assert json.loads((tmp_path / "state.json").read_text())["api_answer_refused"] is False


POISONED_FIELDS = {
    "innerIpAddress",
    "netmask",
    "outerIpAddress",
    "gateVxlanId",
    "ueSubnetCidrRange",
    "deviceSubnetCidrRange",
    "ownedByCustomer",
}


def test_poisoned_answers_cover_the_required_kinds() -> None:
    assert len(POISONED_ANSWERS) >= 8


@pytest.mark.parametrize(("field", "value"), [("vpg_id", "other-vpg"), ("outer", "198.18.0.99")])
def test_a_saved_view_for_another_vpg_or_outer_address_is_discarded(
    tmp_path: Path, emulator: Emulator, field: str, value: str
) -> None:
    atomic_json.write(tmp_path / "gate.json", {"gate": EMU_GATE.to_json()})
    control, _ = emu_agent(tmp_path, emulator)
    assert control.gate == EMU_GATE  # the same view, unchanged, is taken
    saved = {**EMU_GATE.to_json(), field: value}
    atomic_json.write(tmp_path / "gate.json", {"gate": saved, "fetched_at": 1.0})
    atomic_json.write(tmp_path / "state.json", {"gate": saved})
    agent, _ = emu_agent(
        tmp_path, emulator, kernel=FakeKernel(desired_state(make_config(), FACTS, EMU_GATE))
    )
    if field == "outer":
        # Only a configured local address says which outer address the view must have.
        assert agent.gate is not None
        agent = Agent(
            dataclasses.replace(
                agent.config,
                tunnel=dataclasses.replace(agent.config.tunnel, local_address=FACTS.local_address),
            ),
            client=agent.client,
            netlink=agent.netlink,
        )
    assert agent.gate is None


class TeardownKernel(FakeKernel):
    def __init__(self, desired: DesiredState, local: str) -> None:
        super().__init__(desired)
        self.local = IPv4Address(local)
        self.deleted: list[str] = []

    def host_facts(self, *_: Any) -> Any:
        return dataclasses.replace(FACTS, local_address=self.local)

    def delete_link(self, name: str) -> bool:
        self.deleted.append(name)
        return True

    def observe_link(self, name: str) -> Any:
        return converged(self.desired).link if name == self.desired.link.name else None


def _down_agent(tmp_path: Path, emulator: Emulator, host: str) -> tuple[Agent, PoisonableClient]:
    kernel = TeardownKernel(desired_state(make_config(), FACTS, EMU_GATE), host)
    return emu_agent(tmp_path, emulator, kernel=kernel)


def test_down_unregister_uses_the_saved_view_and_unsets_a_redirection_pointing_here(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nftables, "nft_available", lambda: False)  # no nft on this host
    client = SoracomClient(emulator.base_url, EMU.auth_key_id, lambda: AUTH_KEY)  # type: ignore[attr-defined]
    client.register_gate_peer(EMU.vpg_id, "198.18.0.10")
    client.set_redirection(EMU.vpg_id, "198.19.0.3")
    atomic_json.write(tmp_path / "gate.json", {"gate": EMU_GATE.to_json()})
    # The host's address changed since it registered: the registered one is unregistered.
    agent, _ = _down_agent(tmp_path, emulator, host="198.18.0.99")
    removed, messages = agent.teardown(unregister=True)
    assert removed
    assert emulator.peers() == []
    assert emulator.state()["redirection"] is None
    assert f"unregistered 198.18.0.10 from VPG {EMU.vpg_id}" in messages
    assert any(m.startswith("unset the redirection") for m in messages)
    assert not (tmp_path / "gate.json").exists()


def test_down_unregister_still_unregisters_when_the_vpg_answer_is_refused(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A VPG answer that fails its checks must not keep the registration alive (scale-in would
    # otherwise leave this peer registered after the instance is gone).
    monkeypatch.setattr(nftables, "nft_available", lambda: False)
    client = SoracomClient(emulator.base_url, EMU.auth_key_id, lambda: AUTH_KEY)  # type: ignore[attr-defined]
    client.register_gate_peer(EMU.vpg_id, "198.18.0.10")
    client.set_redirection(EMU.vpg_id, "198.19.0.3")
    atomic_json.write(tmp_path / "gate.json", {"gate": EMU_GATE.to_json()})
    agent, poisonable = _down_agent(tmp_path, emulator, host="198.18.0.10")
    poisonable.vpg = lambda answer: {**answer, "redirection": 5}
    removed, messages = agent.teardown(unregister=True)
    assert removed and emulator.peers() == []
    assert any(
        m.startswith(f"left the redirection of VPG {EMU.vpg_id} unchecked") for m in messages
    )
    assert "unsetRedirectionConfiguration" not in emulator.counts()


def test_down_unregister_leaves_a_redirection_pointing_elsewhere(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nftables, "nft_available", lambda: False)
    client = SoracomClient(emulator.base_url, EMU.auth_key_id, lambda: AUTH_KEY)  # type: ignore[attr-defined]
    client.register_gate_peer(EMU.vpg_id, "198.18.0.10")
    client.set_redirection(EMU.vpg_id, "198.19.0.200")
    atomic_json.write(tmp_path / "gate.json", {"gate": EMU_GATE.to_json()})
    agent, _ = _down_agent(tmp_path, emulator, host="198.18.0.10")
    agent.teardown(unregister=True)
    assert emulator.state()["redirection"] == {"enabled": True, "gateway": "198.19.0.200"}
    assert "unsetRedirectionConfiguration" not in emulator.counts()
    assert emulator.peers() == []


def test_down_unregister_keeps_the_saved_view_when_unregistering_fails(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nftables, "nft_available", lambda: False)
    client = SoracomClient(emulator.base_url, EMU.auth_key_id, lambda: AUTH_KEY)  # type: ignore[attr-defined]
    client.register_gate_peer(EMU.vpg_id, "198.18.0.10")
    atomic_json.write(tmp_path / "gate.json", {"gate": EMU_GATE.to_json()})
    agent, down_client = _down_agent(tmp_path, emulator, host="198.18.0.10")
    down_client.refuse = {"unregisterGatePeer"}
    with pytest.raises(SoracomError):
        agent.teardown(unregister=True)
    assert (tmp_path / "gate.json").exists()  # still the record of the registration
    assert emulator.peers() != []


def test_down_unregister_needs_no_nft(
    tmp_path: Path, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(netns: Any = None) -> None:
        raise nftables.NftError("list table", ["nft"], 1, "Operation not permitted")

    monkeypatch.setattr(nftables, "nft_available", lambda: True)
    monkeypatch.setattr(nftables, "current", broken)
    client = SoracomClient(emulator.base_url, EMU.auth_key_id, lambda: AUTH_KEY)  # type: ignore[attr-defined]
    client.register_gate_peer(EMU.vpg_id, "198.18.0.10")
    atomic_json.write(tmp_path / "gate.json", {"gate": EMU_GATE.to_json()})
    agent, _ = _down_agent(tmp_path, emulator, host="198.18.0.10")
    with pytest.raises(nftables.NftError):
        agent.teardown(unregister=True)
    assert emulator.peers() == []  # unregistered all the same


def test_apply_exits_1_with_the_refusal_on_one_line(
    tmp_path: Path, nft_table: list[str], emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from gatepeer import agent as agent_module
    from gatepeer.cli import main

    agent, client = emu_agent(tmp_path, emulator)
    assert agent.reconcile().health == "ok"
    client.peers = POISONED_ANSWERS["netmask-slash-1"][1]
    monkeypatch.setattr(agent_module, "Agent", lambda cfg: agent)
    monkeypatch.setattr(agent, "close", lambda: None)
    key = tmp_path / "key"
    key.write_text(AUTH_KEY)
    key.chmod(0o600)
    config = tmp_path / "gatepeer.toml"
    config.write_text(
        f'[soracom]\nendpoint = "{emulator.base_url}"\n'  # type: ignore[attr-defined]
        f'auth_key_id = "{EMU.auth_key_id}"\nauth_key_file = "{key}"\n'
        f'vpg_id = "{EMU.vpg_id}"\n[agent]\nstate_file = "{tmp_path / "other-state.json"}"\n'
    )
    result = CliRunner().invoke(main, ["apply", "--config", str(config)])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("gatepeer: ")]
    assert len(lines) == 1 and "listGatePeers answer refused: netmask '128.0.0.0'" in lines[0]
    assert "Traceback" not in result.output


def test_dry_run_plans_opening_gate_and_registering_from_the_api_plan(
    tmp_path: Path, nft_table: list[str], emulator: Emulator
) -> None:
    # Gate closed, this peer not registered: the plan opens Gate and registers (as the soracom
    # CLI lines that would do it), the kernel's plan uses a placeholder inner address, and
    # nothing reaches the API but reads.
    emulator.update_settings(gate_opened=False)
    agent, _ = emu_agent(tmp_path, emulator, redirection="unmanaged", open_gate=True)
    result = agent.reconcile(dry_run=True)
    assert [a.command() for a in result.api_actions] == [
        f"soracom vpg open-gate --vpg-id {EMU.vpg_id}",
        f"soracom vpg register-gate-peer --vpg-id {EMU.vpg_id} --outer-ip-address "
        f"{FACTS.local_address}  # the API assigns the inner address",
    ]
    assert result.actions, "the kernel's actions are planned against the placeholder view"
    assert set(emulator.counts()) <= {"auth", "getVirtualPrivateGateway", "listGatePeers"}
    assert emulator.peers() == []
    # The real run makes the same changes, then the view is read: nothing is left to plan.
    assert agent.reconcile().health == "ok"
    assert [p.outer_ip for p in emulator.peers()] == [str(FACTS.local_address)]
    assert agent.reconcile(dry_run=True).api_actions == []
