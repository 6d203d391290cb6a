"""The health evaluator's signals from what a reader found live, beside the state document's
own (`state_document.recorded_signals`): the live tunnel (`rtnl.TunnelReading`), the daemon
and [ha]. Pure.

`gatepeer status`, the metrics and the daemon's STATUS= line build their signals here, so one
state and one kernel give one verdict.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatepeer import health, redirection
from gatepeer.config import HaConfig
from gatepeer.ha import report as ha_report
from gatepeer.state_document import StateSummary, probe_signals, recorded_signals

if TYPE_CHECKING:  # a reading's type only: this module does no I/O
    from gatepeer.kernel.rtnl import TunnelReading

# state.json is rewritten after every reconcile and probe round; older than this many
# reconcile intervals means the daemon is stuck.
STALE_INTERVALS = 3


def tunnel_signal(interface: str, tunnel: TunnelReading) -> health.TunnelSignal:
    link = tunnel.link
    if link is None:
        return health.TunnelSignal(
            interface, present=False, kind=None, admin_up=False, oper_up=False
        )
    return health.TunnelSignal(
        interface,
        kind=link.kind,
        admin_up=link.admin_up,
        oper_up=link.oper_up,
        oper_state=link.oper_state,
        vni=link.vni,
        addresses=frozenset(tunnel.addresses),
        flood=frozenset(tunnel.flood),
    )


def daemon_signal(
    st: StateSummary, pid: int | None, now: float, reconcile_interval: float
) -> health.DaemonSignal:
    """`pid`: the live daemon's (None: not running). The loop's own pass is what counts: the
    prober rewrites the file every round."""
    last = st.reconciled_at or st.updated_at
    return health.DaemonSignal(
        running=pid is not None,
        pid=pid,
        loop_age_s=now - last if last else None,
        stale_after_s=STALE_INTERVALS * reconcile_interval,
    )


def observed_signals(
    st: StateSummary | None,
    tunnel: TunnelReading,
    *,
    interface: str,
    daemon: health.DaemonSignal | None,
    packet_path_mode: str | None,
    redirection_mode: str | None,
    ha: HaConfig | None,
    config_error: str | None = None,
    configured: bool = True,
    state_path: Path | None = None,
    state_error: str | None = None,
) -> health.Signals:
    """A reader's signals: the state document (None: there is none) joined with the live
    kernel, the daemon and the configuration. Status and the metrics both build theirs here,
    so the same state and kernel give them the same verdict."""
    reader: dict[str, Any] = dict(
        config_error=config_error,
        configured=configured,
        state_file=str(state_path) if state_path is not None else None,
        state_found=st is not None or state_error is not None,
        state_damage=state_error,
        tunnel=tunnel_signal(interface, tunnel),
    )
    if st is None:
        return health.Signals(**reader)
    findings: tuple[str, ...] = ()
    if st.gate is not None:
        findings = tuple(redirection.findings(packet_path_mode, redirection_mode, st.gate, ha=ha))
    # Without a daemon nobody probes: its old results would only mislead.
    running = daemon is not None and daemon.running
    # What the document records, read with this reader's settings, the live kernel and HA.
    return replace(
        recorded_signals(st),
        **reader,
        redirection_findings=findings,
        probes=probe_signals(st.endpoints) if st.probed and running else None,
        daemon=daemon,
        ha=tuple(ha_report.reasons(ha, st.ha)),
    )


def running_verdict(
    st: StateSummary,
    tunnel: TunnelReading,
    *,
    pid: int,
    now: float,
    reconcile_interval: float,
    packet_path_mode: str | None,
    redirection_mode: str | None,
    ha: HaConfig | None,
) -> health.Verdict:
    """The running daemon's health as it reports it (metrics, systemd STATUS=): what
    `gatepeer status` says while the daemon runs on a valid configuration."""
    signals = observed_signals(
        st,
        tunnel,
        interface=st.interface,
        daemon=daemon_signal(st, pid, now, reconcile_interval),
        packet_path_mode=st.packet_path_mode or packet_path_mode,
        redirection_mode=st.redirection_mode or redirection_mode,
        ha=ha,
    )
    return health.evaluate(signals)
