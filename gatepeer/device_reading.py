"""The daemon's last reading of the kernel's per-device counters, joined with the SIM map and
kept on disk for `gatepeer devices`.

The daemon reads the counters on a thread for the device metrics (at most every
`metrics.devices.MIN_READ_INTERVAL_S`); each reading is written here, atomically, with its
time, already in the form the report shows: one row per device (every address of the SIM map
and every address the kernel counted), ordered by address, with the SIM's fields beside the
counters. `gatepeer devices` then loads one compact file and renders it, instead of listing
both nftables sets, loading the SIM map and joining them per row (computed once, stored). A
reading older than `MAX_AGE_S` (no daemon, or nobody scraping the metrics) is not used: the
report reads the kernel itself and says so.

The file lives beside `agent.state_file` (tmpfs: a reading means nothing after a reboot). Each
row holds `FIELDS` in order: the SIM's (null for an address the map does not name) and the
counters' (null for a SIM the kernel has no counters for), each age as of `read_at`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatepeer import atomic_json
from gatepeer.device_traffic import Counters as DeviceCounters
from gatepeer.device_traffic import DeviceReading

if TYPE_CHECKING:
    from gatepeer.config import Config
    from gatepeer.sims import SimMap

log = logging.getLogger(__name__)

FILE_NAME = "device-traffic.json"
VERSION = 2
# One row's fields: the keys of a device in `gatepeer devices --json`, in order (but its
# connections, which the report counts itself).
SIM_FIELDS = ("name", "imsi", "sim_id", "group_id", "online", "source")
COUNTER_FIELDS = (
    "last_packet_age_s",
    "packets_from_device",
    "bytes_from_device",
    "packets_to_device",
    "bytes_to_device",
)
FIELDS = ("address", *SIM_FIELDS, *COUNTER_FIELDS)
# Older than this, a reading is not the daemon's current one: Prometheus scrapes every 15 to
# 60 s and each scrape older than MIN_READ_INTERVAL_S starts a reading.
MAX_AGE_S = 120.0
ROWS_PER_WRITE = 1000
_NO_SIM = (None,) * len(SIM_FIELDS)
_NO_COUNTERS = (None,) * len(COUNTER_FIELDS)


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading as kept: its rows (`FIELDS`, by address), the wall-clock time they were
    read at, and the SIM map they were joined with (`fetched_at`, `error`, `sims`: its
    size), None when the daemon had none."""

    rows: list[list[Any]]
    read_at: float
    sim_map: dict[str, Any] | None

    def traffic(self) -> DeviceReading:
        """The counters alone, ages as of `read_at` (to join with another SIM map)."""
        age = len(SIM_FIELDS) + 1  # then the four counters
        return DeviceReading(
            (int(IPv4Address(r[0])), *r[age + 1 : age + 5], r[age])
            for r in self.rows
            if r[age + 1] is not None
        )


def path_for(config: Config) -> Path:
    return config.agent.state_file.parent / FILE_NAME


def address_text(n: int) -> str:
    """The dotted quad of an address's integer (a tenth of `str(IPv4Address(n))`'s cost)."""
    return socket.inet_ntoa(n.to_bytes(4, "big"))


def joined_rows(reading: DeviceReading, sim_map: SimMap | None) -> Iterator[tuple[Any, ...]]:
    """Pure: one row of `FIELDS` per address in the SIM map or the reading, by address."""
    records = sim_map.sorted_fields() if sim_map is not None else iter(())
    counted = reading.rows()
    sim = next(records, None)
    counts = next(counted, None)
    while sim is not None or counts is not None:
        if counts is None or (sim is not None and sim[0] < counts[0]):
            assert sim is not None
            yield (address_text(sim[0]), *sim[1:], *_NO_COUNTERS)
            sim = next(records, None)
            continue
        n, pf, bf, pt, bt, age = counts
        same = sim is not None and sim[0] == n
        fields = sim[1:] if same and sim is not None else _NO_SIM
        yield (address_text(n), *fields, age, pf, bf, pt, bt)
        counts = next(counted, None)
        if same:
            sim = next(records, None)


