"""What changes on this host when keepalived moves the role, in the order that keeps connections;
the coordinator runs it once per role change, before the claim.

- Becoming master: conntrackd commits the other peer's connections into the kernel, then this
  peer takes `ha.snat_address` and announces it (the VPC hosts' replies come here from then
  on, and find their connections); then the claim; then conntrackd's flush, resync and bulk
  send (`after_claim`).
- Any other role: the NAT address goes first (stop drawing the replies), then conntrackd's
  steps for that role.

Either part may be absent: no `snat_address` (conntrackd alone), or `conntrack_sync` off (the
address alone: the connections are lost anyway, but the address still moves with the role).
"""

from __future__ import annotations

from gatepeer.ha.conntrackd import COMMIT, HANDOVER, Conntrackd
from gatepeer.ha.nat_address import NatAddress


class RoleHandover:
    """`__call__(role)` runs before the claim, `after_claim(role)` after it (the coordinator
    calls both once per role change)."""

    def __init__(self, conntrackd: Conntrackd | None, nat: NatAddress | None) -> None:
        self.conntrackd = conntrackd
        self.nat = nat

    def __call__(self, role: str) -> list[str]:
        """Returns the failures, one line each; every step runs even if one before failed."""
        nat, ctl = self.nat, self.conntrackd
        if role == "unknown":
            return []
        if role == "master":
            failures = ctl.handover(role, flags=(COMMIT,)) if ctl is not None else []
            return failures + (nat.hold() if nat is not None else [])
        failures = nat.release() if nat is not None else []
        return failures + (ctl.handover(role) if ctl is not None else [])

    def after_claim(self, role: str) -> list[str]:
        """The master's flush, resync and bulk send: they refresh conntrackd's caches and the
        other peer's copy, which nothing on the traffic's path waits for, so the claim (the
        devices' traffic moving here) does not wait for them either."""
        if role != "master" or self.conntrackd is None:
            return []
        rest = [flag for flag, _ in HANDOVER[role] if flag != COMMIT]
        return self.conntrackd.handover(role, flags=rest)
