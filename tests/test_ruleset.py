"""The packet path's ruleset (pure): rendering (golden files), the spec's validation, and the
comparison with what `nft list` prints. The real `nft` is tests/test_nftables.py's.

Regenerate the golden files with GATEPEER_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from gatepeer import ruleset as rs
from gatepeer.ruleset import PacketPathSpec

GOLDEN = Path(__file__).parent / "golden" / "nftables"
UPDATE = os.environ.get("GATEPEER_UPDATE_GOLDEN") == "1"

SUBNET = IPv4Network("198.19.0.0/16")
EP1, EP2, EP3 = IPv4Address("198.18.0.11"), IPv4Address("198.18.0.12"), IPv4Address("198.18.0.13")
ALLOW = (
    IPv4Network("203.0.113.0/25"),
    IPv4Network("192.0.2.0/24"),
    IPv4Network("203.0.113.0/24"),  # overlaps the first: collapsed before loading
    IPv4Network("198.51.100.7/32"),
)


def spec(**kw: object) -> PacketPathSpec:
    base: dict[str, object] = {"device_subnet": SUBNET, "endpoints": frozenset({EP1, EP2})}
    base.update(kw)
    return PacketPathSpec(**base)  # type: ignore[arg-type]


CASES = {
    "route_0ep": spec(endpoints=frozenset()),
    "route_1ep": spec(endpoints=frozenset({EP1})),
    "route_2ep": spec(),
    "nat_2ep": spec(mode="nat"),
    "nat_allowlist": spec(mode="nat", allowed_destinations=ALLOW),
    "route_flowtable": spec(flowtable=True),
    "nat_allowlist_flowtable_0ep": spec(
        mode="nat", allowed_destinations=ALLOW, flowtable=True, endpoints=frozenset()
    ),
}
PLAIN = [name for name, s in CASES.items() if not s.flowtable]
WITH_FLOWTABLE = [name for name, s in CASES.items() if s.flowtable]

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


def test_modes_differ_by_masquerade_and_connection_tracking() -> None:
    route, nat = rs.render(spec()), rs.render(spec(mode="nat"))
    added = [ln for ln in nat.splitlines() if ln not in route.splitlines()]
    assert added[0].startswith('\tcomment "managed by gatepeer, spec ')
    # nat needs conntrack: the established accept, and the outer VXLAN packets left untracked
    # (tracking them would cost a second lookup per packet). Route mode tracks nothing.
    assert added[1:] == [
        '\t\tiifname "eth0" udp dport 4789 notrack',
        "\tchain output {",
        "\t\ttype filter hook output priority raw; policy accept;",
        '\t\toifname "eth0" udp dport 4789 notrack',
        "\t\tct state established,related accept",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        '\t\toifname "eth0" ip saddr 198.19.0.0/16 counter name "masqueraded_flows" masquerade',
    ]
    assert "ct " not in route and "notrack" not in route
    assert (
        'oifname "eth0" ip saddr 198.19.0.0/16 counter name "masqueraded_flows" masquerade' in nat
    )
    # Every counter exists in every mode: the metrics keep one schema.
    for text in (route, nat):
        assert [c for c in rs.COUNTERS if f"counter {c} {{" in text] == list(rs.COUNTERS)


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


MSS_OUT = '\t\toifname "vxlan0" tcp flags syn tcp option maxseg size set rt mtu'


def test_canonical_keeps_rule_order() -> None:
    text = rs.render(spec())
    lines = text.splitlines()
    a = lines.index('\t\toifname "vxlan0" tcp flags syn tcp option maxseg size set rt mtu')
    lines[a], lines[a - 1] = lines[a - 1], lines[a]
    assert rs.canonical("\n".join(lines)) != rs.canonical(text)


def test_change_needed() -> None:
    want = spec()
    assert rs.change_needed(want, None) == "reload"
    assert rs.change_needed(want, rs.render(want)) == "none"
    assert rs.change_needed(want, rs.render(want, counters={"vxlan_accepted": (9, 9)})) == "none"
    assert rs.change_needed(want, rs.render(spec(endpoints=frozenset({EP3})))) == "endpoints"
    assert rs.change_needed(want, rs.render(spec(endpoints=frozenset()))) == "endpoints"
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
        "import sys, gatepeer.plan, gatepeer.ruleset, gatepeer.state; "
        "print(sorted(m for m in sys.modules if m.startswith('gatepeer.kernel')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
