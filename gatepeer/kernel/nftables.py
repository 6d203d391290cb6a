"""The packet path's nftables layer: one table, `inet gatepeer`, rendered from a spec and loaded
atomically with `nft -f -`. Nothing here touches another table.

Shape of the table (see `render`):

- `input` (hook input, policy accept: SSH and everything else must keep working): VXLAN (UDP to
  the tunnel port) is accepted only from the VPG endpoints in the named set `vpg_endpoints`; any
  other source is counted (`vxlan_foreign_dropped`) and dropped.
- `prerouting` (priority raw, before conntrack): packets in from the tunnel whose inner source
  is outside the device subnet, and any IPv6 from the tunnel (SORACOM Gate is IPv4 only), are
  counted (`spoofed_source_dropped`) and dropped. Doing it here rather than in `forward` covers
  traffic to this host too, and a spoofing device cannot fill the conntrack table.
- `forward` (policy accept: this host may route other traffic we know nothing about, and a drop
  policy in our table would drop it whatever other tables say): PMTU signals (ICMP
  frag-needed, ICMPv6 packet-too-big) always pass; TCP SYN and SYN-ACK to and from the tunnel get
  their MSS clamped to the route MTU; established flows are offloaded to the flowtable when it is
  on; established/related traffic is accepted; then, with an allow-list, anything else from the
  tunnel to a destination outside it is counted (`allowlist_dropped`) and dropped. The
  allow-list therefore limits what devices may *start*; replies to flows started from the
  underlay (route mode) still pass.
- `postrouting` (nat mode only): traffic from the device subnet leaving by the underlay is
  masqueraded; conntrack maps the replies back, and they leave through the tunnel by the normal
  route. The rule's counter (`masqueraded_flows`) counts new flows (a nat chain sees only the
  first packet of each).

Every named counter is declared in every mode so the metrics keep one schema.

Convergence (see `change_needed`): `nft list table` prints a canonical text. Both it and our
rendered text are normalised the same way (whitespace, wrapped element lists, the order of set
elements, flowtable devices and top-level blocks, counter values dropped) and compared. Equal
means converged; equal apart from the `vpg_endpoints` elements means only the set needs updating
(no reload, counters kept); anything else, including a hand edit, means reload. The table comment
carries a hash of the spec without its endpoints, so `nft list` shows which spec is loaded, and
an endpoint update does not make it stale.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Literal

FAMILY = "inet"
TABLE = "gatepeer"
ENDPOINT_SET = "vpg_endpoints"
ALLOW_SET = "allowed_destinations"
FLOWTABLE = "ft"

# Every named counter, in render order. Metrics can rely on all of them existing.
COUNTERS = (
    "vxlan_accepted",
    "vxlan_foreign_dropped",
    "spoofed_source_dropped",
    "allowlist_dropped",
    "masqueraded_flows",
)

Mode = Literal["route", "nat"]
# What it takes to bring the kernel's table to the spec.
Change = Literal["none", "endpoints", "reload"]

_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")  # IFNAMSIZ - 1; nothing nft would need quoted
_TIMEOUT = 30.0


class NftError(RuntimeError):
    """`nft` failed; the message carries nft's own stderr."""

    def __init__(self, what: str, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip() or f"exit status {returncode}"
        super().__init__(f"{what}: {detail}")


@dataclass(frozen=True)
class PacketPathSpec:
    """Everything the table is rendered from. Endpoints change without a reload."""

    device_subnet: IPv4Network
    endpoints: frozenset[IPv4Address] = frozenset()
    mode: Mode = "route"
    tunnel: str = "vxlan0"
    underlay: str = "eth0"
    vxlan_port: int = 4789
    # Destinations devices may start flows to; empty allows every destination.
    allowed_destinations: tuple[IPv4Network, ...] = ()
    flowtable: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.device_subnet, IPv4Network):
            raise TypeError(f"device_subnet: want IPv4Network, got {self.device_subnet!r}")
        if not isinstance(self.endpoints, frozenset) or not all(
            isinstance(a, IPv4Address) for a in self.endpoints
        ):
            raise TypeError(f"endpoints: want frozenset of IPv4Address, got {self.endpoints!r}")
        if self.mode not in ("route", "nat"):
            raise ValueError(f"mode: want 'route' or 'nat', got {self.mode!r}")
        for what, name in (("tunnel", self.tunnel), ("underlay", self.underlay)):
            if not isinstance(name, str) or not _IFNAME.fullmatch(name):
                raise ValueError(f"{what}: {name!r} is not a valid interface name")
        if self.tunnel == self.underlay:
            raise ValueError(f"tunnel and underlay are both {self.tunnel!r}")
        if not isinstance(self.vxlan_port, int) or not 0 < self.vxlan_port < 65536:
            raise ValueError(f"vxlan_port: {self.vxlan_port!r} is not a UDP port")
        if not isinstance(self.allowed_destinations, tuple) or not all(
            isinstance(n, IPv4Network) for n in self.allowed_destinations
        ):
            raise TypeError(
                "allowed_destinations: want tuple of IPv4Network, "
                f"got {self.allowed_destinations!r}"
            )

    @property
    def allow_list(self) -> tuple[IPv4Network, ...]:
        """The allow-list as it is loaded: collapsed (overlapping prefixes are an error in an
        nft interval set) and sorted."""
        return tuple(sorted(ipaddress.collapse_addresses(self.allowed_destinations)))


