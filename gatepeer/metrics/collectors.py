"""Prometheus collectors, one per concern, reading their providers at scrape time.

Names follow Prometheus conventions (base units, `_total` counters, `_info` for labels worth
joining on); the interface counters copy node_exporter's names so dashboards built for it read
these too. A value that cannot be known is not exported (no fake zeros): conntrack without
netfilter, the neighbour limit outside the initial network namespace, an RTT for an endpoint
whose last probe went unanswered. Nothing secret is ever a label or a value.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from gatepeer.config import AgentConfig, HaConfig
from gatepeer.flow_logger import FlowLogStats
from gatepeer.ha.metrics import HaCollector
from gatepeer.ha.role import RoleView
from gatepeer.health import HEALTHS
from gatepeer.health_signals import running_verdict
from gatepeer.kernel.rtnl import OPER_STATES, TunnelReading
from gatepeer.metrics.device_activity import DeviceActivity
from gatepeer.metrics.devices import DEFAULT_TOP_N, DeviceCollector, DeviceSource
from gatepeer.metrics.ena import EnaCollector
from gatepeer.metrics.flow_log import FlowLogCollector
from gatepeer.metrics.sources import (
    CONNTRACK_COUNT,
    CONNTRACK_MAX,
    NEIGHBOUR_LIMIT,
    AgentSource,
    KernelSource,
    PacketPathSource,
)

# nftables counter name -> reason label
DROP_REASONS = {
    "vxlan_foreign_dropped": "vxlan_foreign_source",
    "spoofed_source_dropped": "spoofed_inner_source",
    "allowlist_dropped": "destination_not_allowed",
    "host_service_dropped": "host_service_not_allowed",
    "vxlan_malformed_dropped": "vxlan_malformed",
    # packet_path.closed: a destination outside the allowed set and the VPC.
    "closed_dropped": "destination_outside_closed_network",
}
# nftables counter name -> class label, for what the packet path counts but lets through
# (the kernel may still drop it: another VNI with no link of its own, an incomplete fragment).
COUNTED_CLASSES = {
    "vxlan_other_vni": "vxlan_other_vni",
    "outer_fragments": "outer_fragment",
}
HEALTH_STATES = HEALTHS
# A reconcile without an API call takes milliseconds; with one, up to the request timeout.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class BuildCollector:
    def __init__(self, version: str) -> None:
        self.version = version

    def collect(self) -> Iterator[Metric]:
        yield _gauge("gatepeer_up", "1 while the agent runs and answers scrapes.", 1)
        info = GaugeMetricFamily(
            "gatepeer_build_info", "The running gatepeer's version.", labels=["version"]
        )
        info.add_metric([self.version], 1)
        yield info


class RegistrationCollector:
    """This host as a gate peer of the VPG, as the API last described it."""

    def __init__(self, agent: AgentSource) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        s = self.agent.summary()
        yield _gauge(
            "gatepeer_registered",
            "1 when this host holds a gate peer registration for its current address.",
            1 if s.registered else 0,
        )
        if s.gate is None:
            return
        info = GaugeMetricFamily(
            "gatepeer_registration_info",
            "The gate peer registration: inner and outer address, VNI, VPG.",
            labels=["inner_address", "vni", "vpg_id", "outer_address"],
        )
        info.add_metric(
            [str(s.gate.inner.ip), str(s.gate.vni), s.gate.vpg_id, str(s.gate.outer)], 1
        )
        yield info
        yield _gauge(
            "gatepeer_gate_open", "1 when Gate is open on the VPG.", int(s.gate.gate_opened)
        )
        redirection = s.gate.redirection
        yield _gauge(
            "gatepeer_redirection_enabled",
            "1 when the VPG's Junction redirection is enabled.",
            int(bool(redirection and redirection.enabled)),
        )
        yield _gauge(
            "gatepeer_redirection_is_self",
            "1 when the VPG's redirection is enabled and its gateway is this peer.",
            int(bool(s.redirection_is_self)),
        )
        redirection_info = GaugeMetricFamily(
            "gatepeer_redirection_info",
            "The VPG's redirection gateway (empty: none) and soracom.redirection (mode).",
            labels=["gateway", "mode"],
        )
        gateway = redirection.gateway if redirection else None
        redirection_info.add_metric(
            [str(gateway) if gateway else "", s.redirection_mode or "unknown"], 1
        )
        yield redirection_info
        if s.gate_fetched_at is not None:
            yield _gauge(
                "gatepeer_gate_view_refreshed_timestamp_seconds",
                "When the SORACOM API last answered a refresh of the gate view.",
                s.gate_fetched_at,
            )


class EndpointCollector:
    """Each VPG tunnel endpoint: its FDB entry and what the probes through the tunnel say."""

    def __init__(self, agent: AgentSource, kernel: KernelSource) -> None:
        self.agent = agent
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        s = self.agent.summary()
        link = self.kernel.link(s.interface)
        flood = {str(d) for d in self.kernel.flood_destinations(link.index)} if link else set()
        yield _gauge(
            "gatepeer_vpg_endpoints", "VPG tunnel endpoints known from the API.", len(s.endpoints)
        )
        label = ["endpoint"]
        info = GaugeMetricFamily(
            "gatepeer_vpg_endpoint_info",
            "A VPG endpoint (outer address) and its inner address.",
            labels=["endpoint", "inner_address"],
        )
        fdb = GaugeMetricFamily(
            "gatepeer_vpg_endpoint_fdb_present",
            "1 when the tunnel has this endpoint's all-zero-MAC FDB entry.",
            labels=label,
        )
        up = GaugeMetricFamily(
            "gatepeer_vpg_endpoint_up",
            "1 when the endpoint answers ICMP echo through the tunnel, 0 when it stopped "
            "answering; absent before the first probes.",
            labels=label,
        )
        rtt = GaugeMetricFamily(
            "gatepeer_vpg_endpoint_rtt_seconds",
            "Round trip of the last probe; absent when it went unanswered.",
            labels=label,
        )
        loss = GaugeMetricFamily(
            "gatepeer_vpg_endpoint_probe_loss_ratio",
            "Unanswered share of the last probes (a sliding window).",
            labels=label,
        )
        for e in s.endpoints:
            info.add_metric([e.outer, e.inner or ""], 1)
            fdb.add_metric([e.outer], int(e.outer in flood))
            if e.probe.state != "unknown":
                up.add_metric([e.outer], int(e.probe.state == "up"))
            if e.probe.rtt_s is not None:
                rtt.add_metric([e.outer], e.probe.rtt_s)
            if e.probe.loss is not None:
                loss.add_metric([e.outer], e.probe.loss)
        yield from (info, fdb, up, rtt, loss)


class TunnelCollector:
    """The vxlan link itself and its FDB flood entries."""

    def __init__(self, agent: AgentSource, kernel: KernelSource) -> None:
        self.agent = agent
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        s = self.agent.summary()
        link = self.kernel.link(s.interface)
        yield _gauge("gatepeer_tunnel_present", "1 when the tunnel link exists.", int(bool(link)))
        yield _gauge(
            "gatepeer_tunnel_oper_up",
            "1 when the tunnel is up and passes packets (vxlan reports oper state unknown).",
            int(bool(link and link.oper_up)),
        )
        if s.gate is not None:
            yield _gauge(
                "gatepeer_fdb_entries_desired",
                "All-zero-MAC FDB entries the tunnel needs: one per VPG endpoint.",
                len(s.gate.endpoints),
            )
        flood = self.kernel.flood_destinations(link.index) if link else frozenset()
        yield _gauge(
            "gatepeer_fdb_entries_present", "All-zero-MAC FDB entries on the tunnel.", len(flood)
        )
        if link is None:
            return
        state = GaugeMetricFamily(
            "gatepeer_tunnel_oper_state",
            "The tunnel's RFC 2863 operational state (1 for the current one).",
            labels=["device", "state"],
        )
        for name in OPER_STATES:
            state.add_metric([link.name, name], int(link.oper_state == name))
        yield state
        yield _gauge("gatepeer_tunnel_mtu_bytes", "The tunnel's MTU.", link.mtu)
        if link.vni is not None:
            yield _gauge("gatepeer_tunnel_vni", "The tunnel's VXLAN network identifier.", link.vni)


class InterfaceCollector:
    """The tunnel's interface counters, named as node_exporter names them."""

    FIELDS = (
        ("receive_bytes", "rx_bytes"),
        ("receive_packets", "rx_packets"),
        ("receive_errs", "rx_errors"),
        ("receive_drop", "rx_dropped"),
        ("transmit_bytes", "tx_bytes"),
        ("transmit_packets", "tx_packets"),
        ("transmit_errs", "tx_errors"),
        ("transmit_drop", "tx_dropped"),
    )

    def __init__(self, agent: AgentSource, kernel: KernelSource) -> None:
        self.agent = agent
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        link = self.kernel.link(self.agent.summary().interface)
        if link is None or link.stats is None:
            return
        for name, field in self.FIELDS:
            family = CounterMetricFamily(
                f"gatepeer_network_{name}",
                f"Tunnel interface statistic {field}.",
                labels=["device"],
            )
            family.add_metric([link.name], getattr(link.stats, field))
            yield family


