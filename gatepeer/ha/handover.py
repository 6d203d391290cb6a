"""What changes on this host when keepalived moves the role, in the order that keeps connections;
the coordinator runs it once per role change, before the claim.

- Becoming master: conntrackd commits the other peer's connections into the kernel, then this
  peer takes `ha.snat_address` and announces it (the VPC hosts' replies come here from then
  on, and find their connections), then conntrackd's flush, resync and bulk send.
- Any other role: the NAT address goes first (stop drawing the replies), then conntrackd's
  steps for that role.

Either part may be absent: no `snat_address` (conntrackd alone), or `conntrack_sync` off (the
address alone: the connections are lost anyway, but the address still moves with the role).
"""

from __future__ import annotations

from gatepeer.ha.conntrackd import Conntrackd
from gatepeer.ha.nat_address import NatAddress


class RoleHandover:
    def __init__(self, conntrackd: Conntrackd | None, nat: NatAddress | None) -> None:
        self.conntrackd = conntrackd
        self.nat = nat

    def __call__(self, role: str) -> list[str]:
        """Returns the failures, one line each; every step runs even if one before failed."""
        nat, ctl = self.nat, self.conntrackd
        if role == "master":
            take = nat.hold if nat is not None else None
            if ctl is None:
                return take() if take is not None else []
            return ctl.handover(role, after_commit=take)
        if role == "unknown":
            return []
        failures = nat.release() if nat is not None else []
        if ctl is not None:
            failures += ctl.handover(role)
        return failures
