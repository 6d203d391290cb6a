"""The pure rendering of the packet path's nftables table, `inet gatepeer`, from a spec: what
to load, how to compare it with what the kernel lists, and how to describe the change. No I/O
here: `gatepeer.kernel.nftables` runs `nft`.

Shape of the table (see `render`). Every hook's base chain dispatches once (a verdict map on
the input interface, or one test) into chains per direction, so a packet of an established flow
crosses a handful of rules; rules put their cheap tests (protocol, port, address) before
interface names; no hook is registered that the mode does not use.

- `input` (hook input, policy accept: SSH and everything else must keep working for the rest
  of the network): the tunnel's VXLAN (UDP to the tunnel port carrying the tunnel's VNI) is
  accepted by the first rule only on the underlay, to the local address, from the VPG endpoints
  in the named set `vpg_endpoints`, and only when well formed (long enough for the VXLAN header
  and an inner Ethernet header, flags exactly the I flag). What else comes to the tunnel port
  goes to `vxlan_not_accepted`: a malformed one sent to the tunnel's address and port is counted
  (`vxlan_malformed_dropped`) and dropped; ours from any other source, address or interface is
  counted (`vxlan_foreign_dropped`) and dropped; VXLAN with another VNI (another VXLAN user on
  this host) is not ours: it is counted (`vxlan_other_vni`) and passes. Packets from the tunnel
  to this host, whatever address they are for, go to `to_host`: replies to the host's own
  traffic (probes), ICMP echo requests and the `host_services` ports pass; anything else is
  counted (`host_service_dropped`) and dropped. With conntrack on (nat mode, route mode
  masquerading what leaves the VPC, an allow-list or the flowtable) "replies" are judged by
  connection state; in plain route mode, which renders no `ct` at all, statelessly: ICMP
  replies and errors, TCP segments that open nothing.
- `prerouting` (priority -450: before the kernel reassembles IPv4 at -400 once conntrack is on,
  and before conntrack): one verdict map on the input interface, into `from_underlay` and
  `from_tunnel`. `from_underlay`: outer IPv4 fragments to the local address are counted
  (`outer_fragments`, one per fragment, never dropped: the input chain judges the reassembled
  datagram like any other). `from_tunnel`: packets whose inner source is outside the device
  subnet, and any IPv6 (SORACOM Gate is IPv4 only), are counted (`spoofed_source_dropped`) and
  dropped. Doing it here rather than in `forward` covers traffic to this host too, and a
  spoofing device cannot fill the conntrack table. With conntrack on, the outer VXLAN packets
  (and every outer UDP fragment) to the local address are exempted from tracking here
  (`underlay_to_local`, `outer_fragment`) and in `output` (priority raw) on their way out; in
  route mode masquerading what leaves the VPC (`outside_vpc = "masquerade"`), so is forwarded
  traffic between devices and the VPC (`vpc_networks`): it stays routed and stateless, and
  conntrack engages only for flows to destinations outside the VPC.
- `forward` (policy accept: this host may route other traffic we know nothing about, and a drop
  policy in our table would drop it whatever other tables say): TCP segments with SYN (SYN and
  SYN-ACK) go to `clamp_mss`, which clamps the MSS of those to and from the tunnel to the route
  MTU; established flows are offloaded to the flowtable when it is on; with an allow-list,
  established/related traffic is accepted and anything else from the tunnel goes to
  `new_from_tunnel`: PMTU signals (ICMP frag-needed) pass, anything to a destination outside the
  list is counted (`allowlist_dropped`) and dropped. The allow-list therefore limits what
  devices may *start*; replies to flows started from the underlay (route mode) still pass.
  In a closed network (`closed`) every packet from the tunnel to a destination neither in
  `allowed_destinations` nor in `vpc_networks` is counted (`closed_dropped`) and dropped,
  statelessly and before any established accept (a destination taken off the list is closed
  for open flows too); the stateful allow-list is then not rendered.
- `postrouting` (nat mode; route mode with `outside_vpc = "masquerade"`): traffic from the
  device subnet leaving by the underlay is masqueraded (in route mode only when it goes outside
  `vpc_networks`: the VPC sees devices' own addresses); conntrack maps the replies back, and
  they leave through the tunnel by the normal route. The rule's counter (`masqueraded_flows`)
  counts new flows (a nat chain sees only the first packet of each).

Every named counter is declared in every mode so the metrics keep one schema.

With `snat_address` (HA), what is masqueraded above is source-NATed to that address instead, the
one that moves with the master. With `sync_events` (HA, conntrackd's sync) and conntrack on,
`forward` first limits each new flow's conntrack events to new, assured and destroy: conntrackd
pays per event, and the peer's copy needs no other TCP state change (docs/ha.md: about a fifth
more new connections per second with the sync). With `track_flows`, route mode leaves device <->
VPC flows tracked (no `notrack`) so the flow log sees them. With `device_counters`, a second
table, `inet gatepeer_dev_<hash>` (`render_devices`), counts each device's packets and bytes in
two dynamic sets with a timeout every packet refreshes (`devices_from`, `devices_to`), in a
forward chain after ours (what this table drops is not counted). It is a table of its own so
that a reload of this one keeps the counts; `load` creates it in the same transaction when
missing, keeps it when present, and deletes any other, and its name (a hash of its definition)
is how convergence checks it without listing it. Note: nft 1.0.6 fetches every set element in
the namespace to list anything, so with 100,000 devices every `nft list` here costs seconds
(bench/README.md).

Convergence (see `change_needed`): `nft list table` prints a canonical text. Both it and our
rendered text are normalised the same way (whitespace, wrapped element lists, the order of set
and verdict map elements, flowtable devices and top-level blocks, counter values dropped) and
compared, with a last line naming the device table loaded, if any. Equal means converged;
equal apart from the `vpg_endpoints` and `allowed_destinations` elements means only those sets
need refilling (`sets_transaction`: one transaction, no reload, counters kept); anything else,
including a hand edit, means reload. The table comment carries a hash of the spec without
those sets' elements, so `nft list` shows which spec is loaded, and a set update does not make
it stale.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Literal

from gatepeer.device_traffic import DeviceTraffic

FAMILY = "inet"
TABLE = "gatepeer"
ENDPOINT_SET = "vpg_endpoints"
ALLOW_SET = "allowed_destinations"
VPC_SET = "vpc_networks"
FLOWTABLE = "ft"
# The conntrack events a synced flow raises (`sync_events`), in the order nft lists them.
SYNC_EVENTS = "new,destroy,assured"
# Per-device traffic (`device_counters`): dynamic sets whose elements carry a counter and a
# timeout that every packet refreshes, so an element's expiry tells its last packet's age. They
# live in a table of their own: nft 1.0.6 fetches every element of every set in a table to list
# anything of it (its chains, its counters), which with 100,000 devices takes seconds. The
# table's name carries a hash of its definition, so `nft list tables` (cheap) tells whether the
# right one is loaded.
DEVICE_TABLE_PREFIX = f"{TABLE}_dev_"
DEVICES_FROM_SET = "devices_from"
DEVICES_TO_SET = "devices_to"
DEVICE_SETS = (DEVICES_FROM_SET, DEVICES_TO_SET)
# Sized for 100,000 devices (the next power of two); a device silent this long is forgotten.
DEVICE_SET_SIZE = 131072
DEVICE_TIMEOUT_S = 3600

# Every named counter, in render order. Metrics can rely on all of them existing.
COUNTERS = (
    "vxlan_accepted",
    "vxlan_foreign_dropped",
    "spoofed_source_dropped",
    "allowlist_dropped",
    "masqueraded_flows",
    "host_service_dropped",
    "vxlan_malformed_dropped",
    "vxlan_other_vni",
    "outer_fragments",
    "closed_dropped",
)
# Counted, never dropped by this table: another VXLAN user's VNI, and outer fragments.
COUNTED_ONLY = ("vxlan_other_vni", "outer_fragments")
# Before the kernel reassembles IPv4 (-400, once conntrack is on) and before conntrack (-200).
PREROUTING_PRIORITY = -450

Mode = Literal["route", "nat"]
# Route mode: device traffic to destinations outside the VPC is masqueraded, or routed as is.
OutsideVpc = Literal["masquerade", "route"]
# A port devices may open on this host from the tunnel: ("tcp", 22).
HostService = tuple[Literal["tcp", "udp"], int]
# What it takes to bring the kernel's table to the spec.
# "sets": only the elements of `vpg_endpoints` and `allowed_destinations` differ.
Change = Literal["none", "sets", "reload"]

# UDP header (8) + VXLAN header (8) + inner Ethernet header (14): the least a VXLAN packet holds.
_VXLAN_MIN_UDP_LENGTH = 30
# The flags byte of a VXLAN header with a valid VNI and no extension: the I flag alone.
_VXLAN_FLAGS = 0x08

_IFNAME = re.compile(r"[A-Za-z0-9_.@-]{1,15}")  # IFNAMSIZ - 1; nothing nft would need quoted


@dataclass(frozen=True)
class PacketPathSpec:
    """Everything the table is rendered from. Endpoints change without a reload."""

    device_subnet: IPv4Network
    # The tunnel's own VXLAN: its VNI and the underlay address it is bound to.
    vni: int
    local_address: IPv4Address
    endpoints: frozenset[IPv4Address] = frozenset()
    mode: Mode = "route"
    tunnel: str = "vxlan0"
    underlay: str = "eth0"
    vxlan_port: int = 4789
    # Destinations devices may start flows to; empty allows every destination.
    allowed_destinations: tuple[IPv4Network, ...] = ()
    flowtable: bool = False
    # Ports devices may open on this host; everything else they start towards it is dropped.
    host_services: tuple[HostService, ...] = ()
    # Route mode: what happens to device traffic leaving the VPC, and what the VPC is.
    outside_vpc: OutsideVpc = "route"
    vpc_networks: tuple[IPv4Network, ...] = ()
    # What is masqueraded (nat mode; route mode's outside-VPC traffic) is source-NATed to this
    # address instead: the VPC sees one address whichever HA peer is master.
    snat_address: IPv4Address | None = None
    # Per-device packets and bytes, both directions, counted in the kernel.
    device_counters: bool = False
    # Device traffic to destinations outside the allow-list and the VPC is counted and dropped.
    closed: bool = False
    # Route mode: device <-> VPC flows stay tracked by conntrack (for the flow log).
    track_flows: bool = False
    # conntrackd syncs the flows to the HA peer: new flows report only their start, becoming
    # assured and their end to conntrack's listeners, not every TCP state change.
    sync_events: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.device_subnet, IPv4Network):
            raise TypeError(f"device_subnet: want IPv4Network, got {self.device_subnet!r}")
        if not isinstance(self.vni, int) or not 0 <= self.vni < 1 << 24:
            raise ValueError(f"vni: {self.vni!r} is not a VXLAN network identifier")
        if not isinstance(self.local_address, IPv4Address):
            raise TypeError(f"local_address: want IPv4Address, got {self.local_address!r}")
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
        if not isinstance(self.host_services, tuple) or not all(
            isinstance(h, tuple)
            and len(h) == 2
            and h[0] in ("tcp", "udp")
            and isinstance(h[1], int)
            and 0 < h[1] < 65536
            for h in self.host_services
        ):
            raise ValueError(
                f"host_services: want a tuple of (tcp|udp, port), got {self.host_services!r}"
            )
        if self.outside_vpc not in ("masquerade", "route"):
            raise ValueError(f"outside_vpc: want 'masquerade' or 'route', got {self.outside_vpc!r}")
        if not isinstance(self.vpc_networks, tuple) or not all(
            isinstance(n, IPv4Network) for n in self.vpc_networks
        ):
            raise TypeError(f"vpc_networks: want tuple of IPv4Network, got {self.vpc_networks!r}")
        if self.masquerades_outside_vpc and not self.vpc_networks:
            # Without it every device flow would be masqueraded, VPC hosts included.
            raise ValueError("vpc_networks: route mode masquerading outside the VPC needs them")
        if self.snat_address is not None and not isinstance(self.snat_address, IPv4Address):
            raise TypeError(f"snat_address: want IPv4Address or None, got {self.snat_address!r}")
        for flag in ("device_counters", "closed", "track_flows"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag}: want a bool, got {getattr(self, flag)!r}")
        if self.closed and not self.vpc_networks:
            # Without it every device flow outside the allow-list would be dropped, VPC included.
            raise ValueError("vpc_networks: a closed network needs them")

    @property
    def allow_list(self) -> tuple[IPv4Network, ...]:
        """The allow-list as it is loaded: collapsed (overlapping prefixes are an error in an
        nft interval set) and sorted."""
        return tuple(sorted(ipaddress.collapse_addresses(self.allowed_destinations)))

    @property
    def vpc_list(self) -> tuple[IPv4Network, ...]:
        """The VPC's networks as they are loaded: collapsed and sorted."""
        return tuple(sorted(ipaddress.collapse_addresses(self.vpc_networks)))

    @property
    def has_allow_set(self) -> bool:
        """The `allowed_destinations` set exists: with an allow-list, and in a closed network
        (where an empty one means "the VPC only")."""
        return bool(self.allow_list) or self.closed

    @property
    def has_vpc_set(self) -> bool:
        return self.masquerades_outside_vpc or self.closed

    @property
    def masquerades_outside_vpc(self) -> bool:
        return self.mode == "route" and self.outside_vpc == "masquerade"

    @property
    def stateless_vpc(self) -> bool:
        """Route mode masquerading what leaves the VPC: forwarded device <-> VPC traffic is
        exempted from conntrack, so only flows leaving the VPC pay for it. Not with an
        allow-list or the flowtable: those judge or offload every flow by its state."""
        return (
            self.masquerades_outside_vpc
            and not self.allow_list
            and not self.flowtable
            and not self.track_flows
        )

    @property
    def tracked(self) -> bool:
        """Connection tracking runs only where a rule needs a connection's state: nat mode,
        route mode masquerading what leaves the VPC, the allow-list, the flowtable. Any `ct`
        expression engages it for the whole network namespace, and then every packet pays for
        it (about 9 % of small-packet throughput here) unless a `notrack` rule exempts it; so
        route mode with `outside_vpc = "route"` renders no `ct` at all, route mode with
        "masquerade" exempts device <-> VPC traffic, and conntrack is sized only when
        tracked."""
        return (
            bool(self.allow_list)
            or self.flowtable
            or self.mode == "nat"
            or self.masquerades_outside_vpc
            or self.track_flows
        )


