"""The ENA allowance counters of the underlay interface (`gatepeer.aws.ena`).

`gatepeer_ena_allowance_exceeded_packets_total{device, allowance}`: packets the ENA driver
queued or dropped because the instance exceeded an allowance, `allowance` being the ethtool
statistic's name without `_allowance_exceeded` (bw_in, bw_out, pps, conntrack, linklocal);
`gatepeer_ena_conntrack_allowance_available{device}` where the driver offers it. Off ENA
nothing is exported: absent, not zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gatepeer.aws.ena import ALLOWANCE_COUNTERS, CONNTRACK_AVAILABLE

SUFFIX = "_allowance_exceeded"


class EnaCollector:
    def __init__(
        self,
        interface: Callable[[], str | None],
        read: Callable[[str], Mapping[str, int]],
    ) -> None:
        self.interface = interface
        self.read = read

    def collect(self) -> Iterator[Metric]:
        device = self.interface()
        if device is None:
            return
        values = self.read(device)
        exceeded = [(n, values[n]) for n in ALLOWANCE_COUNTERS if n in values]
        if exceeded:
            family = CounterMetricFamily(
                "gatepeer_ena_allowance_exceeded_packets",
                "Packets the ENA driver queued or dropped because the instance exceeded an "
                "EC2 network allowance (ethtool statistic <allowance>_allowance_exceeded).",
                labels=["device", "allowance"],
            )
            for name, value in exceeded:
                family.add_metric([device, name.removesuffix(SUFFIX)], value)
            yield family
        if CONNTRACK_AVAILABLE in values:
            available = GaugeMetricFamily(
                "gatepeer_ena_conntrack_allowance_available",
                "Tracked connections the instance may still open before its allowance "
                "(ethtool statistic conntrack_allowance_available).",
                labels=["device"],
            )
            available.add_metric([device], values[CONNTRACK_AVAILABLE])
            yield available
