"""This gate peer's registration with the VPG: what the API says, turned into a `GateView`.

Reading never changes anything (`read_registration`, `fetch_gate_view`); the changes are
planned (`plan_registration`: open Gate, register, as `api_actions`) and made one by one
(`apply_api_action`). Registration is idempotent: when this host's outer address is already a
customer peer of the VPG, that registration is reused; the agent never registers twice.

Every field taken from an answer passes a check first (one function per check below). A field
that fails raises `AnswerRefused` with one printable line naming the field and the value; the
agent then keeps its last good view (a poisoned answer must never reach the kernel).
"""

from __future__ import annotations

import logging
import urllib.parse
from dataclasses import dataclass
from typing import Any

from gatepeer.api_actions import (
    ApiAction,
    OpenGate,
    RegisterGatePeer,
    SetRedirection,
)
from gatepeer.desired_state import (
    Endpoint,
    GateView,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    Redirection,
)
from gatepeer.soracom import SoracomClient, SoracomError, printable

log = logging.getLogger(__name__)


class GateError(RuntimeError):
    """The API answered, but with something this peer cannot work with."""


class AnswerRefused(GateError):
    """An API answer failed a check: nothing from it is used. `field` names the field."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)

    def within(self, vpg_id: str, operation: str) -> AnswerRefused:
        """The same refusal, saying which VPG and which answer."""
        return AnswerRefused(self.field, f"VPG {vpg_id}: {operation} answer refused: {self}")


DEFAULT_VNI = 10  # SORACOM's VNI when the VPG's answer has no gateVxlanId
MAX_VNI = 2**24 - 1
LIMITED_BROADCAST = IPv4Address("255.255.255.255")
# SORACOM's two coverages answer on different hosts; a VPG exists in only one of them.
COVERAGE_ENDPOINTS = {"api.soracom.io": "g.api.soracom.io", "g.api.soracom.io": "api.soracom.io"}


def shown(value: Any, limit: int = 60) -> str:
    """A value from an answer, for a message: its repr, printable, on one line, bounded."""
    return printable(repr(value), limit)


# ---- one check per field ---------------------------------------------------------------------


def check_vni(value: Any) -> int:
    """gateVxlanId: the spec types it as a number, so 10.0 is 10; absent means SORACOM's 10."""
    if value is None:
        return DEFAULT_VNI
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    # bool is an int to Python.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VNI:
        raise AnswerRefused(
            "gateVxlanId", f"gateVxlanId {shown(value)} is not a VXLAN id (1-{MAX_VNI})"
        )
    return value


def check_device_subnet(vpg: dict[str, Any]) -> IPv4Network:
    """deviceSubnetCidrRange, or ueSubnetCidrRange (the same range) when the first is absent."""
    absent = vpg.get("deviceSubnetCidrRange") is None
    name = "ueSubnetCidrRange" if absent else "deviceSubnetCidrRange"
    value = vpg.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        subnet = IPv4Network(value)
    except ValueError:
        raise AnswerRefused(
            name,
            f"{name} {shown(value)} is not an IPv4 prefix (neither deviceSubnetCidrRange nor "
            "ueSubnetCidrRange gives the device subnet)"
            if value is None
            else f"{name} {shown(value)} is not an IPv4 prefix",
        ) from None
    if subnet.prefixlen < 8 or subnet.prefixlen > 30:
        raise AnswerRefused(name, f"{name} {value} is not a device subnet (/8 to /30)")
    return subnet


