"""Which SIM is behind a device address: the SIM map, built from the SORACOM API, kept on disk.

This peer's devices are the SIMs whose session is on this VPG (listSims: `sessionStatus.vpgId`
and `ueIpAddress`, online) and the SIMs the VPG's IP address map gives an address (static or
dynamic entries; the map's entries for gate peers and the VPG itself are no devices). A SIM in
session on another VPG is not ours, whatever its address. The daemon fetches the map at start
and then on a slow cadence (`devices.sim_refresh_seconds`); a failed refresh keeps the last map
and records why, so `gatepeer devices` and `gatepeer status` say it. The map lives in
`devices.sim_cache` (on disk, like the gate view) and is read from there by everyone else.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from gatepeer import atomic_json
from gatepeer.device_traffic import ADDRESS_TYPE

if TYPE_CHECKING:
    from gatepeer.config import Config
    from gatepeer.soracom import SoracomClient

log = logging.getLogger(__name__)

Source = Literal["session", "ip_map"]
SOURCES = ("session", "ip_map")
# IP address map entries that are SIMs; the others are gate peers and the VPG's own addresses.
SIM_ENTRY_TYPES = frozenset({"static", "dynamic"})
CACHE_VERSION = 1


class SimRecord(NamedTuple):
    """One device address and the SIM behind it. A named tuple, not a frozen dataclass: the
    cache makes 10,000 of them per `gatepeer devices`, five times faster this way."""

    address: IPv4Address
    imsi: str
    sim_id: str | None
    name: str | None
    group_id: str | None
    online: bool
    source: Source

    def to_json(self) -> dict[str, Any]:
        return {
            "address": str(self.address),
            "imsi": self.imsi,
            "sim_id": self.sim_id,
            "name": self.name,
            "group_id": self.group_id,
            "online": self.online,
            "source": self.source,
        }

    def to_row(self) -> list[Any]:
        """The cache's compact form, in the order of `ROW_FIELDS`."""
        return [
            int(self.address),  # an integer: parsing 10,000 dotted quads costs ~90 ms
            self.imsi,
            self.sim_id,
            self.name,
            self.group_id,
            self.online,
            self.source,
        ]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> SimRecord:
        """From `to_row`'s list; ValueError or TypeError when it is not one."""
        address, imsi, sim_id, name, group_id, online, source = checked_row(row)
        return cls(IPv4Address(address), imsi, sim_id, name, group_id, online, source)


def checked_row(row: Sequence[Any]) -> Sequence[Any]:
    """A cache row (`SimRecord.to_row`) as it is, once its fields are checked; ValueError or
    TypeError when it is not one."""
    address, imsi, sim_id, name, group_id, online, source = row
    if source not in SOURCES or online not in (True, False) or type(address) is not int:
        raise ValueError(f"not a SIM map row: {row!r}"[:200])
    if not (type(imsi) is str and imsi) or not all(
        v is None or (type(v) is str and v) for v in (sim_id, name, group_id)
    ):
        raise ValueError(f"not a SIM map row: {row!r}"[:200])
    if not 0 <= address < 1 << 32:
        raise ValueError(f"not a SIM map row: {row!r}"[:200])
    return row


# The cache holds one list per SIM, not one object: 10,000 SIMs load in a third of the time.
ROW_FIELDS = ("address", "imsi", "sim_id", "name", "group_id", "online", "source")

# SimRecords' packed form: one string per SIM, its first character online and source, then
# the IMSI, SIM id, name and group joined by NUL ("" for None: a present value is never "").
_UNFLAG: dict[str, tuple[bool, Source]] = {
    "a": (True, "session"),
    "b": (False, "session"),
    "c": (True, "ip_map"),
    "d": (False, "ip_map"),
}
_FLAGS = {kind: flag for flag, kind in _UNFLAG.items()}


