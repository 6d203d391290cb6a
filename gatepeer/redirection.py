"""The VPG's Junction redirection: which gateway this peer claims, and what is wrong with it.

Pure: the agent posts the change, status and the metrics report the findings. The gateway to
claim is computed in `desired_gateway` only, so that high availability can later claim a
virtual address or the elected peer's address there instead of this peer's inner address.
"""

from __future__ import annotations

from gatepeer.config import Config
from gatepeer.state import GateView, IPv4Address, Redirection


def own_gateway(gate: GateView) -> IPv4Address:
    """The address that means "this peer" as a redirection gateway: its inner address."""
    return gate.inner.ip


def desired_gateway(config: Config, gate: GateView) -> IPv4Address | None:
    """The gateway this peer keeps on the VPG; None when redirection is not managed."""
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


def points_here(gate: GateView) -> bool:
    """The VPG redirects devices' traffic to this peer."""
    r = gate.redirection
    return r is not None and r.enabled and r.gateway == own_gateway(gate)


def describe(redirection: Redirection | None) -> str:
    """The VPG's redirection in a few words, for messages and status."""
    if redirection is None:
        return "not set"
    if redirection.gateway is None:
        return "enabled without a gateway" if redirection.enabled else "off"
    return str(redirection.gateway) + ("" if redirection.enabled else " (disabled)")


def findings(mode: str | None, setting: str | None, gate: GateView) -> list[str]:
    """Why the VPG's redirection leaves this peer degraded (empty: it does not)."""
    if points_here(gate):
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
