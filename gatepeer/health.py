"""The one health evaluator: every health signal in, one verdict out. Pure: no I/O.

The agent (a reconcile), the daemon (its systemd STATUS= line and the health it writes in
state.json), `gatepeer status` and the metrics each gather the signals they can see and ask
`evaluate`; none of them judges a signal itself. The same signals always give the same verdict,
so the metrics and `gatepeer status` cannot disagree about one state.

The vocabulary, best to worst:

- "ok": converged, traffic flows;
- "degraded": traffic flows, something needs a look (an API error, one endpoint silent, ...);
- "failed": the last reconcile could not bring the kernel to the desired state;
- "down": no data path: nothing set up, no configuration, the tunnel broken, or no VPG
  endpoint answering.

A signal left at its default was not looked at (the agent does not read its own state file,
nobody probes without a daemon): it says nothing, good or bad.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from gatepeer.desired_state import GateView, IPv4Address, IPv4Interface

HEALTHS = ("ok", "degraded", "failed", "down")  # best first
RANK = {h: i for i, h in enumerate(HEALTHS)}
# `gatepeer status`: 0 healthy, 1 degraded, 2 down or not configured (a failed reconcile
# leaves the data path in doubt: 2 as well).
STATUS_EXIT_CODES = {"ok": 0, "degraded": 1, "failed": 2, "down": 2}


@dataclass(frozen=True)
class TunnelSignal:
    """The tunnel link as the kernel has it right now."""

    interface: str
    present: bool = True
    kind: str | None = "vxlan"
    admin_up: bool = True
    oper_up: bool = True
    oper_state: str | None = None
    vni: int | None = None
    addresses: frozenset[IPv4Interface] = frozenset()
    flood: frozenset[IPv4Address] = frozenset()  # all-zero-MAC FDB destinations


@dataclass(frozen=True)
class ProbeSignal:
    """One VPG endpoint and what the probes through the tunnel last said ("up", "down",
    "unknown")."""

    outer: str
    inner: str | None
    state: str


@dataclass(frozen=True)
class DaemonSignal:
    """`gatepeer run`: whether it runs, and how long ago its loop last reconciled."""

    running: bool
    pid: int | None = None
    loop_age_s: float | None = None
    stale_after_s: float | None = None


@dataclass(frozen=True)
class Signals:
    # The setup, as `gatepeer status` finds it.
    config_error: str | None = None  # the configuration cannot be read (the message says why)
    configured: bool = True  # a configuration file exists
    state_file: str | None = None  # where the state document was looked for; None: not looked
    state_found: bool = True
    state_damage: str | None = None  # the state document exists but is (partly) unreadable
    # The registration.
    gate: GateView | None = None
    gate_expected: bool = False  # a missing gate view is a finding (not for the agent itself)
    local_address: str | None = None  # this host's address now (None: not known)
    # The reconcile and the SORACOM API.
    reconcile_failure: str | None = None
    api_error: str | None = None  # the last gate view refresh failed (the last good one stays)
    api_answer_refused: bool = False  # api_error is an answer that failed a check
    redirection_error: str | None = None  # the last setRedirectionConfiguration failed
    redirection_findings: tuple[str, ...] = ()  # redirection.findings(): not pointing here
    # What is running and what it sees.
    tunnel: TunnelSignal | None = None
    probes: tuple[ProbeSignal, ...] | None = None  # None: nobody probes
    daemon: DaemonSignal | None = None  # None: not asked (the daemon itself, or the agent)
    ha: tuple[str, ...] = ()  # ha.report.reasons(): role or claim problems


@dataclass(frozen=True)
class Verdict:
    health: str
    reasons: tuple[str, ...] = ()  # worst first

    @property
    def exit_code(self) -> int:
        """`gatepeer status`'s exit code for this verdict."""
        return STATUS_EXIT_CODES[self.health]


@dataclass
class _Findings:
    items: list[tuple[str, str]] = field(default_factory=list)

    def add(self, health: str, reason: str) -> None:
        if all(reason != said for _, said in self.items):
            self.items.append((health, reason))

    def mention(self, health: str, detail: str, reason: str) -> None:
        """Add `reason` unless `detail` was already said (one cause, one line)."""
        if not any(detail in said for _, said in self.items):
            self.add(health, reason)

    def verdict(self) -> Verdict:
        if not self.items:
            return Verdict("ok")
        ordered = sorted(self.items, key=lambda item: -RANK[item[0]])  # stable: keeps order
        return Verdict(ordered[0][0], tuple(reason for _, reason in ordered))


