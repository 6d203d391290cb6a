"""What the HA master claims, as the callable the coordinator runs on MASTER (and again on
MASTER_RX_LOWER_PRI): with `ha.snat_address`, that address held on the underlay and announced
again (gratuitous ARP; gatepeer/ha/nat_address.py) and, on EC2, moved to this instance's ENI as
a secondary private address (AssignPrivateIpAddresses with AllowReassignment); then the VPG's
Junction redirection to `redirection.claim_gateway` (this peer's inner address, or the virtual
address in vip mode) through the API; then, in route mode, each route table in
`ha.route_tables` pointed at this instance's ENI (ReplaceRoute). The NAT address comes first:
the VPC must deliver the replies here before the devices' traffic does.

Any failed step raises; the coordinator retries the whole claim with backoff while this peer
stays master. Every step is idempotent, so a retry repeats the ones that already worked.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from gatepeer import redirection
from gatepeer.config import Config
from gatepeer.desired_state import GateView

log = logging.getLogger(__name__)


class ClaimError(RuntimeError):
    """The claim cannot be made yet; the message says what is missing."""


class RedirectionSetter(Protocol):
    def set_redirection(self, vpg_id: str, gateway: str) -> None: ...


@dataclass(frozen=True)
class RouteTarget:
    """Where route mode points the VPC route tables: this instance's ENI, via this client."""

    ec2: Any  # a boto3 EC2 client
    eni_id: str


class GatewayClaim:
    """`claim()` for the coordinator. The gate view and the route target are read at each
    claim (the daemon's agent changes with a reload; the view arrives after start)."""

    def __init__(
        self,
        config: Callable[[], Config],
        gate: Callable[[], GateView | None],
        api: RedirectionSetter,
        route_target: Callable[[], RouteTarget] | None = None,
        address_target: Callable[[], RouteTarget | None] | None = None,
        announce: Callable[[], list[str]] | None = None,
    ) -> None:
        self.config = config
        self.gate = gate
        self.api = api
        self.route_target = route_target
        # Where ha.snat_address moves on EC2; returns None off EC2 (keepalived alone moves it).
        self.address_target = address_target
        # Takes and announces ha.snat_address here (idempotent; the handover took it first,
        # after conntrackd's commit): a re-claim after a split brain announces it again.
        self.announce = announce
        self.done: list[str] = []  # what the last successful claim did, for the log and tests

    def __call__(self) -> None:
        cfg = self.config()
        gate = self.gate()
        if gate is None:
            raise ClaimError("no gate view yet (the first API refresh has not succeeded)")
        gateway = redirection.claim_gateway(cfg, gate)
        done = []
        snat = cfg.ha.snat_address if cfg.ha is not None else None
        if snat is not None and self.announce is not None:
            failures = self.announce()
            if failures:
                raise ClaimError("; ".join(failures))
            done.append(f"snat_address {snat} held and announced")
        if snat is not None and self.address_target is not None:
            target = self.address_target()
            if target is not None:
                done.append(move_address(target, snat))
        self.api.set_redirection(cfg.soracom.vpg_id, str(gateway))
        done.append(f"redirection gateway {gateway}")
        tables = cfg.ha.route_tables if cfg.ha is not None else ()
        if tables:
            if self.route_target is None:
                raise ClaimError("ha.route_tables is set but this daemon has no EC2 access")
            target = self.route_target()
            done += point_routes(target, tables, gate.inner.network)
        self.done = done
        log.info("claimed: %s", "; ".join(done))


def point_routes(target: RouteTarget, tables: tuple[str, ...], subnet: IPv4Network) -> list[str]:
    from gatepeer.aws.ec2 import point_route_at

    out = []
    for table in tables:
        how = point_route_at(target.ec2, table, subnet, target.eni_id)
        out.append(f"{table} {subnet} -> {target.eni_id} ({how})")
    return out


def move_address(target: RouteTarget, address: IPv4Address) -> str:
    from gatepeer.aws.ec2 import assign_private_address

    assign_private_address(target.ec2, target.eni_id, address)
    return f"snat_address {address} -> {target.eni_id}"


def claim_lost(
    cfg: Config, gate: GateView | None, fetched_at: float | None, claimed_at: float | None
) -> str | None:
    """Why this master must claim again, or None: the VPG's redirection, as fetched after our
    last successful claim, is not the gateway we claim. (Before that fetch the view still shows
    the gateway from before our claim, which proves nothing.)"""
    if gate is None or fetched_at is None or claimed_at is None or fetched_at <= claimed_at:
        return None
    wanted = redirection.claim_gateway(cfg, gate)
    current = gate.redirection
    if current is not None and current.enabled and current.gateway == wanted:
        return None
    return (
        f"the VPG's redirection gateway is {redirection.describe(current)}, not {wanted}, "
        "although this peer is master and claimed it"
    )
