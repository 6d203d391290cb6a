"""Metrics: each collector against golden exposition files with the agent, kernel and packet
path faked; what is not known is not exported; the histogram only grows; the HTTP listener's
lifecycle (the live scrape in a lab: tests/lab/test_metrics_lab.py).

GATEPEER_UPDATE_GOLDEN=1 rewrites tests/golden/metrics/*.prom from the fakes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers.device_fakes import (
    SIMS,
    TRAINED_READING,
    FakeDevices,
    recorded_ena_allowances,
    trained_activity,
)
from helpers.exposition import sample_names
from helpers.metrics_sources import (
    FULL_COUNTERS,
    GATE,
    SUMMARY,
    FakeAgent,
    FakeKernel,
    FakePacketPath,
)
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from gatepeer import __version__
from gatepeer.desired_state import (
    IPv4Address,
    Redirection,
)
from gatepeer.flow_logger import FlowLogStats
from gatepeer.metrics.collectors import ReconcileCollector, build_registry, collectors
from gatepeer.metrics.server import MetricsServer, listen_address
from gatepeer.metrics.sources import CONNTRACK_COUNT, CONNTRACK_MAX
from gatepeer.soracom import ApiStats
from gatepeer.state_document import EndpointSummary, ProbeResult, StateSummary

GOLDEN = Path(__file__).parents[1] / "golden" / "metrics"
GOLDEN_NOW = 1_800_000_000.0  # the clock of the collectors that read one (devices, health)
A = IPv4Address


def expose(collector: Any) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def all_collectors(
    agent: FakeAgent | None = None,
    kernel: FakeKernel | None = None,
    packet_path: FakePacketPath | None = None,
) -> dict[str, Any]:
    return collectors(
        agent or FakeAgent(),
        kernel or FakeKernel(),
        packet_path or FakePacketPath(FULL_COUNTERS),
        "0.1.0",
        devices=FakeDevices(TRAINED_READING, SIMS),
        device_activity=trained_activity(GOLDEN_NOW),
        device_top_n=lambda: 2,
        underlay=lambda: "eth0",
        ena_read=recorded_ena_allowances,
        flow_log=lambda: FlowLogStats(written=1234, dropped_rate_limit=56, overflows=2, starts=1),
        clock=lambda: GOLDEN_NOW,
    )


# ---- golden files ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(all_collectors()))
def test_collector_matches_its_golden_file(name: str) -> None:
    text = expose(all_collectors()[name])
    path = GOLDEN / f"{name}.prom"
    if os.environ.get("GATEPEER_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with GATEPEER_UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from {path} (GATEPEER_UPDATE_GOLDEN=1)"


def test_every_golden_file_belongs_to_a_collector() -> None:
    assert {p.stem for p in GOLDEN.glob("*.prom")} == set(all_collectors())


def test_required_metric_names_are_exported() -> None:
    names = set()
    for collector in all_collectors().values():
        names |= sample_names(expose(collector))
    required = {
        "gatepeer_up",
        "gatepeer_build_info",
        "gatepeer_registration_info",
        "gatepeer_vpg_endpoints",
        "gatepeer_vpg_endpoint_up",
        "gatepeer_vpg_endpoint_rtt_seconds",
        "gatepeer_vpg_endpoint_probe_loss_ratio",
        "gatepeer_fdb_entries_desired",
        "gatepeer_fdb_entries_present",
        "gatepeer_tunnel_oper_up",
        "gatepeer_tunnel_oper_state",
        "gatepeer_tunnel_mtu_bytes",
        *(
            f"gatepeer_network_{d}_{k}_total"
            for d in ("receive", "transmit")
            for k in ("bytes", "packets", "errs", "drop")
        ),
        "gatepeer_packet_path_dropped_packets_total",
        "gatepeer_conntrack_entries",
        "gatepeer_conntrack_limit",
        "gatepeer_neighbour_entries",
        "gatepeer_neighbour_table_limit",
        "gatepeer_reconcile_runs_total",
        "gatepeer_reconcile_failures_total",
        "gatepeer_reconcile_duration_seconds_bucket",
        "gatepeer_reconcile_last_success_timestamp_seconds",
        "gatepeer_api_requests_total",
        "gatepeer_api_request_duration_seconds_total",
        "gatepeer_api_ratelimit_remaining",
        "gatepeer_api_auth_failures_total",
        "gatepeer_api_answer_refused",
        "gatepeer_redirection_enabled",
        "gatepeer_redirection_is_self",
        "gatepeer_redirection_info",
        "gatepeer_fast_path_active",
        "gatepeer_health",
    }
    assert required <= names, sorted(required - names)


def test_drop_reasons_come_from_the_named_nftables_counters() -> None:
    text = expose(all_collectors()["packet_path"])
    assert 'gatepeer_packet_path_dropped_packets_total{reason="vxlan_foreign_source"} 17.0' in text
    assert 'gatepeer_packet_path_dropped_packets_total{reason="spoofed_inner_source"} 3.0' in text
    assert (
        'gatepeer_packet_path_dropped_packets_total{reason="host_service_not_allowed"} 7.0' in text
    )
    assert 'gatepeer_packet_path_dropped_packets_total{reason="vxlan_malformed"} 4.0' in text
    # Counted without a drop: never mixed into the drop family.
    assert 'gatepeer_packet_path_counted_packets_total{class="vxlan_other_vni"} 9.0' in text
    assert 'gatepeer_packet_path_counted_packets_total{class="outer_fragment"} 6.0' in text
    assert 'reason="vxlan_other_vni"' not in text and 'reason="outer_fragment"' not in text


def test_promtool_accepts_the_whole_exposition() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("needs promtool (Debian package prometheus)")
    registry = build_registry(
        FakeAgent(), FakeKernel(), FakePacketPath(FULL_COUNTERS), __version__, process=True
    )
    proc = subprocess.run(
        [promtool, "check", "metrics"], input=generate_latest(registry), capture_output=True
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


# ---- what is not known is not exported --------------------------------------------------------


def test_no_link_no_tables_no_packet_path_exports_only_what_is_known() -> None:
    bare = all_collectors(
        kernel=FakeKernel(link=None, sysctls={}), packet_path=FakePacketPath(None)
    )
    assert expose(bare["interface"]) == ""
    assert expose(bare["conntrack"]) == ""
    assert expose(bare["neighbour"]) == ""
    tunnel = sample_names(expose(bare["tunnel"]))
    assert tunnel == {
        "gatepeer_tunnel_present",
        "gatepeer_tunnel_oper_up",
        "gatepeer_fdb_entries_desired",
        "gatepeer_fdb_entries_present",
    }
    assert "gatepeer_tunnel_oper_up 0.0" in expose(bare["tunnel"])
    assert "gatepeer_fdb_entries_present 0.0" in expose(bare["tunnel"])
    assert "dropped" not in expose(bare["packet_path"])
    endpoints = expose(bare["endpoints"])
    assert 'gatepeer_vpg_endpoint_fdb_present{endpoint="100.64.10.1"} 0.0' in endpoints


def test_a_non_initial_namespace_has_conntrack_but_no_neighbour_limit() -> None:
    c = all_collectors(kernel=FakeKernel(sysctls={CONNTRACK_COUNT: 5, CONNTRACK_MAX: 65536}))
    assert sample_names(expose(c["neighbour"])) == {"gatepeer_neighbour_entries"}
    assert sample_names(expose(c["conntrack"])) == {
        "gatepeer_conntrack_entries",
        "gatepeer_conntrack_limit",
    }


def test_before_registration_and_first_probe() -> None:
    fresh = StateSummary(
        endpoints=(
            EndpointSummary("100.64.10.1", "10.128.0.1", None, ProbeResult("unknown", None, None)),
        ),
    )
    c = all_collectors(agent=FakeAgent(fresh, ApiStats(), (0, [])))
    registration = expose(c["registration"])
    assert sample_names(registration) == {"gatepeer_registered"}
    assert "gatepeer_registered 0.0" in registration
    endpoints = sample_names(expose(c["endpoints"]))
    assert "gatepeer_vpg_endpoint_up" not in endpoints  # unknown is not 0 (down)
    assert "gatepeer_vpg_endpoint_rtt_seconds" not in endpoints
    health = expose(c["health"])
    assert all(
        f'gatepeer_health{{state="{s}"}} 0.0' in health for s in ("ok", "degraded", "failed")
    )
    api = expose(c["api"])
    assert "ratelimit" not in api
    assert "gatepeer_api_auth_failures_total 0.0" in api


@pytest.mark.parametrize(
    ("redirection", "enabled", "is_self", "gateway"),
    [
        (Redirection(True, A("10.128.0.9")), 1, 0, "10.128.0.9"),
        (Redirection(False, A("10.128.0.3")), 0, 0, "10.128.0.3"),
        (None, 0, 0, ""),
    ],
)
def test_redirection_elsewhere_or_off_is_not_self(
    redirection: Redirection | None, enabled: int, is_self: int, gateway: str
) -> None:
    summary = replace(
        SUMMARY, gate=replace(GATE, redirection=redirection), redirection_mode="unmanaged"
    )
    text = expose(all_collectors(FakeAgent(summary))["registration"])
    assert f"gatepeer_redirection_enabled {enabled}.0" in text
    assert f"gatepeer_redirection_is_self {is_self}.0" in text
    assert f'gatepeer_redirection_info{{gateway="{gateway}",mode="unmanaged"}} 1.0' in text


def test_the_refusal_and_redirection_mode_come_from_the_state_document() -> None:
    doc = {
        "gate": replace(GATE, redirection=Redirection(True, A("10.128.0.3"))).to_json(),
        "api_answer_refused": True,
        "api_refused_field": "gateVxlanId",
        "redirection": {"mode": "self", "error": None},
    }
    summary = StateSummary.from_state(doc)
    assert summary.api_answer_refused and summary.redirection_mode == "self"
    assert summary.redirection_is_self is True
    api = expose(all_collectors(FakeAgent(summary))["api"])
    assert 'gatepeer_api_answer_refused{field="gateVxlanId"} 1.0' in api
    accepted = replace(summary, api_answer_refused=False, api_refused_field=None)
    api = expose(all_collectors(FakeAgent(accepted))["api"])
    assert 'gatepeer_api_answer_refused{field=""} 0.0' in api


def test_registration_for_another_address_is_not_registered() -> None:
    moved = replace(SUMMARY, local_address="172.31.9.9")
    assert "gatepeer_registered 0.0" in expose(all_collectors(FakeAgent(moved))["registration"])


def test_reconcile_histogram_takes_in_only_new_durations() -> None:
    agent = FakeAgent(durations=(10, [0.002, 0.003]))
    collector = ReconcileCollector(agent)
    first = expose(collector)
    assert "gatepeer_reconcile_duration_seconds_count 2.0" in first
    assert "gatepeer_reconcile_duration_seconds_count 2.0" in expose(collector)  # no double count
    agent.durations = (13, [0.002, 0.003, 0.2, 0.004, 45.0])
    text = expose(collector)
    assert "gatepeer_reconcile_duration_seconds_count 5.0" in text
    assert 'gatepeer_reconcile_duration_seconds_bucket{le="0.005"} 3.0' in text
    assert 'gatepeer_reconcile_duration_seconds_bucket{le="0.25"} 4.0' in text
    assert 'gatepeer_reconcile_duration_seconds_bucket{le="30.0"} 4.0' in text
    assert 'gatepeer_reconcile_duration_seconds_bucket{le="+Inf"} 5.0' in text
    # The agent keeps only its recent durations: a burst longer than that is counted as kept.
    agent.durations = (2000, [0.001] * 1000)
    assert "gatepeer_reconcile_duration_seconds_count 1005.0" in expose(collector)
    # A reload's fresh agent starts with no durations: nothing is lost or counted twice.
    agent.durations = (2000, [])
    assert "gatepeer_reconcile_duration_seconds_count 1005.0" in expose(collector)


def test_secrets_and_auth_key_id_never_appear() -> None:
    registry = build_registry(FakeAgent(), FakeKernel(), FakePacketPath(FULL_COUNTERS), "0.1.0")
    text = generate_latest(registry).decode()
    assert "keyId-" not in text and "secret" not in text.lower()


# ---- the listener -----------------------------------------------------------------------------


def test_listen_address() -> None:
    local = A("172.31.5.10")
    assert listen_address(None, local) == ("172.31.5.10", 8479)
    assert listen_address(None, None) is None  # not known yet: try after the next reconcile
    assert listen_address("", local) is None
    assert listen_address("127.0.0.1:9999", None) == ("127.0.0.1", 9999)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def test_server_starts_once_serves_and_stops() -> None:
    registry = build_registry(FakeAgent(), FakeKernel(), FakePacketPath(None), "0.1.0")
    server = MetricsServer("127.0.0.1:0", registry, lambda: None)
    server.ensure_started()
    try:
        assert server.bound is not None
        url = f"http://127.0.0.1:{server.bound[1]}/metrics"
        text = _get(url)
        assert "gatepeer_up 1.0" in text
        assert "process_resident_memory_bytes" in text
        server.ensure_started()  # idempotent: still the same listener
        assert _get(url).count("gatepeer_up 1.0") == 1
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):
        _get(url)
    server.stop()  # a second stop is harmless


def test_server_waits_for_the_local_address_and_survives_a_taken_port(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = build_registry(FakeAgent(), FakeKernel(), FakePacketPath(None), "0.1.0")
    local: list[IPv4Address] = []
    waiting = MetricsServer(None, registry, lambda: local[0] if local else None)
    waiting.ensure_started()
    assert waiting.bound is None
    holder = MetricsServer("127.0.0.1:0", registry, lambda: None)
    holder.ensure_started()
    assert holder.bound is not None
    try:
        clash = MetricsServer(f"127.0.0.1:{holder.bound[1]}", registry, lambda: None)
        clash.ensure_started()
        clash.ensure_started()
        assert clash.bound is None
        errors = [r for r in caplog.records if "cannot listen" in r.getMessage()]
        assert len(errors) == 1  # logged once per cause, not once per reconcile
    finally:
        holder.stop()
