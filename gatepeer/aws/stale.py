"""`[aws] remove_stale_registrations`: a replaced instance's gate peer registration goes away.

An Auto Scaling replacement registers its own, new VPC address; the old instance's
registration stays on the VPG (nobody ran `gatepeer down --unregister` on a terminated
instance), and the VPG keeps sending the old inner address's traffic to an address nobody
holds. At start and after each registration, a customer-owned registration of this VPG is
unregistered when its outer address is inside this VPC's CIDR blocks and no network interface
in the VPC holds it (DescribeNetworkInterfaces by private address). A registration whose
address still has an interface (another peer, a peer being started) and one outside the VPC
(another VPC, on-premises) are never touched.

`stale_addresses` is pure; `sweep` does the calls.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Protocol

from gatepeer.aws import AwsError
from gatepeer.aws.ec2 import _call

log = logging.getLogger(__name__)


class GatePeers(Protocol):
    def list_gate_peers(self, vpg_id: str) -> list[dict[str, Any]]: ...

    def unregister_gate_peer(self, vpg_id: str, outer_ip: str) -> None: ...


def candidates(
    peers: Iterable[dict[str, Any]], own: IPv4Address, vpc_cidrs: Iterable[IPv4Network]
) -> list[IPv4Address]:
    """Customer-owned registrations other than this peer's whose outer address is in the VPC:
    the ones whose interface must be looked up."""
    nets = tuple(vpc_cidrs)
    found = set()
    for peer in peers:
        if peer.get("ownedByCustomer") is not True:
            continue  # the VPG's own endpoints
        try:
            outer = IPv4Address(str(peer.get("outerIpAddress")))
        except ValueError:
            continue
        if outer != own and any(outer in net for net in nets):
            found.add(outer)
    return sorted(found)


def stale_addresses(
    candidates: Iterable[IPv4Address], held: Iterable[IPv4Address]
) -> list[IPv4Address]:
    """The candidates no network interface in the VPC holds."""
    kept = set(held)
    return [a for a in candidates if a not in kept]


def held_addresses(ec2: Any, vpc_id: str, addresses: list[IPv4Address]) -> set[IPv4Address]:
    """Which of `addresses` a network interface in the VPC holds (primary or secondary)."""
    answer = _call(
        "DescribeNetworkInterfaces",
        f"{len(addresses)} address(es) in {vpc_id}",
        ec2.describe_network_interfaces,
        Filters=[
            {"Name": "vpc-id", "Values": [vpc_id]},
            {"Name": "addresses.private-ip-address", "Values": [str(a) for a in addresses]},
        ],
    )
    held = set()
    for eni in answer.get("NetworkInterfaces", []):
        for item in eni.get("PrivateIpAddresses", []) or [
            {"PrivateIpAddress": eni.get("PrivateIpAddress")}
        ]:
            try:
                held.add(IPv4Address(str(item.get("PrivateIpAddress"))))
            except ValueError:
                continue
    return held


@dataclass
class Sweep:
    """The last sweep, for status."""

    removed: list[str] = field(default_factory=list)
    checked_at: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"removed": list(self.removed), "checked_at": self.checked_at, "error": self.error}


def sweep(
    api: GatePeers,
    ec2: Any,
    vpg_id: str,
    own: IPv4Address,
    vpc_id: str,
    vpc_cidrs: tuple[IPv4Network, ...],
) -> list[IPv4Address]:
    """Unregister this VPG's stale registrations; the addresses removed. SORACOM errors
    (gatepeer.soracom.SoracomError) and AWS errors propagate; nothing is removed unless EC2
    answered for every candidate."""
    if not vpc_cidrs:
        raise AwsError(
            "aws.remove_stale_registrations: the VPC's CIDR blocks are unknown (IMDS lists no "
            "vpc-ipv4-cidr-blocks), so no registration can be judged"
        )
    found = candidates(api.list_gate_peers(vpg_id), own, vpc_cidrs)
    if not found:
        return []
    stale = stale_addresses(found, held_addresses(ec2, vpc_id, found))
    for address in stale:
        log.warning(
            "aws.remove_stale_registrations: unregistering %s from VPG %s: inside VPC %s, but "
            "no network interface holds it (a replaced instance)",
            address,
            vpg_id,
            vpc_id,
        )
        api.unregister_gate_peer(vpg_id, str(address))
    return stale