class SimRecords(Mapping[IPv4Address, SimRecord]):
    """The SIM map's records by address, packed: the addresses' integers in one ordered array,
    each SIM's fields as one UTF-8 string (see `_pack`), all of them in one bytes object with
    their offsets in another array. About 70 bytes a SIM, against 190 for a dict of one string
    per SIM and 400 for a dict of `SimRecord`s with their `IPv4Address` keys: the daemon holds
    100,000 on a large peer. A lookup is a bisection; a `SimRecord` is made on each. A SIM
    with a NUL in a value is kept aside as its record."""

    __slots__ = ("_addresses", "_offsets", "_text", "_odd")

    def __init__(self, records: Iterable[SimRecord] = ()) -> None:
        self._fill((int(record.address), _pack(record)) for record in records)

    def _fill(self, items: Iterable[tuple[int, str | SimRecord]]) -> None:
        """From (address's integer, packed) in any order (ascending costs least); a later item
        for the same address replaces the earlier."""
        addresses = array(ADDRESS_TYPE)
        parts: list[bytes] = []
        odd: dict[int, SimRecord] = {}
        ascending, last = True, -1
        for n, value in items:
            ascending = ascending and n > last
            last = n
            addresses.append(n)
            if type(value) is str:
                parts.append(value.encode())
            else:
                odd[n] = value  # type: ignore[assignment]
                parts.append(b"")
        if not ascending:
            order = sorted(range(len(addresses)), key=addresses.__getitem__)
            keep = [
                k
                for at, k in enumerate(order)
                if at + 1 == len(order) or addresses[order[at + 1]] != addresses[k]
            ]
            addresses = array(ADDRESS_TYPE, (addresses[k] for k in keep))
            parts = [parts[k] for k in keep]
            odd = {n: r for n, r in odd.items() if parts[bisect.bisect_left(addresses, n)] == b""}
        self._addresses = addresses
        self._offsets = array("I", itertools.accumulate(map(len, parts), initial=0))
        self._text = b"".join(parts)
        self._odd = odd

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> SimRecords:
        """From the cache's rows (`SimRecord.to_row`); ValueError or TypeError when one is not."""
        made = cls.__new__(cls)
        made._fill(map(_packed_row, rows))
        return made

    def _slot(self, n: int) -> int | None:
        addresses = self._addresses
        k = bisect.bisect_left(addresses, n)
        return k if k < len(addresses) and addresses[k] == n else None

    def _value(self, k: int) -> str | SimRecord:
        start, end = self._offsets[k], self._offsets[k + 1]
        if start == end:
            return self._odd[self._addresses[k]]
        return self._text[start:end].decode()

    def __getitem__(self, address: IPv4Address) -> SimRecord:
        if not isinstance(address, IPv4Address):
            raise KeyError(address)
        k = self._slot(int(address))
        if k is None:
            raise KeyError(address)
        return _unpack(address, self._value(k))

    def get_by_int(self, n: int, address: IPv4Address | None = None) -> SimRecord | None:
        """The record of the address with integer `n`, if any (no IPv4Address hashed);
        `address`: that address, when the caller has it already."""
        k = self._slot(n)
        if k is None:
            return None
        return _unpack(IPv4Address(n) if address is None else address, self._value(k))

    def integers(self) -> Iterable[int]:
        """The addresses as integers, ascending, without making an IPv4Address each."""
        return self._addresses

    def group_of(self, address: IPv4Address) -> tuple[bool, str | None]:
        """(known, group id) without making the record."""
        return self.group_of_int(int(address))

    def group_of_int(self, n: int) -> tuple[bool, str | None]:
        """(known, group id) of the address with integer `n`, without making the record: the
        device metrics ask it for every device at every reading."""
        k = self._slot(n)
        if k is None:
            return False, None
        start, end = self._offsets[k], self._offsets[k + 1]
        if start == end:
            return True, self._odd[n].group_id
        group = self._text[self._text.rindex(b"\0", start, end) + 1 : end]
        return True, sys.intern(group.decode()) if group else None

    def sorted_fields(
        self,
    ) -> Iterator[tuple[int, str | None, str, str | None, str | None, bool, Source]]:
        """Each SIM as (the address's integer, name, IMSI, SIM id, group id, online, source),
        by address, without making a record (the daemon joins every SIM with each reading)."""
        for k, n in enumerate(self._addresses):
            value = self._value(k)
            if type(value) is not str:
                r: SimRecord = value  # type: ignore[assignment]
                yield n, r.name, r.imsi, r.sim_id, r.group_id, r.online, r.source
                continue
            online, source = _UNFLAG[value[0]]
            imsi, sim_id, name, group_id = value[1:].split("\0")
            yield n, name or None, imsi, sim_id or None, group_id or None, online, source

    def __contains__(self, address: object) -> bool:
        return isinstance(address, IPv4Address) and self._slot(int(address)) is not None

    def __iter__(self) -> Iterator[IPv4Address]:
        return map(IPv4Address, self._addresses)

    def __len__(self) -> int:
        return len(self._addresses)

    def __repr__(self) -> str:
        return f"SimRecords({len(self)} SIMs)"


