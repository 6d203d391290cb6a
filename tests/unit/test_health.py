"""The one health evaluator: each signal's verdict, worst-first reasons said once, and a table of
signal combinations that `gatepeer status`, the metrics' gatepeer_health, the daemon's STATUS=
verdict and the health the daemon writes in state.json all turn into the same verdict."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.readings import link
from prometheus_client import CollectorRegistry, generate_latest

from gatepeer import atomic_json
from gatepeer.config import HaConfig
from gatepeer.desired_state import GateView
from gatepeer.ha.fifo import Event
from gatepeer.ha.role import Coordinator
from gatepeer.health import (
    HEALTHS,
    DaemonSignal,
    ProbeSignal,
    Signals,
    TunnelSignal,
    Verdict,
    evaluate,
)
from gatepeer.health_signals import running_verdict
from gatepeer.kernel.rtnl import LinkReading, TunnelReading
from gatepeer.metrics.collectors import HealthCollector
from gatepeer.soracom import ApiStats
from gatepeer.state_document import ProbeResult, StateSummary, endpoint_report, recorded_signals
from gatepeer.status_report import gather, render, to_json

A = ipaddress.IPv4Address
I = ipaddress.IPv4Interface  # noqa: E741 - as in the addresses it builds
NOW = 1_760_000_000.0
INTERVAL = 30.0
GATE = {
    "vpg_id": "vpg-1",
    "vni": 10,
    "device_subnet": "10.128.0.0/9",
    "gate_opened": True,
    "inner": "10.128.0.3/9",
    "outer": "172.31.5.10",
    "endpoints": [
        {"outer": "100.64.10.1", "inner": "10.128.0.1"},
        {"outer": "100.64.10.2", "inner": "10.128.0.2"},
    ],
    "redirection": {"enabled": True, "gateway": "10.128.0.3"},
}
VIEW = GateView.from_json(GATE)
HA = HaConfig(peer_address=A("198.18.0.11"))


# ---- the evaluator, signal by signal ------------------------------------------------------------

TUNNEL = TunnelSignal(
    "vxlan0",
    vni=10,
    addresses=frozenset({I("10.128.0.3/9")}),
    flood=frozenset({A("100.64.10.1"), A("100.64.10.2")}),
)
UP = (
    ProbeSignal("100.64.10.1", "10.128.0.1", "up"),
    ProbeSignal("100.64.10.2", "10.128.0.2", "up"),
)
RUNNING = DaemonSignal(True, 4242, loop_age_s=1.0, stale_after_s=90.0)
HEALTHY = Signals(
    gate=VIEW,
    gate_expected=True,
    local_address="172.31.5.10",
    tunnel=TUNNEL,
    probes=UP,
    daemon=RUNNING,
)


def probes(*states: str) -> tuple[ProbeSignal, ...]:
    return tuple(ProbeSignal(p.outer, p.inner, s) for p, s in zip(UP, states, strict=True))


SIGNAL_VERDICTS = [
    (Signals(), "ok", None),
    (HEALTHY, "ok", None),
    (Signals(configured=False, state_found=False, config_error="not configured: x"), "down",
     "not configured: x"),
    (Signals(configured=False, state_found=False), "down", "not configured"),
    (Signals(config_error="config error: soracom.vpg_id: missing"), "down", "config error"),
    (Signals(state_file="/run/s.json", state_found=False), "down",
     "never set up: no state file /run/s.json"),
    (Signals(state_damage="state file unreadable: x"), "degraded", "state file unreadable"),
    (Signals(reconcile_failure="nftables: boom"), "failed", "nftables: boom"),
    (Signals(reconcile_failure="nftables: boom", daemon=DaemonSignal(False)), "degraded",
     "the daemon is not running"),
    (Signals(daemon=DaemonSignal(True, 7, loop_age_s=91.0, stale_after_s=90.0)), "degraded",
     "the daemon (pid 7) has not reconciled for 91 s: stuck?"),
    (Signals(api_error="HTTP 503"), "degraded", "SORACOM API: HTTP 503"),
    (Signals(redirection_error="HTTP 500"), "degraded", "SORACOM API: HTTP 500"),
    (Signals(redirection_findings=("not here",)), "degraded", "not here"),
    (Signals(ha=("ha: keepalived reports FAULT",)), "degraded", "ha: keepalived reports FAULT"),
    (Signals(probes=probes("up", "down")), "degraded", "VPG endpoint 100.64.10.2"),
    (Signals(probes=probes("down", "down")), "down", "no VPG endpoint answers probes"),
    (Signals(probes=probes("down", "unknown")), "degraded", "VPG endpoint 100.64.10.1"),
    (Signals(probes=probes("unknown", "unknown")), "ok", None),
    (Signals(tunnel=TunnelSignal("vxlan0", present=False)), "down", "vxlan0 does not exist"),
    (Signals(tunnel=TunnelSignal("vxlan0", kind="veth")), "down", "vxlan0 is a veth link"),
    (Signals(tunnel=TunnelSignal("vxlan0", admin_up=False, oper_up=False)), "down",
     "vxlan0 is admin down"),
    (Signals(gate_expected=True), "down", "not registered: no gate view yet"),
    (Signals(gate_expected=True, api_error="HTTP 401"), "down",
     "not registered: no gate view yet (HTTP 401)"),
    (Signals(gate=VIEW, local_address="172.31.9.9"), "down",
     "registered as 172.31.5.10, but this host's address is now 172.31.9.9"),
    (Signals(gate=VIEW, tunnel=TunnelSignal("vxlan0", vni=11, addresses=TUNNEL.addresses,
                                            flood=TUNNEL.flood)),
     "down", "vxlan0 has VNI 11, the registration says 10"),
    (Signals(gate=VIEW, tunnel=TunnelSignal("vxlan0", flood=TUNNEL.flood)), "down",
     "vxlan0 lacks the inner address 10.128.0.3/9"),
    (Signals(gate=VIEW, tunnel=TunnelSignal("vxlan0", addresses=TUNNEL.addresses)), "down",
     "vxlan0 has no FDB entry for any VPG endpoint"),
    (Signals(gate=VIEW, tunnel=TunnelSignal("vxlan0", addresses=TUNNEL.addresses,
                                            flood=frozenset({A("100.64.10.1")}))),
     "degraded", "vxlan0 has no FDB entry for VPG endpoint 100.64.10.2"),
]  # fmt: skip


@pytest.mark.parametrize(("signals", "health", "first"), SIGNAL_VERDICTS)
def test_each_signal_has_one_verdict(signals: Signals, health: str, first: str | None) -> None:
    verdict = evaluate(signals)
    assert verdict.health == health, verdict
    if first is None:
        assert verdict.reasons == ()
    else:
        assert verdict.reasons[0].startswith(first), verdict.reasons


def test_reasons_are_worst_first_and_each_cause_is_said_once() -> None:
    verdict = evaluate(
        Signals(
            ha=("ha: keepalived stopped: this peer cannot take over",),
            probes=probes("down", "down"),
            reconcile_failure="no gate view yet (HTTP 503)",
            api_error="HTTP 503",  # already in the failure: not said again
            redirection_error="HTTP 500",
        )
    )
    assert verdict == Verdict(
        "down",
        (
            "no VPG endpoint answers probes through the tunnel: 100.64.10.1 (inner 10.128.0.1), "
            "100.64.10.2 (inner 10.128.0.2)",
            "no gate view yet (HTTP 503)",
            "SORACOM API: HTTP 500",
            "ha: keepalived stopped: this peer cannot take over",
        ),
    )
    assert verdict.exit_code == 2
    assert [Verdict(h).exit_code for h in HEALTHS] == [0, 1, 2, 2]


def test_an_unconfigured_machine_says_only_that() -> None:
    verdict = evaluate(
        Signals(configured=False, state_found=False, config_error="not configured: x",
                tunnel=TunnelSignal("vxlan0", present=False))
    )  # fmt: skip
    assert verdict == Verdict("down", ("not configured: x",))


# ---- one verdict everywhere: status, metrics, STATUS= and state.json -------------------------


@dataclass(frozen=True)
class Case:
    """One row: changes to a healthy daemon's state document and kernel, and the verdict."""

    name: str
    health: str
    first: str | None = None  # how the first reason starts
    doc: dict[str, Any] = field(default_factory=dict)
    probe_states: tuple[str, str] = ("up", "up")
    link: LinkReading | None = field(default_factory=link)
    addresses: tuple[ipaddress.IPv4Interface, ...] = (I("10.128.0.3/9"),)
    flood: frozenset[ipaddress.IPv4Address] = frozenset({A("100.64.10.1"), A("100.64.10.2")})
    ha: tuple[str, ...] | None = None  # keepalived events; None: no [ha]
    claim_fails: bool = False
    recorded: bool = True  # state.json alone holds every signal of this row


