"""The flow log's own counters (`gatepeer.flow_logger`): records written, records dropped by
the rate limit, and the times the kernel reported lost events. Absent while the flow log is
off."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, Metric

from gatepeer.flow_logger import FlowLogStats


class FlowLogCollector:
    def __init__(self, stats: Callable[[], FlowLogStats | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        if s is None:
            return
        yield CounterMetricFamily(
            "gatepeer_flow_log_records",
            "Flow log records written (connection events of devices).",
            value=s.written,
        )
        dropped = CounterMetricFamily(
            "gatepeer_flow_log_records_dropped",
            "Flow log records not written, by reason (rate_limit: over flow_log.rate_per_second).",
            labels=["reason"],
        )
        dropped.add_metric(["rate_limit"], s.dropped_rate_limit)
        yield dropped
        yield CounterMetricFamily(
            "gatepeer_flow_log_kernel_overflows",
            "Times the kernel reported connection events lost (its buffer overflowed).",
            value=s.overflows,
        )
