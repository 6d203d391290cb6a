"""The agent against a real kernel, without the lab: one network namespace per test with a veth
as the underlay, the gate view set by hand (no API), the agent's code run in a thread that has
entered the namespace. For what a fake kernel would only pretend: address promotion, links of
another kind under our name, a renamed tunnel, sysctls restored by `down`.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.kernel_ns import LOCAL, UNDERLAY, Namespace, namespace
from helpers.plan_inputs import GATE

from gatepeer.agent import Agent
from gatepeer.config import PacketPathConfig
from gatepeer.desired_state import IPv4Interface, IPv4Network
from gatepeer.lab.network import netns

pytestmark = pytest.mark.netns


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Namespace]:
    with namespace(tmp_path) as made:
        yield made


def reconcile(ns: Namespace, agent: Agent) -> Any:
    return ns.call(lambda: agent.reconcile(refresh=False))


# ---- 3: a new inner address in the same subnet ----------------------------------------------


def test_a_new_inner_address_in_the_same_subnet_converges_in_one_apply(ns: Namespace) -> None:
    agent = ns.agent()
    first = reconcile(ns, agent)
    assert first.health == "ok", first.reasons
    assert ns.addresses("vxlan0") == [str(GATE.inner)]

    # The API hands this peer another address in the same device subnet. Debian leaves
    # promote_secondaries at 0: deleting the old primary would take the new one with it.
    new_inner = IPv4Interface("198.19.0.7/16")
    agent.gate = dataclasses.replace(agent.gate, inner=new_inner)  # type: ignore[arg-type]
    second = reconcile(ns, agent)
    assert second.health == "ok", second.reasons
    assert ns.addresses("vxlan0") == [str(new_inner)]
    # Added before the old one is removed: the tunnel always had an address on the subnet.
    kinds = [type(a).__name__ for a in second.actions]
    assert kinds.index("AddAddress") < kinds.index("RemoveAddress"), kinds
    routes = netns.ip_json(ns.name, "-4", "route", "show", "dev", "vxlan0")
    assert [(r["dst"], r.get("prefsrc")) for r in routes] == [("198.19.0.0/16", "198.19.0.7")]
    assert reconcile(ns, agent).actions == []
    ns.call(agent.close)


def test_an_address_another_tool_added_to_the_tunnel_stays(ns: Namespace) -> None:
    # keepalived's virtual address in vip mode: on our tunnel, but not ours to remove.
    agent = ns.agent()
    assert reconcile(ns, agent).health == "ok"
    netns.ip(ns.name, "addr", "add", "198.19.0.100/32", "dev", "vxlan0")
    again = reconcile(ns, agent)
    assert again.health == "ok" and again.actions == [], again.actions
    assert sorted(ns.addresses("vxlan0")) == sorted([str(GATE.inner), "198.19.0.100/32"])
    # A new agent (a restart) reads what is ours from the state file: still the inner only.
    state = json.loads(agent.config.agent.state_file.read_text())
    assert state["owned_addresses"] == [str(GATE.inner)]
    ns.call(agent.close)
    restarted = ns.agent()
    assert reconcile(ns, restarted).actions == []
    assert "198.19.0.100/32" in ns.addresses("vxlan0")
    ns.call(restarted.close)


# ---- 4: a link of another kind under the configured name ------------------------------------


def write_cli_config(ns: Namespace, interface: str) -> Path:
    key = ns.state_dir / "auth-key"
    key.write_text("secret\n")
    key.chmod(0o600)
    path = ns.state_dir / "gatepeer.toml"
    path.write_text(
        f'[soracom]\nauth_key_id = "keyId-test"\nvpg_id = "vpg-test"\nauth_key_file = "{key}"\n'
        f'[tunnel]\ninterface = "{interface}"\nunderlay_interface = "{UNDERLAY}"\n'
        f'local_address = "{LOCAL}"\n'
        f'[agent]\nstate_file = "{ns.state_dir / "state.json"}"\ngate_cache = ""\n'
    )
    return path


def gatepeer_in(ns: Namespace, *args: str) -> subprocess.CompletedProcess[str]:
    from conftest import gatepeer_command

    return subprocess.run(
        ["ip", "netns", "exec", ns.name, *gatepeer_command(), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bridge_under_the_tunnel_name_is_a_config_error_for_apply_and_down(
    ns: Namespace,
) -> None:
    ns.ip("link", "add", "vxlan0", "type", "bridge")
    bridge_index = ns.link("vxlan0")["ifindex"]  # type: ignore[index]
    agent = ns.agent()
    result = reconcile(ns, agent)
    assert result.bad_config and result.health == "failed", result
    (reason,) = result.reasons
    assert reason.startswith("tunnel.interface: ") and "bridge" in reason, reason
    assert result.actions == []
    ns.call(agent.close)

    # `down` refuses too, exit 2, before touching anything (the nftables table stays).
    ns.call(lambda: netns.run(["nft", "add", "table", "inet", "gatepeer"]))
    down = gatepeer_in(ns, "down", "--config", str(write_cli_config(ns, "vxlan0")))
    assert down.returncode == 2, down.stdout + down.stderr
    assert down.stderr.startswith("gatepeer: tunnel.interface: ") and "bridge" in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr
    link = ns.link("vxlan0")
    assert link is not None and link["ifindex"] == bridge_index
    assert link["linkinfo"]["info_kind"] == "bridge"
    assert ns.call(lambda: netns.run(["nft", "list", "tables"]).stdout).strip()


def test_a_veth_under_the_tunnel_name_is_never_deleted(ns: Namespace) -> None:
    # The underlay's peer end is a veth: name the tunnel after it.
    agent = ns.agent(interface="gpu1")
    result = reconcile(ns, agent)
    ns.call(agent.close)
    assert result.bad_config, result
    assert "tunnel.interface: gpu1 is a veth link" in result.reasons[0]
    assert ns.link("gpu1") is not None


# ---- 5: tunnel.interface renamed ------------------------------------------------------------


def test_renaming_the_tunnel_removes_the_old_link_and_creates_the_new_one(ns: Namespace) -> None:
    before = ns.agent()
    assert reconcile(ns, before).health == "ok"
    ns.call(before.close)
    recorded = json.loads((ns.state_dir / "state.json").read_text())["managed_link"]
    assert recorded["name"] == "vxlan0" and recorded["vni"] == GATE.vni

    # The operator renames the tunnel; the next apply (a new process) reads the state file.
    after = ns.agent(interface="gptun1")
    result = reconcile(ns, after)
    ns.call(after.close)
    assert result.health == "ok", result.reasons
    assert result.actions[0].command().startswith("ip link del vxlan0  # "), result.actions[0]
    assert ns.link("vxlan0") is None
    link = ns.link("gptun1")
    assert link is not None and link["linkinfo"]["info_data"]["id"] == GATE.vni
    assert ns.addresses("gptun1") == [str(GATE.inner)]
    state = json.loads((ns.state_dir / "state.json").read_text())
    assert state["managed_link"]["name"] == "gptun1"

    # Renamed again and taken down before any apply: `down` removes the recorded link too.
    renamed = ns.agent(interface="gptun2")
    removed, messages = ns.call(lambda: renamed.teardown(unregister=False))
    ns.call(renamed.close)
    assert removed and "removed gptun1 (made under an earlier tunnel.interface)" in messages
    assert ns.link("gptun1") is None


def test_a_link_under_the_old_name_that_is_no_longer_ours_stays(ns: Namespace) -> None:
    before = ns.agent()
    assert reconcile(ns, before).health == "ok"
    ns.call(before.close)
    # Replaced by hand since: a vxlan with another VNI, then a bridge, under the old name.
    ns.ip("link", "del", "vxlan0")
    ns.ip("link", "add", "vxlan0", "type", "vxlan", "id", "99", "dstport", "4789", "dev", UNDERLAY)
    after = ns.agent(interface="gptun1")
    assert reconcile(ns, after).health == "ok"
    ns.call(after.close)
    assert ns.link("vxlan0")["linkinfo"]["info_data"]["id"] == 99  # type: ignore[index]

    state = json.loads((ns.state_dir / "state.json").read_text())
    state["managed_link"] = {**state["managed_link"], "name": "gpbr0"}
    (ns.state_dir / "state.json").write_text(json.dumps(state))
    ns.ip("link", "add", "gpbr0", "type", "bridge")
    again = ns.agent(interface="gptun1")
    assert reconcile(ns, again).health == "ok"
    ns.call(again.close)
    assert ns.link("gpbr0") is not None


# ---- 9: host-wide sysctls are recorded before the first change and restored by down ----------

HOST_KEYS = {
    "net.ipv4.ip_forward": 0,
    f"net.ipv4.conf.{UNDERLAY}.rp_filter": 1,
    "net.ipv4.conf.all.send_redirects": 1,
    f"net.ipv4.conf.{UNDERLAY}.send_redirects": 1,
    "net.netfilter.nf_conntrack_tcp_timeout_established": 432000,
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": 120,
}


def tracking_agent(ns: Namespace) -> Agent:
    """An agent whose packet path tracks connections (an allow-list), so conntrack is sized."""
    allow = PacketPathConfig(allowed_destinations=(IPv4Network("203.0.113.0/24"),))
    config = dataclasses.replace(ns.config(), packet_path=allow)
    agent = ns.call(lambda: Agent(config))
    agent.gate = dataclasses.replace(GATE, outer=LOCAL)
    return agent


def test_route_mode_leaves_conntrack_settings_alone(ns: Namespace) -> None:
    # Route mode routing everything with device addresses (outside_vpc = "route") tracks
    # nothing; the default masquerades what leaves the VPC and sizes conntrack for that.
    netns.write_sysctls(ns.name, HOST_KEYS)
    plain = PacketPathConfig(outside_vpc="route")
    config = dataclasses.replace(ns.config(), packet_path=plain)
    agent = ns.call(lambda: Agent(config))
    agent.gate = dataclasses.replace(GATE, outer=LOCAL)
    assert reconcile(ns, agent).health == "ok"
    ns.call(agent.close)
    for key in ("nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_timeout_time_wait"):
        assert ns.sysctl(f"net.netfilter.{key}") == HOST_KEYS[f"net.netfilter.{key}"]
    assert ns.sysctl("net.ipv4.ip_forward") == 1


def test_down_restores_every_sysctl_gatepeer_changed_to_its_value_before(ns: Namespace) -> None:
    netns.write_sysctls(ns.name, HOST_KEYS)
    agent = tracking_agent(ns)
    assert reconcile(ns, agent).health == "ok"
    changed = {key: ns.sysctl(key) for key in HOST_KEYS}
    assert all(changed[k] != v for k, v in HOST_KEYS.items()), changed
    record = json.loads((ns.state_dir / "sysctl-original.json").read_text())
    assert record["sysctls"]["net/ipv4/conf/gpu0/rp_filter"] == {"original": 1, "set": 2}

    # Drift repaired by a later reconcile must not overwrite the value from before gatepeer.
    netns.write_sysctls(ns.name, {f"net.ipv4.conf.{UNDERLAY}.rp_filter": 0})
    assert reconcile(ns, agent).health == "ok"
    record = json.loads((ns.state_dir / "sysctl-original.json").read_text())
    assert record["sysctls"]["net/ipv4/conf/gpu0/rp_filter"]["original"] == 1
    # Changed by the operator after gatepeer: `down` leaves it, and says so.
    time_wait = "net.netfilter.nf_conntrack_tcp_timeout_time_wait"
    netns.write_sysctls(ns.name, {time_wait: 90})

    removed, messages = ns.call(lambda: agent.teardown(unregister=False))
    ns.call(agent.close)
    assert removed
    after = {key: ns.sysctl(key) for key in HOST_KEYS}
    assert after == {**HOST_KEYS, time_wait: 90}
    assert "restored net.ipv4.ip_forward to 0 (gatepeer had set 1)" in messages, messages
    left = f"left {time_wait} at 90: changed since gatepeer set 60 (it was 120 before)"
    assert left in messages, messages
    assert not (ns.state_dir / "sysctl-original.json").exists()
