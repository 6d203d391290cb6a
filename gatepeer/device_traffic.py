"""What the kernel counted per device address (`packet_path.device_counters`): packets and
bytes each way, and how long ago the last packet passed.

`DeviceTraffic` is one device's counts (what `gatepeer.kernel.nftables.device_traffic` returns,
parsed by `gatepeer.ruleset.device_traffic_from_json`). `DeviceReading` is one reading of every
device as columns: the daemon holds readings of 100,000 devices, and a column of integers costs
8 bytes a value where a `DeviceTraffic` with its `IPv4Address` costs about 420 bytes a device.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol

# Typecodes: an IPv4 address fits "I" (unsigned 32 bits), a counter "Q" (unsigned 64 bits).
ADDRESS_TYPE = "I"
COUNTER_TYPE = "Q"
assert array(ADDRESS_TYPE).itemsize == 4 and array(COUNTER_TYPE).itemsize == 8


@dataclass(frozen=True, slots=True)
class DeviceTraffic:
    """One device's counts since it was first seen (or since it last fell silent for longer
    than the sets' timeout). Bytes are inner IP bytes. `last_packet_age_s` has the kernel's
    one-second resolution; None when the kernel did not say."""

    address: IPv4Address
    packets_from_device: int
    bytes_from_device: int
    packets_to_device: int
    bytes_to_device: int
    last_packet_age_s: float | None


class Counters(Protocol):
    """What `DeviceReading.from_traffic` reads of each device (`DeviceTraffic`'s fields)."""

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


# One row of a reading: the address's integer, the four counters, the age (None: unknown).
Row = tuple[int, int, int, int, int, float | None]


class DeviceReading:
    """Every device's counters in one reading, as columns ordered by the address's integer
    (no object per device). Ages unknown to the kernel are NaN inside, None outside."""

    __slots__ = ("addresses", "packets_from", "bytes_from", "packets_to", "bytes_to", "ages")

    def __init__(self, rows: Iterable[Row] = ()) -> None:
        """From rows in any order (ascending costs least: no reordering); a later row for the
        same address replaces the earlier."""
        self.addresses = array(ADDRESS_TYPE)
        self.packets_from = array(COUNTER_TYPE)
        self.bytes_from = array(COUNTER_TYPE)
        self.packets_to = array(COUNTER_TYPE)
        self.bytes_to = array(COUNTER_TYPE)
        self.ages = array("d")
        ascending, last = True, -1
        for n, pf, bf, pt, bt, age in rows:
            ascending = ascending and n > last
            last = n
            self.append(n, pf, bf, pt, bt, age)
        if not ascending:
            self._reorder()

    def _reorder(self) -> None:
        """By address, the last row of each address kept (the sort is stable)."""
        columns = [getattr(self, name) for name in self.__slots__]
        order = sorted(range(len(self.addresses)), key=self.addresses.__getitem__)
        keep = [
            k
            for at, k in enumerate(order)
            if at + 1 == len(order) or self.addresses[order[at + 1]] != self.addresses[k]
        ]
        for name, column in zip(self.__slots__, columns, strict=True):
            setattr(self, name, array(column.typecode, (column[k] for k in keep)))

    def append(self, n: int, pf: int, bf: int, pt: int, bt: int, age: float | None) -> None:
        """One more device; the caller keeps the addresses ascending."""
        self.addresses.append(n)
        self.packets_from.append(pf)
        self.bytes_from.append(bf)
        self.packets_to.append(pt)
        self.bytes_to.append(bt)
        self.ages.append(math.nan if age is None else age)

    @classmethod
    def from_traffic(cls, traffic: Mapping[IPv4Address, Counters]) -> DeviceReading:
        """From a by-address mapping of counters (what `nftables.device_traffic` returns)."""
        return cls(
            (
                int(a),
                t.packets_from_device,
                t.bytes_from_device,
                t.packets_to_device,
                t.bytes_to_device,
                t.last_packet_age_s,
            )
            for a, t in traffic.items()
        )

    def __len__(self) -> int:
        return len(self.addresses)

    def rows(self) -> Iterator[Row]:
        """Each device's row, by address."""
        for n, pf, bf, pt, bt, age in zip(
            self.addresses,
            self.packets_from,
            self.bytes_from,
            self.packets_to,
            self.bytes_to,
            self.ages,
            strict=True,
        ):
            yield n, pf, bf, pt, bt, None if age != age else age  # NaN: unknown

    def traffic(self) -> dict[IPv4Address, DeviceTraffic]:
        """As `DeviceTraffic` by address (tests, and callers of the mapping form)."""
        return {
            (a := IPv4Address(n)): DeviceTraffic(a, pf, bf, pt, bt, age)
            for n, pf, bf, pt, bt, age in self.rows()
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DeviceReading):
            return NotImplemented
        return list(self.rows()) == list(other.rows())

    def __repr__(self) -> str:
        return f"DeviceReading({len(self)} devices)"
