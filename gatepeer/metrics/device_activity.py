"""Pure: what the daemon remembers about each device between readings of the kernel's
per-device counters, and what it concludes (who talks most, who went silent).

The kernel's set element for a device expires some time after its last packet, taking its
counters with it; this tracker keeps the last time each device was seen and a learned "usual
interval" between its bursts of activity, so a device that went quiet is still known (and
counted as silent) after its element is gone, and the per-group byte counters only ever grow
(each reading adds what changed since the previous one, a recreated element counting from 0).

Memory is under 200 bytes per device seen within `FORGET_AFTER_S` (measured in
bench/bench_device_metrics.py): each is kept by its address's integer, not an `IPv4Address`
(which would keep a reading's object alive, 88 bytes more), in a slotted record.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Gaps shorter than this are one burst of activity, not two.
MIN_GAP_S = 1.0
# Gaps learned before a device can be judged silent: one gap is no habit.
MIN_GAPS = 3
# Silent: quiet for longer than this many usual intervals...
SILENT_FACTOR = 2.0
# ...and longer than this (devices sending every few seconds are judged on scrape jitter else).
SILENT_FLOOR_S = 60.0
# A device not seen for a week is forgotten (its SIM was likely retired or moved).
FORGET_AFTER_S = 7 * 86_400.0
# Smoothing of the learned interval, as TCP smooths its round-trip time (RFC 6298).
GAP_GAIN = 0.125
DEVIATION_GAIN = 0.25
# Group of a device whose SIM has no group, and of an address the SIM map does not know.
NO_GROUP = "none"
UNKNOWN_SIM = "unknown"


class DeviceCounters(Protocol):
    """The fields of `gatepeer.device_traffic.DeviceTraffic` this module reads."""

    @property
    def packets_from_device(self) -> int: ...
    @property
    def bytes_from_device(self) -> int: ...
    @property
    def packets_to_device(self) -> int: ...
    @property
    def bytes_to_device(self) -> int: ...
    @property
    def last_packet_age_s(self) -> float | None: ...


@dataclass(slots=True)
class _Seen:
    last_at: float
    gap_mean: float = 0.0
    gap_deviation: float = 0.0
    gaps: int = 0
    group: str = UNKNOWN_SIM
    present: bool = True
    # The element's counters at the previous reading (0 once it expired).
    packets_from: int = 0
    bytes_from: int = 0
    packets_to: int = 0
    bytes_to: int = 0


@dataclass
class GroupTotals:
    packets_from_device: int = 0
    bytes_from_device: int = 0
    packets_to_device: int = 0
    bytes_to_device: int = 0
    devices: int = 0  # present in the kernel now
    silent: int = 0


@dataclass(frozen=True)
class DeviceView:
    """One device as exported: its counters now, its age and usual interval."""

    address: ipaddress.IPv4Address
    group: str
    packets_from_device: int
    bytes_from_device: int
    packets_to_device: int
    bytes_to_device: int
    last_seen_age_s: float
    usual_interval_s: float | None
    silent: bool


@dataclass
class DeviceActivity:
    """The tracker. `observe` after each reading of the kernel's counters; then ask."""

    seen: dict[int, _Seen] = field(default_factory=dict)  # by the address's integer
    groups: dict[str, GroupTotals] = field(default_factory=dict)

    def observe(
        self,
        traffic: Mapping[ipaddress.IPv4Address, DeviceCounters],
        group_of: Callable[[ipaddress.IPv4Address], str],
        now: float,
    ) -> None:
        for totals in self.groups.values():
            totals.devices = totals.silent = 0
        counted: set[int] = set()
        for address, t in traffic.items():
            group = group_of(address)
            key = int(address)
            counted.add(key)
            entry = self.seen.get(key)
            if t.last_packet_age_s is not None:
                last_at = now - t.last_packet_age_s
            elif entry is None or (t.packets_from_device, t.packets_to_device) != (
                entry.packets_from,
                entry.packets_to,
            ):  # no expiry reported: the counters moving is the activity
                last_at = now
            else:
                last_at = entry.last_at
            if entry is None:
                entry = self.seen[key] = _Seen(last_at=last_at, group=group)
            if last_at - entry.last_at >= MIN_GAP_S:
                _learn_gap(entry, last_at - entry.last_at)
            entry.last_at = max(entry.last_at, last_at)
            entry.group = group
            self._add(group, t, entry)
            entry.present = True
        for key, entry in list(self.seen.items()):
            if key in counted:
                continue
            if now - entry.last_at > FORGET_AFTER_S:
                del self.seen[key]
                continue
            # Its element expired: a new one starts from zero.
            entry.present = False
            entry.packets_from = entry.bytes_from = entry.packets_to = entry.bytes_to = 0
        for entry in self.seen.values():
            totals = self.groups.setdefault(entry.group, GroupTotals())
            totals.devices += entry.present
            totals.silent += _silent(entry, now)

    def _add(self, group: str, t: DeviceCounters, entry: _Seen) -> None:
        totals = self.groups.setdefault(group, GroupTotals())
        totals.packets_from_device += _grown(t.packets_from_device, entry.packets_from)
        totals.bytes_from_device += _grown(t.bytes_from_device, entry.bytes_from)
        totals.packets_to_device += _grown(t.packets_to_device, entry.packets_to)
        totals.bytes_to_device += _grown(t.bytes_to_device, entry.bytes_to)
        entry.packets_from, entry.bytes_from = t.packets_from_device, t.bytes_from_device
        entry.packets_to, entry.bytes_to = t.packets_to_device, t.bytes_to_device

    def silent_count(self, now: float) -> int:
        return sum(_silent(e, now) for e in self.seen.values())

    def top(self, n: int, now: float) -> list[DeviceView]:
        """The n present devices with the most bytes (both ways) in their current element,
        most first; ties broken by address so the series do not flap."""
        present = ((a, e) for a, e in self.seen.items() if e.present)
        best = heapq.nlargest(
            n, present, key=lambda ae: (ae[1].bytes_from + ae[1].bytes_to, -ae[0])
        )
        return [_view(ipaddress.IPv4Address(a), e, now) for a, e in best]

    def views(self, addresses: Iterable[ipaddress.IPv4Address], now: float) -> list[DeviceView]:
        found = ((a, self.seen.get(int(a))) for a in addresses)
        return [_view(a, e, now) for a, e in found if e is not None]