def ha_record(states: Sequence[str], claim_fails: bool) -> dict[str, Any]:
    def claim() -> None:
        if claim_fails:
            raise RuntimeError("API answered 503")

    coordinator = Coordinator(claim, clock=lambda: NOW - 30)
    coordinator.handle([Event("INSTANCE", "gatepeer", s, 150) for s in states])
    return coordinator.view().to_json()


FAILED = {
    "last_reconcile": {"health": "failed", "error": "nftables: boom", "failure": "nftables: boom"}
}
API_DOWN = {"gate_error": "SORACOM API getVirtualPrivateGateway failed with HTTP 503"}
ELSEWHERE = {
    "gate": {**GATE, "redirection": {"enabled": True, "gateway": "10.128.0.9"}},
    "packet_path": {"mode": "nat"},
}

CASES = [
    Case("healthy", "ok"),
    Case("one endpoint silent", "degraded", "VPG endpoint 100.64.10.2",
         probe_states=("up", "down")),
    Case("every endpoint silent", "down", "no VPG endpoint answers",
         probe_states=("down", "down")),
    Case("reconcile failed", "failed", "nftables: boom", doc=FAILED),
    Case("reconcile failed and an endpoint silent", "failed", "nftables: boom", doc=FAILED,
         probe_states=("down", "up")),
    Case("API failing", "degraded", "SORACOM API: SORACOM API getVirtualPrivateGateway",
         doc=API_DOWN),
    Case("API answer refused", "degraded", "SORACOM API: VPG vpg-1: listGatePeers answer refused",
         doc={"gate_error": "VPG vpg-1: listGatePeers answer refused: netmask",
              "api_answer_refused": True, "api_refused_field": "netmask"}),
    Case("API failing and every endpoint silent", "down", "no VPG endpoint answers", doc=API_DOWN,
         probe_states=("down", "down")),
    Case("redirection post failing", "degraded", "SORACOM API: setRedirection",
         doc={"redirection": {"mode": "self", "error": "setRedirectionConfiguration: HTTP 500"}}),
    Case("nat without redirection here", "degraded", "packet_path.mode is nat", doc=ELSEWHERE),
    Case("no gate view yet", "down", "not registered: no gate view yet (HTTP 401)",
         doc={"gate": None, "gate_error": "HTTP 401"}),
    Case("registered for an old address", "down", "registered as 172.31.5.10",
         doc={"host": {"local_address": "172.31.9.9"}}),
    # What only a reader sees (the live kernel, the clock, [ha]):
    Case("loop stuck", "degraded", "the daemon (pid 4242) has not reconciled for 3600 s",
         doc={"reconciled_at": NOW - 3600}, recorded=False),
    Case("tunnel gone", "down", "vxlan0 does not exist", link=None, recorded=False),
    Case("tunnel admin down", "down", "vxlan0 is admin down", link=link(flags=0), recorded=False),
    Case("tunnel without the inner address", "down", "vxlan0 lacks the inner address",
         addresses=(), recorded=False),
    Case("one FDB entry missing", "degraded",
         "vxlan0 has no FDB entry for VPG endpoint 100.64.10.2",
         flood=frozenset({A("100.64.10.1")}), recorded=False),
    Case("ha backup", "ok", ha=("BACKUP",), recorded=False),
    Case("ha master", "ok", ha=("BACKUP", "MASTER"), recorded=False),
    Case("ha fault", "degraded", "ha: keepalived reports FAULT", ha=("MASTER", "FAULT"),
         recorded=False),
    Case("ha no state yet", "degraded", "ha: no state from keepalived yet", ha=(), recorded=False),
    Case("ha claim failing", "degraded", "ha: master, but claiming the gateway failed",
         ha=("MASTER",), claim_fails=True, recorded=False),
    Case("ha fault and tunnel gone", "down", "vxlan0 does not exist", ha=("FAULT",), link=None,
         recorded=False),
    Case("ha stopped and reconcile failed", "failed", "nftables: boom", ha=("STOP",), doc=FAILED,
         recorded=False),
]  # fmt: skip


