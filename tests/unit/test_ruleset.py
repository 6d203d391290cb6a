"""The packet path's ruleset (pure): rendering (golden files), the spec's validation, and the
comparison with what `nft list` prints. The real `nft` is tests/lab/test_nftables.py's.

Regenerate the golden files with GATEPEER_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from helpers.ruleset_specs import (
    ALLOW,
    CASES,
    EP1,
    EP2,
    EP3,
    SNAT,
    VPC,
    spec,
)

from gatepeer import ruleset as rs
from gatepeer.device_traffic import DeviceTraffic

GOLDEN = Path(__file__).parents[1] / "golden" / "nftables"
UPDATE = os.environ.get("GATEPEER_UPDATE_GOLDEN") == "1"


# ---- rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_render_matches_golden(name: str) -> None:
    text = rs.render(CASES[name])
    path = GOLDEN / f"{name}.nft"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with GATEPEER_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_render_is_deterministic() -> None:
    a = spec(endpoints=frozenset({EP3, EP1, EP2}), allowed_destinations=ALLOW)
    b = spec(endpoints=frozenset({EP2, EP1, EP3}), allowed_destinations=tuple(reversed(ALLOW)))
    assert rs.render(a) == rs.render(b)
    assert "elements = { 198.18.0.11, 198.18.0.12, 198.18.0.13 }" in rs.render(a)


def test_allow_list_is_collapsed_and_sorted() -> None:
    assert spec(allowed_destinations=ALLOW).allow_list == (
        IPv4Network("192.0.2.0/24"),
        IPv4Network("198.51.100.7/32"),
        IPv4Network("203.0.113.0/24"),
    )
    assert "elements = { 192.0.2.0/24, 198.51.100.7, 203.0.113.0/24 }" in rs.render(
        spec(allowed_destinations=ALLOW)
    )


def chain(text: str, name: str) -> list[str]:
    """The rules of one chain in rendered text, without its hook line."""
    lines = text.splitlines()
    start = lines.index(f"\tchain {name} {{") + 1
    rules = lines[start : lines.index("\t}", start)]
    return [r.strip() for r in rules if not r.strip().startswith("type ")]


def tracked(s: rs.PacketPathSpec) -> bool:
    """Where a rule needs a connection's state, so conntrack runs for the namespace."""
    masquerades = s.mode == "nat" or s.outside_vpc == "masquerade"
    return masquerades or s.flowtable or bool(s.allow_list)


def uses_conntrack(text: str) -> bool:
    return re.search(r"(^|\s)ct ", text, re.M) is not None


def test_modes_differ_by_masquerade_and_connection_tracking() -> None:
    route, nat = rs.render(spec()), rs.render(spec(mode="nat"))
    # Route mode renders no `ct` at all: any would engage conntrack for the whole namespace and
    # cost every forwarded packet (or the notrack rules that exempt it); nat mode needs it.
    assert not uses_conntrack(route) and "notrack" not in route
    assert "chain output" not in route
    assert "ct state established,related accept" in chain(nat, "to_host")
    assert chain(nat, "postrouting") == [
        'oifname "eth0" ip saddr 198.19.0.0/16 counter name "masqueraded_flows" masquerade'
    ]
    assert "postrouting" not in route
    # With conntrack on, the outer VXLAN packets are never tracked: a second lookup per packet.
    assert chain(nat, "from_underlay") == ["ip daddr 198.18.0.1 jump underlay_to_local"]
    assert chain(nat, "underlay_to_local")[0] == "udp dport 4789 @th,96,24 0xa notrack"
    assert chain(nat, "output") == [
        'udp dport 4789 @th,96,24 0xa ip saddr 198.18.0.1 oifname "eth0" notrack'
    ]
    for text in (route, nat):
        # Every counter exists in every mode: the metrics keep one schema.
        assert [c for c in rs.COUNTERS if f"counter {c} {{" in text] == list(rs.COUNTERS)
    for name, s in CASES.items():
        text = rs.render(s)
        assert uses_conntrack(text) == tracked(s), name
        # The forward chain asks for a connection's state only where a rule needs it.
        forward = chain(text, "forward")
        stateful = bool(s.allow_list) and not s.closed
        judged = [r for r in forward if r.startswith("ct ") and " ct event set " not in r]
        assert bool(judged) == stateful, name