def check_gate_opened(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise AnswerRefused("gateOpened", f"gateOpened {shown(value)} is not true or false")
    return value


def check_address(field: str, value: Any) -> IPv4Address:
    """An IPv4 address given as a string (an integer is not an address in this API)."""
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        return IPv4Address(value)
    except ValueError:
        raise AnswerRefused(field, f"{field} {shown(value)} is not an IPv4 address") from None


def check_inner(field: str, value: Any, subnet: IPv4Network) -> IPv4Address:
    address = check_address(field, value)
    if address not in subnet:
        raise AnswerRefused(field, f"{field} {address} is outside the device subnet {subnet}")
    if address in (subnet.network_address, subnet.broadcast_address):
        raise AnswerRefused(field, f"{field} {address} is not a host address of {subnet}")
    return address


def check_netmask(value: Any, subnet: IPv4Network) -> None:
    """A peer's netmask (dotted, a prefix length, or null) must be the device subnet's."""
    if value is None:
        return  # registerGatePeer answers a null netmask
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise AnswerRefused("netmask", f"netmask {shown(value)} is not a netmask")
    text = str(value).lstrip("/")
    try:
        prefix = IPv4Network(f"0.0.0.0/{text}").prefixlen
    except ValueError:
        raise AnswerRefused("netmask", f"netmask {shown(value)} is not a netmask") from None
    if prefix != subnet.prefixlen:
        raise AnswerRefused(
            "netmask", f"netmask {shown(value)} (/{prefix}) differs from the device subnet {subnet}"
        )


def check_endpoint_outer(value: Any, host: IPv4Address) -> IPv4Address:
    """A VPG endpoint's outer address: a unicast address that is not this host."""
    address = check_address("outerIpAddress", value)
    unusable = (
        "unspecified"
        if address.is_unspecified
        else "loopback"
        if address.is_loopback
        else "link-local"
        if address.is_link_local
        else "multicast"
        if address.is_multicast
        else "broadcast"
        if address == LIMITED_BROADCAST
        else "reserved"
        if address.is_reserved
        else "this host's own address"
        if address == host
        else None
    )
    if unusable:
        raise AnswerRefused(
            "outerIpAddress", f"VPG endpoint outerIpAddress {address} is {unusable}"
        )
    return address


def check_redirection(value: Any) -> Redirection | None:
    """The VPG's Junction redirection (JunctionRedirectionConfiguration), if any."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise AnswerRefused("redirection", f"redirection {shown(value)} is not an object")
    enabled = value.get("enabled", False)
    if not isinstance(enabled, bool):
        raise AnswerRefused(
            "redirection.enabled", f"redirection.enabled {shown(enabled)} is not true or false"
        )
    gateway = value.get("gateway")
    if gateway in (None, ""):
        return Redirection(enabled, None)
    return Redirection(enabled, check_address("redirection.gateway", gateway))


def check_owned_by_customer(row: dict[str, Any]) -> bool:
    value = row.get("ownedByCustomer")
    if not isinstance(value, bool):
        raise AnswerRefused(
            "ownedByCustomer",
            f"gate peer {shown(row.get('outerIpAddress'))}: ownedByCustomer {shown(value)} "
            "is not true or false",
        )
    return value


# ---- the VPG ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VpgFacts:
    """The checked fields of one getVirtualPrivateGateway answer."""

    gate_opened: bool
    device_subnet: IPv4Network
    vni: int
    redirection: Redirection | None


def read_vpg(client: SoracomClient, vpg_id: str) -> VpgFacts:
    try:
        vpg = client.get_virtual_private_gateway(vpg_id)
    except SoracomError as exc:
        if exc.status == 404:
            hint = coverage_hint(client.endpoint)
            raise SoracomError(exc.operation, exc.status, exc.message, exc.code, hint) from None
        raise
    try:
        return VpgFacts(
            gate_opened=check_gate_opened(vpg.get("gateOpened")),
            device_subnet=check_device_subnet(vpg),
            vni=check_vni(vpg.get("gateVxlanId")),
            redirection=check_redirection(vpg.get("redirection")),
        )
    except AnswerRefused as exc:
        raise exc.within(vpg_id, "getVirtualPrivateGateway") from None


def coverage_hint(endpoint: str) -> str:
    """A 404 for a VPG that exists is most often the other coverage's endpoint."""
    host = urllib.parse.urlsplit(endpoint).hostname or ""
    other = COVERAGE_ENDPOINTS.get(host)
    if other:
        return (
            f"if the VPG is in the other coverage, set soracom.endpoint = "
            f'"https://{other}" (now {endpoint})'
        )
    return (
        "check soracom.vpg_id, and that soracom.endpoint serves the VPG's coverage "
        "(https://api.soracom.io: Japan, https://g.api.soracom.io: global)"
    )


# ---- the gate peers ---------------------------------------------------------------------------


def find_own_peer(peers: list[dict[str, Any]], outer: IPv4Address) -> dict[str, Any] | None:
    for peer in peers:
        if peer.get("ownedByCustomer") is True and peer.get("outerIpAddress") == str(outer):
            return peer
    return None


def vpg_endpoints(
    peers: list[dict[str, Any]], subnet: IPv4Network, host: IPv4Address
) -> tuple[Endpoint, ...]:
    """The VPG's own tunnel endpoints (`ownedByCustomer: false`), every field checked."""
    found = []
    for peer in peers:
        if check_owned_by_customer(peer):
            continue
        outer = check_endpoint_outer(peer.get("outerIpAddress"), host)
        raw_inner = peer.get("innerIpAddress")
        inner = None if raw_inner is None else check_inner("innerIpAddress", raw_inner, subnet)
        check_netmask(peer.get("netmask"), subnet)
        found.append(Endpoint(outer, inner))
    return tuple(sorted(found, key=lambda e: e.outer))


@dataclass(frozen=True)
class VpgReading:
    """What the API says now about the VPG and its gate peers (reads only)."""

    vpg: VpgFacts
    peers: list[dict[str, Any]]


def read_registration(client: SoracomClient, vpg_id: str) -> VpgReading:
    return VpgReading(read_vpg(client, vpg_id), client.list_gate_peers(vpg_id))


def plan_registration(
    vpg_id: str,
    reading: VpgReading,
    outer: IPv4Address,
    *,
    open_gate: bool,
    inner_address: IPv4Address | None = None,
) -> list[ApiAction]:
    """The API changes that make this host a gate peer of an open Gate: openGate when Gate is
    closed (and soracom.open_gate allows it), registerGatePeer when `outer` is not registered.
    Pure; refuses what no change can fix."""
    actions: list[ApiAction] = []
    vpg = reading.vpg
    if not vpg.gate_opened:
        if not open_gate:
            raise GateError(
                f"Gate is closed on VPG {vpg_id}: open it, or set soracom.open_gate = true"
            )
        actions.append(OpenGate(vpg_id))
    subnet = vpg.device_subnet
    if inner_address is not None and inner_address not in subnet:
        raise GateError(
            f"tunnel.inner_address: {inner_address} is outside VPG {vpg_id}'s device subnet "
            f"{subnet}; pick an address inside it"
        )
    if find_own_peer(reading.peers, outer) is None:
        actions.append(RegisterGatePeer(vpg_id, outer, inner_address))
    return actions


def apply_api_action(
    client: SoracomClient, action: ApiAction, reading: VpgReading | None = None
) -> VpgReading | None:
    """Make the call `action` stands for; for the registration's actions, the reading that
    follows it (Gate open, this peer listed)."""
    vpg_id = action.vpg_id
    if isinstance(action, OpenGate):
        log.info("Gate is closed on VPG %s; opening it (soracom.open_gate = true)", vpg_id)
        client.open_gate(vpg_id)
        vpg = read_vpg(client, vpg_id)
        if not vpg.gate_opened:
            raise GateError(f"Gate is still closed on VPG {vpg_id} after openGate")
        return VpgReading(vpg, reading.peers if reading else client.list_gate_peers(vpg_id))
    if isinstance(action, RegisterGatePeer):
        log.info("registering %s as a gate peer of VPG %s", action.outer, vpg_id)
        inner = str(action.inner) if action.inner else None
        try:
            answer = client.register_gate_peer(vpg_id, str(action.outer), inner)
        except SoracomError as exc:
            # A concurrent registration (another run, a retried request) may have won the race.
            peers = client.list_gate_peers(vpg_id)
            if find_own_peer(peers, action.outer) is None:
                raise exc from None
        else:
            peers = client.list_gate_peers(vpg_id)
            if find_own_peer(peers, action.outer) is None:
                peers = [*peers, answer]  # a listing that lags behind: the answer stands in
        vpg = reading.vpg if reading else read_vpg(client, vpg_id)
        return VpgReading(vpg, peers)
    if isinstance(action, SetRedirection):
        assert action.gateway is not None, "planned with the inner address unknown"
        client.set_redirection(vpg_id, str(action.gateway))
        return reading
    client.unset_redirection(vpg_id)
    return reading


def gate_view(
    vpg_id: str,
    reading: VpgReading,
    outer: IPv4Address,
    inner_address: IPv4Address | None = None,
    *,
    placeholder: bool = False,
) -> GateView:
    """The view of a registered peer, every field checked. `placeholder` (a dry run before
    registering): the inner address is the one asked for, or the subnet's first, until the
    API assigns one."""
    vpg, peers = reading.vpg, reading.peers
    subnet = vpg.device_subnet
    own = find_own_peer(peers, outer)
    assumed = placeholder and own is None  # not registered yet: a dry run plans on
    try:
        if assumed:
            inner = inner_address or subnet.network_address
        elif own is None:
            raise GateError(
                f"VPG {vpg_id}: {outer} is not registered; run gatepeer apply to register it"
            )
        else:
            inner = check_inner("innerIpAddress", own.get("innerIpAddress"), subnet)
            check_netmask(own.get("netmask"), subnet)
        endpoints = vpg_endpoints(peers, subnet, outer)
    except AnswerRefused as exc:
        raise exc.within(vpg_id, "listGatePeers") from None
    if inner_address is not None and inner != inner_address:
        raise GateError(
            f"tunnel.inner_address: {outer} is registered with VPG {vpg_id} with inner address "
            f'{inner}, not {inner_address}; set tunnel.inner_address = "{inner}", or '
            "unregister it (gatepeer down --unregister) to register again"
        )
    if not assumed and not endpoints:
        raise GateError(
            f"VPG {vpg_id}: the API lists no VPG tunnel endpoints; check the VPG's state in "
            "the SORACOM console (it may still be starting)"
        )
    return GateView(
        vpg_id=vpg_id,
        vni=vpg.vni,
        device_subnet=subnet,
        gate_opened=vpg.gate_opened,
        # Always the device subnet's prefix: check_netmask refused any other.
        inner=IPv4Interface(f"{inner}/{subnet.prefixlen}"),
        endpoints=endpoints,
        outer=outer,
        redirection=vpg.redirection,
    )


def fetch_gate_view(
    client: SoracomClient, vpg_id: str, outer: IPv4Address, inner_address: IPv4Address | None = None
) -> GateView:
    """The VPG as the API has it now, for a peer already registered on an open Gate. Reads
    only: `converge_registration` (or the agent's plan) makes the changes."""
    reading = read_registration(client, vpg_id)
    plan_registration(vpg_id, reading, outer, open_gate=False, inner_address=inner_address)
    return gate_view(vpg_id, reading, outer, inner_address)


def converge_registration(
    client: SoracomClient,
    vpg_id: str,
    outer: IPv4Address,
    *,
    open_gate: bool,
    inner_address: IPv4Address | None = None,
) -> GateView:
    """Plan the registration's API changes, make them, and return the view that follows."""
    reading = read_registration(client, vpg_id)
    for action in plan_registration(
        vpg_id, reading, outer, open_gate=open_gate, inner_address=inner_address
    ):
        log.info("apply: %s", action.command())
        reading = apply_api_action(client, action, reading) or reading
    return gate_view(vpg_id, reading, outer, inner_address)
