"""The HA collector: this peer's role and its changes, for Prometheus. Imported by the daemon's
metrics only (prometheus_client is heavy: never from `gatepeer status` or `gatepeer check`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

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
