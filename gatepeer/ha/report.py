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
    if ha.virtual_address is not None:
        out.append(f"virtual_address {ha.virtual_address}")
    out += [f"route_table {t}" for t in ha.route_tables]
    return out


def peer_state(view: RoleView, now: float) -> str:
    recent = view.peer_lower_priority_at
    if view.role == "master" and recent is not None and now - recent <= SPLIT_BRAIN_RECENT:
        return "master too (split brain, re-asserted)"
    return PEER_STATE[view.role]


def summary(ha: HaConfig | None, recorded: Any, now: float) -> dict[str, Any] | None:
    """The "ha" object of `gatepeer status --json`; None without [ha] (a single peer)."""
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
    if view.role == "master" and view.claim_error:
        return [f"ha: master, but claiming the gateway failed: {view.claim_error}"]
    return []


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
