"""The HA collector: this peer's role and its changes, for Prometheus. Imported by the daemon's
metrics only (prometheus_client is heavy: never from `gatepeer status` or `gatepeer check`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gatepeer.ha import conntrackd
from gatepeer.ha.role import RoleView

ROLES = ("master", "backup", "fault", "stopped", "unknown")


class HaCollector:
    """gatepeer_ha_* from the coordinator's view (None: [ha] is not configured: nothing)."""

    def __init__(self, view: Callable[[], RoleView | None]) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        view = self.view()
        if view is None:
            return
        role = GaugeMetricFamily(
            "gatepeer_ha_role", "1 for this peer's VRRP role as keepalived reports it.",
            labels=["role"],
        )  # fmt: skip
        for name in ROLES:
            role.add_metric([name], int(view.role == name))
        yield role
        yield CounterMetricFamily(
            "gatepeer_ha_transitions",
            "Role changes keepalived reported since the daemon started.",
            value=view.transitions,
        )
        if view.since is not None:
            yield GaugeMetricFamily(
                "gatepeer_ha_last_transition_timestamp_seconds",
                "When the role last changed (Unix time).",
                value=view.since,
            )
        if view.priority is not None:
            yield GaugeMetricFamily(
                "gatepeer_ha_priority", "This peer's VRRP priority.", value=view.priority
            )
        yield CounterMetricFamily(
            "gatepeer_ha_claims",
            "Successful claims of the gateway (on becoming master, and re-assertions).",
            value=view.claims,
        )
        yield GaugeMetricFamily(
            "gatepeer_ha_claim_failing",
            "1 while this peer is master and its last claim of the gateway failed.",
            value=int(view.claim_error is not None),
        )
        yield GaugeMetricFamily(
            "gatepeer_ha_handover_failing",
            "1 when conntrackd's steps at the last role change (commit, resync) failed.",
            value=int(view.handover_error is not None),
        )
        yield from sync_metrics(view)


def sync_metrics(view: RoleView) -> Iterator[Metric]:
    """gatepeer_ha_sync_*: conntrackd's sync as the daemon last read it (nothing without sync)."""
    health = view.sync
    if health is None:
        return
    yield GaugeMetricFamily(
        "gatepeer_ha_sync_up",
        "1 when conntrackd answered the daemon's last reading of its statistics.",
        value=int(health.error is None),
    )
    yield GaugeMetricFamily(
        "gatepeer_ha_sync_broken",
        "1 when the sync cannot be trusted (conntrackd silent, the peer unheard, recent errors).",
        value=int(bool(conntrackd.problems(health, health.read_at))),
    )
    if health.last_message_at is not None:
        yield GaugeMetricFamily(
            "gatepeer_ha_sync_last_message_timestamp_seconds",
            "When a sync message from the other peer's conntrackd last arrived (Unix time).",
            value=health.last_message_at,
        )
    entries = GaugeMetricFamily(
        "gatepeer_ha_sync_entries",
        "Flows in conntrackd's caches: internal (this peer's), external (the other peer's).",
        labels=["cache"],
    )
    for cache, value in (
        ("internal", health.internal_entries),
        ("external", health.external_entries),
    ):
        if value is not None:
            entries.add_metric([cache], value)
    yield entries
    if health.errors is not None:
        yield CounterMetricFamily(
            "gatepeer_ha_sync_errors",
            "Sync messages conntrackd failed to send or receive, or found malformed.",
            value=health.errors,
        )
    if health.lost is not None:
        yield CounterMetricFamily(
            "gatepeer_ha_sync_lost_messages",
            "Sync messages FTFW found missing in the sequence (it asks for them again).",
            value=health.lost,
        )
