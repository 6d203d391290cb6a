"""The kernel's side of a reconcile: read what is there, apply the plan's actions, read back.

`plan.py` says what to change (pure); this module makes the changes through `kernel.netlink`
and `kernel.nftables`, records a host-wide sysctl's value before its first change (for `down`
to restore), and checks that what was applied reads back as planned: a kernel that does not
converge is a failure, named by the actions still left.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from gatepeer.config import Config
from gatepeer.desired_state import DesiredState, IPv4Interface, ObservedState
from gatepeer.kernel import nftables, sysctl
from gatepeer.kernel.netlink import KernelError, Netlink
from gatepeer.plan import (
    Action,
    DeleteLink,
    LoadRuleset,
    SetSysctl,
    UpdateEndpointSet,
    describe,
    plan,
)
from gatepeer.teardown import our_link

log = logging.getLogger(__name__)


class ReconcileError(RuntimeError):
    """The kernel could not be brought to the desired state; the message says what differs."""


def require_nft() -> None:
    if not nftables.nft_available():
        raise KernelError("nftables: the nft command is not installed (Debian: nftables)")


def observe(netlink: Netlink, desired: DesiredState) -> ObservedState:
    """The link, addresses, flood entries and sysctls the plan compares; the nftables table
    too when the packet path has one."""
    observed = netlink.observe(desired.link.name, desired.sysctls)
    if desired.packet_path is None:
        return observed
    require_nft()
    try:
        return replace(observed, nft_table=nftables.current())
    except nftables.NftError as exc:
        raise KernelError(f"nftables: {exc}") from None


def apply_action(config: Config, netlink: Netlink, action: Action) -> None:
    try:
        if isinstance(action, LoadRuleset):
            # Carry the counters over a reload: they feed metrics and must not reset.
            kept = nftables.counters_from_listing(action.current) if action.current else None
            nftables.load(action.spec, counters=kept)
        elif isinstance(action, UpdateEndpointSet):
            nftables.update_sets(action.spec)
        else:
            if isinstance(action, SetSysctl):
                _record_original(config, action)
            netlink.apply(action)
    except nftables.NftError as exc:
        raise KernelError(f"nftables: {exc}") from None


def _record_original(config: Config, action: SetSysctl) -> None:
    """Note a host-wide key's value before its first change, for `down` to restore. The
    tunnel's own keys go with the link and are not recorded."""
    path = action.setting.path
    if action.was is None or f"/conf/{config.tunnel.interface}/" in path:
        return
    record = sysctl.OriginalValues.beside(config.agent.state_file)
    try:
        record.remember(path, action.was, action.setting.value)
    except OSError as exc:
        # Not changed, then: a value that cannot be restored is not ours to change.
        raise KernelError(
            f"cannot record {action.setting.dotted}={action.was} in {record.path} before "
            f"changing it: {exc.strerror or exc}"
        ) from None


def notes(observed: ObservedState, desired: DesiredState) -> list[str]:
    """Settings this network namespace cannot take: said, not treated as failures."""
    missing = [
        s.dotted for s in desired.sysctls if s.init_netns_only and observed.sysctl(s.path) is None
    ]
    if missing:
        return [
            "only the initial network namespace can set "
            + ", ".join(missing)
            + "; left to the host"
        ]
    return []


def link_record(observed: ObservedState) -> dict[str, Any] | None:
    """The state file's record of the vxlan link we have (None: no vxlan link to record)."""
    link = observed.link
    if link is None or link.kind != "vxlan":
        return None
    return {"name": link.name, "ifindex": link.index, "vni": link.vni, "dst_port": link.dst_port}


def previous_link(
    netlink: Netlink, managed_link: Mapping[str, Any] | None, desired: DesiredState
) -> list[Action]:
    """Removing the link made under an earlier tunnel.interface, if it is still there."""
    rec = managed_link
    if rec is None or rec["name"] == desired.link.name or not our_link(netlink, rec, rec["name"]):
        return []
    return [DeleteLink(rec["name"], f"tunnel.interface is now {desired.link.name}")]


def converge(
    desired: DesiredState,
    observed: ObservedState,
    actions: list[Action],
    *,
    underlay: str,
    read: Callable[[DesiredState], ObservedState],
    apply: Callable[[Action], None],
    remember: Callable[[ObservedState], frozenset[IPv4Interface]],
) -> tuple[list[str], list[Action]]:
    """Apply `actions` (logging each command() first), read back, let `remember` record what
    is ours from the read-back, and plan again. Late sysctl actions are appended to `actions`.
    Returns the notes on the final state and what is still left to do (`refuse_leftover`)."""
    for action in actions:
        log.info("apply: %s", action.command())
        apply(action)
    final = read(desired)
    owned = remember(final)
    leftover = plan(desired, final, underlay, owned)
    # Keys that appear only once what we applied loaded their module (conntrack's, after the
    # first ruleset with `ct state`) get a second pass, then are checked.
    absent_before = {path for path, value in observed.sysctls if value is None}
    late = [a for a in leftover if isinstance(a, SetSysctl) and a.setting.path in absent_before]
    if late and len(late) == len(leftover):
        for action in late:
            log.info("apply: %s", action.command())
            apply(action)
        actions.extend(late)
        final = read(desired)
        leftover = plan(desired, final, underlay, owned)
    return notes(final, desired), leftover


def refuse_leftover(leftover: list[Action]) -> None:
    if leftover:
        raise ReconcileError(
            "read back differs from what was applied: " + "; ".join(describe(leftover))
        )
