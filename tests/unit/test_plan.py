"""The pure part of a reconcile: desired state from inputs, and the plan that converges on it.

No kernel, no I/O: observed states are built by hand. A converged system plans nothing; a link
is replaced only for an attribute the kernel cannot change, and the reason says which.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from typing import Any

import pytest
from helpers.plan_inputs import (
    EP1,
    EP2,
    EP3,
    FACTS,
    GATE,
    INNER,
    LOCAL,
    UNDERLAY,
    A,
    converged,
    converged_link,
    desired,
    make_config,
)

from gatepeer.config import Config, PacketPathConfig
from gatepeer.desired_state import (
    DesiredState,
    DesiredStateError,
    Endpoint,
    GateView,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    ObservedState,
    Sysctl,
    VxlanSpec,
    desired_state,
    neighbour_thresholds,
    stable_mac,
    tunnel_mtu,
)
from gatepeer.plan import (
    AddAddress,
    AddFdb,
    CreateLink,
    DeleteLink,
    LoadRuleset,
    RemoveAddress,
    RemoveFdb,
    SetMtu,
    SetSysctl,
    SetUp,
    describe,
    owned_after,
    plan,
)


def with_sysctls(observed: ObservedState, **values: int | None) -> ObservedState:
    """Replace observed sysctl values; keys are the path's last component(s) joined by '__'."""
    table = dict(observed.sysctls)
    for short, value in values.items():
        matches = [p for p in table if p.endswith(short.replace("__", "/"))]
        assert len(matches) == 1, (short, matches)
        table[matches[0]] = value
    return dataclasses.replace(observed, sysctls=tuple(table.items()))


def fresh_host_sysctls(d: DesiredState) -> tuple[tuple[str, int | None], ...]:
    """A host that has never seen gatepeer: kernel defaults, no tunnel interface yet."""
    values: dict[str, int | None] = {
        "net/ipv4/ip_forward": 0,
        "net/ipv4/conf/vxlan0/rp_filter": None,  # the interface does not exist yet
        "net/ipv4/conf/vxlan0/promote_secondaries": None,
        f"net/ipv4/conf/{UNDERLAY}/rp_filter": 1,
        "net/ipv4/conf/all/send_redirects": 1,
        f"net/ipv4/conf/{UNDERLAY}/send_redirects": 1,
        "net/ipv4/neigh/default/gc_thresh1": 128,
        "net/ipv4/neigh/default/gc_thresh2": 512,
        "net/ipv4/neigh/default/gc_thresh3": 1024,
        "net/netfilter/nf_conntrack_buckets": 65536,
        "net/netfilter/nf_conntrack_max": 262144,
        "net/netfilter/nf_conntrack_tcp_timeout_established": 432000,
        "net/netfilter/nf_conntrack_tcp_timeout_time_wait": 120,
        "net/netfilter/nf_conntrack_udp_timeout": 30,
        "net/netfilter/nf_conntrack_udp_timeout_stream": 120,
    }
    wanted = {s.path for s in d.sysctls}
    assert wanted <= set(values), wanted - set(values)
    # Conntrack's keys are wanted only where the packet path tracks connections (nat mode).
    return tuple((path, value) for path, value in values.items() if path in wanted)


# ---- desired state ---------------------------------------------------------------------------


def test_desired_state_from_inputs() -> None:
    d = desired()
    assert d.link.name == "vxlan0"
    assert d.link.vni == 10
    assert d.link.local == LOCAL
    assert d.link.underlay_index == 2
    assert d.link.dst_port == 4789
    assert d.link.src_port_range == (4789, 4789)
    assert d.link.mtu == 1500
    assert d.address == INNER
    assert d.fdb == frozenset({EP1, EP2})
    by_path = {s.path: s for s in d.sysctls}
    assert by_path["net/ipv4/ip_forward"].value == 1
    assert by_path["net/ipv4/conf/vxlan0/rp_filter"].value == 2
    assert by_path["net/ipv4/conf/eth0/rp_filter"].value == 2
    thresholds = [by_path[f"net/ipv4/neigh/default/gc_thresh{i}"] for i in (1, 2, 3)]
    assert [t.value for t in thresholds] == [25_000, 75_000, 100_000]
    assert all(t.comparison == "at_least" and t.init_netns_only for t in thresholds)


def test_mtu_auto_is_underlay_minus_50() -> None:
    assert desired(mtu="auto").link.mtu == 9001 - 50
    facts = dataclasses.replace(FACTS, underlay_mtu=1500)
    assert tunnel_mtu(make_config(mtu="auto"), facts) == 1450


