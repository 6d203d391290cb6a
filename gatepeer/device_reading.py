"""The daemon's last reading of the kernel's per-device counters, kept on disk for
`gatepeer devices`.

The daemon reads the counters on a thread for the device metrics (at most every
`metrics.devices.MIN_READ_INTERVAL_S`); each reading is written here, atomically, with its
time. `gatepeer devices` then reads one compact file instead of listing both nftables sets
and parsing their JSON (computed once, stored). A reading older than `MAX_AGE_S` (no daemon,
or nobody scraping the metrics) is not used: the report reads the kernel itself and says so.

The file lives beside `agent.state_file` (tmpfs: a reading means nothing after a reboot). One
row per device: the address as an integer and the counts, in the order of `FIELDS`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatepeer import atomic_json
from gatepeer.device_traffic import DeviceTraffic

if TYPE_CHECKING:
    from gatepeer.config import Config
    from gatepeer.metrics.device_activity import DeviceCounters

log = logging.getLogger(__name__)

FILE_NAME = "device-traffic.json"
VERSION = 1
FIELDS = (
    "address",
    "packets_from_device",
    "bytes_from_device",
    "packets_to_device",
    "bytes_to_device",
    "last_packet_age_s",
)
# Older than this, a reading is not the daemon's current one: Prometheus scrapes every 15 to
# 60 s and each scrape older than MIN_READ_INTERVAL_S starts a reading.
MAX_AGE_S = 120.0
ROWS_PER_WRITE = 1000


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading as kept: its rows (in the order of `FIELDS`) and the wall-clock time they
    were read at. The rows become `DeviceTraffic` once, in `traffic`."""

    rows: list[list[Any]]
    read_at: float

    def traffic(self, now: float | None = None) -> dict[IPv4Address, DeviceTraffic]:
        """The counters by address, each last packet's age as of `now` (default: as of the
        reading). ValueError when a row is not one."""
        since = 0.0 if now is None else max(0.0, now - self.read_at)
        found: dict[IPv4Address, DeviceTraffic] = {}
        for row in self.rows:
            n, pf, bf, pt, bt, age = row
            if not (
                type(n) is int
                and type(pf) is int
                and type(bf) is int
                and type(pt) is int
                and type(bt) is int
                and (age is None or type(age) is float or type(age) is int)
            ):
                raise ValueError(f"not a device reading row: {row!r}"[:200])
            address = IPv4Address(n)
            found[address] = DeviceTraffic(
                address, pf, bf, pt, bt, None if age is None else age + since
            )
        return found


def path_for(config: Config) -> Path:
    return config.agent.state_file.parent / FILE_NAME


def keep(path: Path, traffic: Mapping[IPv4Address, DeviceCounters], read_at: float) -> None:
    """Write one reading, then rename it into place (readers see the old or the new, whole).
    Written a chunk of rows at a time: a document of every row built first would cost the
    daemon tens of MB at 100,000 devices. A failure is logged, not raised (the metrics go
    on). One writer (the metrics' reading thread), so one fixed temporary name."""
    head = json.dumps(
        {"format": atomic_json.FORMAT_VERSION, "version": VERSION, "read_at": read_at,
         "fields": list(FIELDS)}
    )  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with open(tmp, "w") as fh:
            fh.write(head[:-1] + ', "devices": [')
            chunk: list[str] = []
            sep = ""  # between chunks: a comma once the first is written
            for address, t in traffic.items():
                age = t.last_packet_age_s
                age_text = "null" if age is None else repr(float(age))
                chunk.append(
                    f"[{int(address)},{int(t.packets_from_device)},{int(t.bytes_from_device)},"
                    f"{int(t.packets_to_device)},{int(t.bytes_to_device)},{age_text}]"
                )
                if len(chunk) == ROWS_PER_WRITE:
                    fh.write(sep + ",".join(chunk))
                    sep = ","
                    chunk.clear()
            if chunk:
                fh.write(sep + ",".join(chunk))
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


def from_json(doc: Mapping[str, Any]) -> Reading:
    if doc.get("version") != VERSION or doc.get("fields") != list(FIELDS):
        raise ValueError(f"not a version {VERSION} device reading")
    read_at = doc["read_at"]
    if not isinstance(read_at, int | float) or isinstance(read_at, bool):
        raise ValueError("read_at must be a number")
    rows = doc["devices"]
    if not isinstance(rows, list) or not all(
        isinstance(r, list) and len(r) == len(FIELDS) for r in rows
    ):
        raise ValueError("devices must be a list of rows of " + ", ".join(FIELDS))
    return Reading(rows, float(read_at))
