"""Plain immutable values: what SORACOM told us, what we want, and what the kernel has.

Nothing here does I/O. `desired_state` is the only logic: it joins the configuration, the facts
about this host and the gate view from the API into the state the kernel should be in.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from gatepeer.config import VXLAN_OVERHEAD, Config
from gatepeer.ruleset import PacketPathSpec

IPv4Address = ipaddress.IPv4Address
IPv4Interface = ipaddress.IPv4Interface
IPv4Network = ipaddress.IPv4Network


@dataclass(frozen=True)
class Endpoint:
    """One of the VPG's own tunnel endpoints (`ownedByCustomer: false`)."""

    outer: IPv4Address
    inner: IPv4Address | None


@dataclass(frozen=True)
class Redirection:
    """The VPG's Junction redirection as the API reports it."""

    enabled: bool
    gateway: IPv4Address | None  # None: the VPG names no gateway

    def to_json(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "gateway": str(self.gateway) if self.gateway else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Redirection:
        gateway = data.get("gateway")
        return cls(bool(data["enabled"]), IPv4Address(gateway) if gateway else None)


@dataclass(frozen=True)
class GateView:
    """Everything the agent learned from the SORACOM API; kept as the last known good."""

    vpg_id: str
    vni: int
    device_subnet: IPv4Network
    gate_opened: bool
    inner: IPv4Interface  # this peer's inner address with the device subnet's prefix
    endpoints: tuple[Endpoint, ...]
    outer: IPv4Address  # the outer address this peer is registered with
    redirection: Redirection | None = None  # None: the VPG has no redirection configured

    def to_json(self) -> dict[str, Any]:
        return {
            "vpg_id": self.vpg_id,
            "vni": self.vni,
            "device_subnet": str(self.device_subnet),
            "gate_opened": self.gate_opened,
            "inner": str(self.inner),
            "outer": str(self.outer),
            "endpoints": [
                {"outer": str(e.outer), "inner": str(e.inner) if e.inner else None}
                for e in self.endpoints
            ],
            "redirection": self.redirection.to_json() if self.redirection else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GateView:
        return cls(
            vpg_id=str(data["vpg_id"]),
            vni=int(data["vni"]),
            device_subnet=IPv4Network(data["device_subnet"]),
            gate_opened=bool(data["gate_opened"]),
            inner=IPv4Interface(data["inner"]),
            outer=IPv4Address(data["outer"]),
            endpoints=tuple(
                Endpoint(IPv4Address(e["outer"]), IPv4Address(e["inner"]) if e["inner"] else None)
                for e in data["endpoints"]
            ),
            # Absent in views saved before redirection was read: not known, so None.
            redirection=Redirection.from_json(data["redirection"])
            if data.get("redirection")
            else None,
        )


@dataclass(frozen=True)
class HostFacts:
    """Facts about this machine that the desired state depends on."""

    underlay: str
    underlay_index: int
    underlay_mtu: int
    local_address: IPv4Address
    flowtable_supported: bool = False  # this kernel takes an nftables flowtable
    # What "inside the VPC" means in route mode, and where it came from: "config"
    # (packet_path.vpc_cidrs), "imds" (the VPC's CIDR blocks) or "underlay" (its prefix).
    vpc_networks: tuple[IPv4Network, ...] = ()
    vpc_networks_source: str | None = None


@dataclass(frozen=True)
class VxlanSpec:
    name: str
    vni: int
    local: IPv4Address
    underlay_index: int
    dst_port: int
    src_port_range: tuple[int, int]
    mtu: int
    learning: bool = True  # per-endpoint unicast after the first reply, as SORACOM's script has
    # Set only when the link is created: the same MAC every time, so a re-created link does not
    # leave the VPG endpoints with a stale ARP entry for our inner address.
    mac: str | None = None


# How a sysctl compares: "exact" must equal; "at_least" leaves a larger value the operator chose.
Comparison = Literal["exact", "at_least"]


@dataclass(frozen=True)
class Sysctl:
    path: str  # under /proc/sys, with slashes: interface names may contain dots
    value: int
    comparison: Comparison = "exact"
    # Some keys exist only in the initial network namespace: absent elsewhere is not an error.
    init_netns_only: bool = False

    @property
    def dotted(self) -> str:
        """The sysctl(8) name; a dot inside a component (eth0.100) is written as a slash."""
        return ".".join(part.replace(".", "/") for part in self.path.split("/"))

    def satisfied_by(self, observed: int) -> bool:
        if self.comparison == "at_least":
            return observed >= self.value
        return observed == self.value


@dataclass(frozen=True)
class DesiredState:
    link: VxlanSpec
    address: IPv4Interface
    fdb: frozenset[IPv4Address]
    sysctls: tuple[Sysctl, ...]
    packet_path: PacketPathSpec | None = None


@dataclass(frozen=True)
class ObservedLink:
    index: int
    name: str
    kind: str | None
    vni: int | None
    local: IPv4Address | None
    underlay_index: int | None
    dst_port: int | None
    src_port_range: tuple[int, int] | None
    learning: bool | None
    mtu: int
    admin_up: bool
    oper_state: str


@dataclass(frozen=True)
class ObservedState:
    link: ObservedLink | None
    addresses: frozenset[IPv4Interface]
    fdb: frozenset[IPv4Address]  # destinations of the all-zero-MAC entries
    # (path, value or None when this namespace has no such key or cannot write it)
    sysctls: tuple[tuple[str, int | None], ...]
    nft_table: str | None = None  # `nft list table inet gatepeer`, None when absent

    def sysctl(self, path: str) -> int | None:
        return dict(self.sysctls).get(path)


class DesiredStateError(ValueError):
    """The inputs cannot make a working tunnel; the message names the setting to change."""


def neighbour_thresholds(devices: int) -> tuple[int, int, int]:
    """gc_thresh1/2/3 for `devices` active neighbours: GC stays idle well below the soft limit
    and the hard limit leaves twice the room, so a burst never hits "neighbor table overflow"."""
    return devices // 2, devices + devices // 2, devices * 2


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
    in any other: see `kernel.nftables.unwritable`); the timeouts are per namespace.
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


def stable_mac(local: IPv4Address, vni: int) -> str:
    """A locally administered unicast MAC derived from what identifies this peer's tunnel."""
    digest = hashlib.sha256(f"gatepeer/{local}/{vni}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def tunnel_mtu(config: Config, facts: HostFacts) -> int:
    largest = facts.underlay_mtu - VXLAN_OVERHEAD
    if config.tunnel.mtu == "auto":
        return largest
    if config.tunnel.mtu > largest:
        raise DesiredStateError(
            f"tunnel.mtu: {config.tunnel.mtu} needs an underlay MTU of at least "
            f"{config.tunnel.mtu + VXLAN_OVERHEAD}, {facts.underlay} has {facts.underlay_mtu} "
            f'(set mtu = "auto" or at most {largest})'
        )
    return config.tunnel.mtu


def snat_address(config: Config, facts: HostFacts) -> IPv4Address | None:
    """`ha.snat_address`, checked against what only this host knows: its own VPC address and
    the VPC's networks (the config checked the rest)."""
    snat = config.ha.snat_address if config.ha is not None else None
    if snat is None:
        return None
    if snat == facts.local_address:
        raise DesiredStateError(
            f"ha.snat_address: {snat} is this host's own VPC address ({facts.underlay}); the "
            "NAT address is a third address in the peers' subnet"
        )
    if facts.vpc_networks and not any(snat in net for net in facts.vpc_networks):
        where = ", ".join(map(str, facts.vpc_networks))
        raise DesiredStateError(
            f"ha.snat_address: {snat} is outside the VPC networks this host sees ({where}, "
            f"from {facts.vpc_networks_source}); it must be in the peers' VPC subnet"
        )
    return snat


def desired_state(
    config: Config,
    facts: HostFacts,
    gate: GateView,
    resolved_destinations: tuple[IPv4Network, ...] = (),
) -> DesiredState:
    """`resolved_destinations`: what packet_path.allowed_destinations' AWS names stand for
    (gatepeer.aws.destinations), added to its prefixes."""
    t = config.tunnel
    link = VxlanSpec(
        name=t.interface,
        vni=gate.vni,
        local=facts.local_address,
        underlay_index=facts.underlay_index,
        dst_port=t.destination_port,
        src_port_range=t.source_port_range,
        mtu=tunnel_mtu(config, facts),
        mac=stable_mac(facts.local_address, gate.vni),
    )
    pp = config.packet_path
    if pp.flowtable is True and not facts.flowtable_supported:
        raise DesiredStateError(
            "packet_path.flowtable: true, but this kernel has no nftables flowtable "
            '(CONFIG_NF_FLOW_TABLE); set it to "auto" or false'
        )
    if pp.mode == "route" and pp.outside_vpc == "masquerade" and not facts.vpc_networks:
        raise DesiredStateError(
            "packet_path.vpc_cidrs: not set, and neither IMDS nor the underlay told the VPC's "
            'CIDRs; list them, or set packet_path.outside_vpc = "route"'
        )
    snat = snat_address(config, facts)
    allowed = pp.allowed_destinations + resolved_destinations
    # An empty allow-list admits everything: AWS names not resolved yet (EC2 silent, nothing
    # kept on disk) must never mean that, so until they resolve devices reach only the VPC.
    closed = pp.closed or (bool(pp.allowed_names) and not allowed)
    if closed and not facts.vpc_networks:
        raise DesiredStateError(
            "packet_path.closed: the VPC's CIDRs are not known (nor learned from IMDS or the "
            "underlay); list them in packet_path.vpc_cidrs"
        )
    packet_path = PacketPathSpec(
        device_subnet=gate.device_subnet,
        vni=gate.vni,
        local_address=facts.local_address,
        endpoints=frozenset(e.outer for e in gate.endpoints),
        mode=pp.mode,
        tunnel=t.interface,
        underlay=facts.underlay,
        vxlan_port=t.destination_port,
        allowed_destinations=allowed,
        flowtable=facts.flowtable_supported and pp.flowtable is not False,
        host_services=pp.host_services,
        outside_vpc=pp.outside_vpc,
        vpc_networks=facts.vpc_networks,
        device_counters=pp.device_counters,
        snat_address=snat,
        closed=closed,
        # The flow log sees only what conntrack tracks: in route mode it asks for device flows.
        track_flows=config.flow_log.enabled,
        sync_events=config.ha is not None and config.ha.conntrack_sync,
    )
    g1, g2, g3 = neighbour_thresholds(config.kernel.neighbour_table_devices)
    sysctls: tuple[Sysctl, ...] = (
        Sysctl("net/ipv4/ip_forward", 1),
        # Loose reverse-path filtering: replies may come back through the other endpoint.
        Sysctl(f"net/ipv4/conf/{t.interface}/rp_filter", 2),
        # A new inner address in the old one's subnet is added as a secondary; without
        # promotion, removing the old primary would remove it too (Debian's default is 0).
        Sysctl(f"net/ipv4/conf/{t.interface}/promote_secondaries", 1),
        Sysctl(f"net/ipv4/conf/{facts.underlay}/rp_filter", 2),
        # Devices' packets that arrive while vxlan0 is briefly absent would otherwise earn the
        # VPC host an ICMP redirect to the VPC router, cached for minutes (the kernel sends one
        # when all OR the interface allows it, so both are off).
        Sysctl("net/ipv4/conf/all/send_redirects", 0),
        Sysctl(f"net/ipv4/conf/{facts.underlay}/send_redirects", 0),
        Sysctl("net/ipv4/neigh/default/gc_thresh1", g1, "at_least", init_netns_only=True),
        Sysctl("net/ipv4/neigh/default/gc_thresh2", g2, "at_least", init_netns_only=True),
        Sysctl("net/ipv4/neigh/default/gc_thresh3", g3, "at_least", init_netns_only=True),
    )
    # Conntrack is sized only where the packet path tracks connections (nat mode, an allow-list,
    # the flowtable): route mode has no use for it and leaves another tool's tracking alone.
    # Timeouts are set exactly, some below the kernel's defaults (why: conntrack_sysctls), and
    # they are host-wide; the values before gatepeer are recorded and `down` restores them.
    if packet_path is not None and packet_path.tracked:
        for path, value in conntrack_sysctls(
            config.kernel.neighbour_table_devices, pp.flows_per_device
        ):
            global_size = path.endswith(("_max", "_buckets"))
            sysctls += (
                Sysctl(path, value, "at_least", init_netns_only=True)
                if global_size
                else Sysctl(path, value),
            )
    if snat is not None:
        # An HA pair moves tracked flows between peers, and during a failover each peer sees
        # only part of a flow's segments (the VPG and the VPC host switch peers at different
        # moments). Strict window tracking then marks the rest out of window: INVALID packets
        # get no NAT, so the old master forwarded a device's ACK with the device's own source
        # and the VPC host reset the connection (traced in docs/ha.md). conntrack-tools'
        # manual advises liberal tracking for synced firewalls.
        sysctls += (Sysctl("net/netfilter/nf_conntrack_tcp_be_liberal", 1),)
    if config.flow_log.enabled:
        # The flow log's byte counts on "destroy" (per network namespace; off by default).
        sysctls += (Sysctl("net/netfilter/nf_conntrack_acct", 1),)
    return DesiredState(
        link=link,
        address=gate.inner,
        fdb=frozenset(e.outer for e in gate.endpoints),
        sysctls=sysctls,
        packet_path=packet_path,
    )
