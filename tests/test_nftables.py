"""The nftables layer: rendering (golden files), the pure comparison, and the real thing in
network namespaces this test creates and always removes.

Regenerate the golden files with GATEPEER_UPDATE_GOLDEN=1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from gatepeer.kernel import nftables as nf
from gatepeer.kernel.nftables import PacketPathSpec

GOLDEN = Path(__file__).parent / "golden" / "nftables"
UPDATE = os.environ.get("GATEPEER_UPDATE_GOLDEN") == "1"
ROOT = Path(__file__).resolve().parent.parent

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

needs_nft = pytest.mark.skipif(
    shutil.which("nft") is None, reason="needs nftables (`nft` not found)"
)


# ---- rendering -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_render_matches_golden(name: str) -> None:
    text = nf.render(CASES[name])
    path = GOLDEN / f"{name}.nft"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with GATEPEER_UPDATE_GOLDEN=1"
    assert text == path.read_text()


def test_render_is_deterministic() -> None:
    a = spec(endpoints=frozenset({EP3, EP1, EP2}), allowed_destinations=ALLOW)
    b = spec(endpoints=frozenset({EP2, EP1, EP3}), allowed_destinations=tuple(reversed(ALLOW)))
    assert nf.render(a) == nf.render(b)
    assert "elements = { 198.18.0.11, 198.18.0.12, 198.18.0.13 }" in nf.render(a)


def test_allow_list_is_collapsed_and_sorted() -> None:
    assert spec(allowed_destinations=ALLOW).allow_list == (
        IPv4Network("192.0.2.0/24"),
        IPv4Network("198.51.100.7/32"),
        IPv4Network("203.0.113.0/24"),
    )
    assert "elements = { 192.0.2.0/24, 198.51.100.7, 203.0.113.0/24 }" in nf.render(
        spec(allowed_destinations=ALLOW)
    )


def test_modes_differ_by_masquerade_and_connection_tracking() -> None:
    route, nat = nf.render(spec()), nf.render(spec(mode="nat"))
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
        assert [c for c in nf.COUNTERS if f"counter {c} {{" in text] == list(nf.COUNTERS)


def test_transaction_touches_only_our_table() -> None:
    for s in CASES.values():
        text = nf.transaction(s)
        assert text.startswith("add table inet gatepeer\ndelete table inet gatepeer\ntable ")
        for line in text.splitlines():
            words = line.split()
            if "inet" in words:  # every object named is in inet gatepeer
                assert words[words.index("inet") + 1] == "gatepeer", line
    assert nf.REMOVE_TRANSACTION == "add table inet gatepeer\ndelete table inet gatepeer\n"
    assert nf.endpoints_transaction([EP2, EP1]) == (
        "flush set inet gatepeer vpg_endpoints\n"
        "add element inet gatepeer vpg_endpoints { 198.18.0.11, 198.18.0.12 }\n"
    )
    assert nf.endpoints_transaction([]) == "flush set inet gatepeer vpg_endpoints\n"


def test_render_seeds_counters() -> None:
    text = nf.render(spec(), counters={"vxlan_accepted": (5, 700)})
    assert "counter vxlan_accepted {\n\t\tpackets 5 bytes 700\n\t}" in text
    assert nf.counters_from_listing(text)["vxlan_accepted"] == (5, 700)
    assert nf.counters_from_listing(text)["allowlist_dropped"] == (0, 0)


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
    assert nf.canonical(LISTING_QUIRKS) == nf.canonical(ours)
    assert nf.canonical(ours)[:3] == ["table inet gatepeer {", '\tcomment "c"', "\tcounter a {"]


MSS_OUT = '\t\toifname "vxlan0" tcp flags syn tcp option maxseg size set rt mtu'


def test_canonical_keeps_rule_order() -> None:
    text = nf.render(spec())
    lines = text.splitlines()
    a = lines.index('\t\toifname "vxlan0" tcp flags syn tcp option maxseg size set rt mtu')
    lines[a], lines[a - 1] = lines[a - 1], lines[a]
    assert nf.canonical("\n".join(lines)) != nf.canonical(text)


def test_change_needed() -> None:
    want = spec()
    assert nf.change_needed(want, None) == "reload"
    assert nf.change_needed(want, nf.render(want)) == "none"
    assert nf.change_needed(want, nf.render(want, counters={"vxlan_accepted": (9, 9)})) == "none"
    assert nf.change_needed(want, nf.render(spec(endpoints=frozenset({EP3})))) == "endpoints"
    assert nf.change_needed(want, nf.render(spec(endpoints=frozenset()))) == "endpoints"
    assert nf.change_needed(want, nf.render(spec(mode="nat"))) == "reload"
    assert nf.change_needed(want, nf.render(spec(vxlan_port=8472))) == "reload"
    hand_edit = nf.render(want).replace(MSS_OUT + "\n", "")
    assert nf.change_needed(want, hand_edit) == "reload"


def test_spec_hash_ignores_endpoints_only() -> None:
    h = nf.spec_hash(spec())
    assert nf.spec_hash(spec(endpoints=frozenset())) == h
    assert nf.spec_hash(spec(mode="nat")) != h
    assert nf.loaded_spec_hash(nf.render(spec(endpoints=frozenset({EP3})))) == h
    assert nf.loaded_spec_hash("table inet gatepeer {\n}\n") is None


def test_loaded_endpoints() -> None:
    assert nf.loaded_endpoints(LISTING_QUIRKS) == {EP1, EP2, EP3}
    assert nf.loaded_endpoints(nf.render(spec(endpoints=frozenset()))) == frozenset()


def test_describe() -> None:
    want = spec()
    assert nf.describe(want, nf.render(want)) == []
    created = nf.describe(want, None)
    assert created[:2] == ["# create table inet gatepeer", "nft -f - <<'EOF'"]
    assert created[-1] == "EOF" and "add table inet gatepeer" in created
    moved = nf.describe(want, nf.render(spec(endpoints=frozenset({EP1, EP3}))))
    assert moved == [
        "# set vpg_endpoints: +198.18.0.12 -198.18.0.13",
        "nft -f - <<'EOF'",
        "flush set inet gatepeer vpg_endpoints",
        "add element inet gatepeer vpg_endpoints { 198.18.0.11, 198.18.0.12 }",
        "EOF",
    ]
    edited = nf.render(want).replace(MSS_OUT + "\n", "")
    lines = nf.describe(want, edited)
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
    assert nf.counters_from_json(text) == {"vxlan_foreign_dropped": (3, 150)}


# ---- conntrack sizing --------------------------------------------------------------------------


def test_conntrack_sizing() -> None:
    got = dict(nf.conntrack_sysctls(50_000, 8))
    # 50,000 x 8 x 1.25 = 500,000 -> 2^19
    assert got["net/netfilter/nf_conntrack_max"] == 524_288
    assert got["net/netfilter/nf_conntrack_buckets"] == 524_288
    assert got["net/netfilter/nf_conntrack_tcp_timeout_established"] == 7440
    assert dict(nf.conntrack_sysctls(50_000, 4))["net/netfilter/nf_conntrack_max"] == 262_144
    assert dict(nf.conntrack_sysctls(10, 2))["net/netfilter/nf_conntrack_max"] == 65_536
    assert dict(nf.conntrack_sysctls(100_000, 10))["net/netfilter/nf_conntrack_max"] == 2_097_152
    for path, value in nf.conntrack_sysctls(1, 1):
        assert path.startswith("net/netfilter/nf_conntrack_") and value > 0
    with pytest.raises(ValueError):
        nf.conntrack_sysctls(0, 8)


def test_unwritable_reports_absent_keys(tmp_path: Path) -> None:
    problems = nf.unwritable([("net/netfilter/nf_conntrack_max", 1)], root=tmp_path)
    assert problems == ["net/netfilter/nf_conntrack_max: absent (no conntrack in this kernel?)"]


# ---- the kernel ------------------------------------------------------------------------------


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check)


def _new_netns() -> str:
    name = f"gtnf{secrets.token_hex(4)}"
    _run("ip", "netns", "add", name)
    _run("ip", "-n", name, "link", "set", "lo", "up")
    # No IPv6 chatter (router solicitations, MLD) to muddle the counters.
    _run(
        "ip",
        "netns",
        "exec",
        name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    )
    return name


def _stand_ins(ns: str) -> None:
    """vxlan0 and eth0 as a veth pair: what the flowtable names must exist on most kernels."""
    _run("ip", "-n", ns, "link", "add", "vxlan0", "type", "veth", "peer", "name", "eth0")


@pytest.fixture
def ns() -> Iterator[str]:
    name = _new_netns()
    try:
        yield name
    finally:
        _run("ip", "netns", "delete", name, check=False)


@pytest.fixture(scope="module")
def check_ns() -> Iterator[str]:
    name = _new_netns()
    try:
        _stand_ins(name)
        yield name
    finally:
        _run("ip", "netns", "delete", name, check=False)


def _nft(ns: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", *args], input=stdin, capture_output=True, text=True
    )


@pytest.mark.netns
@needs_nft
@pytest.mark.parametrize("name", PLAIN)
def test_check_mode_accepts_transaction(check_ns: str, name: str) -> None:
    proc = _nft(check_ns, "-c", "-f", "-", stdin=nf.transaction(CASES[name]))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.netns
@needs_nft
@pytest.mark.parametrize("name", WITH_FLOWTABLE)
def test_check_mode_flowtable_agrees_with_probe(check_ns: str, name: str) -> None:
    proc = _nft(check_ns, "-c", "-f", "-", stdin=nf.transaction(CASES[name]))
    assert (proc.returncode == 0) == nf.flowtable_supported(check_ns), proc.stderr


@pytest.mark.netns
@needs_nft
def test_flowtable_probe_matches_a_real_load(ns: str) -> None:
    _stand_ins(ns)
    _nft(ns, "add", "table", "inet", "other")
    before = _nft(ns, "list", "ruleset").stdout
    supported = nf.flowtable_supported.__wrapped__(ns)  # uncached: run the probe here
    assert _nft(ns, "list", "ruleset").stdout == before, "the probe left something behind"

    base = spec(mode="nat", allowed_destinations=ALLOW)
    nf.load(base, ns)
    with_ft = spec(mode="nat", allowed_destinations=ALLOW, flowtable=True)
    try:
        nf.load(with_ft, ns)
        loaded = True
    except nf.NftError as exc:
        loaded = False
        assert "flowtable" in str(exc)
    assert supported == loaded
    # Either way the table is exactly one of the two: a failed load changes nothing.
    assert nf.is_converged(with_ft if loaded else base, ns)


@pytest.mark.netns
@needs_nft
def test_lifecycle(ns: str) -> None:
    _nft(
        ns,
        "-f",
        "-",
        stdin="table inet other {\n\tchain c {\n\t\tip saddr 192.0.2.1 accept\n\t}\n}\n",
    )
    other = _nft(ns, "list", "table", "inet", "other").stdout
    want = spec(mode="nat", allowed_destinations=ALLOW)

    assert nf.current(ns) is None
    assert not nf.is_converged(want, ns)
    assert nf.counters(ns) == {}
    nf.remove(ns)  # absent: no error

    nf.load(want, ns)
    text = nf.current(ns)
    assert text is not None
    assert nf.canonical(text) == nf.canonical(nf.render(want))
    assert nf.is_converged(want, ns)
    assert nf.loaded_spec_hash(text) == nf.spec_hash(want)

    # Reload: same result, other table untouched, counters carried over when asked.
    nf.load(want, ns, counters={"vxlan_foreign_dropped": (4, 200)})
    assert nf.is_converged(want, ns)
    assert nf.counters(ns)["vxlan_foreign_dropped"] == (4, 200)
    assert set(nf.counters(ns)) == set(nf.COUNTERS)

    # Endpoints change without a reload: the counters stay.
    moved = spec(mode="nat", allowed_destinations=ALLOW, endpoints=frozenset({EP3}))
    assert nf.change_needed(moved, nf.current(ns)) == "endpoints"
    nf.update_endpoints(moved.endpoints, ns)
    assert nf.is_converged(moved, ns)
    assert nf.counters(ns)["vxlan_foreign_dropped"] == (4, 200)
    nf.update_endpoints([], ns)
    assert nf.is_converged(spec(mode="nat", allowed_destinations=ALLOW, endpoints=frozenset()), ns)
    nf.update_endpoints(want.endpoints, ns)
    assert nf.is_converged(want, ns)

    # Hand edits are seen.
    _nft(ns, "add", "element", "inet", "gatepeer", "vpg_endpoints", "{ 198.18.0.99 }")
    assert nf.change_needed(want, nf.current(ns)) == "endpoints"
    nf.update_endpoints(want.endpoints, ns)
    assert nf.is_converged(want, ns)
    _nft(ns, "flush", "chain", "inet", "gatepeer", "forward")
    assert nf.change_needed(want, nf.current(ns)) == "reload"
    assert any(
        "ct state established,related accept" in ln for ln in nf.describe(want, nf.current(ns))
    )
    _nft(ns, "add", "rule", "inet", "gatepeer", "input", "tcp", "dport", "22", "drop")
    assert not nf.is_converged(want, ns)
    nf.load(want, ns)
    assert nf.is_converged(want, ns)

    nf.remove(ns)
    assert nf.current(ns) is None
    nf.remove(ns)
    assert _nft(ns, "list", "table", "inet", "other").stdout == other
    assert _nft(ns, "list", "tables").stdout.split("\n")[:-1] == ["table inet other"]


@pytest.mark.netns
@needs_nft
def test_errors_carry_nft_stderr(ns: str) -> None:
    with pytest.raises(nf.NftError, match="updating set vpg_endpoints failed: .*No such file"):
        nf.update_endpoints([EP1], ns)
    # A missing namespace is an error, not "no table".
    with pytest.raises(nf.NftError, match="Cannot open network namespace"):
        nf.current(f"{ns}-missing")


@pytest.mark.netns
def test_conntrack_max_is_read_only_outside_the_initial_namespace(ns: str) -> None:
    code = (
        "from gatepeer.kernel import nftables as nf; "
        "print('\\n'.join(nf.unwritable(nf.conntrack_sysctls(50000, 8))))"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.splitlines()
    if not Path("/proc/sys/net/netfilter/nf_conntrack_max").exists():
        pytest.skip("needs conntrack (no /proc/sys/net/netfilter/nf_conntrack_max)")
    assert [ln.split(":")[0] for ln in out] == [
        "net/netfilter/nf_conntrack_buckets",
        "net/netfilter/nf_conntrack_max",
    ]
    assert all("read-only in this network namespace" in ln for ln in out)


# ---- real packets ------------------------------------------------------------------------------


def _send_udp(ns: str, src: str, dst: str, port: int) -> None:
    code = (
        "import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        "s.bind((sys.argv[1], 0)); s.sendto(b'gatepeer', (sys.argv[2], int(sys.argv[3])))"
    )
    _run("ip", "netns", "exec", ns, sys.executable, "-c", code, src, dst, str(port))


def _wait_for(ns: str, name: str, packets: int) -> tuple[int, int]:
    deadline = time.monotonic() + 3
    while True:
        got = nf.counters(ns)[name]
        if got[0] >= packets or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


@pytest.fixture
def pair() -> Iterator[tuple[str, str]]:
    """The gate peer's namespace and a neighbour's, joined as underlay (eth0) and tunnel
    (vxlan0, a veth stand-in: the checks key on the name, not on decapsulation)."""
    peer, other = _new_netns(), None
    try:
        other = _new_netns()
        for a, b in (("eth0", "up0"), ("vxlan0", "dev0")):
            _run(
                "ip",
                "-n",
                peer,
                "link",
                "add",
                a,
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                other,
            )
            _run("ip", "-n", peer, "link", "set", a, "up")
            _run("ip", "-n", other, "link", "set", b, "up")
        _run("ip", "-n", peer, "addr", "add", "198.18.0.1/24", "dev", "eth0")
        _run("ip", "-n", other, "addr", "add", "198.18.0.2/24", "dev", "up0")
        _run("ip", "-n", other, "addr", "add", f"{EP1}/32", "dev", "up0")
        _run("ip", "-n", peer, "addr", "add", "198.19.0.1/16", "dev", "vxlan0")
        _run("ip", "-n", other, "addr", "add", "198.19.0.2/16", "dev", "dev0")
        _run("ip", "-n", other, "addr", "add", "203.0.113.9/32", "dev", "dev0")
        # No ARP for the spoofed source: the gate peer would not answer one (no route back).
        link = _run("ip", "-n", peer, "-br", "link", "show", "vxlan0").stdout.split()
        _run("ip", "-n", other, "neigh", "replace", "198.19.0.1", "lladdr", link[2], "dev", "dev0")
        yield peer, other
    finally:
        for name in (peer, other):
            if name:
                _run("ip", "netns", "delete", name, check=False)


@pytest.mark.netns
@needs_nft
def test_packets_are_counted(pair: tuple[str, str]) -> None:
    peer, other = pair
    nf.load(spec(endpoints=frozenset({EP1})), peer)

    _send_udp(other, "198.18.0.2", "198.18.0.1", 4789)  # not a VPG endpoint
    assert _wait_for(peer, "vxlan_foreign_dropped", 1) == (1, 36)  # 20 IP + 8 UDP + 8 payload
    _send_udp(other, str(EP1), "198.18.0.1", 4789)
    assert _wait_for(peer, "vxlan_accepted", 1) == (1, 36)
    assert nf.counters(peer)["vxlan_foreign_dropped"] == (1, 36)

    _send_udp(other, "198.19.0.2", "198.19.0.1", 9)  # a device: not counted
    _send_udp(other, "203.0.113.9", "198.19.0.1", 9)  # outside the device subnet
    assert _wait_for(peer, "spoofed_source_dropped", 1) == (1, 36)
