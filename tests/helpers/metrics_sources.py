"""What the metrics collectors read, faked: the agent (its state summary, API counters and
reconcile durations), the kernel and the packet path's counters, with values that exercise
every sample (the golden exposition files in tests/golden/metrics/ are rendered from them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gatepeer.desired_state import (
    Endpoint,
    GateView,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    Redirection,
)
from gatepeer.kernel.rtnl import InterfaceStats, LinkReading
from gatepeer.metrics.sources import CONNTRACK_COUNT, CONNTRACK_MAX, NEIGHBOUR_LIMIT
from gatepeer.soracom import ApiStats
from gatepeer.state_document import EndpointSummary, ProbeResult, StateSummary

A = IPv4Address


GATE = GateView(
    vpg_id="d6a52f88-4f11-4f5e-9b2d-1f2e3d4c5b6a",
    vni=10,
    device_subnet=IPv4Network("10.128.0.0/9"),
    gate_opened=True,
    inner=IPv4Interface("10.128.0.3/9"),
    endpoints=(
        Endpoint(A("100.64.10.1"), A("10.128.0.1")),
        Endpoint(A("100.64.10.2"), A("10.128.0.2")),
    ),
    outer=A("172.31.5.10"),
    redirection=Redirection(enabled=True, gateway=A("10.128.0.3")),
)


SUMMARY = StateSummary(
    version="0.1.0",
    pid=4242,
    updated_at=1_760_000_200.0,
    interface="vxlan0",
    health="degraded",
    reasons=(
        "VPG endpoint 100.64.10.2 (inner 10.128.0.2) does not answer probes through the tunnel",
    ),
    gate=GATE,
    local_address="172.31.5.10",
    endpoints=(
        EndpointSummary("100.64.10.1", "10.128.0.1", True, ProbeResult("up", 0.00125, 0.0)),
        EndpointSummary("100.64.10.2", "10.128.0.2", True, ProbeResult("down", None, 0.3)),
    ),
    probed=True,
    gate_fetched_at=1_760_000_000.5,
    last_health="ok",
    last_duration_s=0.0031,
    reconciles=42,
    failures=3,
    last_success_at=1_760_000_100.25,
    packet_path_mode="nat",
    fast_path=False,
    api_answer_refused=True,
    api_refused_field="netmask",
    redirection_mode="self",
)


LINK = LinkReading(
    index=7,
    name="vxlan0",
    kind="vxlan",
    flags=0x1 | 0x10000,
    mtu=1500,
    oper_state="unknown",
    stats=InterfaceStats(
        rx_packets=1000,
        tx_packets=2000,
        rx_bytes=150_000,
        tx_bytes=300_000,
        rx_errors=1,
        tx_errors=2,
        rx_dropped=3,
        tx_dropped=4,
    ),  # fmt: skip
    vni=10,
    local=A("172.31.5.10"),
    dst_port=4789,
    underlay_index=2,
)


class FakeAgent:
    def __init__(
        self,
        summary: StateSummary = SUMMARY,
        stats: ApiStats | None = None,
        durations: tuple[int, Sequence[float]] = (42, [0.003, 0.02, 0.7, 12.0]),
    ) -> None:
        self._summary = summary
        self._stats = stats or ApiStats(
            requests={
                ("auth", 200): 1,
                ("getVirtualPrivateGateway", 200): 14,
                ("getVirtualPrivateGateway", 503): 2,
                ("listGatePeers", 200): 14,
                ("listGatePeers", 0): 1,
            },
            seconds={"auth": 0.25, "getVirtualPrivateGateway": 1.5, "listGatePeers": 12.0},
            ratelimit_remaining=97,
            auth_failures=1,
        )
        self.durations = durations

    def summary(self) -> StateSummary:
        return self._summary

    def api_stats(self) -> ApiStats:
        return self._stats

    def reconcile_durations(self) -> tuple[int, Sequence[float]]:
        return self.durations


class FakeKernel:
    def __init__(
        self,
        link: LinkReading | None = LINK,
        flood: frozenset[IPv4Address] = frozenset({A("100.64.10.1"), A("100.64.10.2")}),
        sysctls: Mapping[str, int] | None = None,
        addresses: Sequence[IPv4Interface] = (IPv4Interface("10.128.0.3/9"),),
    ) -> None:
        self._link = link
        self._flood = flood
        self._addresses = tuple(addresses)
        self._sysctls = (
            {CONNTRACK_COUNT: 1234, CONNTRACK_MAX: 262_144, NEIGHBOUR_LIMIT: 100_000}
            if sysctls is None
            else sysctls
        )

    def link(self, name: str) -> LinkReading | None:
        return self._link if self._link and self._link.name == name else None

    def flood_destinations(self, index: int) -> frozenset[IPv4Address]:
        assert self._link is not None and index == self._link.index
        return self._flood

    def addresses(self, index: int) -> Sequence[IPv4Interface]:
        assert self._link is not None and index == self._link.index
        return self._addresses

    def neighbour_count(self, index: int) -> int:
        return 812

    def sysctl(self, path: str) -> int | None:
        return self._sysctls.get(path)


class FakePacketPath:
    def __init__(self, counters: Mapping[str, tuple[int, int]] | None = None) -> None:
        self._counters = counters

    def counters(self) -> Mapping[str, tuple[int, int]] | None:
        return self._counters


FULL_COUNTERS = {
    "vxlan_accepted": (99_999, 9_999_900),
    "vxlan_foreign_dropped": (17, 1_700),
    "spoofed_source_dropped": (3, 252),
    "allowlist_dropped": (5, 420),
    "host_service_dropped": (7, 420),
    "masqueraded_flows": (12, 0),
    "vxlan_malformed_dropped": (4, 160),
    "vxlan_other_vni": (9, 450),
    "outer_fragments": (6, 3000),
    "closed_dropped": (11, 660),
}
