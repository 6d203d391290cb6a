"""The allow-list's AWS names in a reconcile: the resolved prefixes join the literal ones in
the packet path, a list of names nothing resolved yet never becomes "admit everything", and a
kept set (destinations_cache) builds the path at a boot without EC2."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_kernel import FakeKernel
from helpers.plan_inputs import FACTS, GATE, make_config

from gatepeer import atomic_json
from gatepeer.agent import Agent
from gatepeer.aws import AwsError
from gatepeer.aws.destinations import ResolvedDestinations
from gatepeer.config import AgentConfig, Config, PacketPathConfig
from gatepeer.desired_state import DesiredStateError, desired_state

LIST = "pl-0123456789abcdef0"
CLOUD = IPv4Network("203.0.113.0/24")


def config_with(tmp_path: Path, **packet_path: Any) -> Config:
    config = make_config()
    return dataclasses.replace(
        config,
        packet_path=PacketPathConfig(
            allowed_names=(LIST,), destinations_cache=tmp_path / "destinations.json", **packet_path
        ),
        agent=AgentConfig(state_file=tmp_path / "state.json", gate_cache=tmp_path / "gate.json"),
    )


def agent_for(config: Config) -> Agent:
    kernel = FakeKernel(desired_state(make_config(), FACTS, GATE))
    agent = Agent(config, netlink=kernel)  # type: ignore[arg-type]
    agent.gate = GATE
    agent.facts = FACTS
    return agent


class FakeEc2:
    """Answers GetManagedPrefixListEntries for LIST; counts the calls."""

    def __init__(self, cidrs: list[str]) -> None:
        self.cidrs = cidrs
        self.calls = 0

    def get_managed_prefix_list_entries(self, **kwargs: Any) -> dict[str, Any]:
        assert kwargs["PrefixListId"] == LIST
        self.calls += 1
        return {"Entries": [{"Cidr": c} for c in self.cidrs]}


def test_resolved_prefixes_join_the_literal_ones(tmp_path: Path) -> None:
    literal = IPv4Network("198.51.100.0/24")
    agent = agent_for(config_with(tmp_path, allowed_destinations=(literal,)))
    assert agent.destinations is not None
    ec2 = FakeEc2([str(CLOUD)])
    agent.destinations.ec2 = lambda: ec2
    assert agent.refresh_destinations() is True
    assert set(agent.desired().packet_path.allowed_destinations) == {literal, CLOUD}
    # On its cadence only, unless forced (apply forces it).
    assert agent.refresh_destinations() is False and ec2.calls == 1
    agent.refresh_destinations(force=True)
    assert ec2.calls == 2


def test_names_not_resolved_never_admit_everything(tmp_path: Path) -> None:
    """EC2 silent and nothing kept: devices reach only the VPC (closed), never everything."""
    agent = agent_for(config_with(tmp_path))
    assert agent.destinations is not None

    def unreachable() -> Any:
        raise AwsError("EC2 did not answer")

    agent.destinations.ec2 = unreachable
    agent.refresh_destinations()
    assert agent.destinations.state.errors[LIST].startswith(f"{LIST}: ")
    spec = agent.desired().packet_path
    assert spec.closed is True and spec.allowed_destinations == ()
    assert spec.vpc_networks == FACTS.vpc_networks
    # Once resolved, the list alone decides again (closed stays off).
    agent.destinations.ec2 = lambda: FakeEc2([str(CLOUD)])
    agent.refresh_destinations(force=True)
    spec = agent.desired().packet_path
    assert spec.closed is False and spec.allowed_destinations == (CLOUD,)


def test_closed_maps_to_the_spec(tmp_path: Path) -> None:
    config = dataclasses.replace(
        config_with(tmp_path), packet_path=PacketPathConfig(closed=True, outside_vpc="route")
    )
    spec = agent_for(config).desired().packet_path
    assert spec.closed is True and spec.allowed_destinations == ()
    no_vpc = dataclasses.replace(FACTS, vpc_networks=())
    with pytest.raises(DesiredStateError) as err:
        desired_state(config, no_vpc, GATE)
    assert str(err.value).startswith("packet_path.closed: ")


def test_a_boot_without_ec2_uses_the_kept_set(tmp_path: Path) -> None:
    config = config_with(tmp_path)
    assert config.packet_path.destinations_cache is not None
    kept = ResolvedDestinations({LIST: (CLOUD,)}, {LIST: 1.0})
    atomic_json.write(config.packet_path.destinations_cache, kept.to_json())
    agent = agent_for(config)
    assert agent.desired().packet_path.allowed_destinations == (CLOUD,)


def test_without_names_there_is_no_resolver(tmp_path: Path) -> None:
    config = dataclasses.replace(config_with(tmp_path), packet_path=PacketPathConfig())
    agent = agent_for(config)
    assert agent.destinations is None and agent.refresh_destinations() is False
    assert agent.desired().packet_path.allowed_destinations == ()


def test_every_drop_counter_of_the_table_is_a_metric_reason() -> None:
    """closed_dropped (and any later *_dropped counter) reaches
    gatepeer_packet_path_dropped_packets_total through the counters collector."""
    from gatepeer.metrics.collectors import DROP_REASONS
    from gatepeer.ruleset import COUNTERS

    dropped = {c for c in COUNTERS if c.endswith("_dropped")}
    assert "closed_dropped" in dropped
    assert dropped <= set(DROP_REASONS), sorted(dropped - set(DROP_REASONS))
    assert DROP_REASONS["closed_dropped"] == "destination_outside_closed_network"


def test_a_new_resolution_refills_the_set_without_a_reload(tmp_path: Path) -> None:
    """closed = true: a prefix list that changes is a set refill (kernel/nftables.update_sets,
    one transaction), never a reload of the table."""
    from gatepeer import ruleset

    agent = agent_for(config_with(tmp_path, closed=True, outside_vpc="route"))
    assert agent.destinations is not None
    ec2 = FakeEc2([str(CLOUD)])
    agent.destinations.ec2 = lambda: ec2
    agent.refresh_destinations()
    before = agent.desired().packet_path
    ec2.cidrs = [str(CLOUD), "198.51.100.0/24"]
    assert agent.refresh_destinations(force=True) is True
    after = agent.desired().packet_path
    assert after.allowed_destinations != before.allowed_destinations
    assert ruleset.change_needed(after, ruleset.render(before)) == "sets"


def test_the_daemons_refresher_resolves_when_due(tmp_path: Path) -> None:
    from gatepeer.daemon import Daemon

    config = dataclasses.replace(
        config_with(tmp_path), metrics=dataclasses.replace(make_config().metrics, listen="")
    )
    daemon = Daemon(config, lambda: config)
    agent = daemon.agent
    assert agent.destinations is not None
    ec2 = FakeEc2([str(CLOUD)])
    agent.destinations.ec2 = lambda: ec2
    agent.facts = FACTS
    agent.refresh_gate = lambda **_: True  # type: ignore[method-assign]
    assert daemon.start_refresh()
    assert daemon._refresher is not None
    daemon._refresher.join(5)
    assert ec2.calls == 1 and agent.destinations.prefixes() == (CLOUD,)
    assert daemon.wake.is_set()  # the loop reconciles against the new set
    # Not due again before destinations_refresh.
    assert daemon.start_refresh()
    daemon._refresher.join(5)
    assert ec2.calls == 1


def test_status_names_what_the_names_resolved_to_and_what_failed(tmp_path: Path) -> None:
    from gatepeer.aws import report
    from gatepeer.daemon import Daemon

    config = dataclasses.replace(
        config_with(tmp_path), metrics=dataclasses.replace(make_config().metrics, listen="")
    )
    daemon = Daemon(config, lambda: config)
    assert daemon.agent.destinations is not None
    daemon.agent.destinations.ec2 = lambda: FakeEc2([str(CLOUD)])
    daemon.agent.refresh_destinations()
    view = daemon._aws_view()
    assert view is not None
    line = report.line(view)
    assert line is not None and "1 name(s) resolved to 1 prefix(es)" in line
    assert "FAILING" not in line

    def unreachable() -> Any:
        raise AwsError("EC2 did not answer")

    daemon.agent.destinations.ec2 = unreachable
    daemon.agent.refresh_destinations(force=True)
    line = report.line(daemon._aws_view() or {})
    assert line is not None and f"FAILING: {LIST}: EC2 did not answer" in line