# ---- rendering (pure) ------------------------------------------------------------------------


def _elements(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def _ports(ports: Sequence[int]) -> str:
    # nft lists a one-element anonymous set as the bare value.
    return str(ports[0]) if len(ports) == 1 else _elements(map(str, ports))


def _prefix(net: IPv4Network) -> str:
    # nft lists a /32 element as a bare address.
    return str(net.network_address) if net.prefixlen == 32 else str(net)


def _duration(seconds: int) -> str:
    """A duration as nft lists it: 1h, 30m, 1h30m, 45s."""
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    text = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{sec}s" if sec else "")
    return text or "0s"


def spec_hash(spec: PacketPathSpec) -> str:
    """A short hash of everything in the spec but the elements of the sets that change without
    a reload (endpoints, allowed destinations)."""
    body = _render(spec, comment="", counters=None, set_elements=False)
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
    spec: PacketPathSpec,
    comment: str,
    counters: Mapping[str, tuple[int, int]] | None,
    set_elements: bool = True,
) -> str:
    t, u = f'"{spec.tunnel}"', f'"{spec.underlay}"'
    out = [f"table {FAMILY} {TABLE} {{"]
    if comment:
        out.append(f'\tcomment "{comment}"')
    for name in COUNTERS:
        packets, nbytes = (counters or {}).get(name, (0, 0))
        out += [f"\tcounter {name} {{", f"\t\tpackets {packets} bytes {nbytes}", "\t}", ""]

    out += [f"\tset {ENDPOINT_SET} {{", "\t\ttype ipv4_addr"]
    if spec.endpoints and set_elements:
        out.append(f"\t\telements = {_elements(str(a) for a in sorted(spec.endpoints))}")
    out += ["\t}", ""]
    if spec.has_allow_set:
        out += [f"\tset {ALLOW_SET} {{", "\t\ttype ipv4_addr", "\t\tflags interval"]
        if spec.allow_list and set_elements:
            out.append(f"\t\telements = {_elements(_prefix(n) for n in spec.allow_list)}")
        out += ["\t}", ""]
    if spec.has_vpc_set:
        out += [f"\tset {VPC_SET} {{", "\t\ttype ipv4_addr", "\t\tflags interval"]
        out.append(f"\t\telements = {_elements(_prefix(n) for n in spec.vpc_list)}")
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

    # The tunnel's VXLAN: UDP to our port carrying our VNI (bits 96-119 of the transport
    # header: 8 bytes of UDP, then flags and reserved). The kernel hands such a packet to our
    # vxlan link whatever local address or interface it came in on, so that is what the
    # endpoint check covers; VXLAN with any other VNI belongs to another user (flannel,
    # Docker overlay) and passes untouched, even on our port.
    # Every rule puts its cheap tests (protocol, port, address) before interface names.
    port, vni, local = spec.vxlan_port, f"{spec.vni:#x}", spec.local_address
    ours = f"udp dport {port} @th,96,24 {vni}"
    tracked = spec.tracked
    # A well-formed VXLAN packet of ours holds the 8-byte header and at least an inner Ethernet
    # header (UDP length 8 + 8 + 14), and its flags are exactly the I flag: our link uses no
    # extension, and the kernel drops any other flags silently. Those checks sit in the accept
    # rule, so a good packet costs one rule; what fails them is counted as malformed when it
    # was sent to the tunnel's own address and port (the kernel would drop it anyway).
    accept_ours = (
        f"udp dport {port} ip daddr {local} iifname {u} udp length >= {_VXLAN_MIN_UDP_LENGTH}"
        f" @th,64,8 {_VXLAN_FLAGS:#x} @th,96,24 {vni} ip saddr @{ENDPOINT_SET}"
        ' counter name "vxlan_accepted" accept'
    )
    to_port = f"ip daddr {local} iifname {u}"
    out += [
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
        f"\t\t{accept_ours}",
        f"\t\tudp dport {port} jump vxlan_not_accepted",
        f"\t\tiifname {t} jump to_host",
        "\t}",
        "",
        # Only packets to our port that the accept rule refused come here.
        "\tchain vxlan_not_accepted {",
        # The length first: a shorter packet has no flags byte for the next rule to read.
        f"\t\t{to_port} udp length < {_VXLAN_MIN_UDP_LENGTH}"
        ' counter name "vxlan_malformed_dropped" drop',
        f'\t\t{to_port} @th,64,8 != {_VXLAN_FLAGS:#x} counter name "vxlan_malformed_dropped" drop',
        f'\t\t@th,96,24 {vni} counter name "vxlan_foreign_dropped" drop',
        # Another VNI belongs to another VXLAN user (Docker overlay, flannel): counted, and
        # left to the kernel, which hands it to that user's link or drops it when there is none.
        f'\t\t@th,96,24 != {vni} counter name "vxlan_other_vni"',
        "\t}",
        "",
        # Devices reach this host only as far as it lets them: whatever they address (the inner
        # address, the VPC address, anything bound to 0.0.0.0), they get answers to the host's
        # own traffic (probes), ping and the listed services; any other new connection is
        # counted and dropped.
        "\tchain to_host {",
    ]
    if tracked:
        out += [
            "\t\tct state established,related accept",
            "\t\ticmp type echo-request accept",
        ]
    else:
        # Without conntrack the same policy, statelessly: ICMP a host needs (ping, the replies
        # to its probes, errors for its own traffic), and TCP segments that do not open a
        # connection (those of the host's own connections; a stray one gets a reset). A device
        # can open nothing but the listed services; UDP to any other port is dropped, replies
        # included (this host sends no UDP of its own into the tunnel).
        # Written as nft 1.0.6 lists them back, so a loaded table compares equal.
        out.append(
            "\t\ticmp type { echo-reply, destination-unreachable, echo-request, time-exceeded,"
            " parameter-problem } accept"
        )
    for proto in ("tcp", "udp"):
        ports = sorted(p for pr, p in spec.host_services if pr == proto)
        if ports:
            out.append(f"\t\t{proto} dport {_ports(ports)} accept")
    if not tracked:
        out.append("\t\ttcp flags != syn / fin,syn,rst,ack accept")
    # nft lists a verdict map's elements sorted by key.
    dispatch = (f"{u} : jump from_underlay", f"{t} : jump from_tunnel")
    out += [
        '\t\tcounter name "host_service_dropped" drop',
        "\t}",
        "",
        # Every packet crosses this hook: one lookup of its interface, the checks only for the
        # tunnel's and the underlay's.
        "\tchain prerouting {",
        f"\t\ttype filter hook prerouting priority {PREROUTING_PRIORITY}; policy accept;",
        f"\t\tiifname vmap {_elements(sorted(dispatch))}",
        "\t}",
        "",
        "\tchain from_underlay {",
    ]
    # Outer IPv4 fragments on the underlay to the local address are counted before any
    # reassembly, one per fragment; a non-first fragment has no UDP header to tell its port,
    # hence every fragment to the local address. They are only counted: a path with a smaller
    # MTU may fragment the VPG's packets (RFC 7348 lets a VTEP drop them; Linux reassembles
    # them), and the input chain judges the whole datagram like any other. With conntrack on,
    # the kernel reassembles at prerouting priority -400, so this chain sits at -450.
    fragment = "ip frag-off & 16383 != 0"
    if not tracked:
        out.append(f'\t\tip daddr {local} {fragment} counter name "outer_fragments"')
    else:
        out.append(f"\t\tip daddr {local} jump underlay_to_local")
    if spec.stateless_vpc:
        # VPC -> device traffic is routed as in plain route mode: no conntrack entry, no lookup.
        out.append(f"\t\tip daddr {spec.device_subnet} ip saddr @{VPC_SET} notrack")
    out += ["\t}", ""]
    if tracked:
        out += [
            "\tchain underlay_to_local {",
            # The outer VXLAN packets are never tracked: that would double the cost for nothing.
            f"\t\t{ours} notrack",
            f"\t\t{fragment} jump outer_fragment",
            "\t}",
            "",
            "\tchain outer_fragment {",
            '\t\tcounter name "outer_fragments"',
            # A fragmented datagram's pieces after the first carry no UDP header to match:
            # every UDP fragment to the local address is exempted, or conntrack's defragmenter
            # would hold them waiting for a first piece that bypassed it. The host reassembles
            # the datagram on input, where `input` judges it whole.
            "\t\tip protocol udp notrack",
            "\t}",
            "",
        ]
    out += [
        # Doing this here rather than in `forward` covers traffic to this host too, and a
        # spoofing device cannot fill the conntrack table.
        "\tchain from_tunnel {",
        f'\t\tip saddr != {spec.device_subnet} counter name "spoofed_source_dropped" drop',
        '\t\tmeta nfproto ipv6 counter name "spoofed_source_dropped" drop',
    ]
    if spec.stateless_vpc:
        # Only this host's own address is left tracked, so replies to its own traffic still
        # pass `to_host` by their state.
        out.append(f"\t\tip daddr != {local} ip daddr @{VPC_SET} notrack")
    out += ["\t}", ""]
    if tracked:
        out += [
            "\tchain output {",
            "\t\ttype filter hook output priority raw; policy accept;",
            f"\t\t{ours} ip saddr {local} oifname {u} notrack",
            "\t}",
            "",
        ]
    out += [
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy accept;",
    ]
    if spec.sync_events and tracked:
        # conntrackd's cost is per event: a short TCP connection's state changes (SYN_RECV,
        # ESTABLISHED, CLOSE) are three of its five. The peer's copy needs the flow, its NAT
        # and its state once established; the flow log needs new and destroy.
        out.append(f"\t\tct state new ct event set {SYNC_EVENTS}")
    out += [
        # Before the established accept: a SYN-ACK is already "established" to conntrack.
        "\t\ttcp flags syn jump clamp_mss",
    ]
    if spec.closed:
        # Stateless, before any established accept: a destination taken out of the list is
        # closed for flows already open too.
        out.append(
            f"\t\tiifname {t} ip daddr != @{VPC_SET} ip daddr != @{ALLOW_SET}"
            ' counter name "closed_dropped" drop'
        )
    if spec.flowtable:
        # Only flows that already passed every check below get the fast path.
        for a, b in ((t, u), (u, t)):
            out.append(
                f"\t\tiifname {a} oifname {b} meta l4proto {{ tcp, udp }}"
                f" ct state established flow add @{FLOWTABLE}"
            )
    if spec.allow_list and not spec.closed:
        # Established traffic passes before the allow-list (without one, the policy accepts).
        # A closed network judges every packet above instead, and lets the VPC in too.
        out.append("\t\tct state established,related accept")
        out.append(f"\t\tiifname {t} jump new_from_tunnel")
    out += [
        "\t}",
        "",
        "\tchain clamp_mss {",
        f"\t\tiifname {t} tcp option maxseg size set rt mtu",
        f"\t\toifname {t} tcp option maxseg size set rt mtu",
        "\t}",
    ]
    if spec.allow_list and not spec.closed:
        out += [
            "",
            "\tchain new_from_tunnel {",
            # The allow-list must never eat path MTU discovery.
            "\t\ticmp type destination-unreachable icmp code frag-needed accept",
            f'\t\tip daddr != @{ALLOW_SET} counter name "allowlist_dropped" drop',
            "\t}",
        ]
    if spec.mode == "nat" or spec.masquerades_outside_vpc:
        # Route mode: only what leaves the VPC (a NAT or internet gateway's path) takes this
        # peer's address; the VPC sees devices' own.
        outside = f" ip daddr != @{VPC_SET}" if spec.masquerades_outside_vpc else ""
        # With an address of its own (HA), the one that moves to the master, not this host's.
        nat = f"snat ip to {spec.snat_address}" if spec.snat_address else "masquerade"
        out += [
            "",
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f"\t\toifname {u} ip saddr {spec.device_subnet}{outside}"
            f' counter name "masqueraded_flows" {nat}',
            "\t}",
        ]
    out.append("}")
    return "\n".join(out) + "\n"


