"""The status screen's line for the state document's "aws" object (pure: no boto3, no I/O)."""

from __future__ import annotations

from typing import Any


def line(aws: dict[str, Any]) -> str | None:
    """One line for `gatepeer status`: where aws.route_tables points and what the stale sweep
    removed; None when neither feature is on."""
    parts = []
    routes = aws.get("route_tables")
    if isinstance(routes, dict):
        tables = routes.get("tables") or {}
        if routes.get("error"):
            parts.append(f"routes FAILING: {routes['error']}")
        elif tables:
            states = ", ".join(f"{t} {how}" for t, how in sorted(tables.items()))
            parts.append(f"routes {routes.get('destination')} -> {routes.get('eni_id')} ({states})")
        else:
            parts.append("routes not checked yet")
    stale = aws.get("stale_registrations")
    if isinstance(stale, dict):
        if stale.get("error"):
            parts.append(f"stale sweep FAILING: {stale['error']}")
        elif stale.get("checked_at") is None:
            parts.append("stale sweep not run yet")
        else:
            removed = ", ".join(stale.get("removed") or []) or "none"
            parts.append(f"stale registrations removed: {removed}")
    return "aws           " + "; ".join(parts) if parts else None
