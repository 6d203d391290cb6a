"""The status screen's line for the state document's "aws" object (pure: no boto3, no I/O)."""

from __future__ import annotations

from typing import Any


def line(aws: dict[str, Any]) -> str | None:
    """One line for `gatepeer status`: where aws.route_tables points, what the stale sweep
    removed, what the allow-list's AWS names resolved to; None when no feature is on."""
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
    destinations = aws.get("destinations")
    if isinstance(destinations, dict):
        entries = destinations.get("entries") or {}
        errors = destinations.get("errors") or {}
        count = sum(len(e.get("prefixes") or []) for e in entries.values() if isinstance(e, dict))
        part = f"destinations {len(entries)} name(s) resolved to {count} prefix(es)"
        if destinations.get("unresolved"):
            part += f", unresolved: {', '.join(destinations['unresolved'])}"
        if errors:
            part += f"; FAILING: {next(iter(errors.values()))}"
        parts.append(part)
    return "aws           " + "; ".join(parts) if parts else None