def test_mtu_that_does_not_fit_the_underlay_names_the_key() -> None:
    facts = dataclasses.replace(FACTS, underlay_mtu=1500)
    with pytest.raises(DesiredStateError) as info:
        desired_state(make_config(mtu=1500), facts, GATE)
    msg = str(info.value)
    assert msg.startswith("tunnel.mtu:")
    assert "1550" in msg and "1450" in msg and "eth0" in msg
    # Exactly what fits is accepted.
    assert tunnel_mtu(make_config(mtu=1450), facts) == 1450


def test_neighbour_thresholds() -> None:
    assert neighbour_thresholds(50_000) == (25_000, 75_000, 100_000)
    g1, g2, g3 = neighbour_thresholds(1_024)
    assert g1 < g2 < g3
    assert g3 > 1_024  # above the kernel default that overflows


def test_stable_mac_is_stable_local_and_unicast() -> None:
    mac = stable_mac(LOCAL, 10)
    assert mac == stable_mac(LOCAL, 10)
    assert mac != stable_mac(LOCAL, 11)
    octets = [int(o, 16) for o in mac.split(":")]
    assert len(octets) == 6
    assert octets[0] & 0x02 and not octets[0] & 0x01  # locally administered, unicast


def test_gate_view_json_round_trip() -> None:
    view = dataclasses.replace(
        GATE, endpoints=(*GATE.endpoints, Endpoint(EP3, None)), gate_opened=False
    )
    data = view.to_json()
    assert data["inner"] == "198.19.0.3/16"
    assert data["endpoints"][2] == {"outer": "198.18.1.13", "inner": None}
    assert GateView.from_json(data) == view
    assert GateView.from_json(json.loads(json.dumps(data))) == view


# ---- plans -----------------------------------------------------------------------------------


def test_plan_from_nothing() -> None:
    # Route mode routing everything with device addresses: no connection is tracked.
    plain = PacketPathConfig(outside_vpc="route")
    d = desired_state(dataclasses.replace(make_config(), packet_path=plain), FACTS, GATE)
    observed = ObservedState(
        link=None, addresses=frozenset(), fdb=frozenset(), sysctls=fresh_host_sysctls(d)
    )
    actions = plan(d, observed, UNDERLAY)
    assert actions[0] == CreateLink(d.link, UNDERLAY)
    # The new link's own keys first (they exist once it does), before its address.
    tunnel_keys = {a.setting.path: a.was for a in actions[1:3] if isinstance(a, SetSysctl)}
    assert tunnel_keys == {  # absent before creation, set anyway
        "net/ipv4/conf/vxlan0/rp_filter": None,
        "net/ipv4/conf/vxlan0/promote_secondaries": None,
    }
    # The filter is loaded before the link comes up and before forwarding is switched on.
    assert actions[3:8] == [
        AddAddress("vxlan0", INNER),
        AddFdb("vxlan0", EP1),
        AddFdb("vxlan0", EP2),
        LoadRuleset(d.packet_path, None),
        SetUp("vxlan0"),
    ]
    sysctls = {a.setting.path: a.was for a in actions[8:] if isinstance(a, SetSysctl)}
    assert len(sysctls) == len(actions) - 8
    assert sysctls == {
        "net/ipv4/ip_forward": 0,
        "net/ipv4/conf/eth0/rp_filter": 1,
        "net/ipv4/conf/all/send_redirects": 1,
        "net/ipv4/conf/eth0/send_redirects": 1,
        "net/ipv4/neigh/default/gc_thresh1": 128,
        "net/ipv4/neigh/default/gc_thresh2": 512,
        "net/ipv4/neigh/default/gc_thresh3": 1024,
        # No conntrack key: this route mode tracks no connection, so it sizes nothing there.
    }
    assert not any(isinstance(a, DeleteLink | RemoveFdb | RemoveAddress) for a in actions)


def test_conntrack_is_sized_only_where_connections_are_tracked() -> None:
    def conntrack_keys(config: Config) -> set[str]:
        d = desired_state(config, FACTS, GATE)
        return {s.path for s in d.sysctls if s.path.startswith("net/netfilter/")}

    route = dataclasses.replace(make_config(), packet_path=PacketPathConfig(outside_vpc="route"))
    assert conntrack_keys(route) == set()
    nat = dataclasses.replace(route, packet_path=PacketPathConfig(mode="nat"))
    allow = dataclasses.replace(
        route,
        packet_path=PacketPathConfig(
            outside_vpc="route", allowed_destinations=(IPv4Network("203.0.113.0/24"),)
        ),
    )
    # The default route mode masquerades what leaves the VPC: those flows are tracked.
    route_masquerading = make_config()
    assert route_masquerading.packet_path.outside_vpc == "masquerade"
    for tracked in (nat, allow, route_masquerading):
        assert {
            "net/netfilter/nf_conntrack_max",
            "net/netfilter/nf_conntrack_buckets",
            "net/netfilter/nf_conntrack_tcp_timeout_established",
        } <= conntrack_keys(tracked)


