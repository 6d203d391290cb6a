"""state.json, the agent's record of its last reconcile: its fields, how they are built from
the reconcile's results and the probes, the health judged once from them, and how a reader
parses them back. Pure: the daemon and `apply` write what `build` makes (`atomic_json` does the
I/O); `status`, the metrics, the daemon's STATUS= line and `gatepeer check` read the verdict
it holds, adding only what they read live through `health_signals` and the one evaluator.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from gatepeer import __version__, health, redirection
from gatepeer.config import IFNAME_RE, TunnelConfig
from gatepeer.desired_state import Endpoint, GateView, HostFacts, IPv4Address, IPv4Interface

# ---- what the probes found ------------------------------------------------------------------

ProbeState = Literal["up", "down", "unknown"]


@dataclass(frozen=True)
class ProbeResult:
    state: ProbeState
    rtt_s: float | None  # the last probe's round trip; None when it was not answered
    loss: float | None  # unanswered share of the prober's window; None before any
    error: str | None = None  # why the last probe could not even be sent

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "rtt_s": round(self.rtt_s, 6) if self.rtt_s is not None else None,
            "loss": round(self.loss, 3) if self.loss is not None else None,
            "error": self.error,
        }


UNKNOWN = ProbeResult("unknown", None, None)


# ---- reading the document ------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointSummary:
    outer: str
    inner: str | None
    fdb_present: bool | None  # None: not recorded
    probe: ProbeResult


@dataclass(frozen=True)
class StateSummary:
    """state.json as typed values; every field tolerates an older or partial document."""

    version: str | None = None
    pid: int | None = None
    updated_at: float | None = None
    reconciled_at: float | None = None  # the main loop's last pass (the prober writes too)
    interface: str = TunnelConfig.interface
    health: str = "unknown"
    reasons: tuple[str, ...] = ()
    gate: GateView | None = None
    local_address: str | None = None
    endpoints: tuple[EndpointSummary, ...] = ()
    probed: bool = False  # the daemon recorded probe results
    gate_fetched_at: float | None = None
    gate_error: str | None = None
    last_health: str | None = None
    last_error: str | None = None
    last_duration_s: float | None = None
    reconciles: int = 0
    failures: int = 0
    last_success_at: float | None = None
    packet_path_mode: str | None = None
    fast_path: bool | None = None
    vpc_cidrs: str | None = None  # route mode's VPC and its source: "198.18.0.0/16 (from imds)"
    api_answer_refused: bool = False  # gate_error is a refused answer (the last good view stays)
    api_refused_field: str | None = None  # the field that failed its check
    redirection_mode: str | None = None  # soracom.redirection when the state was written
    redirection_error: str | None = None  # the last setRedirectionConfiguration failed
    # Why the last reconcile failed (None: it did not); older documents name it only in
    # last_reconcile.error.
    reconcile_failure: str | None = None
    ha: Any = None  # the HA role the daemon recorded (RoleView.to_json()); None: none
    aws: Any = None  # [aws] route_tables and the stale sweep (AwsIntegration.to_json())
    sim_map: Any = None  # the SIM map's last refresh (SimRefresher.to_json()); None: off

    @property
    def redirection_is_self(self) -> bool | None:
        """The VPG redirects to this peer; None when no gate view is known."""
        return redirection.points_here(self.gate) if self.gate else None

    @property
    def registered(self) -> bool:
        """A registration this host's current address still matches."""
        if self.gate is None:
            return False
        return self.local_address is None or self.local_address == str(self.gate.outer)

    # Fields of the document that were present but unusable (wrong type, bad address).
    damaged: tuple[str, ...] = ()

    @classmethod
    def from_state(cls, data: Mapping[str, Any]) -> StateSummary:
        """Never raises: a field of the wrong shape is left at its default and named in
        `damaged`, so a hand-edited or truncated file cannot break `status` or the metrics."""
        r = _Reader(data)
        gate = None
        if data.get("gate"):
            try:
                gate = GateView.from_json(data["gate"])
            except (KeyError, ValueError, TypeError, AttributeError):
                r.damaged.append("gate")
        last, counters = r.section("last_reconcile"), r.section("counters")
        packet_path, host, tunnel = r.section("packet_path"), r.section("host"), r.section("tunnel")
        redirect = r.section("redirection")
        raw_endpoints = data.get("endpoints")
        probed = isinstance(raw_endpoints, list)
        if raw_endpoints is not None and not probed:
            r.damaged.append("endpoints")
        if isinstance(raw_endpoints, list):
            endpoints = []
            for i, e in enumerate(raw_endpoints):
                entry = _endpoint(e)
                if entry is None:
                    r.damaged.append(f"endpoints[{i}]")
                else:
                    endpoints.append(entry)
        else:
            endpoints = [
                EndpointSummary(str(e.outer), str(e.inner) if e.inner else None, None, UNKNOWN)
                for e in (gate.endpoints if gate else ())
            ]
        interface = r.text(tunnel, "interface", "tunnel.interface")
        if interface is not None and not IFNAME_RE.fullmatch(interface):
            r.damaged.append("tunnel.interface")
            interface = None
        reasons = data.get("reasons") or []
        if not isinstance(reasons, list) or not all(isinstance(x, str) for x in reasons):
            r.damaged.append("reasons")
            reasons = ()
        health = r.text(data, "health", "health")
        fast_path = packet_path.get("fast_path_active")
        if fast_path is not None and not isinstance(fast_path, bool):
            r.damaged.append("packet_path.fast_path_active")
            fast_path = None
        last_health = r.text(last, "health", "last_reconcile.health")
        failure = r.text(last, "failure", "last_reconcile.failure")
        if failure is None and last_health == "failed" and "failure" not in last:
            error = last.get("error")  # its damage, if any, is named below
            failure = error if isinstance(error, str) else None
        pid = data.get("pid")
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool)):
            r.damaged.append("pid")
            pid = None
        return cls(
            version=r.text(data, "version", "version"),
            pid=pid,
            updated_at=r.number(data, "updated_at", "updated_at"),
            reconciled_at=r.number(data, "reconciled_at", "reconciled_at"),
            interface=interface or TunnelConfig.interface,
            health=_known(health) if health is not None else "unknown",
            reasons=tuple(reasons),
            gate=gate,
            local_address=r.text(host, "local_address", "host.local_address"),
            endpoints=tuple(endpoints),
            probed=probed,
            gate_fetched_at=r.number(data, "gate_fetched_at", "gate_fetched_at"),
            gate_error=r.text(data, "gate_error", "gate_error"),
            last_health=last_health,
            last_error=r.text(last, "error", "last_reconcile.error"),
            last_duration_s=r.number(last, "duration_s", "last_reconcile.duration_s"),
            reconciles=r.count(counters, "reconciles", "counters.reconciles"),
            failures=r.count(counters, "failures", "counters.failures"),
            last_success_at=r.number(counters, "last_success_at", "counters.last_success_at"),
            packet_path_mode=r.text(packet_path, "mode", "packet_path.mode"),
            fast_path=fast_path,
            vpc_cidrs=_vpc_cidrs(packet_path),
            api_answer_refused=data.get("api_answer_refused") is True,
            api_refused_field=r.text(data, "api_refused_field", "api_refused_field"),
            redirection_mode=r.text(redirect, "mode", "redirection.mode"),
            redirection_error=r.text(redirect, "error", "redirection.error"),
            reconcile_failure=failure,
            ha=data.get("ha"),
            aws=data.get("aws") if isinstance(data.get("aws"), dict) else None,
            sim_map=data.get("sim_map") if isinstance(data.get("sim_map"), dict) else None,
            damaged=tuple(r.damaged),
        )