def evaluate(s: Signals) -> Verdict:
    """The health and its reasons, worst first."""
    if not s.configured and not s.state_found:
        # Never configured, never run: the rest follows from it.
        return Verdict("down", (s.config_error or "not configured",))
    f = _Findings()
    if s.config_error:
        f.add("down", s.config_error)
    if s.state_damage:
        f.add("degraded", s.state_damage)  # what the kernel has is still judged below
    elif not s.state_found:
        f.add(
            "down",
            f"never set up: no state file {s.state_file} "
            "(run `gatepeer apply` or start the daemon)",
        )
    if s.tunnel is not None:
        _tunnel(f, s.tunnel)
    if s.state_found:
        _registration(f, s)
    _daemon(f, s)
    if s.probes is not None:
        _probes(f, s.probes)
    if s.api_error and (s.gate is not None or not s.gate_expected):
        f.mention(
            "degraded", s.api_error, f"SORACOM API: {s.api_error}; keeping the last applied state"
        )
    if s.redirection_error:
        f.mention("degraded", s.redirection_error, f"SORACOM API: {s.redirection_error}")
    for finding in s.redirection_findings:
        f.add("degraded", finding)
    for reason in s.ha:
        f.add("degraded", reason)
    return f.verdict()


def _tunnel(f: _Findings, t: TunnelSignal) -> None:
    if not t.present:
        f.add("down", f"{t.interface} does not exist")
    elif t.kind != "vxlan":
        f.add("down", f"{t.interface} is a {t.kind or 'plain'} link, not vxlan")
    elif not t.oper_up:
        flag = "admin down" if not t.admin_up else f"operationally {t.oper_state}"
        f.add("down", f"{t.interface} is {flag}")


def _registration(f: _Findings, s: Signals) -> None:
    gate, t = s.gate, s.tunnel
    if gate is None:
        if s.gate_expected:
            f.add(
                "down",
                "not registered: no gate view yet" + (f" ({s.api_error})" if s.api_error else ""),
            )
        return
    if s.local_address is not None and s.local_address != str(gate.outer):
        f.add(
            "down", f"registered as {gate.outer}, but this host's address is now {s.local_address}"
        )
    if t is None or not t.present:
        return
    if t.vni is not None and t.vni != gate.vni:
        f.add("down", f"{t.interface} has VNI {t.vni}, the registration says {gate.vni}")
    if gate.inner not in t.addresses:
        f.add("down", f"{t.interface} lacks the inner address {gate.inner}")
    missing = [str(e.outer) for e in gate.endpoints if e.outer not in t.flood]
    if missing and len(missing) == len(gate.endpoints):
        f.add("down", f"{t.interface} has no FDB entry for any VPG endpoint")
    elif missing:
        f.add("degraded", f"{t.interface} has no FDB entry for VPG endpoint {', '.join(missing)}")


def _daemon(f: _Findings, s: Signals) -> None:
    """The reconcile's failure, judged by who made it, and the daemon itself."""
    d = s.daemon
    if d is not None and not d.running:
        f.add(
            "degraded",
            "the daemon is not running: nothing repairs drift or probes the VPG endpoints",
        )
        if s.reconcile_failure:
            # What a one-shot apply recorded is history: the live kernel was judged above.
            f.add("degraded", f"the last reconcile failed: {s.reconcile_failure}")
        return
    if s.reconcile_failure:
        f.add("failed", s.reconcile_failure)
    if d is None or d.loop_age_s is None or d.stale_after_s is None:
        return
    if d.loop_age_s > d.stale_after_s:
        f.add(
            "degraded",
            f"the daemon (pid {d.pid}) has not reconciled for {d.loop_age_s:.0f} s: stuck?",
        )


def _probes(f: _Findings, probes: Sequence[ProbeSignal]) -> None:
    """One endpoint silent while another answers: degraded (traffic takes the other); every
    endpoint silent: down (no traffic reaches the devices)."""
    down = [p for p in probes if p.state == "down"]
    if not down:
        return
    names = ", ".join(f"{p.outer} (inner {p.inner})" for p in down)
    if len(down) == len(probes):
        f.add("down", f"no VPG endpoint answers probes through the tunnel: {names}")
    else:
        f.add("degraded", f"VPG endpoint {names} does not answer probes through the tunnel")