def test_converged_plans_nothing() -> None:
    d = desired()
    assert plan(d, converged(d), UNDERLAY) == []


def test_converged_plans_nothing_with_several_endpoints_and_auto_mtu() -> None:
    d = desired(mtu="auto", source_port_range=(4789, 4790))
    assert plan(d, converged(d), UNDERLAY) == []


def test_mtu_drift_is_changed_in_place() -> None:
    d = desired()
    actions = plan(d, converged(d, link=converged_link(d, mtu=9001)), UNDERLAY)
    assert actions == [SetMtu("vxlan0", 1500, 9001)]
    assert actions[0].command() == "ip link set vxlan0 mtu 1500  # was 9001"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"vni": 11}, "vni 11 (want 10)"),
        ({"local": A("198.18.0.99")}, "local 198.18.0.99 (want 198.18.0.10)"),
        ({"dst_port": 8472}, "dstport 8472 (want 4789)"),
        ({"src_port_range": (32768, 60999)}, "srcport range (32768, 60999) (want (4789, 4789))"),
        ({"underlay_index": 9}, "lower device 9 (want 2)"),
        ({"learning": False}, "learning False (want True)"),
    ],
)
def test_immutable_drift_replaces_the_link_and_says_why(
    change: dict[str, Any], reason: str
) -> None:
    d = desired()
    observed = converged(d, link=converged_link(d, **change))
    actions = plan(d, observed, UNDERLAY)
    assert isinstance(actions[0], DeleteLink)
    assert actions[0].name == "vxlan0"
    assert reason in actions[0].reason
    assert actions[1] == CreateLink(d.link, UNDERLAY)
    # A new link has nothing: address, FDB, up, per-interface sysctl all again.
    assert AddAddress("vxlan0", INNER) in actions
    assert {a.dst for a in actions if isinstance(a, AddFdb)} == {EP1, EP2}
    assert SetUp("vxlan0") in actions
    rp = [a for a in actions if isinstance(a, SetSysctl)]
    assert [a.setting.path for a in rp] == [
        "net/ipv4/conf/vxlan0/rp_filter",
        "net/ipv4/conf/vxlan0/promote_secondaries",
    ]
    assert not any(isinstance(a, RemoveFdb | RemoveAddress | SetMtu) for a in actions)


@pytest.mark.parametrize(
    ("kind", "said"),
    [("bridge", "a bridge link"), ("wireguard", "a wireguard link"), (None, "no kind")],
)
def test_a_link_of_another_kind_under_the_name_is_a_config_error(
    kind: str | None, said: str
) -> None:
    d = desired()
    observed = converged(d, link=converged_link(d, kind=kind, vni=None, dst_port=None))
    with pytest.raises(DesiredStateError) as info:
        plan(d, observed, UNDERLAY)
    assert str(info.value).startswith("tunnel.interface: vxlan0 is ")
    assert said in str(info.value)


def test_several_immutable_differences_are_all_named() -> None:
    d = desired()
    observed = converged(d, link=converged_link(d, vni=11, dst_port=8472))
    delete = plan(d, observed, UNDERLAY)[0]
    assert isinstance(delete, DeleteLink)
    assert "vni 11" in delete.reason and "dstport 8472" in delete.reason


def test_fdb_endpoint_swap_adds_before_removing_and_keeps_the_survivor() -> None:
    d = desired()
    # The VPG moved one endpoint: EP1 stays, EP2 is replaced by EP3.
    observed = converged(d, fdb=frozenset({EP1, EP3}))
    actions = plan(d, observed, UNDERLAY)
    assert actions == [AddFdb("vxlan0", EP2), RemoveFdb("vxlan0", EP3)]
    assert all(a.dst != EP1 for a in actions if isinstance(a, AddFdb | RemoveFdb))


def test_missing_fdb_entry_is_added_back() -> None:
    d = desired()
    assert plan(d, converged(d, fdb=frozenset({EP1})), UNDERLAY) == [AddFdb("vxlan0", EP2)]