def test_route_mode_masquerades_only_what_leaves_the_vpc() -> None:
    text = rs.render(CASES["route_masquerade_2ep"])
    assert "elements = { 198.18.0.0/16, 203.0.113.0/24 }" in text  # collapsed, sorted
    assert chain(text, "postrouting") == [
        'oifname "eth0" ip saddr 198.19.0.0/16 ip daddr != @vpc_networks'
        ' counter name "masqueraded_flows" masquerade'
    ]
    # Conntrack engages only for flows leaving the VPC: device <-> VPC traffic is exempted
    # before conntrack's hook (-200), this host's own address excepted (to_host judges its
    # replies by state).
    assert chain(text, "from_tunnel")[-1] == (
        "ip daddr != 198.18.0.1 ip daddr @vpc_networks notrack"
    )
    assert chain(text, "from_underlay")[-1] == (
        "ip daddr 198.19.0.0/16 ip saddr @vpc_networks notrack"
    )
    assert rs.PREROUTING_PRIORITY < -200
    # Without masquerading, route mode stays as it was: no conntrack, no VPC set.
    plain = rs.render(spec(vpc_networks=VPC))
    assert not uses_conntrack(plain) and "notrack" not in plain and "vpc_networks" not in plain
    assert plain == rs.render(spec())


@pytest.mark.parametrize("name", CASES)
def test_tracked_tables_exempt_every_outer_udp_fragment(name: str) -> None:
    # Pieces after the first have no UDP header: left to conntrack's defragmenter they would
    # wait for a first piece that `notrack` sent past it, and the datagram would be lost.
    text = rs.render(CASES[name])
    if tracked(CASES[name]):
        assert "ip frag-off & 16383 != 0 jump outer_fragment" in chain(text, "underlay_to_local")
        assert chain(text, "outer_fragment") == [
            'counter name "outer_fragments"',
            "ip protocol udp notrack",
        ]
    else:
        assert "notrack" not in text


def test_allow_list_keeps_every_flow_tracked() -> None:
    # The allow-list accepts replies by their state: device <-> VPC flows stay tracked.
    text = rs.render(CASES["route_masquerade_allowlist"])
    assert "ip daddr @vpc_networks" not in text
    assert "ip daddr != @vpc_networks" in "".join(chain(text, "postrouting"))
    assert not CASES["route_masquerade_allowlist"].stateless_vpc
    assert CASES["route_masquerade_2ep"].stateless_vpc


def test_masquerading_outside_the_vpc_needs_the_vpc() -> None:
    with pytest.raises(ValueError, match="vpc_networks"):
        spec(outside_vpc="masquerade")
    with pytest.raises(ValueError, match="outside_vpc"):
        spec(outside_vpc="nat")
    # nat mode masquerades everything: the VPC is not needed there.
    assert "vpc_networks" not in rs.render(spec(mode="nat", outside_vpc="masquerade"))


@pytest.mark.parametrize("name", CASES)
def test_devices_open_nothing_on_the_host_but_what_is_listed(name: str) -> None:
    # Issue 9, hole 1: everything from the tunnel to this host, whatever its address, goes
    # through to_host, which ends in a counted drop.
    text = rs.render(CASES[name])
    assert 'iifname "vxlan0" jump to_host' in chain(text, "input")
    rules = chain(text, "to_host")
    assert rules[-1] == 'counter name "host_service_dropped" drop'
    if tracked(CASES[name]):  # conntrack is on: replies to the host's own traffic by state
        assert rules[:2] == ["ct state established,related accept", "icmp type echo-request accept"]
        listed = rules[2:-1]
    else:  # route mode, no conntrack: the same policy, stateless
        assert rules[0].startswith("icmp type { echo-reply, destination-unreachable, echo-request")
        assert rules[-2] == "tcp flags != syn / fin,syn,rst,ack accept"  # not a connection opening
        listed = rules[1:-2]
    assert len(listed) == len({p for p, _ in CASES[name].host_services})
    assert all(re.fullmatch(r"(tcp|udp) dport [0-9{}, ]+ accept", r) for r in listed), listed


