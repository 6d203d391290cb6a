"""The VPG's Junction redirection: which gateway this peer claims, and what is wrong with it.

Pure: the agent posts the change, status and the metrics report the findings.

With `[ha]` the reconcile never posts: the gateway belongs to whichever peer keepalived made
master, and that peer's claim (`gatepeer.ha.claim`) posts `claim_gateway` (its inner address,
or `ha.virtual_address` in vip mode). `soracom.redirection = "self"` then changes nothing:
were both peers to keep the gateway on themselves at every refresh, they would take it from
each other forever.
"""

from __future__ import annotations

from gatepeer.config import Config, HaConfig
from gatepeer.desired_state import GateView, IPv4Address, Redirection


def own_gateway(gate: GateView) -> IPv4Address:
    """The address that means "this peer" as a redirection gateway: its inner address."""
    return gate.inner.ip


def claim_gateway(config: Config, gate: GateView) -> IPv4Address:
    """The gateway the HA master claims: the virtual address in vip mode, else its own."""
    if config.ha is not None and config.ha.virtual_address is not None:
        return config.ha.virtual_address
    return own_gateway(gate)


def desired_gateway(config: Config, gate: GateView) -> IPv4Address | None:
    """The gateway the reconcile keeps on the VPG; None when it does not manage it (unmanaged,
    or `[ha]`: then the master's claim sets it, and only on a role change)."""
    if config.ha is not None:
        return None
    if config.soracom.redirection == "self":
        return own_gateway(gate)
    return None


def wanted_change(config: Config, gate: GateView) -> Redirection | None:
    """The redirection to post (setRedirectionConfiguration), or None when it is right."""
    gateway = desired_gateway(config, gate)
    if gateway is None:
        return None
    wanted = Redirection(enabled=True, gateway=gateway)
    return None if gate.redirection == wanted else wanted


def points_here(gate: GateView, virtual_address: IPv4Address | None = None) -> bool:
    """The VPG redirects devices' traffic to this peer (or to the HA virtual address, which
    is here while keepalived has made this peer master)."""
    r = gate.redirection
    mine = {own_gateway(gate)} | ({virtual_address} if virtual_address is not None else set())
    return r is not None and r.enabled and r.gateway in mine


def describe(redirection: Redirection | None) -> str:
    """The VPG's redirection in a few words, for messages and status."""
    if redirection is None:
        return "not set"
    if redirection.gateway is None:
        return "enabled without a gateway" if redirection.enabled else "off"
    return str(redirection.gateway) + ("" if redirection.enabled else " (disabled)")


def findings(
    mode: str | None, setting: str | None, gate: GateView, *, ha: HaConfig | None = None
) -> list[str]:
    """Why the VPG's redirection leaves this peer degraded (empty: it does not). With `[ha]`
    a gateway elsewhere is the normal state of the backup; the master's failed claim is what
    degrades, and `gatepeer.ha.report.reasons` says that."""
    if ha is not None or points_here(gate):
        return []
    here = own_gateway(gate)
    current = describe(gate.redirection)
    if setting == "self":
        return [
            f'soracom.redirection is "self" but the VPG\'s redirection gateway is {current}, '
            f"not this peer ({here}); the next refresh sets it again"
        ]
    if mode == "nat":
        return [
            f"packet_path.mode is nat but the VPG's redirection gateway is {current}, not this "
            f"peer ({here}): devices' traffic does not come here; set soracom.redirection = "
            '"self" or point the redirection at this peer'
        ]
    return []