def _device_body(spec: PacketPathSpec) -> list[str]:
    t = f'"{spec.tunnel}"'
    out = []
    for name in DEVICE_SETS:
        # In the order nft 1.0.6 lists a set's properties.
        out += [
            f"\tset {name} {{",
            "\t\ttype ipv4_addr",
            f"\t\tsize {DEVICE_SET_SIZE}",
            "\t\tflags dynamic,timeout",
            "\t\tcounter",
            f"\t\ttimeout {_duration(DEVICE_TIMEOUT_S)}",
            "\t}",
            "",
        ]
    return out + [
        "\tchain forward {",
        # After gatepeer's own forward chain: what it drops (closed, allow-list) is not counted.
        "\t\ttype filter hook forward priority filter + 10; policy accept;",
        # Every packet a device sends through this peer, and every one routed to it (in nat
        # mode the replies, once conntrack has mapped them back to the device's address).
        f"\t\tiifname {t} update @{DEVICES_FROM_SET} {{ ip saddr }}",
        f"\t\toifname {t} update @{DEVICES_TO_SET} {{ ip daddr }}",
        "\t}",
    ]


def device_table(spec: PacketPathSpec) -> str:
    """The name of the device counters' table for `spec` (a hash of its definition in it)."""
    digest = hashlib.sha256("\n".join(_device_body(spec)).encode()).hexdigest()[:12]
    return f"{DEVICE_TABLE_PREFIX}{digest}"