def test_host_services_render_by_protocol() -> None:
    text = rs.render(spec(host_services=(("udp", 53), ("tcp", 8080), ("tcp", 22))))
    assert "tcp dport { 22, 8080 } accept" in chain(text, "to_host")
    assert "udp dport 53 accept" in chain(text, "to_host")
    assert "dport" not in "".join(chain(rs.render(spec()), "to_host"))


@pytest.mark.parametrize("name", CASES)
def test_vxlan_filter_covers_only_our_vni(name: str) -> None:
    # Issue 9, hole 2: other VXLAN users on this host (other VNIs, on any port, interface or
    # address) pass untouched; ours is accepted only on the underlay, to the local address,
    # from a VPG endpoint.
    text = rs.render(CASES[name])
    # A good packet of ours costs one rule; only what that rule refuses is looked at further.
    assert chain(text, "input") == [
        'udp dport 4789 ip daddr 198.18.0.1 iifname "eth0" udp length >= 30 @th,64,8 0x8'
        ' @th,96,24 0xa ip saddr @vpg_endpoints counter name "vxlan_accepted" accept',
        "udp dport 4789 jump vxlan_not_accepted",
        'iifname "vxlan0" jump to_host',
    ]
    to_port = 'ip daddr 198.18.0.1 iifname "eth0"'
    assert chain(text, "vxlan_not_accepted") == [
        f'{to_port} udp length < 30 counter name "vxlan_malformed_dropped" drop',
        f'{to_port} @th,64,8 != 0x8 counter name "vxlan_malformed_dropped" drop',
        '@th,96,24 0xa counter name "vxlan_foreign_dropped" drop',
        # Counted, no verdict: other VNIs pass on to whoever owns them.
        '@th,96,24 != 0xa counter name "vxlan_other_vni"',
    ]


@pytest.mark.parametrize("name", CASES)
def test_outer_fragments_are_counted_before_reassembly(name: str) -> None:
    # Issue 9, "Must show" 3: the kernel reassembles at priority -400 (conntrack's defrag), so
    # only a chain before it sees fragments; the prerouting chain sits there, counts them first
    # and never drops them.
    text = rs.render(CASES[name])
    assert "\t\ttype filter hook prerouting priority -450; policy accept;" in text
    # One dispatch per packet on its interface; the underlay's to the local address first.
    assert chain(text, "prerouting") == [
        'iifname vmap { "eth0" : jump from_underlay, "vxlan0" : jump from_tunnel }'
    ]
    if tracked(CASES[name]):
        assert chain(text, "from_underlay")[0] == "ip daddr 198.18.0.1 jump underlay_to_local"
        assert chain(text, "underlay_to_local")[-1] == (
            "ip frag-off & 16383 != 0 jump outer_fragment"
        )
        assert chain(text, "outer_fragment")[0] == 'counter name "outer_fragments"'
    else:
        assert chain(text, "from_underlay") == [
            'ip daddr 198.18.0.1 ip frag-off & 16383 != 0 counter name "outer_fragments"'
        ]
    assert text.count("hook prerouting") == 1  # one hook for every packet, not two
    for counted in rs.COUNTED_ONLY:
        rules = [r for r in text.splitlines() if f'counter name "{counted}"' in r]
        assert rules and not [r for r in rules if r.rstrip().endswith(("drop", "accept"))]


def test_vni_and_local_address_are_part_of_the_spec() -> None:
    text = rs.render(spec(vni=0xABCDEF, local_address=IPv4Address("198.18.3.4"), vxlan_port=8472))
    assert "@th,96,24 0xabcdef" in text and "udp dport 8472" in text and "198.18.3.4" in text
    assert rs.change_needed(spec(), rs.render(spec(vni=11))) == "reload"
    assert rs.change_needed(spec(), rs.render(spec(local_address=EP3))) == "reload"


