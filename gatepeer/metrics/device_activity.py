"""Pure: what the daemon remembers about each device between readings of the kernel's
per-device counters, and what it concludes (who talks most, who went silent).

The kernel's set element for a device expires some time after its last packet, taking its
counters with it; this tracker keeps the last time each device was seen and a learned "usual
interval" between its bursts of activity, so a device that went quiet is still known (and
counted as silent) after its element is gone, and the per-group byte counters only ever grow
(each reading adds what changed since the previous one, a recreated element counting from 0).

Memory is about 70 bytes per device seen within `FORGET_AFTER_S`: one array per field,
ordered by the address's integer, no object per device (a slotted record per device and its
dict entry cost about 250; the daemon remembers 100,000 devices on a large peer). Each reading
is merged into the columns in one pass (bench/bench_device_metrics.py measures both).
"""

from __future__ import annotations

import bisect
import heapq
import ipaddress
from array import array
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gatepeer.device_traffic import ADDRESS_TYPE, COUNTER_TYPE, DeviceReading
from gatepeer.device_traffic import Counters as DeviceCounters

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


class _Columns:
    """Each remembered device's fields, one array per field, ordered by address: about 70
    bytes a device, no object per device."""

    __slots__ = (
        "addresses",
        "last_at",
        "gap_mean",
        "gap_deviation",
        "gaps",
        "group",
        "present",
        "packets_from",
        "bytes_from",
        "packets_to",
        "bytes_to",
    )

    def __init__(self) -> None:
        self.addresses = array(ADDRESS_TYPE)
        self.last_at = array("d")
        self.gap_mean = array("d")
        self.gap_deviation = array("d")
        self.gaps = array("I")
        self.group = array("I")  # index into DeviceActivity's group names
        self.present = array("B")
        # The element's counters at the previous reading (0 once it expired).
        self.packets_from = array(COUNTER_TYPE)
        self.bytes_from = array(COUNTER_TYPE)
        self.packets_to = array(COUNTER_TYPE)
        self.bytes_to = array(COUNTER_TYPE)