def state_doc(case: Case) -> dict[str, Any]:
    """What the daemon writes for this case (its own "health" words are deliberately wrong:
    no reader may take them for the signals)."""
    doc: dict[str, Any] = {
        "version": "0.1.0",
        "pid": 4242,
        "updated_at": NOW - 1,
        "reconciled_at": NOW - 1,
        "health": "ok" if case.health != "ok" else "degraded",
        "reasons": [],
        "gate": GATE,
        "gate_error": None,
        "host": {"local_address": "172.31.5.10"},
        "tunnel": {"interface": "vxlan0"},
        "packet_path": {"mode": "route"},
        "redirection": {"mode": "unmanaged", "error": None},
        "last_reconcile": {"health": "ok", "error": None, "failure": None},
        "endpoints": [
            {**e, "fdb_present": True, "probe": {"state": s, "rtt_s": None, "loss": None}}
            for e, s in zip(GATE["endpoints"], case.probe_states, strict=True)
        ],
    }
    doc.update(case.doc)
    if case.ha is not None:
        doc["ha"] = ha_record(case.ha, case.claim_fails)
    return doc


def config_text(tmp_path: Path, case: Case) -> str:
    text = (
        '[soracom]\nauth_key_id = "keyId-x"\nvpg_id = "vpg-1"\n'
        f'auth_key_file = "{tmp_path / "key"}"\n'
        f'[agent]\nstate_file = "{tmp_path / "state.json"}"\n'
        f'reconcile_interval = "{INTERVAL:.0f}s"\n'
    )
    if case.ha is not None:
        text += f'[ha]\npeer_address = "{HA.peer_address}"\n'
    return text