def test_transaction_touches_only_our_table() -> None:
    for s in CASES.values():
        text = rs.transaction(s)
        assert text.startswith("add table inet gatepeer\ndelete table inet gatepeer\ntable ")
        for line in text.splitlines():
            words = line.split()
            if "inet" in words:  # every object named is in inet gatepeer
                assert words[words.index("inet") + 1] == "gatepeer", line
    assert rs.REMOVE_TRANSACTION == "add table inet gatepeer\ndelete table inet gatepeer\n"
    assert rs.endpoints_transaction([EP2, EP1]) == (
        "flush set inet gatepeer vpg_endpoints\n"
        "add element inet gatepeer vpg_endpoints { 198.18.0.11, 198.18.0.12 }\n"
    )
    assert rs.endpoints_transaction([]) == "flush set inet gatepeer vpg_endpoints\n"


def test_render_seeds_counters() -> None:
    text = rs.render(spec(), counters={"vxlan_accepted": (5, 700)})
    assert "counter vxlan_accepted {\n\t\tpackets 5 bytes 700\n\t}" in text
    assert rs.counters_from_listing(text)["vxlan_accepted"] == (5, 700)
    assert rs.counters_from_listing(text)["allowlist_dropped"] == (0, 0)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"mode": "bridge"}, ValueError),
        ({"tunnel": 'vx"0'}, ValueError),
        ({"tunnel": "a" * 16}, ValueError),
        ({"tunnel": "vxlan0\n"}, ValueError),
        ({"underlay": "vxlan0"}, ValueError),
        ({"vxlan_port": 0}, ValueError),
        ({"endpoints": {EP1}}, TypeError),
        ({"endpoints": frozenset({"198.18.0.11"})}, TypeError),
        ({"device_subnet": "198.19.0.0/16"}, TypeError),
        ({"allowed_destinations": [IPv4Network("192.0.2.0/24")]}, TypeError),
        ({"vni": 1 << 24}, ValueError),
        ({"vni": "10"}, ValueError),
        ({"local_address": "198.18.0.1"}, TypeError),
        ({"host_services": (("sctp", 22),)}, ValueError),
        ({"host_services": (("tcp", 0),)}, ValueError),
        ({"host_services": [("tcp", 22)]}, ValueError),
    ],
)
def test_spec_validation(kw: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        spec(**kw)


# ---- comparison (pure) -------------------------------------------------------------------------

# How nft 1.0.6 lists a table: blank lines, wrapped element lists, hash-set order.
LISTING_QUIRKS = """table inet gatepeer {
\tcomment "c"
\tcounter b {
\t\tpackets 17 bytes 1234
\t}

\tcounter a {
\t\tpackets 0 bytes 0
\t}

\tset vpg_endpoints {
\t\ttype ipv4_addr
\t\telements = { 198.18.0.13, 198.18.0.11,
\t\t\t     198.18.0.12 }
\t}

\tflowtable ft {
\t\thook ingress priority filter
\t\tdevices = { "vxlan0", "eth0" }
\t}
}
"""


def test_canonical_ignores_listing_quirks() -> None:
    ours = (
        'table inet gatepeer {\n  comment "c"\n  counter a {\n  }\n  counter b {\n  }\n'
        "  flowtable ft {\n    hook ingress priority filter\n    devices = { eth0, vxlan0 }\n  }\n"
        "  set vpg_endpoints {\n    type ipv4_addr\n"
        "    elements = { 198.18.0.11, 198.18.0.12, 198.18.0.13 }\n  }\n}\n"
    )
    assert rs.canonical(LISTING_QUIRKS) == rs.canonical(ours)
    assert rs.canonical(ours)[:3] == ["table inet gatepeer {", '\tcomment "c"', "\tcounter a {"]


def test_a_listing_without_protocol_names_is_the_same_table() -> None:
    """Found by the image's boot: a root without /etc/protocols (no netbase) lists
    `ip protocol 17`; taken for a difference, the table was reloaded every few seconds."""
    text = rs.render(spec(mode="nat"))
    assert "ip protocol udp" in text
    numbered = text.replace("ip protocol udp", "ip protocol 17")
    assert rs.change_needed(spec(mode="nat"), numbered) == "none"
    # A real difference in the protocol is still one.
    other = text.replace("ip protocol udp", "ip protocol 6")
    assert rs.change_needed(spec(mode="nat"), other) == "reload"


MSS_OUT = '\t\toifname "vxlan0" tcp option maxseg size set rt mtu'


def test_canonical_keeps_rule_order() -> None:
    text = rs.render(spec())
    lines = text.splitlines()
    a = lines.index(MSS_OUT)
    lines[a], lines[a - 1] = lines[a - 1], lines[a]
    assert rs.canonical("\n".join(lines)) != rs.canonical(text)


def test_change_needed() -> None:
    want = spec()
    assert rs.change_needed(want, None) == "reload"
    assert rs.change_needed(want, rs.render(want)) == "none"
    assert rs.change_needed(want, rs.render(want, counters={"vxlan_accepted": (9, 9)})) == "none"
    assert rs.change_needed(want, rs.render(spec(endpoints=frozenset({EP3})))) == "sets"
    assert rs.change_needed(want, rs.render(spec(endpoints=frozenset()))) == "sets"
    assert rs.change_needed(want, rs.render(spec(mode="nat"))) == "reload"
    assert rs.change_needed(want, rs.render(spec(vxlan_port=8472))) == "reload"
    hand_edit = rs.render(want).replace(MSS_OUT + "\n", "")
    assert rs.change_needed(want, hand_edit) == "reload"


def test_spec_hash_ignores_endpoints_only() -> None:
    h = rs.spec_hash(spec())
    assert rs.spec_hash(spec(endpoints=frozenset())) == h
    assert rs.spec_hash(spec(mode="nat")) != h
    assert rs.loaded_spec_hash(rs.render(spec(endpoints=frozenset({EP3})))) == h
    assert rs.loaded_spec_hash("table inet gatepeer {\n}\n") is None


def test_loaded_endpoints() -> None:
    assert rs.loaded_endpoints(LISTING_QUIRKS) == {EP1, EP2, EP3}
    assert rs.loaded_endpoints(rs.render(spec(endpoints=frozenset()))) == frozenset()


def test_describe() -> None:
    want = spec()
    assert rs.describe(want, rs.render(want)) == []
    created = rs.describe(want, None)
    assert created[:2] == ["# create table inet gatepeer", "nft -f - <<'EOF'"]
    assert created[-1] == "EOF" and "add table inet gatepeer" in created
    moved = rs.describe(want, rs.render(spec(endpoints=frozenset({EP1, EP3}))))
    assert moved == [
        "# set vpg_endpoints: +198.18.0.12 -198.18.0.13",
        "nft -f - <<'EOF'",
        "flush set inet gatepeer vpg_endpoints",
        "add element inet gatepeer vpg_endpoints { 198.18.0.11, 198.18.0.12 }",
        "EOF",
    ]
    edited = rs.render(want).replace(MSS_OUT + "\n", "")
    lines = rs.describe(want, edited)
    assert lines[0].startswith("# replace table inet gatepeer")
    assert "#   +" + MSS_OUT in lines
    assert lines[-1] == "EOF"


def test_counters_from_json() -> None:
    text = (
        '{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet", '
        '"name": "vxlan_foreign_dropped", "table": "gatepeer", "handle": 5, "packets": 3, '
        '"bytes": 150}}, {"counter": {"family": "inet", "name": "x", "table": "other", '
        '"handle": 1, "packets": 1, "bytes": 1}}]}'
    )
    assert rs.counters_from_json(text) == {"vxlan_foreign_dropped": (3, 150)}


def test_pure_modules_import_no_kernel_code() -> None:
    code = (
        "import sys, gatepeer.plan, gatepeer.ruleset, gatepeer.desired_state; "
        "print(sorted(m for m in sys.modules if m.startswith('gatepeer.kernel')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# ---- issue 18-20 features ----------------------------------------------------------------------


def test_snat_address_replaces_masquerade() -> None:
    for s in (spec(mode="nat"), spec(outside_vpc="masquerade", vpc_networks=VPC)):
        moved = replace(s, snat_address=SNAT)
        rule = chain(rs.render(moved), "postrouting")[0]
        assert rule.endswith('counter name "masqueraded_flows" snat ip to 198.18.0.50'), rule
        assert not rule.endswith(" masquerade")
        assert chain(rs.render(s), "postrouting")[0].endswith(" masquerade")
    # Route mode without masquerading has no NAT to give an address to.
    assert "postrouting" not in rs.render(spec(snat_address=SNAT))
    with pytest.raises(TypeError, match="snat_address"):
        spec(snat_address="198.18.0.50")


def test_sync_events_limit_a_new_flows_conntrack_events() -> None:
    """With conntrackd's sync, each new flow raises only new, assured and destroy events: a
    short TCP connection's three state-change updates are gone, the peer's copy still gets the
    flow at its start and established, and the flow log (`conntrack -E -e NEW,DESTROY`) still
    sees both of its events."""
    rule = "ct state new ct event set new,destroy,assured"
    for s in (spec(mode="nat"), spec(outside_vpc="masquerade", vpc_networks=VPC)):
        synced = rs.render(replace(s, sync_events=True))
        # First in forward: before anything that could accept the flow's first packet.
        assert chain(synced, "forward")[0] == rule
        assert rule not in rs.render(s)
    assert {"new", "destroy"} <= set(rs.SYNC_EVENTS.split(","))
    # Route mode without conntrack stays without it: a `ct` rule would engage it for every
    # packet, and there is no flow to sync.
    plain = spec()
    assert rs.render(replace(plain, sync_events=True)) == rs.render(plain)
    assert not uses_conntrack(rs.render(replace(plain, sync_events=True)))


def test_device_counters_live_in_a_table_of_their_own() -> None:
    # nft 1.0.6 fetches every element of a table's sets to list anything of it: with the
    # device sets in our table, each converge check and counter read took seconds at 100,000
    # devices (measured: bench/README.md). So they get their own table, named by its hash.
    for s in (spec(), spec(mode="nat"), spec(outside_vpc="masquerade", vpc_networks=VPC)):
        on = replace(s, device_counters=True)
        assert rs.render(on) == rs.render(s)  # our table is the same either way
        text = rs.render_devices(on)
        name = rs.device_table(on)
        assert name.startswith("gatepeer_dev_") and text.startswith(f"table inet {name} {{\n")
        for set_name in rs.DEVICE_SETS:
            assert (
                f"\tset {set_name} {{\n\t\ttype ipv4_addr\n\t\tsize 131072\n"
                "\t\tflags dynamic,timeout\n\t\tcounter\n\t\ttimeout 1h\n\t}"
            ) in text
        # After gatepeer's forward chain, so what it drops is not counted; both directions.
        assert chain(text, "forward") == [
            'iifname "vxlan0" update @devices_from { ip saddr }',
            'oifname "vxlan0" update @devices_to { ip daddr }',
        ]
        assert "priority filter + 10;" in text
    assert rs.DEVICE_SET_SIZE >= 100_000
    # Another tunnel name is another table.
    assert rs.device_table(spec(device_counters=True)) != rs.device_table(
        spec(device_counters=True, tunnel="vx1")
    )


def test_device_table_is_part_of_convergence() -> None:
    on, off = spec(device_counters=True), spec()
    name = rs.device_table(on)
    assert rs.change_needed(on, rs.comparable(on)) == "none"
    assert rs.change_needed(off, rs.render(off)) == "none"  # a bare listing: no device table
    assert rs.change_needed(on, rs.render(on)) == "reload"  # counting on, its table missing
    stale = rs.render(off) + rs.device_tables_line(["gatepeer_dev_0123456789ab"])
    assert rs.change_needed(off, stale) == "reload"
    assert rs.change_needed(on, stale) == "reload"
    # The right table is kept (its counts), any other deleted, a missing one created.
    assert rs.devices_transaction(on, [name]) == ""
    assert rs.devices_transaction(on, []) == rs.render_devices(on)
    assert rs.devices_transaction(off, [name, "gatepeer_dev_x"]) == (
        f"delete table inet {name}\ndelete table inet gatepeer_dev_x\n"
    )
    assert rs.devices_transaction(None, [name]) == f"delete table inet {name}\n"


def test_closed_network_drops_what_is_neither_allowed_nor_vpc() -> None:
    with pytest.raises(ValueError, match="vpc_networks"):
        spec(closed=True)
    for s in (
        spec(closed=True, vpc_networks=VPC),
        spec(mode="nat", closed=True, vpc_networks=VPC, allowed_destinations=ALLOW),
    ):
        text = rs.render(s)
        forward = chain(text, "forward")
        rule = (
            'iifname "vxlan0" ip daddr != @vpc_networks ip daddr != @allowed_destinations'
            ' counter name "closed_dropped" drop'
        )
        # Stateless, and no established accept: flows already open close too; the stateful
        # allow-list is not rendered (it would refuse the VPC).
        assert rule in forward
        assert not [r for r in forward if r.startswith("ct ")]
        assert 'allowlist_dropped" drop' not in text
        assert "set vpc_networks {" in text and "set allowed_destinations {" in text
    # The VPC only: an empty allow-list set, refilled later without a reload.
    assert "\tset allowed_destinations {\n\t\ttype ipv4_addr\n\t\tflags interval\n\t}" in (
        rs.render(spec(closed=True, vpc_networks=VPC))
    )
    assert 'closed_dropped" drop' not in rs.render(spec(vpc_networks=VPC))
    # Every counter in every mode, closed or not: one metrics schema.
    for s in CASES.values():
        text = rs.render(s)
        assert [c for c in rs.COUNTERS if f"counter {c} {{" in text] == list(rs.COUNTERS)


def test_track_flows_keeps_device_vpc_flows_in_conntrack() -> None:
    base = spec(outside_vpc="masquerade", vpc_networks=VPC)
    assert "notrack" in "".join(chain(rs.render(base), "from_tunnel"))
    tracked_text = rs.render(replace(base, track_flows=True))
    assert "notrack" not in "".join(chain(tracked_text, "from_tunnel"))
    assert "notrack" not in "".join(chain(tracked_text, "from_underlay"))
    # Plain route mode: conntrack engages (the flow log needs entries), the outer packets
    # stay exempt.
    plain = replace(spec(), track_flows=True)
    assert plain.tracked and uses_conntrack(rs.render(plain))
    assert "udp dport 4789 @th,96,24 0xa notrack" in chain(rs.render(plain), "underlay_to_local")


def test_allowed_destinations_change_without_reload() -> None:
    want = spec(mode="nat", allowed_destinations=ALLOW, closed=True, vpc_networks=VPC)
    old = replace(want, allowed_destinations=(IPv4Network("192.0.2.0/24"),), endpoints=frozenset())
    assert rs.change_needed(want, rs.render(old)) == "sets"
    assert rs.spec_hash(old) == rs.spec_hash(want)
    # One transaction refills both sets; nothing else is touched.
    assert rs.sets_transaction(want) == (
        "flush set inet gatepeer vpg_endpoints\n"
        "add element inet gatepeer vpg_endpoints { 198.18.0.11, 198.18.0.12 }\n"
        "flush set inet gatepeer allowed_destinations\n"
        "add element inet gatepeer allowed_destinations"
        " { 192.0.2.0/24, 198.51.100.7, 203.0.113.0/24 }\n"
    )
    lines = rs.describe(want, rs.render(old))
    assert lines[:2] == [
        "# set vpg_endpoints: +198.18.0.11 +198.18.0.12",
        "# set allowed_destinations: +198.51.100.7/32 +203.0.113.0/24",
    ]
    # An allow-list appearing where there was none changes rules: a reload.
    assert rs.change_needed(spec(allowed_destinations=ALLOW), rs.render(spec())) == "reload"
    # Closed with the VPC only: the empty set is refilled.
    assert rs.sets_transaction(spec(closed=True, vpc_networks=VPC, endpoints=frozenset())) == (
        "flush set inet gatepeer vpg_endpoints\nflush set inet gatepeer allowed_destinations\n"
    )


DEVICE_JSON = """{"nftables": [{"metainfo": {"version": "1.0.6"}},
{"set": {"family": "inet", "name": "devices_from", "table": "gatepeer_dev_0123456789ab",
 "type": "ipv4_addr",
 "handle": 3, "size": 131072, "flags": ["timeout"], "timeout": 3600, "elem": [
 {"elem": {"val": "198.19.0.5", "expires": 3590, "counter": {"packets": 3, "bytes": 252}}},
 {"elem": {"val": "198.19.0.7", "expires": 100, "counter": {"packets": 1, "bytes": 60}}}],
 "stmt": [{"counter": null}]}},
{"set": {"family": "inet", "name": "devices_to", "table": "gatepeer_dev_0123456789ab",
 "type": "ipv4_addr",
 "handle": 4, "size": 131072, "flags": ["timeout"], "timeout": 3600, "elem": [
 {"elem": {"val": "198.19.0.5", "expires": 3599, "counter": {"packets": 2, "bytes": 168}}},
 {"elem": {"val": "198.19.0.9", "counter": {"packets": 4, "bytes": 400}}}]}},
{"set": {"family": "inet", "name": "devices_to", "table": "other", "type": "ipv4_addr",
 "elem": [{"elem": {"val": "198.19.0.99", "counter": {"packets": 9, "bytes": 9}}}]}}]}"""


def test_device_traffic_from_json() -> None:
    got = rs.device_traffic_from_json(DEVICE_JSON, 3600)
    a5, a7, a9 = (IPv4Address(f"198.19.0.{n}") for n in (5, 7, 9))
    assert list(got) == [a5, a7, a9]  # another table's set is not ours
    assert got[a5] == DeviceTraffic(a5, 3, 252, 2, 168, 1.0)  # the younger of the two ages
    assert got[a7] == DeviceTraffic(a7, 1, 60, 0, 0, 3500.0)
    assert got[a9] == DeviceTraffic(a9, 0, 0, 4, 400, None)
    assert rs.device_traffic_from_json('{"nftables": []}', 3600) == {}


def test_device_counters_come_from_the_config(tmp_path: Path) -> None:
    from helpers.config_files import soracom_section, write_config, write_key
    from helpers.plan_inputs import FACTS, GATE, make_config

    from gatepeer.config import ConfigError, PacketPathConfig, load
    from gatepeer.desired_state import desired_state

    key = write_key(tmp_path / "key")
    on = load(
        write_config(tmp_path, soracom_section(key) + "\n[packet_path]\ndevice_counters = true\n"),
        check_system=False,
    )
    assert on.packet_path.device_counters is True
    assert PacketPathConfig().device_counters is False  # the default: see bench/README.md
    with pytest.raises(ConfigError, match="device_counters"):
        load(
            write_config(
                tmp_path, soracom_section(key) + '\n[packet_path]\ndevice_counters = "on"\n'
            ),
            check_system=False,
        )
    spec_on = desired_state(
        replace(make_config(), packet_path=on.packet_path), FACTS, GATE
    ).packet_path
    assert spec_on is not None and spec_on.device_counters
    spec_off = desired_state(make_config(), FACTS, GATE).packet_path
    assert spec_off is not None and not spec_off.device_counters
    assert not spec_off.closed and not spec_off.track_flows and spec_off.snat_address is None