def test_only_addresses_gatepeer_recorded_are_removed() -> None:
    d = desired()
    extra = IPv4Interface("198.19.0.99/16")
    # Not ours (keepalived's virtual address, another tool's): left alone.
    assert plan(d, converged(d, addresses=frozenset({INNER, extra})), UNDERLAY) == []
    vip = IPv4Interface("198.19.0.100/32")
    assert plan(d, converged(d, addresses=frozenset({INNER, vip})), UNDERLAY) == []
    # Ours from before (an inner address the API has since replaced): removed.
    owned = frozenset({extra})
    assert plan(d, converged(d, addresses=frozenset({INNER, extra})), UNDERLAY, owned) == [
        RemoveAddress("vxlan0", extra)
    ]
    # Same address, different prefix, recorded as ours: the wanted one is added first.
    stale = IPv4Interface("198.19.0.3/24")
    observed = converged(d, addresses=frozenset({stale}))
    assert plan(d, observed, UNDERLAY, frozenset({stale})) == [
        AddAddress("vxlan0", INNER),
        RemoveAddress("vxlan0", stale),
    ]
    assert plan(d, observed, UNDERLAY) == [AddAddress("vxlan0", INNER)]


def test_owned_after_records_the_inner_address_and_ours_still_there() -> None:
    d = desired()
    vip = IPv4Interface("198.19.0.100/32")
    old = IPv4Interface("198.19.0.7/16")
    gone = IPv4Interface("198.19.0.8/16")
    observed = converged(d, addresses=frozenset({INNER, vip, old}))
    assert owned_after(d, observed, frozenset({old, gone})) == {INNER, old}
    assert owned_after(d, observed, frozenset()) == {INNER}


def test_admin_down_is_set_up() -> None:
    d = desired()
    observed = converged(d, link=converged_link(d, admin_up=False, oper_state="DOWN"))
    assert plan(d, observed, UNDERLAY) == [SetUp("vxlan0")]


def test_sysctl_drift_is_set() -> None:
    d = desired()
    actions = plan(d, with_sysctls(converged(d), ip_forward=0, eth0__rp_filter=1), UNDERLAY)
    assert [(a.setting.path, a.setting.value, a.was) for a in actions] == [  # type: ignore[union-attr]
        ("net/ipv4/ip_forward", 1, 0),
        ("net/ipv4/conf/eth0/rp_filter", 2, 1),
    ]


def test_neighbour_thresholds_larger_observed_values_are_kept() -> None:
    d = desired()
    observed = with_sysctls(
        converged(d), gc_thresh1=1_000_000, gc_thresh2=2_000_000, gc_thresh3=4_000_000
    )
    assert plan(d, observed, UNDERLAY) == []


def test_neighbour_thresholds_smaller_observed_values_are_raised() -> None:
    d = desired()
    observed = with_sysctls(converged(d), gc_thresh3=1024)
    actions = plan(d, observed, UNDERLAY)
    assert len(actions) == 1 and isinstance(actions[0], SetSysctl)
    assert actions[0].setting.path == "net/ipv4/neigh/default/gc_thresh3"
    assert actions[0].setting.value == 100_000 and actions[0].was == 1024


def test_neighbour_thresholds_absent_in_another_namespace_plan_nothing() -> None:
    d = desired()
    observed = with_sysctls(converged(d), gc_thresh1=None, gc_thresh2=None, gc_thresh3=None)
    assert plan(d, observed, UNDERLAY) == []
    # The key is left out of the observation entirely: the same.
    kept = tuple((p, v) for p, v in converged(d).sysctls if "gc_thresh" not in p)
    assert plan(d, converged(d, sysctls=kept), UNDERLAY) == []


def test_sysctl_satisfied_by() -> None:
    assert Sysctl("x", 2).satisfied_by(2)
    assert not Sysctl("x", 2).satisfied_by(3)
    assert Sysctl("x", 2, "at_least").satisfied_by(3)
    assert not Sysctl("x", 2, "at_least").satisfied_by(1)


# ---- the iproute2 twins ----------------------------------------------------------------------


SPEC = VxlanSpec(
    name="vxlan0",
    vni=10,
    local=LOCAL,
    underlay_index=2,
    dst_port=4789,
    src_port_range=(4789, 4789),
    mtu=1500,
)