def _packed_row(row: Sequence[Any]) -> tuple[int, str | SimRecord]:
    """A cache row (`SimRecord.to_row`) checked and packed; ValueError or TypeError when it is
    not one."""
    address, imsi, sim_id, name, group_id, online, source = checked_row(row)
    fields = (imsi, sim_id or "", name or "", group_id or "")
    if any("\0" in f for f in fields):
        return address, SimRecord.from_row(row)
    return address, _FLAGS[online, source] + "\0".join(fields)


def _pack(record: SimRecord) -> str | SimRecord:
    fields = (record.imsi, record.sim_id or "", record.name or "", record.group_id or "")
    if any("\0" in f for f in fields):
        return record
    return _FLAGS[record.online, record.source] + "\0".join(fields)


def _unpack(address: IPv4Address, value: str | SimRecord) -> SimRecord:
    if type(value) is not str:
        return value  # type: ignore[return-value]
    online, source = _UNFLAG[value[0]]
    imsi, sim_id, name, group_id = value[1:].split("\0")
    # The group interned: the device tracker keeps one per device; one string per group.
    group = sys.intern(group_id) if group_id else None
    return SimRecord(address, imsi, sim_id or None, name or None, group, online, source)


@dataclass(frozen=True)
class SimMap:
    """The device addresses this peer's VPG serves, by address. `fetched_at` is the wall-clock
    time of the last good fetch (None: never); `error` why the last refresh failed (None: it
    worked), the records then being the last good ones."""

    records: Mapping[IPv4Address, SimRecord] = field(default_factory=SimRecords)
    fetched_at: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.records, SimRecords):  # a plain mapping of records: packed
            object.__setattr__(self, "records", SimRecords(dict(self.records).values()))

    def name_for(self, address: IPv4Address) -> str | None:
        record = self.records.get(address)
        return record.name if record is not None else None

    def sorted_fields(
        self,
    ) -> Iterator[tuple[int, str | None, str, str | None, str | None, bool, Source]]:
        """`SimRecords.sorted_fields` of the records (always packed: see __post_init__)."""
        assert isinstance(self.records, SimRecords)
        return self.records.sorted_fields()

    def failed(self, error: str) -> SimMap:
        """This map kept after a refresh that failed with `error`."""
        return replace(self, error=error)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "fetched_at": self.fetched_at,
            "error": self.error,
            "fields": list(ROW_FIELDS),
            "sims": [r.to_row() for r in self.records.values()],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SimMap:
        if doc.get("version") != CACHE_VERSION or doc.get("fields") != list(ROW_FIELDS):
            raise ValueError(f"not a version {CACHE_VERSION} SIM map")
        records = SimRecords.from_rows(doc.get("sims") or ())
        fetched_at = doc.get("fetched_at")
        if fetched_at is not None and not isinstance(fetched_at, int | float):
            raise ValueError("fetched_at must be a number")
        error = doc.get("error")
        return cls(
            records=records,
            fetched_at=None if fetched_at is None else float(fetched_at),
            error=None if error is None else str(error),
        )


def build(
    vpg_id: str,
    sims: Iterable[Mapping[str, Any]],
    ip_map: Iterable[Mapping[str, Any]],
    fetched_at: float,
) -> SimMap:
    """Pure: the map from listSims' rows and the VPG's IP address map. A session on this VPG
    names its address; an IP map entry adds the SIMs the sessions did not (a static address
    of a SIM that is offline now). A row missing what is needed is skipped, not fatal: one odd
    SIM must not hide the others."""
    by_imsi: dict[str, Mapping[str, Any]] = {}
    records: dict[IPv4Address, SimRecord] = {}
    for sim in sims:
        for imsi in _imsis(sim):
            by_imsi.setdefault(imsi, sim)
        session = sim.get("sessionStatus")
        if not isinstance(session, Mapping) or session.get("vpgId") != vpg_id:
            continue
        if session.get("online") is not True:
            continue  # an offline session's address may be another SIM's by now
        address = _address(session.get("ueIpAddress"))
        session_imsi = session.get("imsi")
        if address is None or not isinstance(session_imsi, str):
            continue
        records[address] = _record(address, session_imsi, sim, online=True, source="session")
    for entry in ip_map:
        if entry.get("type") not in SIM_ENTRY_TYPES:
            continue
        address = _address(entry.get("ipAddress"))
        key = entry.get("key")  # the IMSI, for a SIM's entry
        if address is None or not isinstance(key, str) or address in records:
            continue
        sim = by_imsi.get(key, {})
        session = sim.get("sessionStatus")
        online = (
            isinstance(session, Mapping)
            and session.get("online") is True
            and session.get("vpgId") == vpg_id
        )
        records[address] = _record(address, key, sim, online=online, source="ip_map")
    return SimMap(records=records, fetched_at=fetched_at)


