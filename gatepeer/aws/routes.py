"""`[aws] route_tables` for a single peer: the device subnet's route in each listed VPC route
table points at this instance's ENI, checked at every reconcile.

An Auto Scaling replacement has a new ENI; the old route then points at a deleted interface
(a blackhole in AWS). The replacement takes the route over by itself: CreateRoute when the
table has no route for the device subnet, ReplaceRoute when it points elsewhere (or is a
blackhole), nothing when it is already right. alterNAT's Lambda does the same with
ReplaceRoute; fck-nat re-attaches a static ENI instead.

`decide` is pure (the tables as DescribeRouteTables shows them in, the changes out); `RouteKeeper`
does the calls and keeps the last result for status. An HA pair uses `[ha] route_tables`
(the master's claim) instead; the config refuses both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Any, Literal

from gatepeer.aws import AwsError
from gatepeer.aws.ec2 import Ec2Error, _call, route_target

log = logging.getLogger(__name__)

# A converged table needs one DescribeRouteTables; kernel events must not turn every reconcile
# into an EC2 call, so a right answer is trusted this long.
RECHECK_S = 10.0
# After a failed call, the next try waits this long.
RETRY_S = 15.0


@dataclass(frozen=True)
class RouteSeen:
    """The route for exactly the device subnet in one table, as DescribeRouteTables shows it."""

    target: str  # the ENI, instance, gateway... id; "" when the route names none
    state: str  # "active" or "blackhole"


@dataclass(frozen=True)
class RouteChange:
    table_id: str
    action: Literal["create", "replace"]
    destination: IPv4Network
    eni_id: str
    was: RouteSeen | None

    def command(self) -> str:
        """The AWS CLI twin of the call."""
        verb = "create-route" if self.action == "create" else "replace-route"
        return (
            f"aws ec2 {verb} --route-table-id {self.table_id} "
            f"--destination-cidr-block {self.destination} --network-interface-id {self.eni_id}"
        )

    def describe(self) -> str:
        if self.was is None:
            return f"{self.table_id}: {self.destination} -> {self.eni_id} (created)"
        old = self.was.target or "nothing"
        if self.was.state != "active":
            old += f", {self.was.state}"
        return f"{self.table_id}: {self.destination} -> {self.eni_id} (replaced; was {old})"


def decide(
    tables: Mapping[str, RouteSeen | None], destination: IPv4Network, eni_id: str
) -> list[RouteChange]:
    """The calls that make each table's route for `destination` point at `eni_id`; none for a
    table that is already right. `tables`: each listed table's route (None: it has none)."""
    changes = []
    for table_id, seen in tables.items():
        if seen is None:
            changes.append(RouteChange(table_id, "create", destination, eni_id, None))
        elif seen.target != eni_id or seen.state != "active":
            changes.append(RouteChange(table_id, "replace", destination, eni_id, seen))
    return changes


def routes_seen(
    ec2: Any, table_ids: tuple[str, ...], destination: IPv4Network
) -> dict[str, RouteSeen | None]:
    """DescribeRouteTables for the listed tables: each one's route for exactly `destination`.
    A listed table EC2 does not know is an error naming it."""
    answer = _call(
        "DescribeRouteTables",
        ",".join(table_ids),
        ec2.describe_route_tables,
        RouteTableIds=list(table_ids),
    )
    found: dict[str, RouteSeen | None] = {}
    for table in answer.get("RouteTables", []):
        seen = None
        for route in table.get("Routes", []):
            if route.get("DestinationCidrBlock") == str(destination):
                target = route_target(route, "")
                seen = RouteSeen(target, str(route.get("State", "active")))
        found[str(table["RouteTableId"])] = seen
    missing = [t for t in table_ids if t not in found]
    if missing:
        raise Ec2Error("DescribeRouteTables", missing[0], "no such route table (aws.route_tables)")
    return {t: found[t] for t in table_ids}


def apply(ec2: Any, change: RouteChange) -> None:
    kwargs = {
        "RouteTableId": change.table_id,
        "DestinationCidrBlock": str(change.destination),
        "NetworkInterfaceId": change.eni_id,
    }
    if change.action == "create":
        _call("CreateRoute", change.table_id, ec2.create_route, **kwargs)
    else:
        _call("ReplaceRoute", change.table_id, ec2.replace_route, **kwargs)


@dataclass
class RouteClaim:
    """The last check, for status: what each table's route was made to do, or the error."""

    destination: str | None = None
    eni_id: str | None = None
    tables: dict[str, str] | None = None  # table id -> "ok" | "created" | "replaced"
    checked_at: float | None = None  # wall clock
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "eni_id": self.eni_id,
            "tables": dict(self.tables or {}),
            "checked_at": self.checked_at,
            "error": self.error,
        }


class RouteKeeper:
    """Keeps the listed tables' device-subnet route on this instance's ENI."""

    def __init__(
        self,
        table_ids: tuple[str, ...],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.table_ids = table_ids
        self.clock = clock
        self.wall = wall
        self.claim = RouteClaim()
        self._next_at = 0.0
        self._checked_for: tuple[str, str] | None = None

    def due(self, destination: IPv4Network, eni_id: str) -> bool:
        """A check is due: never made for this subnet and ENI, or its result is old enough."""
        return (str(destination), eni_id) != self._checked_for or self.clock() >= self._next_at

    def keep(self, ec2: Any, destination: IPv4Network, eni_id: str) -> list[RouteChange]:
        """Check the tables and change what is wrong. Raises AwsError (also kept for status)."""
        self.claim.destination, self.claim.eni_id = str(destination), eni_id
        try:
            seen = routes_seen(ec2, self.table_ids, destination)
            changes = decide(seen, destination, eni_id)
            for change in changes:
                log.info("aws.route_tables: %s", change.command())
                apply(ec2, change)
                log.info("aws.route_tables: %s", change.describe())
        except AwsError as exc:
            self.claim.error = str(exc)
            self.claim.checked_at = self.wall()
            self._checked_for = (str(destination), eni_id)
            self._next_at = self.clock() + RETRY_S
            raise
        done = {c.table_id: ("created" if c.action == "create" else "replaced") for c in changes}
        self.claim.tables = {t: done.get(t, "ok") for t in self.table_ids}
        self.claim.error = None
        self.claim.checked_at = self.wall()
        self._checked_for = (str(destination), eni_id)
        self._next_at = self.clock() + RECHECK_S
        return changes

    def fail(self, message: str) -> None:
        """The check could not be made (no ENI known yet): status says why."""
        self.claim.error = message
        self.claim.checked_at = self.wall()