def keep(
    path: Path,
    traffic: DeviceReading | Mapping[IPv4Address, DeviceCounters],
    read_at: float,
    sim_map: SimMap | None = None,
) -> None:
    """Write one reading joined with `sim_map`, then rename it into place (readers see the
    old or the new, whole). Written a chunk of rows at a time: a document of every row built
    first would cost the daemon tens of MB at 100,000 devices. A failure is logged, not raised
    (the metrics go on). One writer (the metrics' reading thread), so one fixed temporary
    name."""
    reading = traffic if isinstance(traffic, DeviceReading) else DeviceReading.from_traffic(traffic)
    said = None
    if sim_map is not None:
        said = {"fetched_at": sim_map.fetched_at, "error": sim_map.error,
                "sims": len(sim_map.records)}  # fmt: skip
    head = json.dumps(
        {"format": atomic_json.FORMAT_VERSION, "version": VERSION, "read_at": read_at,
         "sim_map": said, "fields": list(FIELDS)}
    )  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with open(tmp, "w") as fh:
            fh.write(head[:-1] + ', "devices": [')
            chunk: list[tuple[Any, ...]] = []
            sep = ""  # between chunks: a comma once the first is written
            for row in joined_rows(reading, sim_map):
                chunk.append(row)
                if len(chunk) == ROWS_PER_WRITE:
                    fh.write(sep + json.dumps(chunk, separators=(",", ":"))[1:-1])
                    sep = ","
                    chunk.clear()
            if chunk:
                fh.write(sep + json.dumps(chunk, separators=(",", ":"))[1:-1])
            fh.write("]}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the directory itself may be what failed
            tmp.unlink(missing_ok=True)
        log.warning("cannot keep the device reading in %s: %s", path, exc.strerror or exc)


def load(path: Path) -> Reading | None:
    """The kept reading; None when there is none or it cannot be read (logged)."""
    doc = atomic_json.read(path)
    if doc is None:
        return None
    try:
        return from_json(doc)
    except (KeyError, ValueError, TypeError) as exc:
        log.warning("ignoring an unreadable device reading in %s: %s", path, exc)
        return None


# What each field of a row may hold (checked a column at a time: no Python code per value).
_TYPES: dict[str, set[type]] = {
    "address": {str},
    "name": {str, type(None)},
    "imsi": {str, type(None)},
    "sim_id": {str, type(None)},
    "group_id": {str, type(None)},
    "online": {bool, type(None)},
    "source": {str, type(None)},
    "last_packet_age_s": {float, int, type(None)},
    "packets_from_device": {int, type(None)},
    "bytes_from_device": {int, type(None)},
    "packets_to_device": {int, type(None)},
    "bytes_to_device": {int, type(None)},
}


def from_json(doc: Mapping[str, Any]) -> Reading:
    if doc.get("version") != VERSION or doc.get("fields") != list(FIELDS):
        raise ValueError(f"not a version {VERSION} device reading")
    read_at = doc["read_at"]
    if not isinstance(read_at, int | float) or isinstance(read_at, bool):
        raise ValueError("read_at must be a number")
    sim_map = doc.get("sim_map")
    if sim_map is not None and not (
        isinstance(sim_map, dict) and {"fetched_at", "error", "sims"} <= sim_map.keys()
    ):
        raise ValueError("sim_map must say fetched_at, error and sims")
    rows = doc["devices"]
    if not isinstance(rows, list) or not all(type(r) is list for r in rows):
        raise ValueError("devices must be a list of rows of " + ", ".join(FIELDS))
    if rows and set(map(len, rows)) != {len(FIELDS)}:
        raise ValueError("devices must be a list of rows of " + ", ".join(FIELDS))
    for name, column in zip(FIELDS, zip(*rows, strict=True), strict=False):
        if not set(map(type, column)) <= _TYPES[name]:
            raise ValueError(f"a device's {name} is not one")
    return Reading(rows, float(read_at), sim_map)
