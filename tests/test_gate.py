"""From API answers to a GateView: registration (once), netmask, VNI, endpoints, a closed Gate.

Most tests talk to the emulator on 127.0.0.1; the API quirks the emulator does not produce
(a registration missing from the list, a lost race, junk fields) use a scripted fake client.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from gatepeer.gate import GateError, fetch_gate_view, find_own_peer, vpg_endpoints
from gatepeer.lab.emulator import Emulator, EmulatorSettings, Peer
from gatepeer.soracom import SoracomClient, SoracomError
from gatepeer.state import Endpoint, IPv4Address, IPv4Interface, IPv4Network

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
    return fetch_gate_view(client, VPG_ID, outer, open_gate=open_gate)


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
        fetch_gate_view(client, "vpg-nosuch", OUTER, open_gate=False)
    assert info.value.status == 404


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

    def register_gate_peer(self, vpg_id: str, outer_ip: str) -> dict[str, Any]:
        self.calls.append("registerGatePeer")
        if isinstance(self.register, Exception):
            raise self.register
        assert self.register is not None, "unexpected registerGatePeer"
        return self.register

    def open_gate(self, vpg_id: str) -> dict[str, Any]:
        self.calls.append("openGate")
        return {}


def fake_fetch(fake: FakeClient, *, open_gate: bool = False) -> Any:
    return fetch_gate_view(cast(SoracomClient, fake), VPG_ID, OUTER, open_gate=open_gate)


REGISTERED_NULL_NETMASK = own_row(netmask=None)


def test_prefix_from_the_list_netmask_over_the_register_answer() -> None:
    fake = FakeClient(
        [VPG_OPEN],
        [ENDPOINT_ROWS, [*ENDPOINT_ROWS, own_row(netmask="255.255.255.0")]],
        register=REGISTERED_NULL_NETMASK,
    )
    view = fake_fetch(fake)
    assert fake.calls == [
        "getVirtualPrivateGateway",
        "listGatePeers",
        "registerGatePeer",
        "listGatePeers",
    ]
    assert view.inner == IPv4Interface("198.19.0.3/24")


def test_prefix_from_the_subnet_when_the_list_does_not_show_the_registration_yet() -> None:
    fake = FakeClient([VPG_OPEN], [ENDPOINT_ROWS], register=REGISTERED_NULL_NETMASK)
    view = fake_fetch(fake)
    assert view.inner == IPv4Interface("198.19.0.3/16")


@pytest.mark.parametrize("netmask", [None, "", "junk", "255.0.255.0", 16])
def test_prefix_from_the_subnet_when_the_netmask_is_unusable(netmask: Any) -> None:
    fake = FakeClient([VPG_OPEN], [[*ENDPOINT_ROWS, own_row(netmask=netmask)]])
    assert fake_fetch(fake).inner == IPv4Interface("198.19.0.3/16")


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


def test_endpoints_need_owned_by_customer_false_exactly() -> None:
    rows: list[dict[str, Any]] = [
        *ENDPOINT_ROWS,
        {"outerIpAddress": "198.18.1.99", "innerIpAddress": "198.19.0.9"},  # field missing
        {"outerIpAddress": "198.18.1.98", "ownedByCustomer": None},
        {"outerIpAddress": "junk", "ownedByCustomer": False},
        own_row(),
    ]
    assert vpg_endpoints(rows) == (
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


def test_registration_without_inner_address_is_an_error() -> None:
    fake = FakeClient([VPG_OPEN], [[*ENDPOINT_ROWS, own_row(inner=None)]])
    with pytest.raises(GateError, match="no inner address"):
        fake_fetch(fake)


@pytest.mark.parametrize("subnet", [None, "", "198.19.0.5/16", "not-a-cidr", 5])
def test_unusable_device_subnet_is_a_gate_error(subnet: Any) -> None:
    vpg = {**VPG_OPEN, "deviceSubnetCidrRange": subnet}
    fake = FakeClient([vpg], [[*ENDPOINT_ROWS, own_row()]])
    with pytest.raises(GateError, match="deviceSubnetCidrRange"):
        fake_fetch(fake)


@pytest.mark.parametrize("vni", ["abc", -1, 16_777_216, True, [10], 1.5])
def test_unusable_vni_is_a_gate_error(vni: Any) -> None:
    vpg = {**VPG_OPEN, "gateVxlanId": vni}
    fake = FakeClient([vpg], [[*ENDPOINT_ROWS, own_row()]])
    with pytest.raises(GateError, match="gateVxlanId"):
        fake_fetch(fake)


def test_gate_still_closed_after_open_gate_is_an_error() -> None:
    closed = {**VPG_OPEN, "gateOpened": False}
    fake = FakeClient([closed], [[*ENDPOINT_ROWS, own_row()]])
    with pytest.raises(GateError, match="closed"):
        fake_fetch(fake, open_gate=True)
    assert fake.calls == ["getVirtualPrivateGateway", "openGate", "getVirtualPrivateGateway"]
