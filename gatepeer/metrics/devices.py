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
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gatepeer.device_traffic import Counters as DeviceCounters
from gatepeer.device_traffic import DeviceReading
from gatepeer.metrics.device_activity import (
    NO_GROUP,
    UNKNOWN_SIM,
    DeviceActivity,
    DeviceView,
    GroupTotals,
)

log = logging.getLogger(__name__)

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
    def traffic(self) -> DeviceReading | Mapping[ipaddress.IPv4Address, DeviceCounters] | None:
        """The kernel's per-device counters (the daemon's: a `DeviceReading`, columns); None
        while the kernel does not count them."""

    def sims(self) -> SimMapFields | None:
        """The SIM map (None before the first one is loaded)."""


DEVICE_LABELS = ["address", "name", "imsi", "group"]


# In the daemon, the tracker reads the kernel at most this often, on a thread of its own: with
# 100,000 devices one reading costs about a second of Python (bench/bench_device_metrics.py),
# which must not be a scrape's. Prometheus scrapes every 15 to 60 s.
MIN_READ_INTERVAL_S = 15.0


@dataclass(frozen=True)
class DeviceSnapshot:
    """What one reading concluded, exported by every scrape until the next reading."""

    at: float
    devices: int
    silent: int
    top: list[tuple[list[str], DeviceView]]  # labels, view
    groups: dict[str, GroupTotals]


class DeviceCollector:
    """Top talkers, groups, silent devices. Each reading of the kernel's counters is a lesson
    for the tracker. `background`: read on a thread when the last reading is older than
    `min_interval_s` and export the last conclusions meanwhile (the daemon); else read at
    every scrape (tests)."""

    def __init__(
        self,
        source: DeviceSource,
        *,
        top_n: Callable[[], int] = lambda: DEFAULT_TOP_N,
        clock: Callable[[], float] = time.time,
        activity: DeviceActivity | None = None,
        background: bool = False,
        min_interval_s: float = MIN_READ_INTERVAL_S,
    ) -> None:
        self.source = source
        self.top_n = top_n
        self.clock = clock
        # Passed in to outlive this collector (a new metrics listener keeps what was learned).
        self.activity = activity if activity is not None else DeviceActivity()
        self.background = background
        self.min_interval_s = min_interval_s
        self.snapshot: DeviceSnapshot | None = None
        self._lock = threading.Lock()  # one reading at a time feeds the tracker
        self._reading: threading.Thread | None = None

    def refresh(self) -> None:
        """Read the counters and the SIM map once, teach the tracker, keep its conclusions."""
        with self._lock:
            traffic = self.source.traffic()
            if traffic is None:
                self.snapshot = None
                return
            sims = self.source.sims()
            records: Mapping[ipaddress.IPv4Address, SimRecordFields] = (
                sims.records if sims is not None else {}
            )

            packed_group_of = getattr(records, "group_of_int", None)  # sims.SimRecords': fast

            def group_of(n: int) -> str:
                if packed_group_of is not None:
                    known, group_id = packed_group_of(n)
                    if not known:
                        return UNKNOWN_SIM
                    return group_id or NO_GROUP
                record = records.get(ipaddress.IPv4Address(n))
                if record is None:
                    return UNKNOWN_SIM
                return record.group_id or NO_GROUP

            now = self.clock()
            self.activity.observe(traffic, group_of, now)
            top = [(_labels(v, records), v) for v in self.activity.top(self.top_n(), now)]
            groups = {g: replace(t) for g, t in sorted(self.activity.groups.items())}
            self.snapshot = DeviceSnapshot(
                now,
                sum(t.devices for t in groups.values()),
                sum(t.silent for t in groups.values()),
                top,
                groups,
            )

    def _refresh_logged(self) -> None:
        try:
            self.refresh()
        except Exception:  # noqa: BLE001 - the next scrape tries again
            log.exception("device metrics: reading the per-device counters failed")

    def _current(self) -> DeviceSnapshot | None:
        """The conclusions this scrape exports; starts a reading when they are stale."""
        if not self.background or self.snapshot is None:
            self.refresh()  # the first scrape waits for the first reading
            return self.snapshot
        snap = self.snapshot
        stale = self.clock() - snap.at >= self.min_interval_s
        if stale and (self._reading is None or not self._reading.is_alive()):
            self._reading = threading.Thread(
                target=self._refresh_logged, name="device-metrics", daemon=True
            )
            self._reading.start()
        return snap

    def collect(self) -> Iterator[Metric]:
        snap = self._current()
        if snap is None:
            return
        yield GaugeMetricFamily(
            "gatepeer_devices", "Devices whose traffic the kernel counts now.", value=snap.devices
        )
        yield GaugeMetricFamily(
            "gatepeer_devices_silent",
            "Devices quiet for longer than twice their learned usual interval.",
            value=snap.silent,
        )
        yield from _top_families(snap.top, max(0.0, self.clock() - snap.at))
        yield from _group_families(snap.groups)


def _labels(
    view: DeviceView, records: Mapping[ipaddress.IPv4Address, SimRecordFields]
) -> list[str]:
    record = records.get(view.address)
    return [
        str(view.address),
        (record.name or "") if record else "",
        record.imsi if record else "",
        view.group,
    ]


def _top_families(top: list[tuple[list[str], DeviceView]], since: float) -> Iterator[Metric]:
    """`since`: seconds since the reading, added to each device's age at it."""
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
    for labels, view in top:
        families["sent_bytes"].add_metric(labels, view.bytes_from_device)
        families["received_bytes"].add_metric(labels, view.bytes_to_device)
        families["sent_packets"].add_metric(labels, view.packets_from_device)
        families["received_packets"].add_metric(labels, view.packets_to_device)
        age.add_metric(labels, round(view.last_seen_age_s + since, 3))
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
