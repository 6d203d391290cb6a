"""A gate peer's inputs for the pure core: host facts, a gate view, a config, the desired state,
and an observed state that already matches it."""

from __future__ import annotations

import dataclasses
from typing import Any

from gatepeer import ruleset
from gatepeer.config import Config, TunnelConfig
from gatepeer.desired_state import (
    DesiredState,
    Endpoint,
    GateView,
    HostFacts,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    ObservedLink,
    ObservedState,
    desired_state,
)

A = IPv4Address


UNDERLAY = "eth0"


EP1, EP2, EP3 = A("198.18.1.11"), A("198.18.1.12"), A("198.18.1.13")


INNER = IPv4Interface("198.19.0.3/16")


LOCAL = A("198.18.0.10")


# The VPC networks as the real netlink reader gives them: the underlay's connected prefix.
FACTS = HostFacts(
    underlay=UNDERLAY,
    underlay_index=2,
    underlay_mtu=9001,
    local_address=LOCAL,
    vpc_networks=(IPv4Network("198.18.0.0/16"),),
    vpc_networks_source="underlay",
)


GATE = GateView(
    vpg_id="vpg-test",
    vni=10,
    device_subnet=IPv4Network("198.19.0.0/16"),
    gate_opened=True,
    inner=INNER,
    endpoints=(Endpoint(EP1, A("198.19.0.1")), Endpoint(EP2, A("198.19.0.2"))),
    outer=LOCAL,
)


def make_config(**tunnel: Any) -> Config:
    return dataclasses.replace(Config(), tunnel=dataclasses.replace(TunnelConfig(), **tunnel))


def desired(**tunnel: Any) -> DesiredState:
    return desired_state(make_config(**tunnel), FACTS, GATE)


def converged_link(d: DesiredState, **changes: Any) -> ObservedLink:
    s = d.link
    link = ObservedLink(
        index=7,
        name=s.name,
        kind="vxlan",
        vni=s.vni,
        local=s.local,
        underlay_index=s.underlay_index,
        dst_port=s.dst_port,
        src_port_range=s.src_port_range,
        learning=s.learning,
        mtu=s.mtu,
        admin_up=True,
        oper_state="UNKNOWN",
    )
    return dataclasses.replace(link, **changes)


def converged(d: DesiredState, **changes: Any) -> ObservedState:
    observed = ObservedState(
        link=converged_link(d),
        addresses=frozenset({d.address}),
        fdb=d.fdb,
        sysctls=tuple((s.path, s.value) for s in d.sysctls),
        nft_table=ruleset.render(d.packet_path) if d.packet_path else None,
    )
    return dataclasses.replace(observed, **changes)