def render_devices(spec: PacketPathSpec) -> str:
    """The device counters' table (`device_counters`)."""
    body = _device_body(spec)
    return "\n".join([f"table {FAMILY} {device_table(spec)} {{", *body, "}"]) + "\n"


def device_tables_line(names: Iterable[str]) -> str:
    """How a listing notes the device tables loaded (their contents are never listed)."""
    return f"device tables: {' '.join(sorted(names)) or '-'}\n"


def comparable(spec: PacketPathSpec) -> str:
    """What `current()` should read when the kernel holds `spec`: our table, then the line
    naming the device table."""
    return render(spec) + device_tables_line([device_table(spec)] if spec.device_counters else [])


def devices_transaction(spec: PacketPathSpec | None, loaded: Iterable[str]) -> str:
    """Bring the device tables to `spec` (None: none wanted): the wanted one created if it is
    not among `loaded` (kept if it is: its counts survive), every other one deleted."""
    want = device_table(spec) if spec is not None and spec.device_counters else None
    text = ""
    for name in sorted(set(loaded)):
        if name != want:
            text += f"delete table {FAMILY} {name}\n"
    if spec is not None and want is not None and want not in set(loaded):
        text += render_devices(spec)
    return text


def transaction(spec: PacketPathSpec, counters: Mapping[str, tuple[int, int]] | None = None) -> str:
    """What `load` feeds to `nft -f -`: one atomic transaction that replaces our table.

    nft 1.0.6 has no `destroy`: `add` makes sure the table exists (first load) so `delete`
    cannot fail, then the definition recreates it. Packets see the old table or the new one.
    """
    return f"add table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n" + render(spec, counters)


