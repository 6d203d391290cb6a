"""`gatepeer down`: remove what gatepeer created, put back the host-wide sysctls it changed,
and with --unregister release the redirection (when it points here) and the registration.

Only what is recorded as ours goes: the link under tunnel.interface (a link of another kind
there is refused before anything is touched), the one made under an earlier name when it is
still the vxlan recorded, our nftables table, and sysctls whose value is still the one we set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from gatepeer import gate_cache, redirection
from gatepeer.api_actions import UnsetRedirection
from gatepeer.config import Config
from gatepeer.desired_state import GateView, IPv4Address
from gatepeer.kernel import nftables, sysctl
from gatepeer.kernel.netlink import Netlink
from gatepeer.plan import refuse_foreign
from gatepeer.registration import GateError, apply_api_action, find_own_peer, read_vpg
from gatepeer.soracom import SoracomClient, SoracomError

log = logging.getLogger(__name__)


def our_link(netlink: Netlink, record: Mapping[str, Any] | None, name: str) -> bool:
    """`name` is the link recorded as ours, and still a vxlan with the recorded VNI and
    port (never a link of another kind, nor someone else's vxlan under that name)."""
    if record is None or record["name"] != name:
        return False
    link = netlink.observe_link(name)
    return (
        link is not None
        and link.kind == "vxlan"
        and (link.vni, link.dst_port) == (record["vni"], record["dst_port"])
    )


def teardown(
    config: Config,
    netlink: Netlink,
    client: SoracomClient,
    *,
    gate: GateView | None,
    managed_link: Mapping[str, Any] | None,
    local_address: Callable[[], IPv4Address],
    unregister: bool,
) -> tuple[bool, list[str]]:
    """Remove what gatepeer created, and put back the host-wide sysctls it changed
    (those someone changed since are left, and said). True when something was removed."""
    messages: list[str] = []
    name = config.tunnel.interface
    # Before anything is touched: a link of another kind under our name is a config error.
    refuse_foreign(name, netlink.observe_link(name))
    removed = netlink.delete_link(name)
    if removed:
        messages.append(f"removed {name}")
    old = managed_link["name"] if managed_link else name
    if old != name and our_link(netlink, managed_link, old) and netlink.delete_link(old):
        removed = True
        messages.append(f"removed {old} (made under an earlier tunnel.interface)")
    nft_error: nftables.NftError | None = None
    try:
        if nftables.nft_available() and nftables.current() is not None:
            nftables.remove()
            removed = True
            messages.append(f"removed nftables table {nftables.FAMILY} {nftables.TABLE}")
    except nftables.NftError as exc:
        if not unregister:
            raise
        nft_error = exc  # unregistering needs no nft: do it, then report this
    # Host-wide sysctls back to what they were before gatepeer changed them.
    restored = sysctl.OriginalValues.beside(config.agent.state_file).restore()
    removed = removed or any(line.startswith("restored ") for line in restored)
    messages += restored
    if unregister:
        removed = _unregister(config, client, gate, local_address, messages) or removed
    if nft_error is not None:
        raise nft_error
    config.agent.state_file.unlink(missing_ok=True)
    return removed, messages


def _unregister(
    config: Config,
    client: SoracomClient,
    gate: GateView | None,
    local_address: Callable[[], IPv4Address],
    messages: list[str],
) -> bool:
    """Release the redirection if it points here, then remove the registration the saved
    view records (the host's address may have changed since). True when one was removed."""
    vpg_id = config.soracom.vpg_id
    outer = gate.outer if gate else local_address()
    inner = gate.inner.ip if gate else _registered_inner(client, vpg_id, outer)
    if config.soracom.redirection == "self" and inner is not None:
        _release_redirection(client, vpg_id, inner, messages)
    try:
        client.unregister_gate_peer(vpg_id, str(outer))
    except SoracomError as exc:
        if exc.status != 404:
            raise  # the kept view stays: it is the only record of the registration
        messages.append(f"{outer} was not registered with VPG {vpg_id}")
        done = False
    else:
        messages.append(f"unregistered {outer} from VPG {vpg_id}")
        done = True
    gate_cache.forget(config)
    return done


def _release_redirection(
    client: SoracomClient, vpg_id: str, inner: IPv4Address, messages: list[str]
) -> None:
    """Unset the VPG's redirection when it points at this peer's inner address."""
    try:
        current = read_vpg(client, vpg_id).redirection
    except GateError as exc:
        # An answer we cannot read must not keep the registration alive: say so, go on.
        messages.append(f"left the redirection of VPG {vpg_id} unchecked: {exc}")
        return
    if current is not None and current.gateway == inner:
        action = UnsetRedirection(vpg_id, current)
        log.info("apply: %s", action.command())
        apply_api_action(client, action)
        messages.append(f"unset the redirection of VPG {vpg_id} (it pointed at {inner})")
    else:
        messages.append(
            f"left the redirection of VPG {vpg_id} alone: its gateway is "
            f"{redirection.describe(current)}, not this peer ({inner})"
        )


def _registered_inner(client: SoracomClient, vpg_id: str, outer: IPv4Address) -> IPv4Address | None:
    own = find_own_peer(client.list_gate_peers(vpg_id), outer)
    try:
        return IPv4Address(own["innerIpAddress"]) if own else None
    except (ValueError, TypeError, KeyError):
        return None