class _Reader:
    """Typed reads from the state document; a present value of the wrong type reads as absent
    and its key is remembered."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.damaged: list[str] = []

    def section(self, key: str) -> Mapping[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.damaged.append(key)
            return {}
        return value

    def text(self, where: Mapping[str, Any], key: str, name: str) -> str | None:
        value = where.get(key)
        if value is None or isinstance(value, str):
            return value
        self.damaged.append(name)
        return None

    def number(self, where: Mapping[str, Any], key: str, name: str) -> float | None:
        value = where.get(key)
        if value is not None and _number(value) is None:
            self.damaged.append(name)
        return _number(value)

    def count(self, where: Mapping[str, Any], key: str, name: str) -> int:
        value = where.get(key)
        if value is None:
            return 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self.damaged.append(name)
            return 0
        return value


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _address(value: Any) -> str | None:
    """The address as text when `value` is an IPv4 address, else None."""
    try:
        return str(ipaddress.IPv4Address(value)) if isinstance(value, str) else None
    except ValueError:
        return None


def _vpc_cidrs(packet_path: Mapping[str, Any]) -> str | None:
    """The VPC's networks the agent used and where they came from; None when not recorded."""
    nets, source = packet_path.get("vpc_cidrs"), packet_path.get("vpc_cidrs_source")
    if not isinstance(nets, list) or not nets or not all(isinstance(n, str) for n in nets):
        return None
    return f"{', '.join(nets)} (from {source if isinstance(source, str) else 'unknown'})"


