"""`gatepeer check`: the health check keepalived runs every `ha.check_interval` (vrrp_script).

Healthy means this peer can carry the devices' traffic right now: the tunnel is there and up
with its inner address, the `inet gatepeer` table is loaded, the registration matches this
host, the daemon runs (it is the one that claims the gateway), and at least one VPG endpoint
answered a recent probe. A failing check puts keepalived's instance into FAULT, which hands the
role to the other peer.

It must be as light as `gatepeer status` (keepalived runs it every second on both peers): the
same readers (state.json, `kernel.rtnl`), plus one `nft list table`; no pyroute2.

`gatepeer check --sync` is the second script, with a negative weight: is conntrackd's copy of
the other peer's connections good? On the master only conntrackd not answering counts: the
other peer's silence is not the master's fault. It reads what the daemon recorded (state.json's
"ha" "sync", read from `conntrackd -s` every second) and runs nothing itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gatepeer import atomic_json
from gatepeer.config import Config, ConfigError, load
from gatepeer.ha import conntrackd
from gatepeer.ha.role import RoleView
from gatepeer.kernel import nftables
from gatepeer.kernel.rtnl import TunnelReading
from gatepeer.running_daemon import daemon_pid
from gatepeer.state_document import StateSummary

# Probe results older than this many probe intervals (plus one timeout) no longer prove a path:
# the daemon's prober rewrites state.json after every round.
PROBE_ROUNDS_FRESH = 3


@dataclass(frozen=True)
class CheckInputs:
    state: StateSummary | None
    state_path: Path
    tunnel: TunnelReading
    interface: str
    table_loaded: bool | None  # None: nft could not say
    table_error: str | None
    daemon: int | None
    probe_interval: float
    probe_timeout: float
    now: float


def evaluate(c: CheckInputs) -> list[str]:
    """Why this peer must not hold the role; empty when it may. Pure."""
    reasons: list[str] = []
    link = c.tunnel.link
    if link is None:
        reasons.append(f"{c.interface} does not exist")
    elif link.kind != "vxlan":
        reasons.append(f"{c.interface} is not a vxlan link")
    elif not link.oper_up:
        reasons.append(f"{c.interface} is not up ({link.oper_state})")
    if c.table_loaded is None:
        reasons.append(f"cannot list table {nftables.FAMILY} {nftables.TABLE}: {c.table_error}")
    elif not c.table_loaded:
        reasons.append(f"table {nftables.FAMILY} {nftables.TABLE} is not loaded")
    st = c.state
    if st is None:
        reasons.append(f"no state file {c.state_path}")
        return reasons
    if st.gate is None:
        reasons.append("not registered: no gate view")
    elif not st.registered:
        reasons.append(f"registered as {st.gate.outer}, this host is {st.local_address}")
    elif link is not None and st.gate.inner not in c.tunnel.addresses:
        reasons.append(f"{c.interface} lacks the inner address {st.gate.inner}")
    if c.daemon is None:
        reasons.append("the daemon is not running")
    age = c.now - st.updated_at if st.updated_at is not None else None
    fresh_for = PROBE_ROUNDS_FRESH * c.probe_interval + c.probe_timeout
    if not st.probed:
        reasons.append("no probe results yet")
    elif age is None or age > fresh_for:
        shown = f"{age:.0f} s old" if age is not None else "undated"
        reasons.append(f"probe results are {shown}")
    elif not any(e.probe.state == "up" for e in st.endpoints):
        reasons.append("no VPG endpoint answers its probe")
    return reasons


def gather(
    cfg: Config,
    *,
    read_tunnel: Callable[[str], TunnelReading] = TunnelReading.read,
    table_text: Callable[[], str | None] = nftables.current,
    find_daemon: Callable[[int | None], int | None] = daemon_pid,
    clock: Callable[[], float] = time.time,
) -> CheckInputs:
    raw = atomic_json.read(cfg.agent.state_file)
    state = StateSummary.from_state(raw) if raw else None
    loaded: bool | None
    error = None
    try:
        loaded = table_text() is not None
    except nftables.NftError as exc:
        loaded, error = None, str(exc).splitlines()[0]
    daemon = find_daemon(state.pid if state else None)
    return inputs(cfg, state, read_tunnel, loaded, error, daemon, clock())


def inputs(
    cfg: Config,
    state: StateSummary | None,
    read_tunnel: Callable[[str], TunnelReading],
    table_loaded: bool | None,
    table_error: str | None,
    daemon: int | None,
    now: float,
) -> CheckInputs:
    """The check's inputs from what a caller found (this command, or the daemon judging
    itself: gatepeer/ha/verdict.py)."""
    interface = state.interface if state is not None else cfg.tunnel.interface
    return CheckInputs(
        state=state,
        state_path=cfg.agent.state_file,
        tunnel=read_tunnel(interface),
        interface=interface,
        table_loaded=table_loaded,
        table_error=table_error,
        daemon=daemon,
        probe_interval=cfg.probes.interval,
        probe_timeout=cfg.probes.timeout,
        now=now,
    )


def reading_fresh_for(cfg: Config) -> float:
    """How old the daemon's last reading may be and still prove anything (seconds)."""
    return PROBE_ROUNDS_FRESH * cfg.probes.interval + cfg.probes.timeout


def run(config_file: Path) -> tuple[int, str]:
    """Exit code and the one line to print: 0 healthy, 1 not, 2 bad config."""
    try:
        cfg = load(config_file, check_system=False)
    except ConfigError as exc:
        return 2, f"config error: {exc}"
    reasons = evaluate(gather(cfg))
    if reasons:
        return 1, "unhealthy: " + "; ".join(reasons)
    return 0, "healthy"


def evaluate_sync(recorded_ha: object, now: float, fresh_for: float) -> list[str]:
    """Why this peer's sync is broken; empty when it is good. Pure. The silence of the other
    peer is measured at the daemon's last reading, whose own age is judged against `fresh_for`
    (the daemon writes state.json at least every probe round)."""
    view = RoleView.from_json(recorded_ha)
    health = view.sync
    if health is None:
        return ["sync: the daemon recorded no reading of conntrackd (is it running with [ha]?)"]
    age = now - health.read_at
    if age > fresh_for:
        return [f"sync: the daemon's last reading of conntrackd is {age:.0f} s old"]
    if view.role == "master" and health.error is None:
        # The master's flows are in its own kernel table; a silent peer, or send errors to it,
        # mean the peer is gone or returning. Lowering the master then would let a returning
        # peer (its copy not yet good) win the next election: the role went back to the old
        # master after its port returned, despite nopreempt (test_ha_lab.py, route mode).
        return []
    return conntrackd.problems(health, health.read_at)


def run_sync(config_file: Path, clock: Callable[[], float] = time.time) -> tuple[int, str]:
    """`gatepeer check --sync`: exit code and line, as `run`."""
    try:
        cfg = load(config_file, check_system=False)
    except ConfigError as exc:
        return 2, f"config error: {exc}"
    if cfg.ha is None or not cfg.ha.conntrack_sync:
        return 0, "sync not configured (ha.conntrack_sync is off)"
    raw = atomic_json.read(cfg.agent.state_file)
    state = StateSummary.from_state(raw) if raw else None
    if state is None:
        return 1, f"unhealthy: sync: no state file {cfg.agent.state_file}"
    reasons = evaluate_sync(state.ha, clock(), reading_fresh_for(cfg))
    if reasons:
        return 1, "unhealthy: " + "; ".join(reasons)
    return 0, "sync healthy"