def endpoints_transaction(endpoints: Iterable[IPv4Address]) -> str:
    """Replace the set's elements in one transaction: packets never see it empty or half done."""
    return _refill(ENDPOINT_SET, [str(a) for a in sorted(endpoints)])


def _refill(name: str, elements: Sequence[str]) -> str:
    text = f"flush set {FAMILY} {TABLE} {name}\n"
    if elements:
        text += f"add element {FAMILY} {TABLE} {name} {_elements(elements)}\n"
    return text


def sets_transaction(spec: PacketPathSpec) -> str:
    """Refill `vpg_endpoints` and, where the table has it, `allowed_destinations`, in one
    transaction: a packet sees the old elements or the new, never an empty or half-filled set
    (the kernel commits the whole batch at once). Counters and everything else stay."""
    text = endpoints_transaction(spec.endpoints)
    if spec.has_allow_set:
        text += _refill(ALLOW_SET, [_prefix(n) for n in spec.allow_list])
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


# nft prints a protocol by name only where /etc/protocols (Debian's netbase) names it: a
# minimal image prints `ip protocol 17`. Without this, such a host would reload the table forever.
_PROTOCOL_NAMES = {"1": "icmp", "6": "tcp", "17": "udp", "58": "ipv6-icmp"}
_PROTOCOL_NUMBER = re.compile(r"\b(ip protocol|meta l4proto) (1|6|17|58)\b")