def _grown(now_value: int, before: int) -> int:
    """What a counter added since the last reading; a smaller value is a new element."""
    return now_value - before if now_value >= before else now_value


def _learn_gap(entry: _Seen, gap: float) -> None:
    if entry.gaps == 0:
        entry.gap_mean, entry.gap_deviation = gap, gap / 2
    else:
        entry.gap_deviation += DEVIATION_GAIN * (abs(gap - entry.gap_mean) - entry.gap_deviation)
        entry.gap_mean += GAP_GAIN * (gap - entry.gap_mean)
    entry.gaps += 1


def usual_interval(entry: _Seen) -> float | None:
    """The learned interval between bursts, with room for its spread; None until learned."""
    if entry.gaps < MIN_GAPS:
        return None
    return entry.gap_mean + 2 * entry.gap_deviation


def _silent(entry: _Seen, now: float) -> bool:
    usual = usual_interval(entry)
    if usual is None:
        return False
    return now - entry.last_at > max(SILENT_FACTOR * usual, SILENT_FLOOR_S)


def _view(address: ipaddress.IPv4Address, e: _Seen, now: float) -> DeviceView:
    return DeviceView(
        address=address,
        group=e.group,
        packets_from_device=e.packets_from,
        bytes_from_device=e.bytes_from,
        packets_to_device=e.packets_to,
        bytes_to_device=e.bytes_to,
        last_seen_age_s=max(0.0, now - e.last_at),
        usual_interval_s=usual_interval(e),
        silent=_silent(e, now),
    )