class PacketPathCollector:
    """The nftables packet path: what it dropped and whether the flowtable fast path is on."""

    def __init__(self, agent: AgentSource, packet_path: PacketPathSource) -> None:
        self.agent = agent
        self.packet_path = packet_path

    def collect(self) -> Iterator[Metric]:
        s = self.agent.summary()
        if s.packet_path_mode:
            info = GaugeMetricFamily(
                "gatepeer_packet_path_info", "The packet path mode (route or nat).", labels=["mode"]
            )
            info.add_metric([s.packet_path_mode], 1)
            yield info
        if s.fast_path is not None:
            yield _gauge(
                "gatepeer_fast_path_active",
                "1 when forwarded flows take the nftables flowtable fast path.",
                int(s.fast_path),
            )
        counters = self.packet_path.counters()
        if counters is None:
            return
        packets = CounterMetricFamily(
            "gatepeer_packet_path_dropped_packets",
            "Packets the packet path dropped, by reason.",
            labels=["reason"],
        )
        octets = CounterMetricFamily(
            "gatepeer_packet_path_dropped_bytes",
            "Bytes the packet path dropped, by reason.",
            labels=["reason"],
        )
        for counter, reason in DROP_REASONS.items():
            if counter in counters:
                p, b = counters[counter]
                packets.add_metric([reason], p)
                octets.add_metric([reason], b)
        yield packets
        yield octets
        seen = CounterMetricFamily(
            "gatepeer_packet_path_counted_packets",
            "Packets the packet path counts but does not drop, by class.",
            labels=["class"],
        )
        for counter, label in COUNTED_CLASSES.items():
            if counter in counters:
                seen.add_metric([label], counters[counter][0])
        yield seen


