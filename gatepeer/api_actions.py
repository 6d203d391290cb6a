"""The SORACOM API's changes as planned actions, beside the kernel's (`plan.py`).

Each action is a value with its dry-run twin: `command()` is the `soracom` CLI line a user
would type to make the same change (the operation ids and their `x-soracom-cli` names in the
API's spec). `gatepeer apply --dry-run` prints them; a real run logs the same line before
`registration.apply_api_action` makes the call. Pure: nothing here calls the API.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gatepeer.desired_state import IPv4Address, Redirection
from gatepeer.redirection import describe


@dataclass(frozen=True)
class OpenGate:
    """openGate: devices' traffic may then reach gate peers (soracom.open_gate = true)."""

    vpg_id: str

    def command(self) -> str:
        return f"soracom vpg open-gate --vpg-id {self.vpg_id}"


@dataclass(frozen=True)
class RegisterGatePeer:
    """registerGatePeer: this host's outer address becomes a customer gate peer of the VPG.
    `inner` None: the API assigns one."""

    vpg_id: str
    outer: IPv4Address
    inner: IPv4Address | None

    def command(self) -> str:
        line = (
            f"soracom vpg register-gate-peer --vpg-id {self.vpg_id} --outer-ip-address {self.outer}"
        )
        if self.inner is None:
            return line + "  # the API assigns the inner address"
        return line + f" --inner-ip-address {self.inner}"


@dataclass(frozen=True)
class SetRedirection:
    """setRedirectionConfiguration: Junction redirects devices' traffic to `gateway`. `gateway`
    None: this peer's inner address, not known until the API assigns it."""

    vpg_id: str
    gateway: IPv4Address | None
    was: Redirection | None

    def command(self) -> str:
        gateway = str(self.gateway) if self.gateway else "<the inner address the API assigns>"
        body = json.dumps({"enabled": True, "gateway": gateway}, separators=(",", ":"))
        return (
            f"soracom vpg set-redirection --vpg-id {self.vpg_id} --body '{body}'"
            f"  # now {describe(self.was)}"
        )


@dataclass(frozen=True)
class UnsetRedirection:
    """unsetRedirectionConfiguration: devices' traffic is no longer redirected to a peer."""

    vpg_id: str
    was: Redirection | None

    def command(self) -> str:
        return f"soracom vpg unset-redirection --vpg-id {self.vpg_id}  # now {describe(self.was)}"


ApiAction = OpenGate | RegisterGatePeer | SetRedirection | UnsetRedirection
