"""What status and metrics show about high availability, from the role the coordinator
recorded (state.json's "ha" object, `RoleView.to_json()`) and `[ha]`. Pure: no I/O.

The other peer's state is what keepalived's own view implies, nothing more: a backup stays
backup only while it hears the master's adverts, so our BACKUP means the peer is master; as
master we only know the peer is not advertising a higher priority, except when it was heard
claiming master too (MASTER_RX_LOWER_PRI, the end of a split brain).
"""

from __future__ import annotations

from typing import Any

from gatepeer.config import HaConfig
from gatepeer.ha import conntrackd
from gatepeer.ha.role import RoleView

# A peer heard as master this recently (seconds) is reported as "master too".
SPLIT_BRAIN_RECENT = 60.0

PEER_STATE = {
    "master": "backup or down",
    "backup": "master",
    "fault": "unknown",
    "stopped": "unknown",
    "unknown": "unknown",
}


def claims(ha: HaConfig) -> list[str]:
    """What this peer claims on MASTER."""
    out = ["redirection"]  # Junction redirection through the API, always
    if ha.snat_address is not None:
        out.append(f"snat_address {ha.snat_address}")
    if ha.virtual_address is not None:
        out.append(f"virtual_address {ha.virtual_address}")
    out += [f"route_table {t}" for t in ha.route_tables]
    return out


def peer_state(view: RoleView, now: float) -> str:
    recent = view.peer_lower_priority_at
    if view.role == "master" and recent is not None and now - recent <= SPLIT_BRAIN_RECENT:
        return "master too (split brain, re-asserted)"
    return PEER_STATE[view.role]


def connections_kept(ha: HaConfig) -> tuple[bool, str]:
    """Whether nat mode's connections (and route mode's masqueraded ones) survive a failover,
    and why not. Route mode's device <-> VPC traffic holds no state and always survives."""
    if ha.snat_address is None:
        return False, (
            "nat mode's connections will not survive a failover: set ha.snat_address (the new "
            "master masquerades to its own address, which the VPC hosts have never seen)"
        )
    if not ha.conntrack_sync:
        return False, (
            "nat mode's connections will not survive a failover: ha.conntrack_sync is off (the "
            "new master has no conntrack entry for them)"
        )
    return True, "conntrack synchronised, NAT address moves with the master"


def sync_summary(ha: HaConfig, view: RoleView, now: float) -> dict[str, Any] | None:
    """The "sync" object of the report; None when sync is off."""
    if not ha.conntrack_sync:
        return None
    health = view.sync
    if health is None:
        return {"state": "unknown", "problems": conntrackd.problems(None, now)}
    found = conntrackd.problems(health, health.read_at)
    age = health.last_sync_age(health.read_at)
    return {
        "state": "broken" if found else "ok",
        "problems": found,
        "read_at": health.read_at,
        "last_sync_age_s": round(age, 3) if age is not None else None,
        "internal_entries": health.internal_entries,
        "external_entries": health.external_entries,
        "errors": health.errors,
        "lost": health.lost,
        "port": ha.sync_port,
    }


def summary(
    ha: HaConfig | None, recorded: Any, now: float, check: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The "ha" object of `gatepeer status --json`; None without [ha] (a single peer).
    `check`: the verdict keepalived's health script reads (verdict.report), when known."""
    if ha is None:
        return None
    view = RoleView.from_json(recorded)
    return {
        "role": view.role,
        "since": view.since,
        "for_s": round(now - view.since, 3) if view.since is not None else None,
        "priority": view.priority,
        "transitions": view.transitions,
        "peer": {"address": str(ha.peer_address), "state": peer_state(view, now)},
        "claims": claims(ha),
        "claimed_at": view.claimed_at,
        "claim_error": view.claim_error,
        "handover_error": view.handover_error,
        "snat_address": str(ha.snat_address) if ha.snat_address is not None else None,
        "connections_survive_failover": connections_kept(ha)[0],
        "connections_note": connections_kept(ha)[1],
        "sync": sync_summary(ha, view, now),
        "check": check,
    }


def reasons(ha: HaConfig | None, recorded: Any) -> list[str]:
    """Inputs for the health evaluator (each one degrades): what an operator must look at."""
    if ha is None:
        return []
    view = RoleView.from_json(recorded)
    if view.role == "unknown":
        return ["ha: no state from keepalived yet (is keepalived running with our config?)"]
    if view.role == "fault":
        return ["ha: keepalived reports FAULT: this peer cannot take over"]
    if view.role == "stopped":
        return ["ha: keepalived stopped: this peer cannot take over"]
    out = []
    if view.role == "master" and view.claim_error:
        out.append(f"ha: master, but claiming the gateway failed: {view.claim_error}")
    if view.handover_error:
        out.append(f"ha: conntrackd's handover failed: {view.handover_error}")
    if ha.conntrack_sync and view.sync is not None:
        # Judged at the daemon's reading; a missing reading is the check's to report.
        out += [f"ha: {p}" for p in conntrackd.problems(view.sync, view.sync.read_at)]
    return out


def line(s: dict[str, Any]) -> str:
    """The status screen's line for `summary(...)`."""
    held = f" for {s['for_s']:.0f} s" if s["for_s"] is not None else ""
    prio = f", priority {s['priority']}" if s["priority"] is not None else ""
    text = f"ha            {s['role'].upper()}{held}{prio}; peer {s['peer']['address']} "
    text += s["peer"]["state"]
    if s["claim_error"]:
        text += f"; CLAIM FAILING: {s['claim_error']}"
    elif s["role"] == "master":
        text += f"; claims {', '.join(s['claims'])}"
    return text


def lines(s: dict[str, Any]) -> list[str]:
    """The status screen's HA lines: the role, what a failover does to connections, and
    keepalived's health check."""
    return [line(s), sync_line(s), *check_line(s)]


def check_line(s: dict[str, Any]) -> list[str]:
    """Why keepalived may refuse this peer the role (the daemon's verdict), when known."""
    check = s.get("check")
    if check is None:
        return []
    if check["verdict"] == "ok":
        return [f"ha check      OK ({check['age_s']:.0f} s ago)"]
    if check["verdict"] == "fail":
        return [f"ha check      FAIL ({check['age_s']:.0f} s ago): {'; '.join(check['reasons'])}"]
    return [f"ha check      {check['verdict']}: {check['file']} (is the daemon running?)"]


def sync_line(s: dict[str, Any]) -> str:
    """The status screen's second HA line: what a failover does to open connections."""
    sync = s.get("sync")
    if not s.get("connections_survive_failover"):
        return f"ha sync       {s.get('connections_note')}"
    if sync is None or sync["state"] == "unknown":
        return "ha sync       no reading of conntrackd yet"
    entries = f"{sync['internal_entries']} own / {sync['external_entries']} peer's flows"
    age = sync["last_sync_age_s"]
    heard = f"peer heard {age:.0f} s ago" if age is not None else "peer never heard"
    text = f"ha sync       {sync['state'].upper()}: {entries}, {heard}, {sync['errors']} errors"
    if sync["problems"]:
        text += "; " + "; ".join(sync["problems"])
    return text
