"""Per-device metrics with bounded cardinality.

Series per SIM only for the `[devices] metrics_top_n` devices with the most traffic; every
device, top or not, adds to its SIM group's counters (so a device moving in or out of the top
never makes a group counter go down), and to the counts of devices and of silent devices.
A device is silent when it has been quiet for longer than twice its learned usual interval
(`device_activity`). Nothing is exported while the kernel does not count per device
(`packet_path.device_counters` off, or the table absent): unknown, not zero.

The SIM's name, IMSI and group come from the SIM map (`gatepeer.sims.SimMap`); an address the
map does not know is in group "unknown". No secret is ever a label.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gatepeer.metrics.device_activity import (
    NO_GROUP,
    UNKNOWN_SIM,
    DeviceActivity,
    DeviceCounters,
    DeviceView,
    GroupTotals,
)

DEFAULT_TOP_N = 10


class SimRecordFields(Protocol):
    """The fields of `gatepeer.sims.SimRecord` the labels use."""

    @property
    def imsi(self) -> str: ...
    @property
    def name(self) -> str | None: ...
    @property
    def group_id(self) -> str | None: ...


class SimMapFields(Protocol):
    @property
    def records(self) -> Mapping[ipaddress.IPv4Address, SimRecordFields]: ...


class DeviceSource(Protocol):
    def traffic(self) -> Mapping[ipaddress.IPv4Address, DeviceCounters] | None:
        """The kernel's per-device counters; None while the kernel does not count them."""

    def sims(self) -> SimMapFields | None:
        """The SIM map (None before the first one is loaded)."""


DEVICE_LABELS = ["address", "name", "imsi", "group"]


class DeviceCollector:
    """Top talkers, groups, silent devices. Stateful: each scrape is a reading the tracker
    learns from (Prometheus scrapes every 15 to 60 s: finer than any usual interval worth
    alerting on)."""

    def __init__(
        self,
        source: DeviceSource,
        *,
        top_n: Callable[[], int] = lambda: DEFAULT_TOP_N,
        clock: Callable[[], float] = time.time,
        activity: DeviceActivity | None = None,
    ) -> None:
        self.source = source
        self.top_n = top_n
        self.clock = clock
        # Passed in to outlive this collector (a new metrics listener keeps what was learned).
        self.activity = activity if activity is not None else DeviceActivity()
        self._lock = threading.Lock()  # two scrapes at once must not both feed the tracker

    def collect(self) -> Iterator[Metric]:
        traffic = self.source.traffic()
        if traffic is None:
            return
        sims = self.source.sims()
        records: Mapping[ipaddress.IPv4Address, SimRecordFields] = (
            sims.records if sims is not None else {}
        )

        def group_of(address: ipaddress.IPv4Address) -> str:
            record = records.get(address)
            if record is None:
                return UNKNOWN_SIM
            return record.group_id or NO_GROUP

        now = self.clock()
        with self._lock:
            self.activity.observe(traffic, group_of, now)
            top = self.activity.top(self.top_n(), now)
            groups = {g: t for g, t in sorted(self.activity.groups.items())}
            devices = sum(t.devices for t in groups.values())
            silent = sum(t.silent for t in groups.values())
        yield GaugeMetricFamily(
            "gatepeer_devices", "Devices whose traffic the kernel counts now.", value=devices
        )
        yield GaugeMetricFamily(
            "gatepeer_devices_silent",
            "Devices quiet for longer than twice their learned usual interval.",
            value=silent,
        )
        yield from _top_families(top, records)
        yield from _group_families(groups)


def _top_families(
    top: list[DeviceView], records: Mapping[ipaddress.IPv4Address, SimRecordFields]
) -> Iterator[Metric]:
    doc = " (the top devices by traffic only; every device counts in its group's)"
    families = {
        "sent_bytes": CounterMetricFamily(
            "gatepeer_device_sent_bytes", "Bytes the device sent" + doc, labels=DEVICE_LABELS
        ),
        "received_bytes": CounterMetricFamily(
            "gatepeer_device_received_bytes",
            "Bytes sent to the device" + doc,
            labels=DEVICE_LABELS,
        ),
        "sent_packets": CounterMetricFamily(
            "gatepeer_device_sent_packets", "Packets the device sent" + doc, labels=DEVICE_LABELS
        ),
        "received_packets": CounterMetricFamily(
            "gatepeer_device_received_packets",
            "Packets sent to the device" + doc,
            labels=DEVICE_LABELS,
        ),
    }
    age = GaugeMetricFamily(
        "gatepeer_device_last_seen_age_seconds",
        "Seconds since the device's last packet" + doc,
        labels=DEVICE_LABELS,
    )
    usual = GaugeMetricFamily(
        "gatepeer_device_usual_interval_seconds",
        "The device's learned usual interval between bursts; absent until learned" + doc,
        labels=DEVICE_LABELS,
    )
    for view in top:
        record = records.get(view.address)
        labels = [
            str(view.address),
            (record.name or "") if record else "",
            record.imsi if record else "",
            view.group,
        ]
        families["sent_bytes"].add_metric(labels, view.bytes_from_device)
        families["received_bytes"].add_metric(labels, view.bytes_to_device)
        families["sent_packets"].add_metric(labels, view.packets_from_device)
        families["received_packets"].add_metric(labels, view.packets_to_device)
        age.add_metric(labels, round(view.last_seen_age_s, 3))
        if view.usual_interval_s is not None:
            usual.add_metric(labels, round(view.usual_interval_s, 3))
    yield from families.values()
    yield age
    yield usual


def _group_families(groups: Mapping[str, GroupTotals]) -> Iterator[Metric]:
    label = ["group"]
    doc = " (every device of the SIM group; group none: SIMs without one, unknown: not in the map)"
    sent_bytes = CounterMetricFamily(
        "gatepeer_device_group_sent_bytes", "Bytes the group's devices sent" + doc, labels=label
    )
    received_bytes = CounterMetricFamily(
        "gatepeer_device_group_received_bytes",
        "Bytes sent to the group's devices" + doc,
        labels=label,
    )
    sent_packets = CounterMetricFamily(
        "gatepeer_device_group_sent_packets",
        "Packets the group's devices sent" + doc,
        labels=label,
    )
    received_packets = CounterMetricFamily(
        "gatepeer_device_group_received_packets",
        "Packets sent to the group's devices" + doc,
        labels=label,
    )
    devices = GaugeMetricFamily(
        "gatepeer_device_group_devices", "The group's devices counted now" + doc, labels=label
    )
    silent = GaugeMetricFamily(
        "gatepeer_device_group_silent", "The group's silent devices" + doc, labels=label
    )
    for group, t in groups.items():
        sent_bytes.add_metric([group], t.bytes_from_device)
        received_bytes.add_metric([group], t.bytes_to_device)
        sent_packets.add_metric([group], t.packets_from_device)
        received_packets.add_metric([group], t.packets_to_device)
        devices.add_metric([group], t.devices)
        silent.add_metric([group], t.silent)
    yield from (sent_bytes, received_bytes, sent_packets, received_packets, devices, silent)