# An inline verdict map; nft lists its elements in the kernel's key order (for interface names
# not the text's: "zeth0" before "vxlan0"), so their order carries no meaning.
_VMAP = re.compile(r"vmap \{ ([^{}]*) \}")


def canonical(text: str) -> list[str]:
    """`text` (ours or `nft list table`'s) in a form where equal means the same table.

    Drops what differs without meaning: indentation, blank lines, line wrapping of element
    lists, the order of set and verdict map elements, flowtable devices (and their quotes,
    which newer nft prints) and of top-level blocks, and counter values (state, not
    configuration).
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
        line = _VMAP.sub(lambda v: f"vmap {_elements(sorted(v.group(1).split(', ')))}", line)
        line = _PROTOCOL_NUMBER.sub(lambda p: f"{p.group(1)} {_PROTOCOL_NAMES[p.group(2)]}", line)
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


# The sets whose elements change without a reload.
UPDATABLE_SETS = (ENDPOINT_SET, ALLOW_SET)


def _without_set_elements(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_set = False
    for line in lines:
        stripped = line.strip()
        if stripped in (f"set {name} {{" for name in UPDATABLE_SETS):
            in_set = True
        elif in_set and stripped == "}":
            in_set = False
        elif in_set and stripped.startswith("elements = "):
            continue
        out.append(line)
    return out


def _with_device_line(text: str) -> str:
    # A bare `nft list table` (no device tables line): read as "no device table".
    return text if "\ndevice tables: " in f"\n{text}" else text + device_tables_line([])


def change_needed(spec: PacketPathSpec, current_text: str | None) -> Change:
    """What it takes to converge: nothing, a refill of the updatable sets, or a reload (pure)."""
    if current_text is None:
        return "reload"
    have, want = canonical(_with_device_line(current_text)), canonical(comparable(spec))
    if have == want:
        return "none"
    if _without_set_elements(have) == _without_set_elements(want):
        return "sets"
    return "reload"


def _loaded_elements(current_text: str, name: str) -> list[str]:
    in_set = False
    for line in canonical(current_text):
        stripped = line.strip()
        if stripped == f"set {name} {{":
            in_set = True
        elif in_set and stripped == "}":
            break
        elif in_set:
            m = _LIST_LINE.match(stripped)
            if m:
                return m.group(2).split(", ")
    return []


def loaded_endpoints(current_text: str) -> frozenset[IPv4Address]:
    """The `vpg_endpoints` elements in a listing."""
    return frozenset(IPv4Address(i) for i in _loaded_elements(current_text, ENDPOINT_SET))


def loaded_allowed(current_text: str) -> frozenset[IPv4Network]:
    """The `allowed_destinations` elements in a listing (a bare address is a /32)."""
    return frozenset(IPv4Network(i) for i in _loaded_elements(current_text, ALLOW_SET))


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


def device_traffic_from_json(text: str, timeout_s: float) -> dict[IPv4Address, DeviceTraffic]:
    """Per-device traffic from `nft -j list ...` output holding our device sets, by address.

    Each element carries its counter and `expires` (whole seconds left of `timeout_s`, which
    every packet restarts), so the last packet's age is `timeout_s - expires`; a device in both
    sets takes the younger. Elements without a counter count as zero.
    """
    # Keyed by the address's integer, parsed once per element; IPv4Address objects are made
    # only for the result, unsorted (hashing and comparing them cost most of the parse).
    counts: dict[int, list[int]] = {}
    ages: dict[int, float] = {}
    timeout = float(timeout_s)
    for item in json.loads(text).get("nftables", []):
        s = item.get("set")
        if not s or s.get("family") != FAMILY:
            continue
        if not str(s.get("table", "")).startswith(DEVICE_TABLE_PREFIX):
            continue
        if s.get("name") not in DEVICE_SETS:
            continue
        offset = 0 if s["name"] == DEVICES_FROM_SET else 2
        for raw in s.get("elem", []):
            elem = raw.get("elem", {"val": raw}) if isinstance(raw, dict) else {"val": raw}
            address = int(IPv4Address(str(elem["val"])))
            row = counts.get(address)
            if row is None:
                row = counts[address] = [0, 0, 0, 0]
            counter = elem.get("counter")
            if counter:
                row[offset] += int(counter.get("packets", 0))
                row[offset + 1] += int(counter.get("bytes", 0))
            expires = elem.get("expires")
            if expires is not None:
                age = max(0.0, timeout - float(expires))
                known = ages.get(address)
                ages[address] = age if known is None or age < known else known
    return {
        (a := IPv4Address(n)): DeviceTraffic(a, row[0], row[1], row[2], row[3], ages.get(n))
        for n, row in counts.items()
    }


def describe(spec: PacketPathSpec, current_text: str | None) -> list[str]:
    """What loading `spec` would change, as lines for `gatepeer apply --dry-run`; [] if nothing."""
    change = change_needed(spec, current_text)
    if change == "none":
        return []
    if change == "sets":
        assert current_text is not None
        changes: list[str] = []
        for name, have, want in (
            (
                ENDPOINT_SET,
                set(map(str, loaded_endpoints(current_text))),
                set(map(str, spec.endpoints)),
            ),
            (
                ALLOW_SET,
                set(map(str, loaded_allowed(current_text))),
                set(map(str, spec.allow_list)),
            ),
        ):
            added = " ".join(f"+{a}" for a in sorted(want - have, key=_sort_key))
            gone = " ".join(f"-{a}" for a in sorted(have - want, key=_sort_key))
            if added or gone:
                changes.append(f"# set {name}: {' '.join(x for x in (added, gone) if x)}")
        return changes + _heredoc(sets_transaction(spec))
    header: list[str]
    if current_text is None:
        header = [f"# create table {FAMILY} {TABLE}"]
    else:
        diff = difflib.unified_diff(
            canonical(_with_device_line(current_text)),
            canonical(comparable(spec)),
            fromfile="kernel",
            tofile="wanted",
            lineterm="",
        )
        header = [f"# replace table {FAMILY} {TABLE}: the kernel's differs from the wanted one"]
        header += [f"#   {line}".rstrip() for line in diff]
    return header + _heredoc(transaction(spec))


def _heredoc(text: str) -> list[str]:
    return ["nft -f - <<'EOF'", *text.splitlines(), "EOF"]