class ConntrackCollector:
    def __init__(self, kernel: KernelSource) -> None:
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        count = self.kernel.sysctl(CONNTRACK_COUNT)
        limit = self.kernel.sysctl(CONNTRACK_MAX)
        if count is not None:
            yield _gauge("gatepeer_conntrack_entries", "Connections tracked now.", count)
        if limit is not None:
            yield _gauge("gatepeer_conntrack_limit", "nf_conntrack_max.", limit)


class NeighbourCollector:
    """Neighbour (ARP) entries: each active device behind the tunnel holds one."""

    def __init__(self, agent: AgentSource, kernel: KernelSource) -> None:
        self.agent = agent
        self.kernel = kernel

    def collect(self) -> Iterator[Metric]:
        link = self.kernel.link(self.agent.summary().interface)
        if link is not None:
            entries = GaugeMetricFamily(
                "gatepeer_neighbour_entries",
                "IPv4 neighbour entries on the device.",
                labels=["device"],
            )
            entries.add_metric([link.name], self.kernel.neighbour_count(link.index))
            yield entries
        limit = self.kernel.sysctl(NEIGHBOUR_LIMIT)
        if limit is not None:
            yield _gauge(
                "gatepeer_neighbour_table_limit",
                "gc_thresh3: the IPv4 neighbour table's hard limit (initial namespace only).",
                limit,
            )