class DeviceActivity:
    """The tracker. `observe` after each reading of the kernel's counters; then ask."""

    def __init__(self) -> None:
        self._seen = _Columns()
        self._group_names: list[str] = []
        self._group_index: dict[str, int] = {}
        self.groups: dict[str, GroupTotals] = {}

    def __len__(self) -> int:
        """Devices remembered (seen within FORGET_AFTER_S)."""
        return len(self._seen.addresses)

    def __contains__(self, address: object) -> bool:
        return isinstance(address, ipaddress.IPv4Address) and self._slot(int(address)) is not None

    def observe(
        self,
        traffic: DeviceReading | Mapping[ipaddress.IPv4Address, DeviceCounters],
        group_of: Callable[[int], str],
        now: float,
    ) -> None:
        """Learn from one reading; `group_of` names the group of an address's integer.

        One pass over the remembered devices and the reading, both ordered by address,
        building the next columns (a device seen for the first time joins in its place)."""
        reading = (
            traffic if isinstance(traffic, DeviceReading) else DeviceReading.from_traffic(traffic)
        )
        for totals in self.groups.values():
            totals.devices = totals.silent = 0
        old, new = self._seen, _Columns()
        t_addr, r_addr = old.addresses, reading.addresses
        nt, nr = len(t_addr), len(r_addr)
        i = j = 0
        while i < nt or j < nr:
            if j < nr and (i >= nt or r_addr[j] <= t_addr[i]):
                n = r_addr[j]
                known = i < nt and t_addr[i] == n
                k = i if known else -1
                if known:
                    i += 1
                pf, bf = reading.packets_from[j], reading.bytes_from[j]
                pt, bt, age = reading.packets_to[j], reading.bytes_to[j], reading.ages[j]
                j += 1
                if age == age:  # not NaN: the kernel said when
                    last_at = now - age
                elif k < 0 or pf != old.packets_from[k] or pt != old.packets_to[k]:
                    last_at = now  # no expiry reported: the counters moving is the activity
                else:
                    last_at = old.last_at[k]
                if k < 0:
                    seen_at, mean, deviation, gaps = last_at, 0.0, 0.0, 0
                    pf0 = bf0 = pt0 = bt0 = 0
                else:
                    seen_at, mean, deviation = old.last_at[k], old.gap_mean[k], old.gap_deviation[k]
                    gaps = old.gaps[k]
                    pf0, bf0 = old.packets_from[k], old.bytes_from[k]
                    pt0, bt0 = old.packets_to[k], old.bytes_to[k]
                if last_at - seen_at >= MIN_GAP_S:
                    mean, deviation, gaps = _learn_gap(mean, deviation, gaps, last_at - seen_at)
                seen_at = max(seen_at, last_at)
                group = self._group(group_of(n))
                totals = self._totals(group)
                totals.packets_from_device += _grown(pf, pf0)
                totals.bytes_from_device += _grown(bf, bf0)
                totals.packets_to_device += _grown(pt, pt0)
                totals.bytes_to_device += _grown(bt, bt0)
                present = 1
            else:
                k, i = i, i + 1
                n, seen_at = t_addr[k], old.last_at[k]
                if now - seen_at > FORGET_AFTER_S:
                    continue
                # Its element expired: a new one starts from zero.
                mean, deviation, gaps = old.gap_mean[k], old.gap_deviation[k], old.gaps[k]
                group, present = old.group[k], 0
                pf = bf = pt = bt = 0
                totals = self._totals(group)
            totals.devices += present
            totals.silent += _silent(seen_at, mean, deviation, gaps, now)
            new.addresses.append(n)
            new.last_at.append(seen_at)
            new.gap_mean.append(mean)
            new.gap_deviation.append(deviation)
            new.gaps.append(gaps)
            new.group.append(group)
            new.present.append(present)
            new.packets_from.append(pf)
            new.bytes_from.append(bf)
            new.packets_to.append(pt)
            new.bytes_to.append(bt)
        self._seen = new

    def _group(self, name: str) -> int:
        index = self._group_index.get(name)
        if index is None:
            index = self._group_index[name] = len(self._group_names)
            self._group_names.append(name)
        return index

    def _totals(self, group: int) -> GroupTotals:
        name = self._group_names[group]
        totals = self.groups.get(name)
        if totals is None:
            totals = self.groups[name] = GroupTotals()
        return totals

    def _slot(self, n: int) -> int | None:
        addresses = self._seen.addresses
        k = bisect.bisect_left(addresses, n)
        return k if k < len(addresses) and addresses[k] == n else None

    def silent_count(self, now: float) -> int:
        s = self._seen
        return sum(
            _silent(s.last_at[k], s.gap_mean[k], s.gap_deviation[k], s.gaps[k], now)
            for k in range(len(s.addresses))
        )

    def top(self, n: int, now: float) -> list[DeviceView]:
        """The n present devices with the most bytes (both ways) in their current element,
        most first; ties broken by address so the series do not flap."""
        s = self._seen
        present = (k for k, p in enumerate(s.present) if p)
        best = heapq.nlargest(
            n, present, key=lambda k: (s.bytes_from[k] + s.bytes_to[k], -s.addresses[k])
        )
        return [self._view(k, now) for k in best]

    def views(self, addresses: Iterable[ipaddress.IPv4Address], now: float) -> list[DeviceView]:
        slots = (self._slot(int(a)) for a in addresses)
        return [self._view(k, now) for k in slots if k is not None]

    def _view(self, k: int, now: float) -> DeviceView:
        s = self._seen
        last_at, mean, deviation, gaps = s.last_at[k], s.gap_mean[k], s.gap_deviation[k], s.gaps[k]
        return DeviceView(
            address=ipaddress.IPv4Address(s.addresses[k]),
            group=self._group_names[s.group[k]],
            packets_from_device=s.packets_from[k],
            bytes_from_device=s.bytes_from[k],
            packets_to_device=s.packets_to[k],
            bytes_to_device=s.bytes_to[k],
            last_seen_age_s=max(0.0, now - last_at),
            usual_interval_s=usual_interval(mean, deviation, gaps),
            silent=_silent(last_at, mean, deviation, gaps, now),
        )


def _grown(now_value: int, before: int) -> int:
    """What a counter added since the last reading; a smaller value is a new element."""
    return now_value - before if now_value >= before else now_value


def _learn_gap(mean: float, deviation: float, gaps: int, gap: float) -> tuple[float, float, int]:
    if gaps == 0:
        return gap, gap / 2, 1
    deviation += DEVIATION_GAIN * (abs(gap - mean) - deviation)
    mean += GAP_GAIN * (gap - mean)
    return mean, deviation, gaps + 1


def usual_interval(mean: float, deviation: float, gaps: int) -> float | None:
    """The learned interval between bursts, with room for its spread; None until learned."""
    if gaps < MIN_GAPS:
        return None
    return mean + 2 * deviation


def _silent(last_at: float, mean: float, deviation: float, gaps: int, now: float) -> bool:
    if gaps < MIN_GAPS:
        return False
    return now - last_at > max(SILENT_FACTOR * (mean + 2 * deviation), SILENT_FLOOR_S)