def _endpoint(data: Any) -> EndpointSummary | None:
    """One probed endpoint, or None when the entry is damaged."""
    if not isinstance(data, Mapping):
        return None
    outer, inner, probe = data.get("outer"), data.get("inner"), data.get("probe") or {}
    fdb_present = data.get("fdb_present")
    if (
        _address(outer) is None
        or (inner is not None and _address(inner) is None)
        or not isinstance(probe, Mapping)
        or not isinstance(fdb_present, bool | None)
    ):
        return None
    state = probe.get("state")
    error = probe.get("error")
    return EndpointSummary(
        outer=str(_address(outer)),
        inner=_address(inner),
        fdb_present=fdb_present,
        probe=ProbeResult(
            state=state if state in ("up", "down") else "unknown",
            rtt_s=_number(probe.get("rtt_s")),
            loss=_number(probe.get("loss")),
            error=error if isinstance(error, str) else None,
        ),
    )


# ---- building the document ----------------------------------------------------------------


@dataclass(frozen=True)
class LastReconcile:
    """The outcome of the agent's last reconcile, as the document records it."""

    health: str  # the reconcile's own verdict ("ok", "degraded", "failed")
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    actions: tuple[str, ...]  # each action's command()
    duration_s: float
    failure: str | None  # why the kernel could not be converged


@dataclass(frozen=True)
class AgentSnapshot:
    """What the agent knows when it writes: the document's sources, no judgment yet."""

    pid: int
    now: float
    reconciled_at: float | None  # the main loop's last pass (the prober writes too)
    config_file: str | None
    interface: str
    redirection_mode: str
    packet_path_mode: str
    flowtable_allowed: bool  # packet_path.flowtable is not false
    outside_vpc: str | None = None  # packet_path.outside_vpc
    last: LastReconcile | None = None
    gate: GateView | None = None
    gate_fetched_at: float | None = None
    gate_error: str | None = None
    refused_field: str | None = None  # the field of a refused API answer
    redirection_error: str | None = None
    facts: HostFacts | None = None
    managed_link: Mapping[str, Any] | None = None
    owned_addresses: frozenset[IPv4Interface] = frozenset()
    reconciles: int = 0
    failures: int = 0
    last_success_at: float | None = None


@dataclass(frozen=True)
class Probes:
    """The daemon's view of the endpoints at writing time. `results` None: nobody probes;
    `fdb` None: the tunnel link does not exist."""

    results: Mapping[IPv4Address, ProbeResult] | None
    fdb: frozenset[IPv4Address] | None


