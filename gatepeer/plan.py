"""The pure diff between desired and observed state, as a list of actions.

A converged system plans nothing. Nothing is deleted and re-created when it can be changed in
place: the link is replaced only when an attribute the kernel cannot change differs, and the
action says which. FDB entries change as a set difference, additions first, so traffic keeps a
path while an endpoint is swapped. Of the addresses on the tunnel, only those gatepeer put
there (recorded in the state file, passed in as `owned`) are ever removed: keepalived's
virtual address, or any other tool's, stays.
"""

from __future__ import annotations

from dataclasses import dataclass

from gatepeer import ruleset
from gatepeer.desired_state import (
    DesiredState,
    DesiredStateError,
    IPv4Address,
    IPv4Interface,
    ObservedLink,
    ObservedState,
    Sysctl,
    VxlanSpec,
)
from gatepeer.ruleset import PacketPathSpec

ZERO_MAC = "00:00:00:00:00:00"


@dataclass(frozen=True)
class CreateLink:
    spec: VxlanSpec
    underlay: str

    def command(self) -> str:
        s = self.spec
        lo, hi = s.src_port_range
        mac = f"address {s.mac} " if s.mac else ""
        return (
            f"ip link add {s.name} {mac}type vxlan id {s.vni} local {s.local} dev {self.underlay} "
            f"dstport {s.dst_port} srcport {lo} {hi} {'learning' if s.learning else 'nolearning'}"
            f" && ip link set {s.name} mtu {s.mtu}"
        )


@dataclass(frozen=True)
class DeleteLink:
    name: str
    reason: str

    def command(self) -> str:
        return f"ip link del {self.name}  # {self.reason}"


@dataclass(frozen=True)
class SetMtu:
    name: str
    mtu: int
    was: int

    def command(self) -> str:
        return f"ip link set {self.name} mtu {self.mtu}  # was {self.was}"


@dataclass(frozen=True)
class SetUp:
    name: str

    def command(self) -> str:
        return f"ip link set {self.name} up"


@dataclass(frozen=True)
class AddAddress:
    name: str
    address: IPv4Interface

    def command(self) -> str:
        return f"ip addr add {self.address.with_prefixlen} dev {self.name}"


@dataclass(frozen=True)
class RemoveAddress:
    name: str
    address: IPv4Interface

    def command(self) -> str:
        return f"ip addr del {self.address.with_prefixlen} dev {self.name}"


@dataclass(frozen=True)
class AddFdb:
    name: str
    dst: IPv4Address

    def command(self) -> str:
        return f"bridge fdb append {ZERO_MAC} dev {self.name} dst {self.dst}"


@dataclass(frozen=True)
class RemoveFdb:
    name: str
    dst: IPv4Address

    def command(self) -> str:
        return f"bridge fdb del {ZERO_MAC} dev {self.name} dst {self.dst}"


@dataclass(frozen=True)
class SetSysctl:
    setting: Sysctl
    was: int | None

    def command(self) -> str:
        was = "absent" if self.was is None else self.was
        return f"sysctl -w {self.setting.dotted}={self.setting.value}  # was {was}"


@dataclass(frozen=True)
class LoadRuleset:
    """Replace the whole `inet gatepeer` table in one nft transaction."""

    spec: PacketPathSpec
    current: str | None

    def command(self) -> str:
        return "\n".join(ruleset.describe(self.spec, self.current))


@dataclass(frozen=True)
class UpdateEndpointSet:
    """Only the VPG endpoints changed: update the named set, keep the rules and counters."""

    spec: PacketPathSpec
    current: str

    def command(self) -> str:
        return "\n".join(ruleset.describe(self.spec, self.current))


Action = (
    CreateLink
    | DeleteLink
    | SetMtu
    | SetUp
    | AddAddress
    | RemoveAddress
    | AddFdb
    | RemoveFdb
    | SetSysctl
    | LoadRuleset
    | UpdateEndpointSet
)


class ForeignLinkError(DesiredStateError):
    """A link of another kind holds the tunnel's name: a typo, not ours to delete."""


def refuse_foreign(name: str, link: ObservedLink | None) -> None:
    """Raise unless `name` is absent or a vxlan link: gatepeer deletes only vxlan links, so a
    bridge, a bond or a WireGuard link that happens to carry the configured name survives."""
    if link is None or link.kind == "vxlan":
        return
    kind = f"a {link.kind} link" if link.kind else "a link of no kind (a physical interface?)"
    raise ForeignLinkError(
        f"tunnel.interface: {name} is {kind}, not vxlan; gatepeer will not delete it "
        "(choose another tunnel.interface, or remove it by hand)"
    )


