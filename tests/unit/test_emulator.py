"""Behaviour of the SORACOM API emulator: auth, gate peers, settings, faults, serving.

Loopback only (127.0.0.1), no root. Token expiry runs on a settable clock, not on sleeps.
The shapes of the answers are checked against the spec in test_emulator_contract.py.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from helpers.http_client import Reply, send

from gatepeer.lab.emulator.model import EmulatorSettings, Peer
from gatepeer.lab.emulator.service import Emulator

AUTH_KEY = "secret-behaviour-test-key-0123456789"
SETTINGS = EmulatorSettings(auth_key=AUTH_KEY)
VPG = f"/v1/virtual_private_gateways/{SETTINGS.vpg_id}"
TOKEN_PATH = f"/v1/operators/{SETTINGS.operator_id}/token"
GOOD_LOGIN = {"authKeyId": SETTINGS.auth_key_id, "authKey": AUTH_KEY}


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Lab:
    emu: Emulator
    url: str
    clock: FakeClock
    peer_events: list[list[Peer]] = field(default_factory=list)
    vpg_events: list[EmulatorSettings] = field(default_factory=list)

    def login(self, **extra: Any) -> dict[str, str]:
        reply = send(self.url, "POST", "/v1/auth", {**GOOD_LOGIN, **extra})
        assert reply.status == 200, reply.raw
        return {"X-Soracom-API-Key": reply.json["apiKey"], "X-Soracom-Token": reply.json["token"]}

    def call(self, method: str, path: str, body: Any = None, auth: Any = None) -> Reply:
        return send(self.url, method, path, body, auth)

    def control(self, name: str, body: Any = None) -> Reply:
        return send(self.url, "POST", f"/_emulator/{name}", body)


def make_lab(settings: EmulatorSettings = SETTINGS) -> Lab:
    clock = FakeClock()
    peer_events: list[list[Peer]] = []
    vpg_events: list[EmulatorSettings] = []
    emu = Emulator(settings, peer_events.append, on_vpg_changed=vpg_events.append, clock=clock)
    return Lab(emu, emu.start(), clock, peer_events, vpg_events)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = make_lab()
    try:
        yield lab
    finally:
        lab.emu.stop()


@pytest.fixture
def auth(lab: Lab) -> dict[str, str]:
    return lab.login()


def error_of(reply: Reply) -> dict[str, Any]:
    body = reply.json
    assert set(body) == {"code", "message"}, body
    assert body["code"] and body["message"]
    return dict(body)


# ----- settings --------------------------------------------------------------------------


def test_default_settings() -> None:
    s = EmulatorSettings()
    assert s.vxlan_id == 10
    assert s.device_subnet == "198.19.0.0/16"
    assert s.endpoints == (Peer("198.18.1.11", "198.19.0.1"), Peer("198.18.1.12", "198.19.0.2"))
    assert s.gate_opened is True
    assert s.token_lifetime_s == 86400
    assert s.netmask == "255.255.0.0"
    assert s.auth_key != EmulatorSettings().auth_key  # random per instance, never a constant


def test_settings_repr_and_public_dict_hide_the_key() -> None:
    assert AUTH_KEY not in repr(SETTINGS)
    assert AUTH_KEY not in json.dumps(SETTINGS.public_dict())
    assert "auth_key" not in SETTINGS.public_dict()


def test_settings_accept_plain_pairs_and_normalise() -> None:
    # Lists come from JSON and the command line; the field is typed as what it holds.
    pairs: Any = [("198.18.1.21", "198.19.0.5"), "198.18.1.22=198.19.0.6"]
    s = EmulatorSettings(endpoints=pairs)
    assert s.endpoints == (Peer("198.18.1.21", "198.19.0.5"), Peer("198.18.1.22", "198.19.0.6"))


@pytest.mark.parametrize(
    "bad",
    [
        {"vxlan_id": 0},
        {"vxlan_id": 16777216},
        {"vxlan_id": True},
        {"device_subnet": "198.19.0.1/16"},  # host bits set
        {"device_subnet": "2001:db8::/64"},
        {"device_subnet": "198.19.0.0/31"},
        {"endpoints": [("198.18.1.11", "198.20.0.1")]},  # inner outside the subnet
        {"endpoints": [("198.18.1.11", "198.19.0.0")]},  # the network address
        {"endpoints": [("198.18.1.11", "198.19.0.1"), ("198.18.1.11", "198.19.0.2")]},
        {"endpoints": [("not-an-ip", "198.19.0.1")]},
        {"token_lifetime_s": 0},
        {"vpg_type": 99},
        {"vpg_status": "terminated"},
        {"gate_opened": "yes"},
    ],
)
def test_settings_refuse_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        EmulatorSettings(**bad)


# ----- auth and tokens -------------------------------------------------------------------


def test_auth_answers_key_token_and_operator(lab: Lab) -> None:
    reply = lab.call("POST", "/v1/auth", GOOD_LOGIN)
    assert reply.status == 200
    body = reply.json
    assert set(body) == {"apiKey", "operatorId", "token"}  # userName only for SAM users
    assert body["operatorId"] == SETTINGS.operator_id
    assert body["apiKey"].startswith("api-")
    assert len(body["token"]) >= 64


@pytest.mark.parametrize(
    "login",
    [
        {"authKeyId": SETTINGS.auth_key_id, "authKey": AUTH_KEY + "x"},
        {"authKeyId": "keyId-other", "authKey": AUTH_KEY},
        {"email": "someone@example.com", "password": "pw"},
    ],
    ids=["wrong-secret", "wrong-key-id", "not-an-auth-key"],
)
def test_auth_with_wrong_credentials_is_401(lab: Lab, login: dict[str, Any]) -> None:
    reply = lab.call("POST", "/v1/auth", login)
    assert reply.status == 401
    err = error_of(reply)
    assert AUTH_KEY not in reply.raw.decode()
    assert err["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{nope",
        b"[]",
        {"authKeyId": 5, "authKey": AUTH_KEY},
        {**GOOD_LOGIN, "tokenTimeoutSeconds": 172801},
        {**GOOD_LOGIN, "tokenTimeoutSeconds": "60"},
    ],
    ids=["empty", "bad-json", "not-object", "key-id-type", "timeout-too-long", "timeout-type"],
)
def test_auth_with_a_malformed_body_is_400(lab: Lab, body: Any) -> None:
    reply = lab.call("POST", "/v1/auth", body)
    assert reply.status == 400
    error_of(reply)


def test_calls_need_a_matching_key_and_token(lab: Lab, auth: dict[str, str]) -> None:
    assert lab.call("GET", VPG, auth=auth).status == 200
    assert lab.call("GET", VPG).status == 401
    assert lab.call("GET", VPG, auth={"X-Soracom-Token": auth["X-Soracom-Token"]}).status == 401
    other = lab.login()
    mixed = {"X-Soracom-API-Key": other["X-Soracom-API-Key"], **{"X-Soracom-Token": "x"}}
    assert lab.call("GET", VPG, auth=mixed).status == 401
    swapped = {"X-Soracom-API-Key": other["X-Soracom-API-Key"]}
    swapped["X-Soracom-Token"] = auth["X-Soracom-Token"]
    assert lab.call("GET", VPG, auth=swapped).status == 401


def test_token_expires_after_the_configured_lifetime() -> None:
    lab = make_lab(EmulatorSettings(auth_key=AUTH_KEY, token_lifetime_s=1))
    try:
        auth = lab.login()
        lab.clock.advance(0.9)
        assert lab.call("GET", VPG, auth=auth).status == 200
        lab.clock.advance(0.1)
        reply = lab.call("GET", f"{VPG}/gate/peers", auth=auth)
        assert reply.status == 401
        assert "expired" in error_of(reply)["message"]
        # The spec documents 400 for a refresh with an expired token: log in again.
        assert lab.call("POST", TOKEN_PATH, {}, auth=auth).status == 400
        assert lab.call("GET", VPG, auth=lab.login()).status == 200
    finally:
        lab.emu.stop()


def test_requested_timeout_shortens_the_token(lab: Lab) -> None:
    auth = lab.login(tokenTimeoutSeconds=5)
    lab.clock.advance(4)
    assert lab.call("GET", VPG, auth=auth).status == 200
    lab.clock.advance(1)
    assert lab.call("GET", VPG, auth=auth).status == 401


def test_token_lifetime_setting_changes_at_run_time(lab: Lab) -> None:
    assert lab.control("settings", {"token_lifetime_s": 2}).status == 200
    auth = lab.login(tokenTimeoutSeconds=86400)  # the setting caps what is asked
    lab.clock.advance(2)
    assert lab.call("GET", VPG, auth=auth).status == 401


def test_token_refresh_gives_a_new_working_token(lab: Lab, auth: dict[str, str]) -> None:
    reply = lab.call("POST", TOKEN_PATH, {"tokenTimeoutSeconds": 100}, auth=auth)
    assert reply.status == 200
    assert set(reply.json) == {"token"}
    new = {**auth, "X-Soracom-Token": reply.json["token"]}
    assert new != auth
    lab.clock.advance(50)
    assert lab.call("GET", VPG, auth=new).status == 200
    assert lab.call("GET", VPG, auth=auth).status == 200  # the old one lives on until expiry
    lab.clock.advance(50)
    assert lab.call("GET", VPG, auth=new).status == 401
    assert lab.call("GET", VPG, auth=auth).status == 200  # 86400 s by default
    assert lab.emu.counts()["generateAuthToken"] == 1


def test_token_refresh_checks_operator_body_and_token(lab: Lab, auth: dict[str, str]) -> None:
    assert lab.call("POST", "/v1/operators/OP0000000000/token", {}, auth=auth).status == 400
    assert lab.call("POST", TOKEN_PATH, None, auth=auth).status == 400  # body required
    assert lab.call("POST", TOKEN_PATH, {"tokenTimeoutSeconds": 0}, auth=auth).status == 400
    assert lab.call("POST", TOKEN_PATH, {}).status == 401


def test_expire_tokens_over_http(lab: Lab, auth: dict[str, str]) -> None:
    assert lab.control("expire_tokens").status == 200
    assert lab.call("GET", VPG, auth=auth).status == 401
    assert lab.call("GET", VPG, auth=lab.login()).status == 200


# ----- VPG and gate peers ----------------------------------------------------------------


def test_get_vpg(lab: Lab, auth: dict[str, str]) -> None:
    vpg = lab.call("GET", VPG, auth=auth).json
    assert vpg["vpgId"] == SETTINGS.vpg_id
    assert vpg["operatorId"] == SETTINGS.operator_id
    assert vpg["gateOpened"] is True
    assert vpg["gateVxlanId"] == 10
    assert vpg["deviceSubnetCidrRange"] == "198.19.0.0/16"
    assert vpg["ueSubnetCidrRange"] == "198.19.0.0/16"
    assert vpg["type"] == 14
    assert vpg["status"] == "running"
    assert vpg["vpcPeeringConnections"] == {}


def test_unknown_vpg_is_404_for_every_vpg_operation(lab: Lab, auth: dict[str, str]) -> None:
    other = "/v1/virtual_private_gateways/00000000-0000-4000-8000-000000000000"
    for method, suffix, body in [
        ("GET", "", None),
        ("GET", "/gate/peers", None),
        ("POST", "/gate/peers", {"outerIpAddress": "198.18.2.1"}),
        ("DELETE", "/gate/peers/198.18.2.1", None),
        ("POST", "/gate/open", None),
        ("POST", "/gate/close", None),
        ("POST", "/gate/set_vxlan_id", {"vxlanId": 3}),
        ("POST", "/junction/set_redirection", {"enabled": True}),
        ("POST", "/junction/unset_redirection", None),
    ]:
        reply = lab.call(method, other + suffix, body, auth=auth)
        assert reply.status == 404, (method, suffix)
        error_of(reply)
    assert lab.emu.peers() == []


def test_list_shows_endpoints_then_customer_peers(lab: Lab, auth: dict[str, str]) -> None:
    assert lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth).json
    listed = lab.call("GET", f"{VPG}/gate/peers", auth=auth).json
    assert listed == [
        {
            "outerIpAddress": "198.18.1.11",
            "innerIpAddress": "198.19.0.1",
            "netmask": "255.255.0.0",
            "ownedByCustomer": False,
        },
        {
            "outerIpAddress": "198.18.1.12",
            "innerIpAddress": "198.19.0.2",
            "netmask": "255.255.0.0",
            "ownedByCustomer": False,
        },
        {
            "outerIpAddress": "198.18.2.1",
            "innerIpAddress": "198.19.0.3",
            "netmask": "255.255.0.0",
            "ownedByCustomer": True,
        },
    ]


def test_register_picks_free_lower_half_addresses(lab: Lab, auth: dict[str, str]) -> None:
    net = ipaddress.IPv4Network("198.19.0.0/16")
    lower_end = net.network_address + net.num_addresses // 2
    got = []
    for i in range(1, 4):
        reply = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": f"198.18.2.{i}"}, auth)
        assert reply.status == 200
        assert reply.json["netmask"] is None  # the SORACOM quirk
        assert reply.json["ownedByCustomer"] is True
        got.append(reply.json["innerIpAddress"])
    assert got == ["198.19.0.3", "198.19.0.4", "198.19.0.5"]  # .1 and .2 are the endpoints
    assert all(net.network_address < ipaddress.IPv4Address(a) < lower_end for a in got)
    # A hole left by an unregistered peer is reused before the next address.
    assert lab.call("DELETE", f"{VPG}/gate/peers/198.18.2.2", auth=auth).status == 204
    reply = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.9"}, auth)
    assert reply.json["innerIpAddress"] == "198.19.0.4"


def test_register_never_duplicates(lab: Lab, auth: dict[str, str]) -> None:
    body = {"outerIpAddress": "198.18.2.1"}
    assert lab.call("POST", f"{VPG}/gate/peers", body, auth).status == 200
    again = lab.call("POST", f"{VPG}/gate/peers", body, auth)
    assert again.status == 400
    assert "already" in error_of(again)["message"]
    endpoint = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.1.11"}, auth)
    assert endpoint.status == 400
    assert lab.emu.peers() == [Peer("198.18.2.1", "198.19.0.3")]
    assert len(lab.peer_events) == 1


def test_register_with_an_explicit_inner_address(lab: Lab, auth: dict[str, str]) -> None:
    def register(outer: str, inner: Any) -> Reply:
        body = {"outerIpAddress": outer, "innerIpAddress": inner}
        return lab.call("POST", f"{VPG}/gate/peers", body, auth)

    reply = register("198.18.2.1", "198.19.200.7")  # explicit: the upper half is allowed
    assert (reply.status, reply.json["innerIpAddress"]) == (200, "198.19.200.7")
    assert register("198.18.2.2", "198.19.200.7").status == 400  # taken by a peer
    assert register("198.18.2.3", "198.19.0.1").status == 400  # taken by an endpoint
    assert register("198.18.2.4", "198.20.0.1").status == 400  # outside the subnet
    assert register("198.18.2.5", "198.19.255.255").status == 400  # broadcast
    assert register("198.18.2.6", 7).status == 400  # wrong type
    assert register("not-an-ip", "198.19.0.9").status == 400
    assert lab.call("POST", f"{VPG}/gate/peers", {}, auth).status == 400  # outer required
    assert [p.outer_ip for p in lab.emu.peers()] == ["198.18.2.1"]


def test_register_runs_out_of_lower_half_addresses() -> None:
    # /29: hosts .1-.6, lower half .1-.3; the endpoints hold .1 and .2, which leaves .3.
    lab = make_lab(EmulatorSettings(auth_key=AUTH_KEY, device_subnet="198.19.0.0/29"))
    try:
        auth = lab.login()
        first = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth)
        assert first.json["innerIpAddress"] == "198.19.0.3"
        full = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.2"}, auth)
        assert full.status == 400
        error_of(full)
    finally:
        lab.emu.stop()


def test_concurrent_registrations_get_distinct_addresses(lab: Lab, auth: dict[str, str]) -> None:
    replies: list[Reply] = []

    def register(i: int) -> None:
        body = {"outerIpAddress": f"198.18.3.{i}"}
        replies.append(lab.call("POST", f"{VPG}/gate/peers", body, auth))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(1, 21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in replies] == [200] * 20
    inners = {r.json["innerIpAddress"] for r in replies}
    assert len(inners) == 20
    assert len(lab.peer_events) == 20
    assert sorted(len(e) for e in lab.peer_events) == list(range(1, 21))  # in change order
    assert lab.peer_events[-1] == lab.emu.peers()


def test_unregister(lab: Lab, auth: dict[str, str]) -> None:
    lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth)
    reply = lab.call("DELETE", f"{VPG}/gate/peers/198.18.2.1", auth=auth)
    assert (reply.status, reply.raw) == (204, b"")
    assert lab.emu.peers() == []
    missing = lab.call("DELETE", f"{VPG}/gate/peers/198.18.2.1", auth=auth)
    assert missing.status == 404
    error_of(missing)
    assert lab.call("DELETE", f"{VPG}/gate/peers/198.18.1.11", auth=auth).status == 400
    assert lab.emu.endpoints()[0] == Peer("198.18.1.11", "198.19.0.1")


def test_on_peers_changed_gets_the_customer_peers(lab: Lab, auth: dict[str, str]) -> None:
    lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth)
    lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.2"}, auth)
    lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.2"}, auth)  # refused
    lab.call("DELETE", f"{VPG}/gate/peers/198.18.2.1", auth=auth)
    lab.call("DELETE", f"{VPG}/gate/peers/198.18.2.1", auth=auth)  # 404: no change
    lab.call("GET", f"{VPG}/gate/peers", auth=auth)
    assert lab.peer_events == [
        [Peer("198.18.2.1", "198.19.0.3")],
        [Peer("198.18.2.1", "198.19.0.3"), Peer("198.18.2.2", "198.19.0.4")],
        [Peer("198.18.2.2", "198.19.0.4")],
    ]
    assert lab.peer_events[0][0].outer_ip == "198.18.2.1"


def test_callbacks_run_outside_the_lock() -> None:
    seen: list[list[Peer]] = []
    holder: list[Emulator] = []

    def on_change(peers: list[Peer]) -> None:
        seen.append(holder[0].peers())  # would deadlock if called under the state lock
        holder[0].endpoints()

    emu = Emulator(SETTINGS, on_change)
    holder.append(emu)
    reply = emu.handle("POST", "/v1/auth", {}, json.dumps(GOOD_LOGIN).encode())
    auth = {"X-Soracom-API-Key": reply.body["apiKey"], "X-Soracom-Token": reply.body["token"]}
    body = json.dumps({"outerIpAddress": "198.18.2.1"}).encode()
    replies = []
    # In a thread: a callback under the lock would hang, and the test must fail, not hang.
    worker = threading.Thread(
        target=lambda: replies.append(emu.handle("POST", f"{VPG}/gate/peers", auth, body)),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "on_peers_changed ran under the state lock"
    assert replies[0].status == 200
    assert seen == [[Peer("198.18.2.1", "198.19.0.3")]]


def test_a_failing_callback_does_not_fail_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def boom(peers: list[Peer]) -> None:
        raise RuntimeError("lab hook failed")

    emu = Emulator(SETTINGS, boom)
    url = emu.start()
    try:
        login = send(url, "POST", "/v1/auth", GOOD_LOGIN).json
        auth = {"X-Soracom-API-Key": login["apiKey"], "X-Soracom-Token": login["token"]}
        reply = send(url, "POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth)
        assert reply.status == 200
        assert emu.peers() == [Peer("198.18.2.1", "198.19.0.3")]
        assert "on_peers_changed failed" in caplog.text
    finally:
        emu.stop()


def test_open_and_close_gate(lab: Lab, auth: dict[str, str]) -> None:
    closed = lab.call("POST", f"{VPG}/gate/close", auth=auth)
    assert closed.status == 200
    assert closed.json["gateOpened"] is False
    assert lab.call("GET", VPG, auth=auth).json["gateOpened"] is False
    opened = lab.call("POST", f"{VPG}/gate/open", {"vxlanId": 42}, auth=auth)
    assert opened.status == 200
    assert (opened.json["gateOpened"], opened.json["gateVxlanId"]) == (True, 42)
    assert lab.call("GET", VPG, auth=auth).json["gateVxlanId"] == 42
    assert lab.call("POST", f"{VPG}/gate/open", auth=auth).json["gateVxlanId"] == 42  # no body
    assert [(s.gate_opened, s.vxlan_id) for s in lab.vpg_events] == [(False, 10), (True, 42)]


def test_set_vxlan_id(lab: Lab, auth: dict[str, str]) -> None:
    reply = lab.call("POST", f"{VPG}/gate/set_vxlan_id", {"vxlanId": 4096}, auth=auth)
    assert (reply.status, reply.raw) == (204, b"")
    assert lab.call("GET", VPG, auth=auth).json["gateVxlanId"] == 4096
    assert lab.emu.settings.vxlan_id == 4096
    for bad in ({}, {"vxlanId": 0}, {"vxlanId": 16777216}, {"vxlanId": "5"}):
        assert lab.call("POST", f"{VPG}/gate/set_vxlan_id", bad, auth=auth).status == 400


def test_redirection_is_stored_and_echoed(lab: Lab, auth: dict[str, str]) -> None:
    config = {"enabled": True, "gateway": "198.19.0.3", "description": "via the gate peer"}
    reply = lab.call("POST", f"{VPG}/junction/set_redirection", config, auth=auth)
    assert reply.status == 200
    assert reply.json["redirection"] == config
    assert reply.json["junctionEnabled"] is True
    assert lab.call("GET", VPG, auth=auth).json["redirection"] == config
    assert lab.emu.state()["redirection"] == config
    unset = lab.call("POST", f"{VPG}/junction/unset_redirection", auth=auth)
    assert unset.status == 200
    assert "redirection" not in unset.json
    assert unset.json["junctionEnabled"] is False
    bad = {"enabled": "yes"}
    assert lab.call("POST", f"{VPG}/junction/set_redirection", bad, auth=auth).status == 400


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/junction/set_redirection", {"enabled": True, "gatewy": "198.19.0.3"}, "gatewy"),
        ("/gate/peers", {"outerIPAddress": "198.18.0.10"}, "outerIPAddress"),
        ("/gate/peers", {"outerIpAddress": "198.18.0.10", "innerIP": "198.19.0.9"}, "innerIP"),
        ("/gate/open", {"vxlanID": 20}, "vxlanID"),
    ],
)
def test_a_misspelled_field_is_refused_and_changes_nothing(
    lab: Lab, auth: dict[str, str], path: str, body: dict[str, Any], field: str
) -> None:
    before = lab.emu.state()
    reply = lab.call("POST", f"{VPG}{path}", body, auth=auth)
    assert reply.status == 400
    assert field in error_of(reply)["message"]
    after = lab.emu.state()
    for key in ("peers", "redirection", "settings"):
        assert after[key] == before[key], key
    assert lab.peer_events == [] and lab.vpg_events == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/junction/set_redirection", {"enabled": "yes"}),
        ("/junction/set_redirection", {"gateway": 167968771}),
        ("/gate/peers", {"outerIpAddress": ["198.18.0.10"]}),
        ("/gate/set_vxlan_id", {"vxlanId": True}),
        ("/gate/open", {"privacySeparatorEnabled": 1}),
    ],
)
def test_a_wrongly_typed_field_is_refused(
    lab: Lab, auth: dict[str, str], path: str, body: dict[str, Any]
) -> None:
    reply = lab.call("POST", f"{VPG}{path}", body, auth=auth)
    assert reply.status == 400
    assert "must be of type" in error_of(reply)["message"]
    assert lab.emu.peers() == [] and lab.emu.state()["redirection"] is None


@pytest.mark.parametrize(
    "path", ["/junction/set_redirection", "/gate/peers", "/gate/set_vxlan_id", "/gate/open"]
)
@pytest.mark.parametrize("raw", [b"gateway=198.19.0.3", b"{'enabled': true}", b"[1, 2]", b"\xff"])
def test_a_body_that_is_not_a_json_object_is_400(
    lab: Lab, auth: dict[str, str], path: str, raw: bytes
) -> None:
    headers = {**auth, "Content-Type": "application/json"}
    reply = lab.call("POST", f"{VPG}{path}", raw, auth=headers)
    assert reply.status == 400
    error_of(reply)


def test_operations_without_a_request_body_refuse_fields_but_take_an_empty_object(
    lab: Lab, auth: dict[str, str]
) -> None:
    assert lab.call("POST", f"{VPG}/gate/close", {"force": True}, auth=auth).status == 400
    assert lab.emu.settings.gate_opened is True
    assert lab.call("POST", f"{VPG}/gate/close", {}, auth=auth).status == 200
    assert lab.call("POST", f"{VPG}/junction/unset_redirection", b"", auth=auth).status == 200
    assert lab.call("POST", f"{VPG}/junction/unset_redirection", b"nope", auth=auth).status == 400


def test_the_token_is_checked_before_the_body(lab: Lab) -> None:
    reply = lab.call("POST", f"{VPG}/junction/set_redirection", {"gatewy": "198.19.0.3"})
    assert reply.status == 401


def test_auth_refuses_a_misspelled_field_before_checking_the_key(lab: Lab) -> None:
    reply = lab.call("POST", "/v1/auth", {**GOOD_LOGIN, "authkey": AUTH_KEY})
    assert reply.status == 400
    assert "authkey" in error_of(reply)["message"]


def test_a_refused_body_answers_in_the_wrapped_form_when_set(
    lab: Lab, auth: dict[str, str]
) -> None:
    lab.emu.update_settings(wrapped_errors=True)
    body = {"gatewy": "198.19.0.3"}
    reply = lab.call("POST", f"{VPG}/junction/set_redirection", body, auth=auth)
    assert reply.status == 400
    assert reply.json["httpStatus"] == 400
    assert "gatewy" in reply.json["errorMessage"]["message"]


# ----- answer overrides --------------------------------------------------------------------

POISON = {
    "vpg": {"gateVxlanId": "ten", "gateOpened": False, "extra": [1, {"x": None}]},
    "vpg_remove": ["deviceSubnetCidrRange", "noSuchField"],
    "peers": {
        "198.18.0.10": {"innerIpAddress": "10.0.0.1", "netmask": 7},
        "198.18.1.11": {"ownedByCustomer": True},
    },
}


def _poisoned_vpg(vpg: dict[str, Any]) -> None:
    assert vpg["gateVxlanId"] == "ten"
    assert vpg["gateOpened"] is False
    assert vpg["extra"] == [1, {"x": None}]
    assert "deviceSubnetCidrRange" not in vpg
    assert vpg["ueSubnetCidrRange"] == "198.19.0.0/16"  # untouched fields stay true


def test_overrides_make_every_vpg_answer_lie_but_not_the_state(
    lab: Lab, auth: dict[str, str]
) -> None:
    state = lab.control("overrides", POISON).json
    assert state["overrides"] == POISON
    answers = [
        lab.call("GET", VPG, auth=auth),
        lab.call("POST", f"{VPG}/gate/open", auth=auth),
        lab.call("POST", f"{VPG}/junction/set_redirection", {"enabled": False}, auth=auth),
        lab.call("POST", f"{VPG}/junction/unset_redirection", auth=auth),
        lab.call("POST", f"{VPG}/gate/close", auth=auth),
    ]
    for reply in answers:
        assert reply.status == 200
        _poisoned_vpg(reply.json)
    # The truth: the state document, the settings, and the callbacks.
    true_vpg = lab.emu.state()["vpg"]
    assert true_vpg["gateVxlanId"] == 10 and true_vpg["deviceSubnetCidrRange"] == "198.19.0.0/16"
    assert "extra" not in true_vpg
    assert lab.emu.settings.gate_opened is False  # closeGate really closed it


def test_overrides_change_the_peer_entries_of_that_outer_address(
    lab: Lab, auth: dict[str, str]
) -> None:
    lab.emu.set_overrides(**POISON)
    registered = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.0.10"}, auth=auth)
    assert registered.json["innerIpAddress"] == "10.0.0.1" and registered.json["netmask"] == 7
    other = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.0.11"}, auth=auth)
    assert other.json["innerIpAddress"] == "198.19.0.4"  # not overridden
    rows = {r["outerIpAddress"]: r for r in lab.call("GET", f"{VPG}/gate/peers", auth=auth).json}
    assert rows["198.18.0.10"]["innerIpAddress"] == "10.0.0.1"
    assert rows["198.18.1.11"]["ownedByCustomer"] is True  # a VPG endpoint made to lie
    assert rows["198.18.1.12"]["ownedByCustomer"] is False
    assert rows["198.18.0.11"]["netmask"] == "255.255.0.0"
    # The real registration and what the lab was told are the true inner address.
    assert Peer("198.18.0.10", "198.19.0.3") in lab.emu.peers()
    assert lab.peer_events[0] == [Peer("198.18.0.10", "198.19.0.3")]


def test_empty_overrides_and_reset_faults_clear_them(lab: Lab, auth: dict[str, str]) -> None:
    lab.control("overrides", POISON)
    assert lab.control("overrides", {}).json["overrides"] == {
        "vpg": {},
        "vpg_remove": [],
        "peers": {},
    }
    assert lab.call("GET", VPG, auth=auth).json["gateVxlanId"] == 10
    lab.emu.set_overrides(vpg={"gateVxlanId": 99})
    assert lab.call("GET", VPG, auth=auth).json["gateVxlanId"] == 99
    assert lab.control("reset_faults").status == 200
    assert lab.emu.overrides() == {"vpg": {}, "vpg_remove": [], "peers": {}}
    assert lab.call("GET", VPG, auth=auth).json["gateVxlanId"] == 10


def test_overrides_are_a_private_copy(lab: Lab, auth: dict[str, str]) -> None:
    fields: dict[str, Any] = {"tags": {"name": "poisoned"}}
    lab.emu.set_overrides(vpg=fields)
    fields["tags"]["name"] = "changed later"
    first = lab.call("GET", VPG, auth=auth).json
    assert first["tags"] == {"name": "poisoned"}


@pytest.mark.parametrize(
    "bad",
    [
        {"vpgs": {}},
        {"vpg": ["gateVxlanId"]},
        {"vpg_remove": "redirection"},
        {"vpg_remove": [1]},
        {"peers": {"198.18.0.10": "x"}},
        {"peers": []},
    ],
)
def test_bad_overrides_are_refused_and_keep_the_old_ones(lab: Lab, bad: dict[str, Any]) -> None:
    lab.emu.set_overrides(vpg={"gateVxlanId": 99})
    reply = lab.control("overrides", bad)
    assert reply.status == 400
    error_of(reply)
    assert lab.emu.overrides()["vpg"] == {"gateVxlanId": 99}
    with pytest.raises(ValueError):
        lab.emu.set_overrides(**bad)


def test_redirection_changes_reach_the_callback_in_order() -> None:
    seen: list[dict[str, Any] | None] = []
    emu = Emulator(SETTINGS, on_redirection_changed=seen.append)
    url = emu.start()
    try:
        headers = Lab(emu, url, FakeClock()).login()
        config = {"enabled": True, "gateway": "198.19.0.3"}
        for _ in range(2):  # the same again is no change
            send(url, "POST", f"{VPG}/junction/set_redirection", config, headers)
        send(url, "POST", f"{VPG}/junction/set_redirection", {**config, "enabled": False}, headers)
        send(url, "POST", f"{VPG}/junction/unset_redirection", None, headers)
        send(url, "POST", f"{VPG}/junction/unset_redirection", None, headers)
        lab_overrides = {"vpg_remove": ["redirection"]}
        send(url, "POST", "/_emulator/overrides", lab_overrides)  # answers only: no callback
    finally:
        emu.stop()
    assert seen == [config, {**config, "enabled": False}, None]
    assert emu.redirection() is None


def test_unknown_paths_and_methods_are_404(lab: Lab, auth: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/v1/subscribers"),
        ("PUT", VPG),
        ("GET", "/v1/auth"),
        ("GET", "/"),
        ("GET", "/_emulator/nothing"),
    ]:
        reply = lab.call(method, path, auth=auth)
        assert reply.status == 404, (method, path)
        error_of(reply)
    assert lab.emu.counts()["_unknown"] == 4  # control paths are not counted


def test_wrapped_error_form(lab: Lab) -> None:
    assert lab.control("settings", {"wrapped_errors": True}).status == 200
    reply = lab.call("GET", VPG)
    assert reply.status == 401
    assert set(reply.json) == {"errorMessage", "httpStatus"}
    assert reply.json["httpStatus"] == 401
    assert set(reply.json["errorMessage"]) == {"code", "message"}


# ----- run-time settings -----------------------------------------------------------------


def test_settings_changes_show_in_the_next_answers(lab: Lab, auth: dict[str, str]) -> None:
    new = {
        "vxlan_id": 20,
        "device_subnet": "198.19.7.0/24",
        "endpoints": [
            {"outer_ip": "198.18.1.21", "inner_ip": "198.19.7.1"},
            {"outer_ip": "198.18.1.22", "inner_ip": "198.19.7.2"},
            {"outer_ip": "198.18.1.23", "inner_ip": "198.19.7.3"},
        ],
        "gate_opened": False,
    }
    reply = lab.control("settings", new)
    assert reply.status == 200
    assert reply.json["settings"]["vxlan_id"] == 20
    vpg = lab.call("GET", VPG, auth=auth).json
    assert (vpg["gateVxlanId"], vpg["deviceSubnetCidrRange"], vpg["gateOpened"]) == (
        20,
        "198.19.7.0/24",
        False,
    )
    listed = lab.call("GET", f"{VPG}/gate/peers", auth=auth).json
    assert [(p["outerIpAddress"], p["innerIpAddress"]) for p in listed] == [
        ("198.18.1.21", "198.19.7.1"),
        ("198.18.1.22", "198.19.7.2"),
        ("198.18.1.23", "198.19.7.3"),
    ]
    assert {p["netmask"] for p in listed} == {"255.255.255.0"}
    reg = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth)
    assert reg.json["innerIpAddress"] == "198.19.7.4"
    assert lab.emu.endpoints()[2] == Peer("198.18.1.23", "198.19.7.3")
    assert lab.vpg_events[-1].vxlan_id == 20
    assert len(lab.vpg_events) == 1  # one change, one call


def test_settings_change_in_process(lab: Lab, auth: dict[str, str]) -> None:
    lab.emu.update_settings(vxlan_id=77, endpoints=[("198.18.1.31", "198.19.0.9")])
    assert lab.call("GET", VPG, auth=auth).json["gateVxlanId"] == 77
    assert lab.emu.endpoints() == [Peer("198.18.1.31", "198.19.0.9")]


@pytest.mark.parametrize(
    "bad",
    [
        {"vxlan_id": 0},
        {"vxlan_id": "20"},
        {"device_subnet": "198.19.0.1/24"},
        {"device_subnet": "198.20.0.0/16"},  # the endpoints would fall outside
        {"endpoints": [{"outer_ip": "198.18.1.21"}]},
        {"auth_key": "new"},  # never over HTTP
        {"no_such_setting": 1},
        [],
    ],
)
def test_bad_settings_are_refused_whole(lab: Lab, bad: Any) -> None:
    before = lab.emu.settings
    reply = lab.control("settings", bad)
    assert reply.status == 400
    error_of(reply)
    assert lab.emu.settings == before
    assert lab.vpg_events == []


def test_an_endpoint_cannot_take_a_peer_address(lab: Lab, auth: dict[str, str]) -> None:
    lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth)
    with pytest.raises(ValueError):
        lab.emu.update_settings(endpoints=[("198.18.1.11", "198.19.0.3")])
    assert lab.control("settings", {"endpoints": ["198.18.2.1=198.19.0.9"]}).status == 400


def test_state_shows_counts_peers_settings_faults_and_no_secret(
    lab: Lab, auth: dict[str, str]
) -> None:
    lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth)
    lab.call("GET", f"{VPG}/gate/peers", auth=auth)
    lab.call("GET", f"{VPG}/gate/peers", auth=auth)
    reply = send(lab.url, "GET", "/_emulator/state")
    assert reply.status == 200
    assert AUTH_KEY not in reply.raw.decode()
    state = reply.json
    assert state["counts"] == {"auth": 1, "registerGatePeer": 1, "listGatePeers": 2}
    assert state["peers"] == [{"outer_ip": "198.18.2.1", "inner_ip": "198.19.0.3"}]
    assert state["settings"]["vxlan_id"] == 10
    assert state["faults"]["fail_next"] == 0
    assert [r["operation"] for r in state["recent"]][-2:] == ["listGatePeers"] * 2
    assert lab.control("reset_counts").json["counts"] == {}


# ----- faults ----------------------------------------------------------------------------


def test_latency_delays_each_answer(lab: Lab, auth: dict[str, str]) -> None:
    lab.emu.set_faults(latency_ms=150)
    for _ in range(2):
        started = time.monotonic()
        assert lab.call("GET", VPG, auth=auth).status == 200
        assert time.monotonic() - started >= 0.15
    lab.emu.reset_faults()
    assert lab.emu.faults()["latency_ms"] == 0


def test_fail_next_then_success(lab: Lab, auth: dict[str, str]) -> None:
    lab.emu.set_faults(fail_next=3)
    statuses = [lab.call("GET", VPG, auth=auth).status for _ in range(4)]
    assert statuses == [503, 503, 503, 200]
    assert lab.emu.counts()["getVirtualPrivateGateway"] == 4
    lab.emu.set_faults(fail_next=1, fail_status=500)
    reply = lab.call("POST", f"{VPG}/gate/peers", {"outerIpAddress": "198.18.2.1"}, auth)
    assert reply.status == 500
    error_of(reply)
    assert lab.emu.peers() == []  # a failed call changes nothing


def test_faults_apply_to_auth_too(lab: Lab) -> None:
    lab.emu.set_faults(fail_next=1)
    assert lab.call("POST", "/v1/auth", GOOD_LOGIN).status == 503
    assert lab.call("POST", "/v1/auth", GOOD_LOGIN).status == 200


def test_rate_limit_answers_429_with_the_three_headers(lab: Lab, auth: dict[str, str]) -> None:
    lab.emu.set_faults(rate_limit_next=2, rate_limit_seconds=7)
    for _ in range(2):
        reply = lab.call("GET", VPG, auth=auth)
        assert reply.status == 429
        error_of(reply)
        assert reply.headers["X-Soracom-Ratelimit-Limit"] == "100"
        assert reply.headers["X-Soracom-Ratelimit-Remaining"] == "0"
        assert reply.headers["X-Soracom-Ratelimit-Seconds-Before-Refresh"] == "7"
    ok = lab.call("GET", VPG, auth=auth)
    assert ok.status == 200
    assert ok.headers["X-Soracom-Ratelimit-Limit"] == "100"
    assert "X-Soracom-Ratelimit-Seconds-Before-Refresh" not in ok.headers


def test_normal_answers_count_down_the_remaining_header(lab: Lab, auth: dict[str, str]) -> None:
    # The login was call 1 in this window.
    remaining = [
        int(lab.call("GET", VPG, auth=auth).headers["X-Soracom-Ratelimit-Remaining"])
        for _ in range(3)
    ]
    assert remaining == [98, 97, 96]
    lab.clock.advance(60)  # a new window
    assert lab.call("GET", VPG, auth=auth).headers["X-Soracom-Ratelimit-Remaining"] == "99"


def test_drop_closes_the_connection_without_an_answer(lab: Lab, auth: dict[str, str]) -> None:
    lab.emu.set_faults(drop_next=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        lab.call("GET", VPG, auth=auth)
    assert lab.call("GET", VPG, auth=auth).status == 200
    assert lab.emu.state()["recent"][-2]["fault"] == "drop"


def test_drop_on_a_kept_alive_connection(lab: Lab, auth: dict[str, str]) -> None:
    url = urlsplit(lab.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    try:
        conn.request("GET", VPG, headers=auth)
        assert conn.getresponse().read()  # the connection stays open (HTTP/1.1)
        lab.emu.set_faults(drop_next=1)
        conn.request("GET", VPG, headers=auth)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse()
    finally:
        conn.close()


def test_faults_over_the_control_endpoint(lab: Lab, auth: dict[str, str]) -> None:
    reply = lab.control("faults", {"fail_next": 2, "fail_status": 502})
    assert reply.status == 200
    assert reply.json["faults"]["fail_next"] == 2
    # Control endpoints are never faulted and do not consume faults.
    assert send(lab.url, "GET", "/_emulator/state").status == 200
    assert lab.call("GET", VPG, auth=auth).status == 502
    assert lab.control("reset_faults").json["faults"]["fail_next"] == 0
    assert lab.call("GET", VPG, auth=auth).status == 200

    lab.control("faults", {"rate_limit_next": 1, "rate_limit_seconds": 3})
    limited = lab.call("GET", VPG, auth=auth)
    assert limited.status == 429
    assert limited.headers["X-Soracom-Ratelimit-Seconds-Before-Refresh"] == "3"

    lab.control("faults", {"drop_next": 1})
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        lab.call("GET", VPG, auth=auth)

    lab.control("faults", {"latency_ms": 120})
    started = time.monotonic()
    assert lab.call("GET", VPG, auth=auth).status == 200
    assert time.monotonic() - started >= 0.12


@pytest.mark.parametrize(
    "bad",
    [
        {"fail_next": -1},
        {"fail_next": True},
        {"fail_status": 200},
        {"latency_ms": "100"},
        {"explode": 1},
        {"fail_next": 1, "drop_next": -1},  # refused whole: fail_next stays 0
    ],
)
def test_bad_faults_are_refused(lab: Lab, bad: dict[str, Any]) -> None:
    reply = lab.control("faults", bad)
    assert reply.status == 400
    error_of(reply)
    assert lab.emu.faults()["fail_next"] == 0
    with pytest.raises(ValueError):
        lab.emu.set_faults(**bad)


def test_faults_hit_in_order_drop_rate_limit_fail(lab: Lab, auth: dict[str, str]) -> None:
    lab.emu.set_faults(drop_next=1, rate_limit_next=1, fail_next=1)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        lab.call("GET", VPG, auth=auth)
    assert lab.call("GET", VPG, auth=auth).status == 429
    assert lab.call("GET", VPG, auth=auth).status == 503
    assert lab.call("GET", VPG, auth=auth).status == 200


# ----- serving ---------------------------------------------------------------------------


def test_serves_several_sockets_sharing_one_state(lab: Lab, auth: dict[str, str]) -> None:
    bound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    bound.bind(("127.0.0.1", 0))  # bound, not listening: serve_on listens
    second = lab.emu.serve_on(bound)
    listening = socket.create_server(("127.0.0.1", 0))
    third = lab.emu.serve_on(listening)
    assert len({lab.url, second, third}) == 3
    body = {"outerIpAddress": "198.18.2.1"}
    assert send(second, "POST", f"{VPG}/gate/peers", body, auth).status == 200
    listed = send(third, "GET", f"{VPG}/gate/peers", None, auth).json
    assert "198.18.2.1" in {p["outerIpAddress"] for p in listed}


def test_stop_closes_every_socket(auth: dict[str, str], lab: Lab) -> None:
    other = lab.emu.start()
    url = urlsplit(lab.url)
    kept = http.client.HTTPConnection(url.hostname or "", url.port, timeout=5)
    kept.request("GET", VPG, headers=auth)
    assert kept.getresponse().read()
    started = time.monotonic()
    lab.emu.stop()
    assert time.monotonic() - started < 5  # not waiting on idle keep-alive connections
    for base in (lab.url, other):
        with pytest.raises(ConnectionError):
            send(base, "GET", "/_emulator/state")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        kept.request("GET", VPG, headers=auth)
        kept.getresponse()
    kept.close()


def test_no_secret_in_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gatepeer.lab.emulator")
    lab = make_lab()
    try:
        wrong = {**GOOD_LOGIN, "authKey": "secret-wrong-guess"}
        lab.call("POST", "/v1/auth", wrong)
        auth = lab.login()
        lab.call("GET", VPG, auth=auth)
        lab.emu.set_faults(fail_next=1)
        lab.call("POST", TOKEN_PATH, {}, auth=auth)
    finally:
        lab.emu.stop()
    text = caplog.text
    assert "/v1/auth" in text  # requests are logged...
    for secret in (AUTH_KEY, "secret-wrong-guess", auth["X-Soracom-Token"]):
        assert secret not in text  # ...but never a key or token


def test_command_line(tmp_path: Path) -> None:
    key_file = tmp_path / "auth.key"
    key_file.write_text("secret-cli-key\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gatepeer.lab.emulator",
            "--listen",
            "127.0.0.1:0",
            "--vni",
            "33",
            "--device-subnet",
            "198.19.0.0/20",
            "--endpoint",
            "198.18.1.41=198.19.0.1",
            "--auth-key-id",
            "keyId-cli",
            "--auth-key-file",
            str(key_file),
            "--vpg-id",
            "vpg-cli",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        url = next(w for w in first.split() if w.startswith("http://"))
        login = send(
            url, "POST", "/v1/auth", {"authKeyId": "keyId-cli", "authKey": "secret-cli-key"}
        )
        assert login.status == 200
        auth = {"X-Soracom-API-Key": login.json["apiKey"], "X-Soracom-Token": login.json["token"]}
        vpg = send(url, "GET", "/v1/virtual_private_gateways/vpg-cli", None, auth).json
        assert (vpg["gateVxlanId"], vpg["deviceSubnetCidrRange"]) == (33, "198.19.0.0/20")
        peers = send(url, "GET", "/v1/virtual_private_gateways/vpg-cli/gate/peers", None, auth)
        assert [p["outerIpAddress"] for p in peers.json] == ["198.18.1.41"]
        assert [p["netmask"] for p in peers.json] == ["255.255.240.0"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "secret-cli-key" not in err + first


def test_command_line_refuses_bad_settings() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gatepeer.lab.emulator", "--vni", "0", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "vxlan_id" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--lab-dir", "/nonexistent", "--vni", "20"],
            "--lab-dir takes its settings from the lab: drop --vni",
        ),
        (["--lab-dir", "/nonexistent", "--gate-closed"], "drop --gate-closed"),
        (["--foreground"], "--foreground goes with --lab-dir"),
    ],
)
def test_one_entry_keeps_the_lab_and_standalone_modes_apart(
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`python -m gatepeer.lab.emulator` serves a lab (--lab-dir) or stands alone; mixing them is
    refused before anything starts."""
    from gatepeer.lab.emulator import lab_process
    from gatepeer.lab.emulator.__main__ import main

    def must_not_start(*_: object, **__: object) -> int:
        raise AssertionError("the lab's emulator started")  # it would fork this process

    monkeypatch.setattr(lab_process, "run", must_not_start)

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_sims_control_endpoint_replaces_or_appends() -> None:
    from gatepeer.lab.emulator.service import Emulator

    emu = Emulator()
    one = {"sim_id": "8900100000000000001", "imsi": "001010000000001"}
    two = {"sim_id": "8900100000000000002", "imsi": "001010000000002"}
    assert (
        emu.handle("POST", "/_emulator/sims", {}, json.dumps({"sims": [one]}).encode()).status
        == 200
    )
    body = json.dumps({"sims": [two], "append": True}).encode()
    assert emu.handle("POST", "/_emulator/sims", {}, body).status == 200
    assert [s.sim_id for s in emu.sims()] == [one["sim_id"], two["sim_id"]]
    again = json.dumps({"sims": [two], "append": True}).encode()
    refused = emu.handle("POST", "/_emulator/sims", {}, again)
    assert refused.status == 400 and "two SIMs share a sim_id" in refused.body["message"]
    assert (
        emu.handle("POST", "/_emulator/sims", {}, json.dumps({"sims": [one]}).encode()).status
        == 200
    )
    assert [s.sim_id for s in emu.sims()] == [one["sim_id"]]