def test_exact_commands() -> None:
    assert CreateLink(SPEC, "eth0").command() == (
        "ip link add vxlan0 type vxlan id 10 local 198.18.0.10 dev eth0 dstport 4789 "
        "srcport 4789 4789 learning && ip link set vxlan0 mtu 1500"
    )
    assert DeleteLink("vxlan0", "vni 11 (want 10)").command() == (
        "ip link del vxlan0  # vni 11 (want 10)"
    )
    assert SetUp("vxlan0").command() == "ip link set vxlan0 up"
    assert AddAddress("vxlan0", INNER).command() == "ip addr add 198.19.0.3/16 dev vxlan0"
    assert RemoveAddress("vxlan0", INNER).command() == "ip addr del 198.19.0.3/16 dev vxlan0"
    assert AddFdb("vxlan0", EP1).command() == (
        "bridge fdb append 00:00:00:00:00:00 dev vxlan0 dst 198.18.1.11"
    )
    assert RemoveFdb("vxlan0", EP1).command() == (
        "bridge fdb del 00:00:00:00:00:00 dev vxlan0 dst 198.18.1.11"
    )
    ip_forward = Sysctl("net/ipv4/ip_forward", 1)
    assert SetSysctl(ip_forward, 0).command() == "sysctl -w net.ipv4.ip_forward=1  # was 0"


def test_create_link_command_with_a_mac() -> None:
    spec = dataclasses.replace(SPEC, mac="02:11:22:33:44:55", learning=False)
    argv = shlex.split(CreateLink(spec, "eth0").command().split(" && ")[0])
    assert argv[:6] == ["ip", "link", "add", "vxlan0", "address", "02:11:22:33:44:55"]
    assert argv[-1] == "nolearning"


def _shell_commands(line: str) -> list[list[str]]:
    """The argv of each command in a `a && b  # comment` line."""
    return [shlex.split(part, comments=True) for part in line.split(" && ")]


def test_every_planned_command_is_plausible() -> None:
    d = desired()
    nothing = ObservedState(
        link=None, addresses=frozenset(), fdb=frozenset(), sysctls=fresh_host_sysctls(d)
    )
    drifted = converged(
        d,
        link=converged_link(d, vni=99),
        addresses=frozenset({IPv4Interface("198.19.0.9/16")}),
    )
    actions = [
        *plan(d, nothing, UNDERLAY),
        *plan(d, drifted, UNDERLAY),
        SetMtu("vxlan0", 1500, 9001),
        RemoveFdb("vxlan0", EP3),
        RemoveAddress("vxlan0", INNER),
    ]
    # nft rulesets print as a heredoc for `nft -f -`: checked by tests/lab/test_nftables.py.
    actions = [a for a in actions if not isinstance(a, LoadRuleset)]
    lines = describe(actions)
    assert len(lines) == len(actions)
    for line in lines:
        for argv in _shell_commands(line):
            tool = argv[0]
            if tool == "ip":
                assert argv[1] in {"link", "addr"}, line
                assert argv[2] in {"add", "del", "set"}, line
                assert "vxlan0" in argv, line
            elif tool == "bridge":
                assert argv[1:3] in (["fdb", "append"], ["fdb", "del"]), line
                assert argv[3] == "00:00:00:00:00:00" and argv[4:6] == ["dev", "vxlan0"], line
                IPv4Address(argv[argv.index("dst") + 1])
            else:
                assert tool == "sysctl" and argv[1] == "-w" and len(argv) == 3, line
                key, _, value = argv[2].partition("=")
                assert int(value) >= 0
                assert proc_path(key).startswith(
                    ("/proc/sys/net/ipv4/", "/proc/sys/net/netfilter/")
                ), line


def proc_path(key: str) -> str:
    """The /proc/sys file `sysctl KEY` opens (procps-ng's slashdot rule): when the first
    separator is '.', dots and slashes swap, so an interface name with a dot must be written
    with a slash (net.ipv4.conf.eth0/100.rp_filter); when it is '/', the key is used as is."""
    first = next((c for c in key if c in "./"), "/")
    if first == ".":
        key = key.translate(str.maketrans("./", "/."))
    return "/proc/sys/" + key


def test_sysctl_command_reaches_the_right_file() -> None:
    setting = Sysctl("net/ipv4/conf/vxlan0/rp_filter", 2)
    key = shlex.split(SetSysctl(setting, 0).command(), comments=True)[2].split("=")[0]
    assert proc_path(key) == "/proc/sys/net/ipv4/conf/vxlan0/rp_filter"


def test_sysctl_command_for_an_interface_name_with_a_dot() -> None:
    setting = Sysctl("net/ipv4/conf/eth0.100/rp_filter", 2)
    key = shlex.split(SetSysctl(setting, 0).command(), comments=True)[2].split("=")[0]
    assert proc_path(key) == "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"
