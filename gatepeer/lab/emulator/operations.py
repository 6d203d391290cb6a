"""The SORACOM API operations the emulator implements: routes, statuses and handlers."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import logging
import re
import secrets
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, cast

from gatepeer.lab.emulator.model import (
    DEFAULT_PAGE_SIZE,
    E_AUTH_FAILED,
    E_BAD_REQUEST,
    E_NO_FREE_ADDRESS,
    E_NO_SUCH_PEER,
    E_PEER_EXISTS,
    MAX_TOKEN_TIMEOUT_S,
    MAX_VNI,
    BadRequest,
    EmulatorSettings,
    Overrides,
    Peer,
    PeersCallback,
    RedirectionCallback,
    Response,
    Sim,
    Token,
    VpgCallback,
    check_inner,
    now_ms,
    require_int,
    require_ipv4,
)
from gatepeer.lab.emulator.requests import bad_request_on_value_error

log = logging.getLogger("gatepeer.lab.emulator")  # one logger for the whole emulator


class Route(NamedTuple):
    method: str
    pattern: re.Pattern[str]
    operation: str


_VPG = r"/v1/virtual_private_gateways/(?P<vpg_id>[^/]+)"
ROUTES = tuple(
    Route(method, re.compile(pattern + r"\Z"), operation)
    for method, pattern, operation in (
        ("POST", r"/v1/auth", "auth"),
        ("POST", r"/v1/operators/(?P<operator_id>[^/]+)/token", "generateAuthToken"),
        ("GET", _VPG, "getVirtualPrivateGateway"),
        ("GET", _VPG + r"/gate/peers", "listGatePeers"),
        ("POST", _VPG + r"/gate/peers", "registerGatePeer"),
        ("DELETE", _VPG + r"/gate/peers/(?P<outer_ip_address>[^/]+)", "unregisterGatePeer"),
        ("POST", _VPG + r"/gate/open", "openGate"),
        ("POST", _VPG + r"/gate/close", "closeGate"),
        ("POST", _VPG + r"/gate/set_vxlan_id", "setVirtualPrivateGatewayVxLanId"),
        ("POST", _VPG + r"/junction/set_redirection", "setRedirectionConfiguration"),
        ("POST", _VPG + r"/junction/unset_redirection", "unsetRedirectionConfiguration"),
        ("GET", r"/v1/sims", "listSims"),
        ("GET", _VPG + r"/ip_address_map", "listVirtualPrivateGatewayIpAddressMapEntries"),
    )
)

# Statuses each operation can answer besides injected faults (429, fail_status) and 401 for
# a missing or bad key/token; the contract tests check they cover all of them.
OPERATION_STATUSES: dict[str, frozenset[int]] = {
    "auth": frozenset({200, 400, 401}),
    "generateAuthToken": frozenset({200, 400, 401}),
    "getVirtualPrivateGateway": frozenset({200, 404}),
    "listGatePeers": frozenset({200, 404}),
    "registerGatePeer": frozenset({200, 400, 404}),
    "unregisterGatePeer": frozenset({204, 400, 404}),
    "openGate": frozenset({200, 400, 404}),
    "closeGate": frozenset({200, 404}),
    "setVirtualPrivateGatewayVxLanId": frozenset({204, 400, 404}),
    "setRedirectionConfiguration": frozenset({200, 400, 404}),
    "unsetRedirectionConfiguration": frozenset({200, 404}),
    # 400: a limit that is not a positive integer, or a last_evaluated_key no page ended with.
    "listSims": frozenset({200, 400}),
    "listVirtualPrivateGatewayIpAddressMapEntries": frozenset({200, 400, 404}),
}

Handler = Callable[[dict[str, str], Mapping[str, str], dict[str, Any]], Response]


class Operations:
    """The API's operations on the emulated operator's state: one method per operationId, and
    the state changes with their callbacks. `Emulator` holds the state and serves them."""

    _settings: EmulatorSettings
    _lock: threading.Lock
    _notify_lock: threading.RLock
    _clock: Callable[[], float]
    _peers: dict[str, str]  # outer -> inner, in registration order
    _redirection: dict[str, Any] | None
    _sims: dict[str, Sim]  # sim_id -> SIM
    _tokens: dict[str, Token]
    _created_ms: int
    _modified_ms: int
    _on_peers_changed: PeersCallback | None
    _on_vpg_changed: VpgCallback | None
    _on_redirection_changed: RedirectionCallback | None
    _overrides: Overrides

    @property
    def settings(self) -> EmulatorSettings:
        with self._lock:
            return self._settings

    def _error(self, settings: EmulatorSettings, status: int, code: str, message: str) -> Response:
        err = {"code": code, "message": message}
        body: dict[str, Any] = (
            {"errorMessage": err, "httpStatus": status} if settings.wrapped_errors else err
        )
        return Response(status, body)

    def _mutate(self, change: Callable[[], Any]) -> Any:
        """Run change() under the state lock, then fire callbacks for what it changed."""
        with self._notify_lock:
            with self._lock:
                peers_before, vpg_before = self._peer_list(), self._vpg_key()
                redirection_before = copy.deepcopy(self._redirection)
                result = change()
                peers_after, vpg_after = self._peer_list(), self._vpg_key()
                redirection_after = copy.deepcopy(self._redirection)
                settings = self._settings
            if peers_after != peers_before and self._on_peers_changed is not None:
                try:
                    self._on_peers_changed(peers_after)
                except Exception:
                    log.exception("on_peers_changed failed")
            if vpg_after != vpg_before and self._on_vpg_changed is not None:
                try:
                    self._on_vpg_changed(settings)
                except Exception:
                    log.exception("on_vpg_changed failed")
            changed = redirection_after != redirection_before
            if changed and self._on_redirection_changed is not None:
                try:
                    self._on_redirection_changed(redirection_after)
                except Exception:
                    log.exception("on_redirection_changed failed")
        return result

    def _peer_list(self) -> list[Peer]:
        return [Peer(o, i) for o, i in self._peers.items()]

    def _vpg_key(self) -> tuple[object, ...]:
        s = self._settings
        return (s.vxlan_id, s.device_subnet, s.endpoints, s.gate_opened)

    def _vpg_answer(self) -> dict[str, Any]:
        """The VPG as the API answers it: the true document with the overrides applied."""
        return self._overrides.apply_to_vpg(self._vpg_body())

    def _vpg_body(self) -> dict[str, Any]:
        """The VirtualPrivateGateway document; caller holds the lock."""
        s = self._settings
        vpg: dict[str, Any] = {
            "vpgId": s.vpg_id,
            "operatorId": s.operator_id,
            "type": s.vpg_type,
            "status": s.vpg_status,
            "tags": {"name": s.vpg_name},
            "createdTime": self._created_ms,
            "lastModifiedTime": self._modified_ms,
            "deviceSubnetCidrRange": s.device_subnet,
            # The spec describes both as the device subnet; the real API sends both.
            "ueSubnetCidrRange": s.device_subnet,
            "gateOpened": s.gate_opened,
            "gateVxlanId": s.vxlan_id,
            "gatePrivacySeparatorEnabled": s.privacy_separator_enabled,
            "useInternetGateway": s.use_internet_gateway,
            "junctionEnabled": bool(self._redirection and self._redirection.get("enabled")),
            "allowedOperators": [],
            "customerRoutes": {},
            "vpcPeeringConnections": {},
            "virtualInterfaces": {},
            "vpnConnections": {},
            "fixedIpAddressesEnabled": False,
            "fixedPublicIpAddresses": [],
        }
        if self._redirection is not None:
            vpg["redirection"] = dict(self._redirection)
        return vpg

    # ----- operations --------------------------------------------------------------------

    def _op_auth(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        settings = self.settings
        if "authKeyId" not in req or "authKey" not in req:
            # Email/password and SAM user logins exist in the real API; the lab has only keys.
            return self._error(
                settings, 401, E_AUTH_FAILED, "Authentication failed: use authKeyId and authKey"
            )
        lifetime = self._token_lifetime(settings, req)
        key_ok = secrets.compare_digest(str(req["authKeyId"]), settings.auth_key_id)
        secret_ok = secrets.compare_digest(str(req["authKey"]), settings.auth_key)
        if not (key_ok and secret_ok):
            return self._error(settings, 401, E_AUTH_FAILED, "Authentication failed")
        api_key = f"api-{uuid.uuid4()}"
        token = self._issue_token(api_key, settings.operator_id, lifetime)
        return Response(
            200, {"apiKey": api_key, "operatorId": settings.operator_id, "token": token}
        )

    def _op_generate_token(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        settings = self.settings
        lifetime = self._token_lifetime(settings, req)
        token = self._issue_token(headers["x-soracom-api-key"], params["operator_id"], lifetime)
        return Response(200, {"token": token})

    @staticmethod
    def _token_lifetime(settings: EmulatorSettings, req: Mapping[str, Any]) -> float:
        # token_lifetime_s is the lifetime when the request names none, and a cap when it
        # does, so a test that shortens it also shortens tokens a client asks to be long.
        asked = req.get("tokenTimeoutSeconds")
        if asked is None:
            return settings.token_lifetime_s
        if asked < 1 or asked > MAX_TOKEN_TIMEOUT_S:
            raise BadRequest(f"tokenTimeoutSeconds must be between 1 and {MAX_TOKEN_TIMEOUT_S}")
        return min(float(asked), settings.token_lifetime_s)

    def _issue_token(self, api_key: str, operator_id: str, lifetime: float) -> str:
        token = secrets.token_urlsafe(96)
        with self._lock:
            now = self._clock()
            # Forget long-expired tokens so a long lab run does not grow without bound; a
            # recently expired one stays to answer "expired" rather than "invalid".
            for t in [t for t, v in self._tokens.items() if v.expires_at < now - 3600]:
                del self._tokens[t]
            self._tokens[token] = Token(api_key, operator_id, now + lifetime)
        return token

    def _op_get_vpg(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        with self._lock:
            return Response(200, self._vpg_answer())

    def _op_list_peers(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        with self._lock:
            s = self._settings
            mask = s.netmask
            rows = [_peer_json(e, mask, customer=False) for e in s.endpoints]
            rows += [_peer_json(p, mask, customer=True) for p in self._peer_list()]
            rows = [self._overrides.apply_to_peer(row) for row in rows]
        return Response(200, rows)

    def _op_register_peer(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        try:
            outer = str(require_ipv4("outerIpAddress", req["outerIpAddress"]))
            inner_req = req.get("innerIpAddress")
            inner = None if inner_req is None else str(require_ipv4("innerIpAddress", inner_req))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

        def change() -> Response:
            s = self._settings
            used_outer = set(self._peers) | {e.outer_ip for e in s.endpoints}
            used_inner = set(self._peers.values()) | {e.inner_ip for e in s.endpoints}
            if outer in used_outer:
                return self._error(s, 400, E_PEER_EXISTS, f"Gate peer {outer} already exists")
            if inner is None:
                picked = _free_lower_half(s.network, used_inner)
                if picked is None:
                    return self._error(
                        s, 400, E_NO_FREE_ADDRESS, "No free address in the device subnet"
                    )
                chosen = picked
            else:
                try:
                    check_inner(s.network, inner)
                except ValueError as exc:
                    return self._error(s, 400, E_BAD_REQUEST, str(exc))
                if inner in used_inner:
                    return self._error(s, 400, E_PEER_EXISTS, f"Inner address {inner} is in use")
                chosen = inner
            self._peers[outer] = chosen
            # SORACOM answers the new peer with a null netmask; listGatePeers has it dotted.
            answer = {
                "outerIpAddress": outer,
                "innerIpAddress": chosen,
                "netmask": None,
                "ownedByCustomer": True,
            }
            return Response(200, self._overrides.apply_to_peer(answer))

        return cast(Response, self._mutate(change))

    def _op_unregister_peer(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        outer = params["outer_ip_address"]

        def change() -> Response:
            s = self._settings
            if outer in {e.outer_ip for e in s.endpoints}:
                return self._error(s, 400, E_BAD_REQUEST, "A VPG endpoint cannot be unregistered")
            if self._peers.pop(outer, None) is None:
                return self._error(s, 404, E_NO_SUCH_PEER, f"No such gate peer: {outer}")
            return Response(204)

        return cast(Response, self._mutate(change))

    def _op_open_gate(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        # The body is optional (OpenGateRequest); a VNI in it reconfigures the gate.
        changes: dict[str, Any] = {"gate_opened": True}
        if "vxlanId" in req:
            changes["vxlan_id"] = bad_request_on_value_error(
                require_int, "vxlanId", req["vxlanId"], 1, MAX_VNI
            )
        if "privacySeparatorEnabled" in req:
            changes["privacy_separator_enabled"] = req["privacySeparatorEnabled"]
        return self._change_vpg(changes, 200)

    def _op_close_gate(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        return self._change_vpg({"gate_opened": False}, 200)

    def _op_set_vxlan_id(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        vni = bad_request_on_value_error(require_int, "vxlanId", req["vxlanId"], 1, MAX_VNI)
        return self._change_vpg({"vxlan_id": vni}, 204)

    def _change_vpg(self, changes: dict[str, Any], status: int) -> Response:
        def change() -> Response:
            self._settings = dataclasses.replace(self._settings, **changes)
            self._modified_ms = now_ms()
            # The spec gives no body for openGate/closeGate; the real API answers the VPG.
            return Response(status, self._vpg_answer() if status == 200 else None)

        return cast(Response, self._mutate(change))

    def _op_set_redirection(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        if "gateway" in req:
            bad_request_on_value_error(require_ipv4, "gateway", req["gateway"])
        config = dict(req)  # the fields the spec declares; parse_request refused any other

        def change() -> Response:
            self._redirection = config
            self._modified_ms = now_ms()
            return Response(200, self._vpg_answer())

        return cast(Response, self._mutate(change))

    def _op_unset_redirection(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        def change() -> Response:
            self._redirection = None
            self._modified_ms = now_ms()
            return Response(200, self._vpg_answer())

        return cast(Response, self._mutate(change))

    def _op_list_sims(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        with self._lock:
            s = self._settings
            sims = sorted(self._sims.values(), key=lambda sim: sim.sim_id)
            rows = [(sim.sim_id, _sim_json(sim, s.operator_id, self._created_ms)) for sim in sims]
        return _page(rows, params)

    def _op_list_ip_address_map(
        self, params: dict[str, str], headers: Mapping[str, str], req: dict[str, Any]
    ) -> Response:
        with self._lock:
            s = self._settings
            entries = _ip_address_map(
                s, self._sims.values(), self._peers.values(), self._modified_ms
            )
        # Ordered by address, as the key of the next page is "the last IP address retrieved".
        rows = sorted(
            ((e["ipAddress"], e) for e in entries), key=lambda r: ipaddress.IPv4Address(r[0])
        )
        return _page(rows, params)


def _page(rows: list[tuple[str, dict[str, Any]]], params: Mapping[str, str]) -> Response:
    """One page of `rows` (key, row), sorted by key: the rows after `last_evaluated_key`, at
    most `limit`, and `x-soracom-next-key` (the last row's key) when more remain."""
    limit_text = params.get("limit")
    limit = DEFAULT_PAGE_SIZE
    if limit_text is not None:
        if not limit_text.isascii() or not limit_text.isdigit() or int(limit_text) < 1:
            raise BadRequest(f"limit must be a positive integer, got {limit_text!r}")
        limit = int(limit_text)
    after = params.get("last_evaluated_key")
    start = 0
    if after is not None:
        keys = [key for key, _ in rows]
        if after not in keys:
            raise BadRequest(f"last_evaluated_key {after!r} ends no page")
        start = keys.index(after) + 1
    page = rows[start : start + limit]
    headers: dict[str, str] = {}
    if start + limit < len(rows):
        headers["X-Soracom-Next-Key"] = page[-1][0]
    return Response(200, [row for _, row in page], headers)


def _sim_json(sim: Sim, operator_id: str, created_ms: int) -> dict[str, Any]:
    """The Sim document as listSims answers it: the SIM id doubles as the ICCID."""
    doc: dict[str, Any] = {
        "simId": sim.sim_id,
        "operatorId": operator_id,
        "status": "active",
        "type": "uicc",
        "speedClass": "s1.standard",
        "tags": {"name": sim.name} if sim.name is not None else {},
        "createdTime": created_ms,
        "lastModifiedTime": created_ms,
        "activeProfileId": sim.sim_id,
        "profiles": {
            sim.sim_id: {
                "iccid": sim.sim_id,
                "primaryImsi": sim.imsi,
                "subscribers": {
                    sim.imsi: {"imsi": sim.imsi, "status": "active", "subscription": "plan01s"}
                },
            }
        },
        "sessionStatus": {
            "online": sim.online,
            "imsi": sim.imsi,
            "subscription": "plan01s",
            "lastUpdatedAt": created_ms,
        },
    }
    if sim.group_id is not None:
        doc["groupId"] = sim.group_id
    if sim.address is not None:
        doc["sessionStatus"]["ueIpAddress"] = sim.address
    if sim.vpg_id is not None:
        doc["sessionStatus"]["vpgId"] = sim.vpg_id
    return doc


def _ip_address_map(
    settings: EmulatorSettings, sims: Iterable[Sim], peer_inners: Iterable[str], updated_ms: int
) -> list[dict[str, Any]]:
    """The VPG's IP address map: SIMs' static entries, the addresses it gave SIMs now in session
    (dynamic), customer gate peers and its own endpoints, as the spec's warning describes."""

    def entry(address: str, key: str, kind: str) -> dict[str, Any]:
        return {
            "ipAddress": address,
            "key": key,
            "hostId": key,
            "type": kind,
            "lastUpdatedAt": updated_ms,
        }

    entries = []
    for sim in sims:
        if sim.static_address is not None:
            entries.append(entry(sim.static_address, sim.imsi, "static"))
        elif sim.online and sim.vpg_id == settings.vpg_id and sim.address is not None:
            entries.append(entry(sim.address, sim.imsi, "dynamic"))
    entries += [entry(inner, inner, "customerGatePeer") for inner in peer_inners]
    entries += [entry(e.inner_ip, e.inner_ip, "gatePeer") for e in settings.endpoints]
    return entries


def _peer_json(peer: Peer, netmask: str, *, customer: bool) -> dict[str, Any]:
    return {
        "outerIpAddress": peer.outer_ip,
        "innerIpAddress": peer.inner_ip,
        "netmask": netmask,
        "ownedByCustomer": customer,
    }


def _free_lower_half(net: ipaddress.IPv4Network, used: Iterable[str]) -> str | None:
    """First free host address in the lower half of net (the lab puts devices in the upper)."""
    taken = {int(ipaddress.IPv4Address(a)) for a in used}
    first = int(net.network_address) + 1
    end = int(net.network_address) + net.num_addresses // 2  # exclusive
    for candidate in range(first, end):
        if candidate not in taken:
            return str(ipaddress.IPv4Address(candidate))
    return None