class ReconcileCollector:
    """Reconcile runs. The duration histogram takes in the durations recorded since the last
    scrape (the agent keeps only its recent ones), so its buckets only ever grow."""

    def __init__(self, agent: AgentSource) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._seen: int | None = None
        self._buckets = [0] * (len(RECONCILE_BUCKETS) + 1)
        self._sum = 0.0

    def _absorb(self) -> None:
        total, recent = self.agent.reconcile_durations()
        with self._lock:
            if self._seen is None:
                self._seen = total - len(recent)
            new = max(0, total - self._seen)
            for seconds in list(recent)[len(recent) - min(new, len(recent)) :]:
                index = next(
                    (i for i, le in enumerate(RECONCILE_BUCKETS) if seconds <= le),
                    len(RECONCILE_BUCKETS),
                )
                self._buckets[index] += 1
                self._sum += seconds
            self._seen = total

    def collect(self) -> Iterator[Metric]:
        s = self.agent.summary()
        yield CounterMetricFamily(
            "gatepeer_reconcile_runs", "Reconciles run (kept across restarts).", value=s.reconciles
        )
        yield CounterMetricFamily(
            "gatepeer_reconcile_failures",
            "Reconciles that failed (kept across restarts).",
            value=s.failures,
        )
        if s.last_success_at is not None:
            yield _gauge(
                "gatepeer_reconcile_last_success_timestamp_seconds",
                "When a reconcile last succeeded (ok or degraded).",
                s.last_success_at,
            )
        self._absorb()
        with self._lock:
            cumulative, buckets = 0, []
            for le, count in zip((*RECONCILE_BUCKETS, float("inf")), self._buckets, strict=True):
                cumulative += count
                buckets.append(("+Inf" if le == float("inf") else repr(le), cumulative))
            total = self._sum
        histogram = HistogramMetricFamily(
            "gatepeer_reconcile_duration_seconds", "How long reconciles take (this process)."
        )
        histogram.add_metric([], buckets, total)
        yield histogram


class ApiCollector:
    """The SORACOM API client: requests by operation and HTTP status, time, rate limit."""

    def __init__(self, agent: AgentSource) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        stats = self.agent.api_stats()
        requests = CounterMetricFamily(
            "gatepeer_api_requests",
            "SORACOM API requests by operation and HTTP status (code none: no answer).",
            labels=["operation", "code"],
        )
        for (operation, status), count in sorted(stats.requests.items()):
            requests.add_metric([operation, str(status) if status else "none"], count)
        yield requests
        seconds = CounterMetricFamily(
            "gatepeer_api_request_duration_seconds",
            "Time spent in SORACOM API requests, by operation.",
            labels=["operation"],
        )
        for operation, total in sorted(stats.seconds.items()):
            seconds.add_metric([operation], total)
        yield seconds
        if stats.ratelimit_remaining is not None:
            yield _gauge(
                "gatepeer_api_ratelimit_remaining",
                "Requests left in the rate-limit window, from the last answer's header.",
                stats.ratelimit_remaining,
            )
        yield CounterMetricFamily(
            "gatepeer_api_auth_failures",
            "Times the SORACOM API refused the auth key.",
            value=stats.auth_failures,
        )
        s = self.agent.summary()
        refused = GaugeMetricFamily(
            "gatepeer_api_answer_refused",
            "1 while the last API answer failed a check (the last good view stays applied); "
            "field: the field that failed.",
            labels=["field"],
        )
        refused.add_metric([s.api_refused_field or ""], int(s.api_answer_refused))
        yield refused


