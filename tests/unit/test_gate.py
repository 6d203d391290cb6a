"""From API answers to a GateView: registration (once), netmask, VNI, endpoints, a closed Gate.

Most tests talk to the emulator on 127.0.0.1; the API quirks the emulator does not produce
(a registration missing from the list, a lost race, junk fields) use a scripted fake client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from gatepeer.desired_state import Endpoint, IPv4Address, IPv4Interface, IPv4Network, Redirection
from gatepeer.lab.emulator.model import EmulatorSettings, Peer
from gatepeer.lab.emulator.service import Emulator
from gatepeer.registration import (
    AnswerRefused,
    GateError,
    converge_registration,
    coverage_hint,
    find_own_peer,
    vpg_endpoints,
)
from gatepeer.soracom import SoracomClient, SoracomError

A = IPv4Address
AUTH_KEY = "secret-gate-test-key-4a7c1e9b3d5f"
OUTER = A("198.18.0.10")
SETTINGS = EmulatorSettings(auth_key=AUTH_KEY)
VPG_ID = SETTINGS.vpg_id


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(SETTINGS)
    emu.base_url = emu.start()  # type: ignore[attr-defined]
    yield emu
    emu.stop()


@pytest.fixture
def client(emulator: Emulator) -> SoracomClient:
    return SoracomClient(
        emulator.base_url,  # type: ignore[attr-defined]
        SETTINGS.auth_key_id,
        lambda: AUTH_KEY,
        sleep=lambda s: None,
        timeout=5,
    )


def fetch(client: SoracomClient, *, open_gate: bool = False, outer: IPv4Address = OUTER) -> Any:
    return converge_registration(client, VPG_ID, outer, open_gate=open_gate)


# ---- against the emulator --------------------------------------------------------------------


def test_registers_when_not_registered(client: SoracomClient, emulator: Emulator) -> None:
    view = fetch(client)
    assert emulator.peers() == [Peer("198.18.0.10", "198.19.0.3")]
    assert emulator.counts()["registerGatePeer"] == 1
    assert view.vpg_id == VPG_ID
    assert view.vni == 10
    assert view.device_subnet == IPv4Network("198.19.0.0/16")
    assert view.gate_opened is True
    assert view.outer == OUTER
    # The register answer has a null netmask; the list's "255.255.0.0" gives the prefix.
    assert view.inner == IPv4Interface("198.19.0.3/16")
    assert view.endpoints == (
        Endpoint(A("198.18.1.11"), A("198.19.0.1")),
        Endpoint(A("198.18.1.12"), A("198.19.0.2")),
    )


def test_reuses_the_registration(client: SoracomClient, emulator: Emulator) -> None:
    views = [fetch(client) for _ in range(4)]
    assert emulator.counts()["registerGatePeer"] == 1
    assert len(emulator.peers()) == 1
    assert all(v == views[0] for v in views)


def test_reuses_a_registration_made_before(client: SoracomClient, emulator: Emulator) -> None:
    client.register_gate_peer(VPG_ID, str(OUTER), "198.19.0.77")
    emulator.reset_counts()
    view = fetch(client)
    assert "registerGatePeer" not in emulator.counts()
    assert view.inner == IPv4Interface("198.19.0.77/16")


def test_vni_and_prefix_from_a_non_default_vpg(client: SoracomClient, emulator: Emulator) -> None:
    emulator.update_settings(
        vxlan_id=4711,
        device_subnet="198.19.5.0/24",
        endpoints=[("198.18.1.21", "198.19.5.1"), ("198.18.1.22", "198.19.5.2")],
    )
    view = fetch(client)
    assert view.vni == 4711
    assert view.device_subnet == IPv4Network("198.19.5.0/24")
    assert view.inner == IPv4Interface("198.19.5.3/24")
    assert [e.outer for e in view.endpoints] == [A("198.18.1.21"), A("198.18.1.22")]


def test_endpoints_are_the_vpg_own_only(client: SoracomClient, emulator: Emulator) -> None:
    # Another customer gate peer (a second appliance) is not a tunnel endpoint of ours.
    client.register_gate_peer(VPG_ID, "198.18.0.77")
    view = fetch(client)
    outers = {e.outer for e in view.endpoints}
    assert outers == {A("198.18.1.11"), A("198.18.1.12")}
    assert OUTER not in outers and A("198.18.0.77") not in outers
    assert len(emulator.peers()) == 2


def test_closed_gate_is_an_error_unless_open_gate(
    client: SoracomClient, emulator: Emulator
) -> None:
    emulator.update_settings(gate_opened=False)
    with pytest.raises(GateError) as info:
        fetch(client)
    assert "soracom.open_gate" in str(info.value)
    assert VPG_ID in str(info.value)
    counts = emulator.counts()
    assert "openGate" not in counts
    assert "registerGatePeer" not in counts  # nothing is registered on a closed Gate
    assert emulator.settings.gate_opened is False


def test_closed_gate_is_opened_when_asked(client: SoracomClient, emulator: Emulator) -> None:
    emulator.update_settings(gate_opened=False)
    view = fetch(client, open_gate=True)
    assert emulator.counts()["openGate"] == 1
    assert emulator.settings.gate_opened is True
    assert view.gate_opened is True
    # Open already: not opened again.
    fetch(client, open_gate=True)
    assert emulator.counts()["openGate"] == 1


def test_registration_answer_lost_then_retried_reuses_it(emulator: Emulator) -> None:
    """The first registerGatePeer is carried out but its answer times out; the retry is
    refused (the peer exists) and the view comes from the list: still one registration."""

    class SlowRegister(SoracomClient):
        def register_gate_peer(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            emulator.set_faults(latency_ms=400)
            return super().register_gate_peer(*args, **kwargs)

    def until_registered(seconds: float) -> None:
        deadline = time.monotonic() + 10
        while not emulator.peers() and time.monotonic() < deadline:
            time.sleep(0.02)
        emulator.reset_faults()

    client = SlowRegister(
        emulator.base_url,  # type: ignore[attr-defined]
        SETTINGS.auth_key_id,
        lambda: AUTH_KEY,
        sleep=until_registered,
        timeout=0.1,
    )
    view = fetch(client)
    assert emulator.peers() == [Peer("198.18.0.10", "198.19.0.3")]
    assert emulator.counts()["registerGatePeer"] == 2
    assert client.stats.requests[("registerGatePeer", 0)] == 1
    assert client.stats.requests[("registerGatePeer", 400)] == 1
    assert view.inner == IPv4Interface("198.19.0.3/16")


def test_dropped_call_is_retried(client: SoracomClient, emulator: Emulator) -> None:
    client.authenticate()
    emulator.set_faults(drop_next=1)  # the next call: getVirtualPrivateGateway
    view = fetch(client)
    assert len(emulator.peers()) == 1
    assert view.inner == IPv4Interface("198.19.0.3/16")


def test_unknown_vpg_is_a_soracom_error(client: SoracomClient) -> None:
    with pytest.raises(SoracomError) as info:
        converge_registration(client, "vpg-nosuch", OUTER, open_gate=False)
    assert info.value.status == 404
    assert "soracom.endpoint" in str(info.value) and "g.api.soracom.io" in str(info.value)


@pytest.mark.parametrize(
    ("endpoint", "other"),
    [
        ("https://api.soracom.io", "https://g.api.soracom.io"),
        ("https://g.api.soracom.io/", "https://api.soracom.io"),
    ],
)
def test_a_404_for_the_vpg_names_the_other_coverage(endpoint: str, other: str) -> None:
    assert f'soracom.endpoint = "{other}"' in coverage_hint(endpoint)


def test_a_stable_inner_address_is_asked_for_and_kept(
    client: SoracomClient, emulator: Emulator
) -> None:
    view = converge_registration(
        client, VPG_ID, OUTER, open_gate=False, inner_address=A("198.19.0.77")
    )
    assert emulator.peers() == [Peer("198.18.0.10", "198.19.0.77")]
    assert view.inner == IPv4Interface("198.19.0.77/16")
    # A replacement instance (same outer address after re-registering) gets it again.
    client.unregister_gate_peer(VPG_ID, str(OUTER))
    again = converge_registration(
        client, VPG_ID, OUTER, open_gate=False, inner_address=A("198.19.0.77")
    )
    assert again.inner == view.inner


def test_a_registration_with_another_inner_address_names_the_key(
    client: SoracomClient, emulator: Emulator
) -> None:
    client.register_gate_peer(VPG_ID, str(OUTER), "198.19.0.50")
    with pytest.raises(GateError) as info:
        converge_registration(
            client, VPG_ID, OUTER, open_gate=False, inner_address=A("198.19.0.77")
        )
    message = str(info.value)
    assert message.startswith("tunnel.inner_address:") and "198.19.0.50" in message
    assert not isinstance(info.value, AnswerRefused)
    assert emulator.counts().get("registerGatePeer") == 1  # no second registration


def test_an_inner_address_outside_the_subnet_names_the_key(client: SoracomClient) -> None:
    with pytest.raises(GateError, match=r"^tunnel\.inner_address: 10\.0\.0\.5 is outside"):
        converge_registration(client, VPG_ID, OUTER, open_gate=False, inner_address=A("10.0.0.5"))


def test_the_redirection_is_read(client: SoracomClient, emulator: Emulator) -> None:
    assert fetch(client).redirection is None
    client.set_redirection(VPG_ID, "198.19.0.3")
    assert fetch(client).redirection == Redirection(True, A("198.19.0.3"))


# ---- scripted answers ------------------------------------------------------------------------

VPG_OPEN = {
    "vpgId": VPG_ID,
    "gateOpened": True,
    "gateVxlanId": 10,
    "deviceSubnetCidrRange": "198.19.0.0/16",
}
ENDPOINT_ROWS = [
    {
        "outerIpAddress": "198.18.1.12",
        "innerIpAddress": "198.19.0.2",
        "netmask": "255.255.0.0",
        "ownedByCustomer": False,
    },
    {
        "outerIpAddress": "198.18.1.11",
        "innerIpAddress": "198.19.0.1",
        "netmask": "255.255.0.0",
        "ownedByCustomer": False,
    },
]


def own_row(netmask: Any = "255.255.0.0", inner: Any = "198.19.0.3") -> dict[str, Any]:
    return {
        "outerIpAddress": str(OUTER),
        "innerIpAddress": inner,
        "netmask": netmask,
        "ownedByCustomer": True,
    }


class FakeClient:
    """Answers from a script: `vpgs` and `lists` are consumed in order (the last one repeats)."""

    def __init__(
        self,
        vpgs: list[dict[str, Any]],
        lists: list[list[dict[str, Any]]],
        register: dict[str, Any] | Exception | None = None,
    ) -> None:
        self.vpgs, self.lists, self.register = list(vpgs), list(lists), register
        self.calls: list[str] = []

    def _next(self, queue: list[Any]) -> Any:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    def get_virtual_private_gateway(self, vpg_id: str) -> dict[str, Any]:
        self.calls.append("getVirtualPrivateGateway")
        return dict(self._next(self.vpgs))

    def list_gate_peers(self, vpg_id: str) -> list[dict[str, Any]]:
        self.calls.append("listGatePeers")
        return list(self._next(self.lists))

    def register_gate_peer(
        self, vpg_id: str, outer_ip: str, inner_ip: str | None = None
    ) -> dict[str, Any]:
        self.calls.append("registerGatePeer")
        if isinstance(self.register, Exception):
            raise self.register
        assert self.register is not None, "unexpected registerGatePeer"
        return self.register

    def open_gate(self, vpg_id: str) -> dict[str, Any]:
        self.calls.append("openGate")
        return {}


def fake_fetch(fake: FakeClient, *, open_gate: bool = False) -> Any:
    return converge_registration(cast(SoracomClient, fake), VPG_ID, OUTER, open_gate=open_gate)


REGISTERED_NULL_NETMASK = own_row(netmask=None)


def test_register_then_list_the_registration() -> None:
    fake = FakeClient(
        [VPG_OPEN], [ENDPOINT_ROWS, [*ENDPOINT_ROWS, own_row()]], register=REGISTERED_NULL_NETMASK
    )
    view = fake_fetch(fake)
    assert fake.calls == [
        "getVirtualPrivateGateway",
        "listGatePeers",
        "registerGatePeer",
        "listGatePeers",
    ]
    assert view.inner == IPv4Interface("198.19.0.3/16")


def test_prefix_from_the_subnet_when_the_list_does_not_show_the_registration_yet() -> None:
    fake = FakeClient([VPG_OPEN], [ENDPOINT_ROWS], register=REGISTERED_NULL_NETMASK)
    view = fake_fetch(fake)
    assert view.inner == IPv4Interface("198.19.0.3/16")


@pytest.mark.parametrize("netmask", [None, "255.255.0.0", "16", "/16", 16])
def test_a_netmask_that_agrees_with_the_subnet_or_none(netmask: Any) -> None:
    fake = FakeClient([VPG_OPEN], [[*ENDPOINT_ROWS, own_row(netmask=netmask)]])
    assert fake_fetch(fake).inner == IPv4Interface("198.19.0.3/16")


@pytest.mark.parametrize("absent", [True, False])
def test_the_device_subnet_falls_back_to_ue_subnet_cidr_range(absent: bool) -> None:
    vpg = {k: v for k, v in VPG_OPEN.items() if k != "deviceSubnetCidrRange"}
    if not absent:
        vpg["deviceSubnetCidrRange"] = None
    fake = FakeClient(
        [{**vpg, "ueSubnetCidrRange": "198.19.0.0/16"}], [[*ENDPOINT_ROWS, own_row()]]
    )
    assert fake_fetch(fake).device_subnet == IPv4Network("198.19.0.0/16")


def test_a_vni_given_as_a_whole_float_is_that_integer() -> None:
    fake = FakeClient([{**VPG_OPEN, "gateVxlanId": 10.0}], [[*ENDPOINT_ROWS, own_row()]])
    view = fake_fetch(fake)
    assert view.vni == 10 and isinstance(view.vni, int)


def test_lost_registration_race_reuses_the_winner() -> None:
    exists = SoracomError("registerGatePeer", 400, "Gate peer exists", "SEM0001")
    fake = FakeClient([VPG_OPEN], [ENDPOINT_ROWS, [*ENDPOINT_ROWS, own_row()]], register=exists)
    assert fake_fetch(fake).inner == IPv4Interface("198.19.0.3/16")


def test_failed_registration_is_raised() -> None:
    full = SoracomError("registerGatePeer", 400, "No free address", "SEM0002")
    fake = FakeClient([VPG_OPEN], [ENDPOINT_ROWS], register=full)
    with pytest.raises(SoracomError) as info:
        fake_fetch(fake)
    assert info.value is full


def test_endpoints_are_the_rows_not_owned_by_customer() -> None:
    other_customer = {**own_row(), "outerIpAddress": "198.18.0.77", "innerIpAddress": "x"}
    rows: list[dict[str, Any]] = [*ENDPOINT_ROWS, own_row(), other_customer]
    assert vpg_endpoints(rows, IPv4Network("198.19.0.0/16"), OUTER) == (
        Endpoint(A("198.18.1.11"), A("198.19.0.1")),
        Endpoint(A("198.18.1.12"), A("198.19.0.2")),
    )
    assert find_own_peer(rows, OUTER) == own_row()
    assert find_own_peer(rows, A("198.18.1.11")) is None  # a VPG endpoint is not ours


def test_missing_vni_means_the_default_10() -> None:
    vpg = {k: v for k, v in VPG_OPEN.items() if k != "gateVxlanId"}
    fake = FakeClient([vpg], [[*ENDPOINT_ROWS, own_row()]])
    assert fake_fetch(fake).vni == 10


def test_no_endpoints_is_an_error() -> None:
    fake = FakeClient([VPG_OPEN], [[own_row()]])
    with pytest.raises(GateError, match="no VPG tunnel endpoints"):
        fake_fetch(fake)


@pytest.mark.parametrize("subnet", [None, "", "198.19.0.5/16", "not-a-cidr", 5, "0.0.0.0/1"])
def test_unusable_device_subnet_is_refused(subnet: Any) -> None:
    vpg = {**VPG_OPEN, "deviceSubnetCidrRange": subnet}
    fake = FakeClient([vpg], [[*ENDPOINT_ROWS, own_row()]])
    with pytest.raises(AnswerRefused, match="deviceSubnetCidrRange"):
        fake_fetch(fake)


@pytest.mark.parametrize("vni", ["abc", -1, 0, 16_777_216, True, [10], 1.5, "10"])
def test_unusable_vni_is_refused(vni: Any) -> None:
    vpg = {**VPG_OPEN, "gateVxlanId": vni}
    fake = FakeClient([vpg], [[*ENDPOINT_ROWS, own_row()]])
    with pytest.raises(AnswerRefused, match="gateVxlanId"):
        fake_fetch(fake)


def _endpoint_row(outer: Any = "198.18.1.13", **changes: Any) -> dict[str, Any]:
    row = {**ENDPOINT_ROWS[0], "outerIpAddress": outer, "innerIpAddress": "198.19.0.4"}
    row.update(changes)
    return row


# Each poisoned answer, and the words its one-line reason must hold.
POISONED: list[tuple[str, dict[str, Any], list[dict[str, Any]], str]] = [
    (
        "inner-outside-subnet",
        VPG_OPEN,
        [*ENDPOINT_ROWS, own_row(inner="10.0.0.3")],
        "outside the device subnet",
    ),
    (
        "inner-network-address",
        VPG_OPEN,
        [*ENDPOINT_ROWS, own_row(inner="198.19.0.0")],
        "not a host address",
    ),
    ("inner-missing", VPG_OPEN, [*ENDPOINT_ROWS, own_row(inner=None)], "innerIpAddress None"),
    (
        "inner-an-integer",
        VPG_OPEN,
        [*ENDPOINT_ROWS, own_row(inner=3323134211)],
        "innerIpAddress 3323134211",
    ),
    (
        "netmask-dotted-slash-1",
        VPG_OPEN,
        [*ENDPOINT_ROWS, own_row(netmask="128.0.0.0")],
        "(/1) differs",
    ),
    ("netmask-prefix-24", VPG_OPEN, [*ENDPOINT_ROWS, own_row(netmask=24)], "(/24) differs"),
    ("netmask-junk", VPG_OPEN, [*ENDPOINT_ROWS, own_row(netmask="junk")], "not a netmask"),
    (
        "netmask-non-contiguous",
        VPG_OPEN,
        [*ENDPOINT_ROWS, own_row(netmask="255.0.255.0")],
        "not a netmask",
    ),
    ("endpoint-netmask", VPG_OPEN, [_endpoint_row(netmask="255.255.255.0"), own_row()], "differs"),
    (
        "endpoint-unspecified",
        VPG_OPEN,
        [_endpoint_row("0.0.0.0"), own_row()],
        "0.0.0.0 is unspecified",
    ),
    ("endpoint-loopback", VPG_OPEN, [_endpoint_row("127.0.0.1"), own_row()], "is loopback"),
    (
        "endpoint-link-local",
        VPG_OPEN,
        [_endpoint_row("169.254.169.254"), own_row()],
        "is link-local",
    ),
    ("endpoint-multicast", VPG_OPEN, [_endpoint_row("239.1.1.1"), own_row()], "is multicast"),
    ("endpoint-broadcast", VPG_OPEN, [_endpoint_row("255.255.255.255"), own_row()], "is broadcast"),
    (
        "endpoint-this-host",
        VPG_OPEN,
        [_endpoint_row(str(OUTER)), own_row()],
        "this host's own address",
    ),
    (
        "endpoint-junk",
        VPG_OPEN,
        [_endpoint_row("junk"), own_row()],
        "'junk' is not an IPv4 address",
    ),
    (
        "endpoint-inner-outside",
        VPG_OPEN,
        [_endpoint_row(innerIpAddress="10.9.9.9"), own_row()],
        "outside",
    ),
    (
        "owned-by-customer-missing",
        VPG_OPEN,
        [{"outerIpAddress": "198.18.1.99"}, own_row()],
        "ownedByCustomer None",
    ),
    (
        "owned-by-customer-string",
        VPG_OPEN,
        [_endpoint_row(ownedByCustomer="false"), own_row()],
        "ownedByCustomer 'false'",
    ),
    (
        "subnet-missing",
        {"gateOpened": True, "gateVxlanId": 10},
        [*ENDPOINT_ROWS, own_row()],
        "ueSubnetCidrRange",
    ),
    (
        "gate-opened-string",
        {**VPG_OPEN, "gateOpened": "yes"},
        [*ENDPOINT_ROWS, own_row()],
        "gateOpened 'yes'",
    ),
    (
        "redirection-not-an-object",
        {**VPG_OPEN, "redirection": "on"},
        [*ENDPOINT_ROWS, own_row()],
        "redirection 'on'",
    ),
    (
        "redirection-gateway-junk",
        {**VPG_OPEN, "redirection": {"enabled": True, "gateway": "10.0.0"}},
        [*ENDPOINT_ROWS, own_row()],
        "redirection.gateway",
    ),
    (
        "redirection-enabled-string",
        {**VPG_OPEN, "redirection": {"enabled": "true"}},
        [*ENDPOINT_ROWS, own_row()],
        "redirection.enabled",
    ),
    (
        "control-characters",
        VPG_OPEN,
        [*ENDPOINT_ROWS, own_row(inner="198.19.0.3\r\nforged log line")],
        "\\r\\nforged",
    ),
]


@pytest.mark.parametrize(
    ("vpg", "peers", "reason"), [p[1:] for p in POISONED], ids=[p[0] for p in POISONED]
)
def test_a_poisoned_answer_is_refused_with_one_printable_line(
    vpg: dict[str, Any], peers: list[dict[str, Any]], reason: str
) -> None:
    fake = FakeClient([vpg], [peers])
    with pytest.raises(AnswerRefused) as info:
        fake_fetch(fake)
    message = str(info.value)
    assert reason in message
    assert message.startswith(f"VPG {VPG_ID}: ") and " answer refused: " in message
    assert message.isprintable() and message.isascii(), message
    assert info.value.field and info.value.field in message


def test_gate_still_closed_after_open_gate_is_an_error() -> None:
    closed = {**VPG_OPEN, "gateOpened": False}
    fake = FakeClient([closed], [[*ENDPOINT_ROWS, own_row()]])
    with pytest.raises(GateError, match="closed"):
        fake_fetch(fake, open_gate=True)
    # The VPG and its peers are read first (the plan needs both), then Gate is opened.
    assert fake.calls == [
        "getVirtualPrivateGateway",
        "listGatePeers",
        "openGate",
        "getVirtualPrivateGateway",
    ]