def immutable_differences(spec: VxlanSpec, link: ObservedLink) -> list[str]:
    """Attributes that differ and that the kernel cannot change on an existing vxlan link."""
    if link.kind != "vxlan":
        return [f"kind {link.kind or 'unknown'} (want vxlan)"]
    wanted = {
        "vni": (link.vni, spec.vni),
        "local": (link.local, spec.local),
        "lower device": (link.underlay_index, spec.underlay_index),
        "dstport": (link.dst_port, spec.dst_port),
        "srcport range": (link.src_port_range, spec.src_port_range),
        "learning": (link.learning, spec.learning),
    }
    return [f"{name} {have} (want {want})" for name, (have, want) in wanted.items() if have != want]


def plan(
    desired: DesiredState,
    observed: ObservedState,
    underlay: str,
    owned: frozenset[IPv4Interface] = frozenset(),
) -> list[Action]:
    """The actions from `observed` to `desired`. `owned`: addresses gatepeer added to the
    tunnel earlier (an inner address that the API has since replaced is removed, no other)."""
    spec = desired.link
    actions: list[Action] = []
    link = observed.link
    refuse_foreign(spec.name, link)
    fresh = link is None
    if link is not None:
        differences = immutable_differences(spec, link)
        if differences:
            actions.append(
                DeleteLink(spec.name, "cannot change in place: " + "; ".join(differences))
            )
            fresh = True
    if fresh:
        actions.append(CreateLink(spec, underlay))
        addresses: frozenset[IPv4Interface] = frozenset()
        fdb: frozenset[IPv4Address] = frozenset()
    else:
        assert link is not None
        if link.mtu != spec.mtu:
            actions.append(SetMtu(spec.name, spec.mtu, link.mtu))
        addresses, fdb = observed.addresses, observed.fdb

    # The tunnel's own keys come before its addresses: with promote_secondaries=1 the new
    # address (added as a secondary in the same subnet) survives the removal of the old primary.
    sysctl_actions = _sysctl_actions(desired, observed, fresh)
    actions += [a for a in sysctl_actions if _tunnel_key(a.setting, spec.name)]
    if desired.address not in addresses:
        actions.append(AddAddress(spec.name, desired.address))
    for extra in sorted((addresses & owned) - {desired.address}):
        actions.append(RemoveAddress(spec.name, extra))
    # Add before remove: during an endpoint swap the surviving endpoints never lose their entry.
    for dst in sorted(desired.fdb - fdb):
        actions.append(AddFdb(spec.name, dst))
    for dst in sorted(fdb - desired.fdb):
        actions.append(RemoveFdb(spec.name, dst))
    # The filter is in place before the link comes up and before forwarding is switched on.
    if desired.packet_path is not None:
        change = ruleset.change_needed(desired.packet_path, observed.nft_table)
        if change == "reload":
            actions.append(LoadRuleset(desired.packet_path, observed.nft_table))
        elif change == "sets" and observed.nft_table is not None:
            actions.append(UpdateEndpointSet(desired.packet_path, observed.nft_table))
    if fresh or (link is not None and not link.admin_up):
        actions.append(SetUp(spec.name))

    actions += [a for a in sysctl_actions if not _tunnel_key(a.setting, spec.name)]
    return actions


def _tunnel_key(setting: Sysctl, tunnel: str) -> bool:
    return f"/conf/{tunnel}/" in setting.path


def _sysctl_actions(desired: DesiredState, observed: ObservedState, fresh: bool) -> list[SetSysctl]:
    actions = []
    for setting in desired.sysctls:
        have = observed.sysctl(setting.path)
        tunnel_key = _tunnel_key(setting, desired.link.name)
        if have is None:
            # A fresh link's per-interface keys appear only once it exists.
            if tunnel_key and fresh:
                actions.append(SetSysctl(setting, None))
            continue
        if fresh and tunnel_key or not setting.satisfied_by(have):
            actions.append(SetSysctl(setting, have))
    return actions


def owned_after(
    desired: DesiredState, observed: ObservedState, owned: frozenset[IPv4Interface]
) -> frozenset[IPv4Interface]:
    """What to record as ours once `observed` is read back: the desired address, and earlier
    ones of ours still on the link (their removal failed, or is still to come)."""
    return frozenset(a for a in observed.addresses if a == desired.address or a in owned)


def describe(actions: list[Action]) -> list[str]:
    return [a.command() for a in actions]