class Agent:
    def __init__(self, summary: StateSummary) -> None:
        self._summary = summary

    def summary(self) -> StateSummary:
        return self._summary

    def api_stats(self) -> ApiStats:
        return ApiStats()

    def reconcile_durations(self) -> tuple[int, Sequence[float]]:
        return 0, []


@dataclass
class Kernel:
    case: Case

    def link(self, name: str) -> LinkReading | None:
        return self.case.link if self.case.link and self.case.link.name == name else None

    def flood_destinations(self, index: int) -> frozenset[ipaddress.IPv4Address]:
        return self.case.flood

    def addresses(self, index: int) -> Sequence[ipaddress.IPv4Interface]:
        return self.case.addresses

    def neighbour_count(self, index: int) -> int:
        return 0

    def sysctl(self, path: str) -> int | None:
        return None


def metrics_health(case: Case, summary: StateSummary) -> str:
    collector = HealthCollector(
        Agent(summary),
        Kernel(case),
        reconcile_interval=lambda: INTERVAL,
        ha=lambda: HA if case.ha is not None else None,
        clock=lambda: NOW,
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    lit = [
        line.split('"')[1]
        for line in generate_latest(registry).decode().splitlines()
        if line.startswith("gatepeer_health{") and line.endswith(" 1.0")
    ]
    assert len(lit) == 1, lit
    return lit[0]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_status_metrics_and_the_daemon_agree(tmp_path: Path, case: Case) -> None:
    doc = state_doc(case)
    atomic_json.write(tmp_path / "state.json", doc)
    config = tmp_path / "gatepeer.toml"
    config.write_text(config_text(tmp_path, case))
    tunnel = (
        TunnelReading(case.link, case.addresses, case.flood) if case.link else TunnelReading(None)
    )

    status = gather(
        config, read_tunnel=lambda _: tunnel, find_daemon=lambda pid: pid, clock=lambda: NOW
    )
    summary = StateSummary.from_state(doc)
    daemon = running_verdict(
        summary,
        tunnel,
        pid=4242,
        now=NOW,
        reconcile_interval=INTERVAL,
        packet_path_mode="route",
        redirection_mode="unmanaged",
        ha=HA if case.ha is not None else None,
    )
    scraped = metrics_health(case, summary)

    assert status.health == daemon.health == scraped == case.health, (
        status.reasons,
        daemon.reasons,
    )
    assert status.reasons == list(daemon.reasons)
    assert status.exit_code == {"ok": 0, "degraded": 1, "failed": 2, "down": 2}[case.health]
    if case.first is None:
        assert status.reasons == []
    else:
        assert status.reasons[0].startswith(case.first), status.reasons
    # The health the daemon writes in state.json judges the recorded signals and the probes
    # (not the live kernel, the clock or [ha]): the same verdict on those.
    if case.recorded:
        results = {
            e.outer: ProbeResult(s, None, None)  # type: ignore[arg-type]
            for e, s in zip(VIEW.endpoints, case.probe_states, strict=True)
        }
        written = {
            **doc,
            "endpoints": endpoint_report(
                VIEW.endpoints, results, frozenset(e.outer for e in VIEW.endpoints)
            ),
        }
        verdict = evaluate(recorded_signals(StateSummary.from_state(written)))
        assert (verdict.health, list(verdict.reasons)) == (case.health, status.reasons)


def test_status_shows_the_ha_line_and_object_only_with_ha(tmp_path: Path) -> None:
    case = Case("ha", "degraded", ha=("MASTER",), claim_fails=True)
    doc = state_doc(case)
    atomic_json.write(tmp_path / "state.json", doc)
    config = tmp_path / "gatepeer.toml"
    config.write_text(config_text(tmp_path, case))
    tunnel = TunnelReading(case.link, case.addresses, case.flood)
    status = gather(
        config, read_tunnel=lambda _: tunnel, find_daemon=lambda pid: pid, clock=lambda: NOW
    )
    j = to_json(status)
    assert j["ha"]["role"] == "master" and j["ha"]["claim_error"] == "API answered 503"
    assert j["ha"]["peer"] == {"address": "198.18.0.11", "state": "backup or down"}
    text = render(status)
    assert "ha            MASTER for 30 s, priority 150; peer 198.18.0.11 backup or down; " \
        "CLAIM FAILING: API answered 503" in text  # fmt: skip
    assert status.reasons == ["ha: master, but claiming the gateway failed: API answered 503"]
    # Without [ha] the recorded role is ignored: no object, no line, no reason.
    config.write_text(config_text(tmp_path, Case("single", "ok")))
    single = gather(
        config, read_tunnel=lambda _: tunnel, find_daemon=lambda pid: pid, clock=lambda: NOW
    )
    assert "ha" not in to_json(single) and "ha   " not in render(single)
    assert single.health == "ok"