class HealthCollector:
    """The health evaluator's verdict on the agent's state (the last reconcile, the API, the
    redirection, the probes, HA) and the live tunnel: what `gatepeer status` says while the
    daemon runs."""

    def __init__(
        self,
        agent: AgentSource,
        kernel: KernelSource,
        *,
        reconcile_interval: Callable[[], float] = lambda: AgentConfig.reconcile_interval,
        ha: Callable[[], HaConfig | None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent = agent
        self.kernel = kernel
        self.reconcile_interval = reconcile_interval
        self.ha = ha
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        s = self.agent.summary()
        link = self.kernel.link(s.interface)
        tunnel = TunnelReading(None)
        if link is not None:
            addresses = tuple(self.kernel.addresses(link.index))
            tunnel = TunnelReading(link, addresses, self.kernel.flood_destinations(link.index))
        verdict = running_verdict(
            s,
            tunnel,
            pid=s.pid or os.getpid(),  # this process serves the scrape: the daemon runs
            now=self.clock(),
            reconcile_interval=self.reconcile_interval(),
            packet_path_mode=None,
            redirection_mode=None,
            ha=self.ha(),
        )
        family = GaugeMetricFamily(
            "gatepeer_health",
            "1 for the current health, as `gatepeer status` judges it.",
            labels=["state"],
        )
        for state in HEALTH_STATES:
            family.add_metric([state], int(verdict.health == state))
        yield family


def collectors(
    agent: AgentSource,
    kernel: KernelSource,
    packet_path: PacketPathSource,
    version: str,
    *,
    reconcile_interval: Callable[[], float] = lambda: AgentConfig.reconcile_interval,
    ha: Callable[[], HaConfig | None] | None = None,
    clock: Callable[[], float] = time.time,
    devices: DeviceSource | None = None,
    device_top_n: Callable[[], int] = lambda: DEFAULT_TOP_N,
    underlay: Callable[[], str | None] | None = None,
    ena_read: Callable[[str], Mapping[str, int]] | None = None,
    flow_log: Callable[[], FlowLogStats | None] | None = None,
    device_activity: DeviceActivity | None = None,
    devices_in_background: bool = False,
) -> dict[str, Collector]:
    """Every collector by a short name (the golden files are named after them). `ha`: the
    current [ha] (None inside: not configured); without it there is no HA collector.
    `devices`: the per-device counters and SIM map (no device collector without);
    `underlay`: the ENA interface's name, read with `ena_read` (no ENA collector without);
    `flow_log`: the flow log's counters (None inside: the flow log is off)."""
    found: dict[str, Collector] = {
        "build": BuildCollector(version),
        "registration": RegistrationCollector(agent),
        "endpoints": EndpointCollector(agent, kernel),
        "tunnel": TunnelCollector(agent, kernel),
        "interface": InterfaceCollector(agent, kernel),
        "packet_path": PacketPathCollector(agent, packet_path),
        "conntrack": ConntrackCollector(kernel),
        "neighbour": NeighbourCollector(agent, kernel),
        "reconcile": ReconcileCollector(agent),
        "api": ApiCollector(agent),
        "health": HealthCollector(
            agent,
            kernel,
            reconcile_interval=reconcile_interval,
            ha=ha or (lambda: None),
            clock=clock,
        ),
    }
    if ha is not None:
        found["ha"] = HaCollector(lambda: _role_view(agent, ha))
    if devices is not None:
        found["devices"] = DeviceCollector(
            devices,
            top_n=device_top_n,
            clock=clock,
            activity=device_activity,
            background=devices_in_background,
        )
    if underlay is not None:
        from gatepeer.aws import ena

        found["ena"] = EnaCollector(underlay, ena_read or ena.read)
    if flow_log is not None:
        found["flow_log"] = FlowLogCollector(flow_log)
    return found


def _role_view(agent: AgentSource, ha: Callable[[], HaConfig | None]) -> RoleView | None:
    """The role the daemon recorded in its state ("ha"), while [ha] is configured."""
    return RoleView.from_json(agent.summary().ha) if ha() is not None else None


def build_registry(
    agent: AgentSource,
    kernel: KernelSource,
    packet_path: PacketPathSource,
    version: str,
    *,
    process: bool = True,
    reconcile_interval: Callable[[], float] = lambda: AgentConfig.reconcile_interval,
    ha: Callable[[], HaConfig | None] | None = None,
    devices: DeviceSource | None = None,
    device_top_n: Callable[[], int] = lambda: DEFAULT_TOP_N,
    underlay: Callable[[], str | None] | None = None,
    flow_log: Callable[[], FlowLogStats | None] | None = None,
) -> CollectorRegistry:
    """A fresh registry (never the global one: nothing else in the process leaks in)."""
    from prometheus_client import ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    found = collectors(
        agent,
        kernel,
        packet_path,
        version,
        reconcile_interval=reconcile_interval,
        ha=ha,
        devices=devices,
        device_top_n=device_top_n,
        underlay=underlay,
        flow_log=flow_log,
        devices_in_background=True,  # a reading of 100,000 devices must not be a scrape's
    )
    for collector in found.values():
        registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
    return registry