@dataclass(frozen=True)
class StateDocument:
    """One document, in the two forms its readers need: `data` is what state.json holds,
    `summary` the same typed (what `StateSummary.from_state(data)` reads back)."""

    data: dict[str, Any]
    summary: StateSummary


def build(
    snapshot: AgentSnapshot,
    *,
    probes: Probes | None = None,
    ha: Mapping[str, Any] | None = None,
    aws: Mapping[str, Any] | None = None,
    sim_map: Mapping[str, Any] | None = None,
) -> StateDocument:
    """The document for `snapshot`. Without probes (`gatepeer apply`) its health is the
    reconcile's own verdict; with them (the daemon) it is judged here, once, by the evaluator
    from the recorded signals and the probes. The reconcile's verdict stays in last_reconcile."""
    r, last, facts = snapshot, snapshot.last, snapshot.facts
    data: dict[str, Any] = {
        "version": __version__,
        "pid": r.pid,
        "updated_at": r.now,
        # The prober rewrites this file too: staleness of the loop is judged by this one.
        "reconciled_at": r.reconciled_at,
        "config_file": r.config_file,
        "health": last.health if last else "unknown",
        "reasons": list(last.reasons) if last else [],
        "notes": list(last.notes) if last else [],
        "gate": r.gate.to_json() if r.gate else None,
        "gate_fetched_at": r.gate_fetched_at,
        "gate_error": r.gate_error,
        "api_answer_refused": r.refused_field is not None,
        "api_refused_field": r.refused_field,
        "redirection": {"mode": r.redirection_mode, "error": r.redirection_error},
        "host": {
            "underlay": facts.underlay,
            "underlay_mtu": facts.underlay_mtu,
            "local_address": str(facts.local_address),
        }
        if facts
        else None,
        "tunnel": {"interface": r.interface},
        "managed_link": dict(r.managed_link) if r.managed_link is not None else None,
        "owned_addresses": sorted(a.with_prefixlen for a in r.owned_addresses),
        "packet_path": {
            "mode": r.packet_path_mode,
            "outside_vpc": r.outside_vpc,
            "vpc_cidrs": [str(n) for n in facts.vpc_networks] if facts else None,
            "vpc_cidrs_source": facts.vpc_networks_source if facts else None,
            "flowtable_supported": facts.flowtable_supported if facts else None,
            "fast_path_active": bool(facts and facts.flowtable_supported and r.flowtable_allowed),
        },
        "last_reconcile": {
            "health": last.health,
            "actions": list(last.actions),
            "duration_s": round(last.duration_s, 6),
            "error": "; ".join(last.reasons) or None,
            "failure": last.failure,
        }
        if last
        else None,
        "counters": {
            "reconciles": r.reconciles,
            "failures": r.failures,
            "last_success_at": r.last_success_at,
        },
    }
    endpoints = r.gate.endpoints if r.gate else ()
    if ha is not None:
        # Read by gatepeer.ha.report; before the judgment, which reads a gateway elsewhere as
        # a backup's normal state when "ha" is there.
        data["ha"] = dict(ha)
    if aws:
        data["aws"] = dict(aws)  # [aws] route_tables and the stale sweep, for status
    if sim_map is not None:
        data["sim_map"] = dict(sim_map)  # the SIM map's last refresh, for status
    if probes is not None:
        data["endpoints"] = endpoint_report(endpoints, probes.results, probes.fdb)
    summary = _summary(r, data, probed=probes is not None)
    if probes is not None and probes.results is not None:
        verdict = health.evaluate(recorded_signals(summary))
        data["health"], data["reasons"] = verdict.health, list(verdict.reasons)
        summary = replace(summary, health=_known(verdict.health), reasons=verdict.reasons)
    return StateDocument(data, summary)


