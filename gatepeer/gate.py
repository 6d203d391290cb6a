"""What the SORACOM API says about this gate peer, turned into a `GateView`.

Registration is idempotent: when this host's outer address is already a customer peer of the
VPG, that registration is reused; the agent never registers twice.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from gatepeer.soracom import SoracomClient, SoracomError
from gatepeer.state import Endpoint, GateView, IPv4Address, IPv4Interface, IPv4Network

log = logging.getLogger(__name__)


class GateError(RuntimeError):
    """The API answered, but with something this peer cannot work with."""


DEFAULT_VNI = 10  # SORACOM's VNI when the VPG's answer has no gateVxlanId
MAX_VNI = 2**24 - 1


def _vni(vpg_id: str, value: Any) -> int:
    if value is None:
        return DEFAULT_VNI
    # bool is an int to Python, and a float VNI means the answer is not what we think it is.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VNI:
        raise GateError(f"VPG {vpg_id}: gateVxlanId {value!r} is not a VXLAN id (0-{MAX_VNI})")
    return value


def _prefix_from_netmask(netmask: Any) -> int | None:
    """'255.128.0.0' -> 9; None or junk -> None (register answers with a null netmask)."""
    if not isinstance(netmask, str) or not netmask:
        return None
    try:
        return IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        return None


def _address(value: Any) -> IPv4Address | None:
    try:
        return IPv4Address(value)
    except (ipaddress.AddressValueError, ValueError):
        return None


def find_own_peer(peers: list[dict[str, Any]], outer: IPv4Address) -> dict[str, Any] | None:
    for peer in peers:
        if peer.get("ownedByCustomer") and _address(peer.get("outerIpAddress")) == outer:
            return peer
    return None


def vpg_endpoints(peers: list[dict[str, Any]]) -> tuple[Endpoint, ...]:
    found = []
    for peer in peers:
        if peer.get("ownedByCustomer") is False:
            outer = _address(peer.get("outerIpAddress"))
            if outer is not None:
                found.append(Endpoint(outer, _address(peer.get("innerIpAddress"))))
    return tuple(sorted(found, key=lambda e: e.outer))


def fetch_gate_view(
    client: SoracomClient, vpg_id: str, outer: IPv4Address, *, open_gate: bool
) -> GateView:
    vpg = client.get_virtual_private_gateway(vpg_id)
    if not vpg.get("gateOpened"):
        if not open_gate:
            raise GateError(
                f"Gate is closed on VPG {vpg_id}: open it, or set soracom.open_gate = true"
            )
        log.info("Gate is closed on VPG %s; opening it (soracom.open_gate = true)", vpg_id)
        client.open_gate(vpg_id)
        vpg = client.get_virtual_private_gateway(vpg_id)
        if not vpg.get("gateOpened"):
            raise GateError(f"Gate is still closed on VPG {vpg_id} after openGate")
    cidr = vpg.get("deviceSubnetCidrRange")
    try:
        if not isinstance(cidr, str):
            raise ValueError(cidr)
        subnet = IPv4Network(cidr)
    except ValueError:
        raise GateError(
            f"VPG {vpg_id}: no usable deviceSubnetCidrRange in the API answer (got {cidr!r})"
        ) from None
    vni = _vni(vpg_id, vpg.get("gateVxlanId"))
    peers = client.list_gate_peers(vpg_id)
    own = find_own_peer(peers, outer)
    if own is None:
        log.info("registering %s as a gate peer of VPG %s", outer, vpg_id)
        try:
            own = client.register_gate_peer(vpg_id, str(outer))
        except SoracomError as exc:
            # A concurrent registration (another run, a retried request) may have won the race.
            peers = client.list_gate_peers(vpg_id)
            own = find_own_peer(peers, outer)
            if own is None:
                raise exc from None
        else:
            peers = client.list_gate_peers(vpg_id)
            own = find_own_peer(peers, outer) or own
    inner = _address(own.get("innerIpAddress"))
    if inner is None:
        raise GateError(f"VPG {vpg_id}: the registration of {outer} has no inner address")
    prefix = _prefix_from_netmask(own.get("netmask")) or subnet.prefixlen
    endpoints = vpg_endpoints(peers)
    if not endpoints:
        raise GateError(f"VPG {vpg_id}: the API lists no VPG tunnel endpoints")
    return GateView(
        vpg_id=vpg_id,
        vni=vni,
        device_subnet=subnet,
        gate_opened=True,
        inner=IPv4Interface(f"{inner}/{prefix}"),
        endpoints=endpoints,
        outer=outer,
    )
