"""The report behind `gatepeer status`: state.json read together with the live kernel.

It works when the daemon is down (the kernel and the last state.json say what is there) and on
a machine that was never configured. It must stay fast: standard library and `kernel.rtnl`
only, no pyroute2, no prometheus_client. The metrics read the daemon's state through the same
`state_document.StateSummary`, so the two never disagree on what the state document means.

Health is judged by `gatepeer.health.evaluate` (what the words mean is said there), on the
signals `health_signals.observed_signals` makes of what was read, as for the metrics and the
daemon's STATUS= line. Exit codes: "ok" 0, "degraded" 1, "failed" and "down" 2.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gatepeer import __version__, atomic_json, health, redirection
from gatepeer.aws import report as aws_report
from gatepeer.config import (
    AgentConfig,
    ConfigError,
    HaConfig,
    TunnelConfig,
    load,
)
from gatepeer.ha import report as ha_report
from gatepeer.health_signals import daemon_signal, observed_signals
from gatepeer.kernel.rtnl import TunnelReading
from gatepeer.running_daemon import daemon_pid
from gatepeer.state_document import UNKNOWN, StateSummary

EXIT_CODES = health.STATUS_EXIT_CODES


# ---- the report -----------------------------------------------------------------------------


@dataclass
class Status:
    config_path: Path
    config_error: str | None  # None: a valid configuration was read
    configured: bool
    state_path: Path
    state: StateSummary | None
    interface: str
    tunnel: TunnelReading
    daemon: int | None  # pid of the running daemon
    reconcile_interval: float
    now: float
    packet_path_mode: str | None = None
    state_error: str | None = None  # "state file unreadable: ..." when it exists but is damaged
    redirection_mode: str | None = None
    ha_config: HaConfig | None = None  # [ha]; None: a single peer (no HA line, no HA reasons)
    ha_check: dict[str, Any] | None = None  # keepalived's verdict (verdict.report), with [ha]
    health: str = "down"
    reasons: list[str] = field(default_factory=list)

    @property
    def ha(self) -> dict[str, Any] | None:
        """The "ha" object of the report; None without [ha]."""
        recorded = self.state.ha if self.state else None
        return ha_report.summary(self.ha_config, recorded, self.now, self.ha_check)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.health]


def gather(
    config_path: Path,
    *,
    read_tunnel: Callable[[str], TunnelReading] = TunnelReading.read,
    find_daemon: Callable[[int | None], int | None] = daemon_pid,
    clock: Callable[[], float] = time.time,
) -> Status:
    configured = config_path.exists()
    error: str | None = None
    interface, state_path = TunnelConfig.interface, AgentConfig.state_file
    interval, mode = AgentConfig.reconcile_interval, None
    redirection_mode: str | None = None
    ha_config: HaConfig | None = None
    if not configured:
        error = f"not configured: {config_path} does not exist (set --config or GATEPEER_CONFIG)"
    else:
        try:
            # Status reports; it does not judge the key file (apply and run do).
            cfg = load(config_path, check_system=False)
        except ConfigError as exc:
            error = f"config error: {exc}"
        else:
            interface, state_path = cfg.tunnel.interface, cfg.agent.state_file
            interval, mode = cfg.agent.reconcile_interval, cfg.packet_path.mode
            redirection_mode = cfg.soracom.redirection
            ha_config = cfg.ha
    raw = atomic_json.read(state_path)
    state = StateSummary.from_state(raw) if raw else None
    state_error = None
    if raw is None and state_path.exists():
        state_error = f"state file unreadable: {state_path} is not a gatepeer state document"
    elif state is not None and state.damaged:
        state_error = (
            f"state file unreadable: {state_path} has damaged {', '.join(state.damaged[:5])}"
            + (" ..." if len(state.damaged) > 5 else "")
            + "; those parts are ignored"
        )
    if state is not None:
        interface = state.interface  # what the daemon works on, even if the file was edited
    status = Status(
        config_path=config_path,
        config_error=error,
        configured=configured,
        state_path=state_path,
        state=state,
        interface=interface,
        tunnel=read_tunnel(interface),
        daemon=find_daemon(state.pid if state else None),
        reconcile_interval=interval,
        now=clock(),
        packet_path_mode=(state.packet_path_mode if state else None) or mode,
        state_error=state_error,
        redirection_mode=(state.redirection_mode if state else None) or redirection_mode,
        ha_config=ha_config,
    )
    if ha_config is not None:
        from gatepeer.ha import verdict

        status.ha_check = verdict.report(cfg, status.now)
    status.health, status.reasons = evaluate(status)
    return status


def evaluate(s: Status) -> tuple[str, list[str]]:
    """The health and why, worst first. Pure: looks only at what `gather` read."""
    st = s.state
    daemon = None
    if st is not None:
        daemon = daemon_signal(st, s.daemon, s.now, s.reconcile_interval)
    signals = observed_signals(
        st,
        s.tunnel,
        interface=s.interface,
        daemon=daemon,
        packet_path_mode=s.packet_path_mode,
        redirection_mode=s.redirection_mode,
        ha=s.ha_config,
        config_error=s.config_error,
        configured=s.configured,
        state_path=s.state_path,
        state_error=s.state_error,
    )
    verdict = health.evaluate(signals)
    return verdict.health, list(verdict.reasons)


# ---- output -------------------------------------------------------------------------------


def to_json(s: Status) -> dict[str, Any]:
    st, link, gate = s.state, s.tunnel.link, s.state.gate if s.state else None
    stats = link.stats if link else None
    report: dict[str, Any] = {
        "health": s.health,
        "exit_code": s.exit_code,
        "reasons": s.reasons,
        "version": __version__,
        "config": {"path": str(s.config_path), "configured": s.configured, "error": s.config_error},
        "daemon": {"running": s.daemon is not None, "pid": s.daemon},
        "registration": {
            "registered": st.registered if st else False,
            "vpg_id": gate.vpg_id,
            "outer_address": str(gate.outer),
            "inner_address": str(gate.inner),
            "vni": gate.vni,
            "device_subnet": str(gate.device_subnet),
            "gate_open": gate.gate_opened,
        }
        if gate
        else None,
        "tunnel": {
            "interface": s.interface,
            "present": link is not None,
            "kind": link.kind if link else None,
            "vni": link.vni if link else None,
            "mtu": link.mtu if link else None,
            "local_address": str(link.local) if link and link.local else None,
            "dst_port": link.dst_port if link else None,
            "addresses": [str(a) for a in s.tunnel.addresses],
            "admin_up": link.admin_up if link else False,
            "oper_state": link.oper_state if link else None,
            "oper_up": link.oper_up if link else False,
            "counters": {
                "rx_bytes": stats.rx_bytes,
                "rx_packets": stats.rx_packets,
                "rx_errors": stats.rx_errors,
                "rx_dropped": stats.rx_dropped,
                "tx_bytes": stats.tx_bytes,
                "tx_packets": stats.tx_packets,
                "tx_errors": stats.tx_errors,
                "tx_dropped": stats.tx_dropped,
            }
            if stats
            else None,
        },
        "endpoints": [
            {
                "outer": e.outer,
                "inner": e.inner,
                "fdb_present": ipaddress.IPv4Address(e.outer) in s.tunnel.flood,
                # Without a daemon nobody probes: old results would only mislead.
                "probe": (e.probe if s.daemon is not None else UNKNOWN).to_json(),
            }
            for e in (st.endpoints if st else ())
        ],
        "packet_path": {
            "mode": s.packet_path_mode,
            "fast_path": st.fast_path if st else None,
            "vpc_cidrs": st.vpc_cidrs if st else None,
        },
        "redirection": {
            "mode": s.redirection_mode,
            "enabled": gate.redirection.enabled if gate.redirection else False,
            "gateway": str(gate.redirection.gateway)
            if gate.redirection and gate.redirection.gateway
            else None,
            "is_self": redirection.points_here(gate),
            "this_peer": str(redirection.own_gateway(gate)),
        }
        if gate
        else {"mode": s.redirection_mode},
        "api": {
            "error": st.gate_error if st else None,
            "answer_refused": st.api_answer_refused if st else False,
            "refused_field": st.api_refused_field if st else None,
        },
        "last_reconcile": {
            "health": st.last_health,
            "error": st.last_error,
            "duration_s": st.last_duration_s,
            "runs": st.reconciles,
            "failures": st.failures,
            "last_success_at": st.last_success_at,
        }
        if st
        else None,
        "state_file": {
            "path": str(s.state_path),
            "updated_at": st.updated_at if st else None,
            "age_s": round(s.now - st.updated_at, 3) if st and st.updated_at else None,
            "error": s.state_error,
        },
    }
    ha = s.ha
    if ha is not None:  # only with [ha]: a single peer's report has no "ha" key
        report["ha"] = ha
    if st is not None and st.aws:
        report["aws"] = st.aws
    if st is not None and st.sim_map:
        report["sim_map"] = st.sim_map  # the daemon's last SIM map refresh (gatepeer devices)
    return report


def _sim_map_line(sim_map: dict[str, Any], now: float) -> str:
    """The SIM map's line: how many SIMs, how old; a failed refresh said, with the last map."""
    fetched = sim_map.get("fetched_at")
    line = f"sim map       {sim_map.get('sims')} SIMs, fetched {_ago(now, fetched)}"
    if sim_map.get("error"):
        line += f"; last refresh failed, keeping the last map: {sim_map['error']}"
    return line