def _summary(r: AgentSnapshot, data: Mapping[str, Any], *, probed: bool) -> StateSummary:
    """`StateSummary.from_state(data)` without parsing: the typed values are at hand."""
    last = r.last
    if probed:
        endpoints = tuple(_endpoint(e) for e in data["endpoints"])
    else:
        endpoints = tuple(
            EndpointSummary(str(e.outer), str(e.inner) if e.inner else None, None, UNKNOWN)
            for e in (r.gate.endpoints if r.gate else ())
        )
    interface = r.interface if IFNAME_RE.fullmatch(r.interface) else TunnelConfig.interface
    return StateSummary(
        version=__version__,
        pid=r.pid,
        updated_at=r.now,
        reconciled_at=r.reconciled_at,
        interface=interface,
        health=_known(data["health"]),
        reasons=tuple(data["reasons"]),
        gate=r.gate,
        local_address=str(r.facts.local_address) if r.facts else None,
        endpoints=tuple(e for e in endpoints if e is not None),
        probed=probed,
        gate_fetched_at=r.gate_fetched_at,
        gate_error=r.gate_error,
        last_health=last.health if last else None,
        last_error="; ".join(last.reasons) or None if last else None,
        last_duration_s=round(last.duration_s, 6) if last else None,
        reconciles=r.reconciles,
        failures=r.failures,
        last_success_at=r.last_success_at,
        packet_path_mode=r.packet_path_mode,
        fast_path=data["packet_path"]["fast_path_active"],
        vpc_cidrs=_vpc_cidrs(data["packet_path"]),
        api_answer_refused=r.refused_field is not None,
        api_refused_field=r.refused_field,
        redirection_mode=r.redirection_mode,
        redirection_error=r.redirection_error,
        reconcile_failure=last.failure if last else None,
        ha=data.get("ha"),
        aws=data.get("aws"),
        sim_map=data.get("sim_map"),
    )


def _known(word: str) -> str:
    """The document's health words a reader recognises; any other reads as "unknown"."""
    return word if word in ("ok", "degraded", "failed") else "unknown"


def endpoint_report(
    endpoints: Sequence[Endpoint],
    results: Mapping[IPv4Address, ProbeResult] | None,
    fdb: frozenset[IPv4Address] | None,
) -> list[dict[str, Any]]:
    """The "endpoints" list of state.json. `results` None: nobody probes (no daemon);
    `fdb` None: the tunnel link does not exist."""
    return [
        {
            "outer": str(e.outer),
            "inner": str(e.inner) if e.inner else None,
            "fdb_present": e.outer in fdb if fdb is not None else False,
            "probe": (results.get(e.outer, UNKNOWN) if results is not None else UNKNOWN).to_json(),
        }
        for e in endpoints
    ]


# ---- judging what the document records -----------------------------------------------------


def probe_signals(endpoints: Iterable[EndpointSummary]) -> tuple[health.ProbeSignal, ...]:
    return tuple(health.ProbeSignal(e.outer, e.inner, e.probe.state) for e in endpoints)


def recorded_signals(st: StateSummary) -> health.Signals:
    """What the state document alone says: the registration, the last reconcile, the API, the
    redirection and, when the daemon wrote them, the probes. The daemon's own "health" in
    state.json (before its first gate view: down, as status says)."""
    return health.Signals(
        gate=st.gate,
        gate_expected=True,
        local_address=st.local_address,
        reconcile_failure=st.reconcile_failure,
        api_error=st.gate_error,
        api_answer_refused=st.api_answer_refused,
        redirection_error=st.redirection_error,
        # A state with "ha" is half of a pair: a gateway elsewhere is the backup's normal state.
        redirection_findings=tuple(
            redirection.findings(st.packet_path_mode, st.redirection_mode, st.gate)
        )
        if st.gate is not None and st.ha is None
        else (),
        probes=probe_signals(st.endpoints) if st.probed else None,
    )