def fetch(client: SoracomClient, vpg_id: str, now: float) -> SimMap:
    """The map from the API: listSims and the IP address map, every page of each."""
    sims = client.list_sims()
    ip_map = client.list_ip_address_map(vpg_id)
    return build(vpg_id, sims, ip_map, now)


CACHE_NAME = "sims.json"


def cache_path(config: Config) -> Path | None:
    """Where the map is kept: `devices.sim_cache`, else beside the gate cache (on disk), else
    beside the state file; None when the map is off (`devices.sim_refresh_seconds = 0`)."""
    devices = config.devices
    if not devices.sim_refresh_seconds:
        return None
    if devices.sim_cache is not None:
        return devices.sim_cache
    beside = config.agent.gate_cache or config.agent.state_file
    return beside.parent / CACHE_NAME


def load(path: Path | None) -> SimMap:
    """The kept map; an empty one when there is none, or it cannot be read (said in error)."""
    if path is None:
        return SimMap(error="the SIM map is off (devices.sim_refresh_seconds = 0)")
    doc = atomic_json.read(path)
    if doc is None:
        return SimMap()
    try:
        return SimMap.from_json(doc)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring an unreadable SIM map in %s: %s", path, exc)
        return SimMap(error=f"the SIM map in {path} is unreadable: {exc}")


def keep(path: Path, sim_map: SimMap) -> None:
    """Write the map; a failure is said, not raised (the daemon keeps it in memory)."""
    try:
        atomic_json.write(path, sim_map.to_json(), indent=None)
    except OSError as exc:
        log.warning("cannot keep the SIM map in %s: %s", path, exc.strerror or exc)


def refresh(client: SoracomClient, vpg_id: str, path: Path, last: SimMap, now: float) -> SimMap:
    """One refresh: the new map, kept; on failure the last map with the error, kept too, so
    every reader says the map is stale and why."""
    from gatepeer.soracom import SoracomError

    try:
        new = fetch(client, vpg_id, now)
    except SoracomError as exc:
        log.warning("SIM map refresh failed, keeping the last one: %s", exc)
        new = last.failed(str(exc))
    keep(path, new)
    return new


def _record(
    address: IPv4Address, imsi: str, sim: Mapping[str, Any], *, online: bool, source: Source
) -> SimRecord:
    tags = sim.get("tags")
    name = tags.get("name") if isinstance(tags, Mapping) else None
    sim_id, group_id = sim.get("simId"), sim.get("groupId")
    return SimRecord(
        address=address,
        imsi=imsi,
        sim_id=sim_id if isinstance(sim_id, str) and sim_id else None,
        name=name if isinstance(name, str) and name else None,
        group_id=group_id if isinstance(group_id, str) and group_id else None,
        online=online,
        source=source,
    )


def _imsis(sim: Mapping[str, Any]) -> list[str]:
    """Every IMSI a SIM holds: its session's and each profile's subscribers'."""
    found: list[str] = []
    session = sim.get("sessionStatus")
    if isinstance(session, Mapping) and isinstance(session.get("imsi"), str):
        found.append(session["imsi"])
    profiles = sim.get("profiles")
    if isinstance(profiles, Mapping):
        for profile in profiles.values():
            subscribers = profile.get("subscribers") if isinstance(profile, Mapping) else None
            if isinstance(subscribers, Mapping):
                found += [i for i in subscribers if isinstance(i, str)]
    return found


def _address(value: Any) -> IPv4Address | None:
    try:
        return IPv4Address(value) if isinstance(value, str) else None
    except ValueError:
        return None