def _ago(now: float, then: float | None) -> str:
    if then is None:
        return "never"
    secs = max(0.0, now - then)
    if secs < 120:
        return f"{secs:.0f} s ago"
    if secs < 7200:
        return f"{secs / 60:.0f} min ago"
    return f"{secs / 3600:.1f} h ago"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table(rows: Sequence[Sequence[str]], indent: str) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]


def render(s: Status) -> str:
    """One screen for a person; the JSON has the same facts for scripts."""
    j = to_json(s)
    lines = [f"gatepeer {__version__}: {s.health.upper()}"]
    lines += [f"  ! {r}" for r in s.reasons]
    pad = " " * 14
    reg = j["registration"]
    if reg:
        lines.append(
            f"registration  VPG {reg['vpg_id']}, Gate {'open' if reg['gate_open'] else 'closed'}"
            f"{'' if reg['registered'] else ', NOT REGISTERED for this address'}"
        )
        lines.append(
            f"{pad}outer {reg['outer_address']}  inner {reg['inner_address']}  "
            f"VNI {reg['vni']}  devices {reg['device_subnet']}"
        )
    else:
        lines.append("registration  none known")
    t = j["tunnel"]
    if t["present"]:
        lines.append(
            f"tunnel        {t['interface']} {t['kind'] or 'link'}, "
            f"{'up' if t['oper_up'] else 'DOWN'} (admin {'up' if t['admin_up'] else 'down'}, "
            f"oper {t['oper_state']}), VNI {t['vni']}, MTU {t['mtu']}, dstport {t['dst_port']}"
        )
        lines.append(
            f"{pad}local {t['local_address']}  addresses {', '.join(t['addresses']) or 'none'}"
        )
        c = t["counters"]
        if c:
            lines.append(
                f"{pad}rx {_bytes(c['rx_bytes'])} / {c['rx_packets']} pkts "
                f"({c['rx_errors']} errs, {c['rx_dropped']} drops)  "
                f"tx {_bytes(c['tx_bytes'])} / {c['tx_packets']} pkts "
                f"({c['tx_errors']} errs, {c['tx_dropped']} drops)"
            )
    else:
        lines.append(f"tunnel        {t['interface']} does not exist")
    if j["endpoints"]:
        rows = [["VPG endpoint", "inner", "FDB", "probe", "RTT", "loss"]]
        for e in j["endpoints"]:
            p = e["probe"]
            rows.append(
                [
                    e["outer"],
                    e["inner"] or "-",
                    "yes" if e["fdb_present"] else "NO",
                    p["state"] if p["state"] != "down" else "DOWN",
                    f"{p['rtt_s'] * 1000:.2f} ms" if p["rtt_s"] is not None else "-",
                    f"{p['loss'] * 100:.0f} %" if p["loss"] is not None else "-",
                ]
            )
        table = _table(rows, pad)
        lines.append("endpoints     " + table[0][len(pad) :])
        lines += table[1:]
    pp = j["packet_path"]
    fast = {True: "fast path active", False: "no fast path", None: "fast path unknown"}
    lines.append(f"packet path   {pp['mode'] or 'unknown'}, {fast[pp['fast_path']]}")
    if pp.get("vpc_cidrs"):
        lines.append(f"vpc cidrs     {pp['vpc_cidrs']}")
    rd = j["redirection"]
    if s.state is not None and s.state.gate is not None:
        current = redirection.describe(s.state.gate.redirection)
        lines.append(
            f"redirection   gateway {current}"
            + (" (this peer)" if rd["is_self"] else f", not this peer ({rd['this_peer']})")
            + f"; soracom.redirection {rd['mode'] or 'unknown'}"
        )
    if "ha" in j:
        lines += ha_report.lines(j["ha"])
    aws_line = aws_report.line(j["aws"]) if "aws" in j else None
    if aws_line:
        lines.append(aws_line)
    if "sim_map" in j:
        lines.append(_sim_map_line(j["sim_map"], s.now))
    lr = j["last_reconcile"]
    if lr:
        took = f" in {lr['duration_s'] * 1000:.1f} ms" if lr["duration_s"] is not None else ""
        lines.append(
            f"reconcile     last {lr['health'] or 'unknown'}{took}; last success "
            f"{_ago(s.now, lr['last_success_at'])}; {lr['runs']} runs, {lr['failures']} failed"
        )
        if lr["error"]:
            lines.append(f"{pad}error: {lr['error']}")
    else:
        lines.append("reconcile     never ran")
    d = j["daemon"]
    lines.append(
        f"daemon        {'running, pid ' + str(d['pid']) if d['running'] else 'not running'}"
    )
    sf = j["state_file"]
    lines.append(f"config        {s.config_path}" + ("" if s.configured else " (missing)"))
    updated = f"updated {_ago(s.now, sf['updated_at'])}" if sf["updated_at"] else "none"
    lines.append(f"state file    {sf['path']} ({updated})")
    return "\n".join(lines)