# ---- rendering (pure) ------------------------------------------------------------------------


def _elements(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _prefix(net: IPv4Network) -> str:
    # nft lists a /32 element as a bare address.
    return str(net.network_address) if net.prefixlen == 32 else str(net)


def spec_hash(spec: PacketPathSpec) -> str:
    """A short hash of everything in the spec but its endpoints (those change without reload)."""
    body = _render(replace(spec, endpoints=frozenset()), comment="", counters=None)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def _comment(spec: PacketPathSpec) -> str:
    return f"managed by gatepeer, spec {spec_hash(spec)}; hand edits are reverted"


def render(spec: PacketPathSpec, counters: Mapping[str, tuple[int, int]] | None = None) -> str:
    """The table definition, deterministic, in the form `nft list table` prints it back.

    `counters` (name -> (packets, bytes)) seeds the named counters, so a reload can carry them
    over instead of resetting them to zero.
    """
    return _render(spec, comment=_comment(spec), counters=counters)


def _render(
    spec: PacketPathSpec, comment: str, counters: Mapping[str, tuple[int, int]] | None
) -> str:
    t, u = f'"{spec.tunnel}"', f'"{spec.underlay}"'
    out = [f"table {FAMILY} {TABLE} {{"]
    if comment:
        out.append(f'\tcomment "{comment}"')
    for name in COUNTERS:
        packets, nbytes = (counters or {}).get(name, (0, 0))
        out += [f"\tcounter {name} {{", f"\t\tpackets {packets} bytes {nbytes}", "\t}", ""]

    out += [f"\tset {ENDPOINT_SET} {{", "\t\ttype ipv4_addr"]
    if spec.endpoints:
        out.append(f"\t\telements = {_elements(str(a) for a in sorted(spec.endpoints))}")
    out += ["\t}", ""]
    if spec.allow_list:
        out += [f"\tset {ALLOW_SET} {{", "\t\ttype ipv4_addr", "\t\tflags interval"]
        out.append(f"\t\telements = {_elements(_prefix(n) for n in spec.allow_list)}")
        out += ["\t}", ""]
    if spec.flowtable:
        devices = _elements(sorted((spec.tunnel, spec.underlay)))
        out += [
            f"\tflowtable {FLOWTABLE} {{",
            # Priority 0 on ingress; nft lists it by its name.
            "\t\thook ingress priority filter",
            f"\t\tdevices = {devices}",
            "\t}",
            "",
        ]

    out += [
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\tudp dport {spec.vxlan_port} ip saddr @{ENDPOINT_SET}"
        ' counter name "vxlan_accepted" accept',
        f'\t\tudp dport {spec.vxlan_port} counter name "vxlan_foreign_dropped" drop',
        "\t}",
        "",
        # Every packet crosses this hook: one interface test, the checks only for the tunnel's.
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        f"\t\tiifname {t} jump from_tunnel",
    ]
    # Connection tracking costs every forwarded packet a lookup (about 9 % of small-packet
    # throughput here): route mode engages it only when a rule needs a connection's state
    # (the allow-list, the flowtable); nat mode needs it anyway. Where it is on, the outer
    # VXLAN packets are left untracked: tracking them would double the cost for nothing.
    tracked = bool(spec.allow_list) or spec.flowtable or spec.mode == "nat"
    outer = f"udp dport {spec.vxlan_port} notrack"
    if tracked:
        out.append(f"\t\tiifname {u} {outer}")
    out += [
        "\t}",
        "",
        "\tchain from_tunnel {",
        f'\t\tip saddr != {spec.device_subnet} counter name "spoofed_source_dropped" drop',
        '\t\tmeta nfproto ipv6 counter name "spoofed_source_dropped" drop',
        "\t}",
        "",
    ]
    if tracked:
        out += [
            "\tchain output {",
            "\t\ttype filter hook output priority raw; policy accept;",
            f"\t\toifname {u} {outer}",
            "\t}",
            "",
        ]
    out += [
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
    ]
    if spec.allow_list:
        # The allow-list must never eat path MTU discovery.
        out += [
            "\t\ticmp type destination-unreachable icmp code frag-needed accept",
            "\t\ticmpv6 type packet-too-big accept",
        ]
    out += [
        # Before the established accept: a SYN-ACK is already "established" to conntrack.
        f"\t\tiifname {t} tcp flags syn tcp option maxseg size set rt mtu",
        f"\t\toifname {t} tcp flags syn tcp option maxseg size set rt mtu",
    ]
    if spec.flowtable:
        # Only flows that already passed every check below get the fast path.
        for a, b in ((t, u), (u, t)):
            out.append(
                f"\t\tiifname {a} oifname {b} meta l4proto {{ tcp, udp }}"
                f" ct state established flow add @{FLOWTABLE}"
            )
    if tracked:
        out.append("\t\tct state established,related accept")
    if spec.allow_list:
        out.append(
            f'\t\tiifname {t} ip daddr != @{ALLOW_SET} counter name "allowlist_dropped" drop'
        )
    out += ["\t}"]
    if spec.mode == "nat":
        out += [
            "",
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f"\t\toifname {u} ip saddr {spec.device_subnet}"
            ' counter name "masqueraded_flows" masquerade',
            "\t}",
        ]
    out.append("}")
    return "\n".join(out) + "\n"


def transaction(spec: PacketPathSpec, counters: Mapping[str, tuple[int, int]] | None = None) -> str:
    """What `load` feeds to `nft -f -`: one atomic transaction that replaces our table.

    nft 1.0.6 has no `destroy`: `add` makes sure the table exists (first load) so `delete`
    cannot fail, then the definition recreates it. Packets see the old table or the new one.
    """
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + render(spec, counters)


def endpoints_transaction(endpoints: Iterable[IPv4Address]) -> str:
    """Replace the set's elements in one transaction: packets never see it empty or half done."""
    text = f"flush set {FAMILY} {TABLE} {ENDPOINT_SET}\n"
    addrs = sorted(endpoints)
    if addrs:
        text += f"add element {FAMILY} {TABLE} {ENDPOINT_SET} {_elements(map(str, addrs))}\n"
    return text


REMOVE_TRANSACTION = f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n"


# ---- reading the kernel's listing (pure) ----------------------------------------------------

_COUNTER_VALUES = re.compile(r"^packets \d+ bytes \d+$")
_LIST_LINE = re.compile(r"^(elements|devices) = \{ (.*) \}$")


def _sort_key(item: str) -> tuple[int, int, str]:
    # Numeric address order; anything else (names, ranges) after, as text.
    try:
        net = ipaddress.ip_network(item, strict=False)
    except ValueError:
        return (9, 0, item)
    return (net.version, int(net.network_address), f"{net.prefixlen:03}")


def canonical(text: str) -> list[str]:
    """`text` (ours or `nft list table`'s) in a form where equal means the same table.

    Drops what differs without meaning: indentation, blank lines, line wrapping of element
    lists, the order of set elements, flowtable devices (and their quotes, which newer nft
    prints) and of top-level blocks, and counter values (state, not configuration).
    """
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if pending:
            line = f"{pending} {line}"
            pending = ""
        if line.endswith(","):  # nft wraps long element lists after a comma
            pending = line
            continue
        if not line or _COUNTER_VALUES.match(line):
            continue
        m = _LIST_LINE.match(line)
        if m:
            items = [i.strip().strip('"') for i in m.group(2).split(",") if i.strip()]
            line = f"{m.group(1)} = {_elements(sorted(items, key=_sort_key))}"
        lines.append(line)
    if pending:
        lines.append(pending)
    return _sort_blocks(lines)


def _sort_blocks(lines: list[str]) -> list[str]:
    """Sort each table's top-level blocks (counters, sets, chains: their order has no meaning)
    and indent by depth; the order of rules inside a chain is kept."""
    out: list[str] = []
    depth = 0
    head: list[str] = []
    blocks: list[list[str]] = []
    for line in lines:
        closes = line.startswith("}")
        if closes:
            depth -= 1
        if depth == 0:
            out.append(line)
        elif depth == 1 and not line.endswith("{") and not closes:
            head.append("\t" + line)  # table-level statement such as the comment
        else:
            if depth == 1 and line.endswith("{"):
                blocks.append([])
            if blocks:
                blocks[-1].append("\t" * depth + line)
        if line.endswith("{"):
            depth += 1
        if closes and depth == 0:
            tail = out.pop()
            out += head + [ln for block in sorted(blocks, key=_block_key) for ln in block] + [tail]
            head, blocks = [], []
    return out


_KINDS = ("counter", "set", "map", "flowtable", "chain")


def _block_key(block: list[str]) -> tuple[int, str]:
    """Declarations before use, as nft lists them, then by name."""
    kind = block[0].split()[0]
    return (_KINDS.index(kind) if kind in _KINDS else len(_KINDS), block[0])


def _without_endpoints(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_set = False
    for line in lines:
        stripped = line.strip()
        if stripped == f"set {ENDPOINT_SET} {{":
            in_set = True
        elif in_set and stripped == "}":
            in_set = False
        elif in_set and stripped.startswith("elements = "):
            continue
        out.append(line)
    return out


def change_needed(spec: PacketPathSpec, current_text: str | None) -> Change:
    """What it takes to converge: nothing, an endpoint-set update, or a reload (pure)."""
    if current_text is None:
        return "reload"
    have, want = canonical(current_text), canonical(render(spec))
    if have == want:
        return "none"
    if _without_endpoints(have) == _without_endpoints(want):
        return "endpoints"
    return "reload"


def loaded_endpoints(current_text: str) -> frozenset[IPv4Address]:
    """The `vpg_endpoints` elements in a listing."""
    in_set = False
    for line in canonical(current_text):
        stripped = line.strip()
        if stripped == f"set {ENDPOINT_SET} {{":
            in_set = True
        elif in_set and stripped == "}":
            break
        elif in_set:
            m = _LIST_LINE.match(stripped)
            if m:
                return frozenset(IPv4Address(i) for i in m.group(2).split(", "))
    return frozenset()


def loaded_spec_hash(current_text: str) -> str | None:
    """The spec hash in the table comment, or None when there is none (not made by us)."""
    m = re.search(r'comment "managed by gatepeer, spec ([0-9a-f]{16})', current_text)
    return m.group(1) if m else None


def counters_from_listing(current_text: str) -> dict[str, tuple[int, int]]:
    """Named counters from `nft list table` text, name -> (packets, bytes)."""
    found = re.findall(r"counter (\w+) \{\s*packets (\d+) bytes (\d+)", current_text)
    return {name: (int(p), int(b)) for name, p, b in found}


def counters_from_json(text: str) -> dict[str, tuple[int, int]]:
    """Named counters of our table from `nft -j list ...` output, name -> (packets, bytes)."""
    result: dict[str, tuple[int, int]] = {}
    for item in json.loads(text).get("nftables", []):
        c = item.get("counter")
        if c and c.get("family") == FAMILY and c.get("table") == TABLE:
            result[str(c["name"])] = (int(c["packets"]), int(c["bytes"]))
    return result


def describe(spec: PacketPathSpec, current_text: str | None) -> list[str]:
    """What loading `spec` would change, as lines for `gatepeer apply --dry-run`; [] if nothing."""
    change = change_needed(spec, current_text)
    if change == "none":
        return []
    if change == "endpoints":
        assert current_text is not None
        have = loaded_endpoints(current_text)
        added = " ".join(f"+{a}" for a in sorted(spec.endpoints - have))
        gone = " ".join(f"-{a}" for a in sorted(have - spec.endpoints))
        changes = " ".join(x for x in (added, gone) if x)
        return [
            f"# set {ENDPOINT_SET}: {changes}",
            *_heredoc(endpoints_transaction(spec.endpoints)),
        ]
    header: list[str]
    if current_text is None:
        header = [f"# create table {FAMILY} {TABLE}"]
    else:
        diff = difflib.unified_diff(
            canonical(current_text),
            canonical(render(spec)),
            fromfile="kernel",
            tofile="wanted",
            lineterm="",
        )
        header = [f"# replace table {FAMILY} {TABLE}: the kernel's differs from the wanted one"]
        header += [f"#   {line}".rstrip() for line in diff]
    return header + _heredoc(transaction(spec))


def _heredoc(text: str) -> list[str]:
    return ["nft -f - <<'EOF'", *text.splitlines(), "EOF"]


# ---- the kernel ---------------------------------------------------------------------------


def nft_available() -> bool:
    return shutil.which("nft") is not None


def _run(
    args: Sequence[str], netns: str | None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    # In a named namespace through iproute2, as `ip netns exec` sets up /sys and /etc too.
    argv = (["ip", "netns", "exec", netns] if netns else []) + ["nft", *args]
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, check=False, timeout=_TIMEOUT
        )
    except FileNotFoundError as exc:
        raise NftError(" ".join(argv), argv, 127, f"{exc.filename}: not installed") from exc
    except subprocess.TimeoutExpired:
        raise NftError(" ".join(argv), argv, -1, f"no answer within {_TIMEOUT:g}s") from None
    except OSError as exc:
        raise NftError(" ".join(argv), argv, -1, exc.strerror or str(exc)) from None


def _absent(proc: subprocess.CompletedProcess[str]) -> bool:
    # nft's own ENOENT, not `ip netns exec` failing to find a namespace or nft.
    return proc.returncode != 0 and "Error: No such file or directory" in proc.stderr


def _apply(text: str, what: str, netns: str | None) -> None:
    proc = _run(["-f", "-"], netns, stdin=text)
    if proc.returncode != 0:
        raise NftError(what, proc.args, proc.returncode, proc.stderr)


def load(
    spec: PacketPathSpec,
    netns: str | None = None,
    counters: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """Replace our table with `spec`'s in one transaction (also the very first load).

    On failure nothing changed: the old table, if any, is still loaded. Pass
    `counters_from_listing(current_text)` as `counters` to carry the counters over.
    """
    what = f"loading table {FAMILY} {TABLE} failed"
    if spec.flowtable:
        what += " (it has a flowtable: does this kernel have one? see flowtable_supported())"
    _apply(transaction(spec, counters), what, netns)


def remove(netns: str | None = None) -> None:
    """Delete our table, if it is there; nothing else."""
    _apply(REMOVE_TRANSACTION, f"removing table {FAMILY} {TABLE} failed", netns)


def current(netns: str | None = None) -> str | None:
    """Our table as the kernel has it (`nft list table`), or None when there is none."""
    proc = _run(["list", "table", FAMILY, TABLE], netns)
    if _absent(proc):
        return None
    if proc.returncode != 0:
        raise NftError(
            f"listing table {FAMILY} {TABLE} failed", proc.args, proc.returncode, proc.stderr
        )
    return proc.stdout


def is_converged(spec: PacketPathSpec, netns: str | None = None) -> bool:
    """Whether the loaded table is exactly `spec`'s, read without reloading anything."""
    return change_needed(spec, current(netns)) == "none"


def update_endpoints(endpoints: Iterable[IPv4Address], netns: str | None = None) -> None:
    """Set `vpg_endpoints` to exactly `endpoints`, atomically, without reloading the table."""
    _apply(endpoints_transaction(endpoints), f"updating set {ENDPOINT_SET} failed", netns)


def counters(netns: str | None = None) -> dict[str, tuple[int, int]]:
    """Our named counters, name -> (packets, bytes); empty when the table is absent."""
    proc = _run(["-j", "list", "counters", "table", FAMILY, TABLE], netns)
    if _absent(proc):
        return {}
    if proc.returncode != 0:
        raise NftError("listing counters failed", proc.args, proc.returncode, proc.stderr)
    return counters_from_json(proc.stdout)


@functools.cache
def flowtable_supported(netns: str | None = None) -> bool:
    """Whether this kernel takes a flowtable, asked once with a throwaway table in check mode.

    `nft -c` sends the transaction and has the kernel abort it, so the kernel validates the
    flowtable (this is where a kernel without CONFIG_NF_FLOW_TABLE refuses it) while nothing is
    ever created: safe during a dry run. It uses `lo`, the one device every namespace has.
    """
    probe = f"{TABLE}_ftprobe_{os.getpid()}"
    flowtable = (
        f"\tflowtable {FLOWTABLE} {{\n"
        "\t\thook ingress priority filter\n\t\tdevices = { lo }\n\t}\n"
    )
    with_flowtable = f"table {FAMILY} {probe} {{\n{flowtable}}}\n"
    if _run(["-c", "-f", "-"], netns, stdin=with_flowtable).returncode == 0:
        return True
    # Same table without the flowtable: if that fails too, nft itself is the problem
    # (no permission, say), and that is an error rather than a missing feature.
    proc = _run(["-c", "-f", "-"], netns, stdin=f"table {FAMILY} {probe} {{\n}}\n")
    if proc.returncode != 0:
        raise NftError("probing nftables failed", proc.args, proc.returncode, proc.stderr)
    return False


# ---- conntrack sizing (pure, plus a writability check) -------------------------------------

PROC_SYS = Path("/proc/sys")
CONNTRACK_HEADROOM = 1.25  # flows lingering in TIME_WAIT/CLOSE and the host's own flows
CONNTRACK_FLOOR = 65_536


def conntrack_sysctls(devices: int, flows_per_device: int) -> list[tuple[str, int]]:
    """conntrack sized for `devices` devices with `flows_per_device` concurrent flows each.

    Arithmetic: entries = devices x flows x 1.25, at least 65,536, rounded up to a power of two
    (50,000 x 8 -> 500,000 -> 524,288). Buckets = entries: one entry per bucket at a full table,
    which is also this kernel's own default ratio; a bucket is 8 bytes (4 MiB here) and an
    entry about 256 bytes (128 MiB at a full table, used only as flows exist).

    Timeouts, shorter than the kernel's where its defaults waste the table:
    - TCP established 7,440 s (RFC 5382's minimum for a NAT, 2 h 4 min) instead of 5 days:
      devices that vanish mid-flow would otherwise hold their entries for days.
    - TCP TIME_WAIT 60 s (Linux TCP's own) instead of 120 s: devices making short HTTPS
      requests leave one entry each for that long.
    - UDP 30 s unreplied (the default) and 120 s for a stream (RFC 4787's minimum; older kernels
      default to 180 s), written explicitly so a distribution's tuning does not leak in.

    max and buckets are global and writable only from the initial network namespace (read-only
    in any other: see `unwritable`); the timeouts are per namespace.
    """
    if devices < 1 or flows_per_device < 1:
        raise ValueError("devices and flows_per_device must be at least 1")
    wanted = max(int(devices * flows_per_device * CONNTRACK_HEADROOM), CONNTRACK_FLOOR)
    entries = 1 << (wanted - 1).bit_length()
    return [
        ("net/netfilter/nf_conntrack_buckets", entries),
        ("net/netfilter/nf_conntrack_max", entries),
        ("net/netfilter/nf_conntrack_tcp_timeout_established", 7440),
        ("net/netfilter/nf_conntrack_tcp_timeout_time_wait", 60),
        ("net/netfilter/nf_conntrack_udp_timeout", 30),
        ("net/netfilter/nf_conntrack_udp_timeout_stream", 120),
    ]


def unwritable(settings: Iterable[tuple[str, int]], root: Path = PROC_SYS) -> list[str]:
    """Why each setting cannot be written here (one line each); empty when all can.

    procfs enforces a sysctl's mode even for root, so access(2) answers truthfully; with the
    effective ids, since a non-root caller's capabilities (CAP_NET_ADMIN) count only there.
    """
    problems = []
    for path, _value in settings:
        full = root / path
        if not full.exists():
            problems.append(f"{path}: absent (no conntrack in this kernel?)")
        elif not os.access(full, os.W_OK, effective_ids=True):
            problems.append(
                f"{path}: read-only in this network namespace (global: set it from the "
                "initial namespace)"
            )
    return problems
