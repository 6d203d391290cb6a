"""The report behind `gatepeer devices`: each device seen, by address, with its SIM and traffic.

A device is seen when the SIM map names its address (this VPG's sessions and IP address map,
kept by the daemon in `devices.sim_cache`) or the kernel counted traffic for it (the packet
path's per-device counters, `packet_path.device_counters`). For each: the SIM's name and IMSI,
online (as the API last said), the last packet's age, packets and bytes each way, connections
open (one conntrack dump, counted per address). What cannot be read is said once at the top
and left empty in the rows, never shown as zero.

The traffic is the daemon's last reading of the counters (`gatepeer.device_reading`, kept
beside state.json with its time, already joined with the SIM map and ordered) when one is at
most `device_reading.MAX_AGE_S` old: the report says how old, and only adds each device's
connections. Else (no daemon, nobody scraping its metrics, or `live`) the report lists the
kernel's sets itself, loads the SIM map and joins them, and says so.

Like `gatepeer status`, it stays light: no pyroute2, no prometheus_client, no object per
device (a row is the kept list of values; the text is rendered a column at a time); one
subprocess (conntrack) with a daemon's reading, three without, whatever the number of devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from gatepeer import atomic_json, device_reading, sims
from gatepeer.config import Config
from gatepeer.device_traffic import DeviceReading, DeviceTraffic
from gatepeer.sims import SimMap

TrafficReader = Callable[[], DeviceReading | Mapping[IPv4Address, DeviceTraffic]]
ReadingLoader = Callable[[], device_reading.Reading | None]
ConnectionsReader = Callable[[], str]

# A device's keys in --json, in order; the report's columns.
KEYS = (*device_reading.FIELDS, "connections")
_ADDRESS, _NAME, _IMSI, _ONLINE = (KEYS.index(k) for k in ("address", "name", "imsi", "online"))
_AGE = KEYS.index("last_packet_age_s")


@dataclass(frozen=True, slots=True)
class TrafficSource:
    """Where the traffic came from: "daemon" (its reading, made at `read_at`), "kernel" (read
    now, `why` not the daemon's), or None (not read)."""

    source: str | None
    read_at: float | None = None
    why: str | None = None


@dataclass(frozen=True, slots=True)
class SimMapSaid:
    """What the report says of the SIM map it joined: when fetched, why the last refresh
    failed, how many SIMs."""

    fetched_at: float | None
    error: str | None
    sims: int

    @classmethod
    def of(cls, sim_map: SimMap) -> SimMapSaid:
        return cls(sim_map.fetched_at, sim_map.error, len(sim_map.records))


@dataclass
class DevicesReport:
    columns: list[Sequence[Any]]  # one per KEYS, a value per device, by address
    sim_map: SimMapSaid
    now: float
    notes: list[str] = field(default_factory=list)  # what could not be read, one line each
    traffic_source: TrafficSource = TrafficSource(None)

    def __len__(self) -> int:
        return len(self.columns[0])

    def devices(self) -> list[dict[str, Any]]:
        """Each device as --json shows it."""
        return [dict(zip(KEYS, values, strict=True)) for values in zip(*self.columns, strict=True)]

    def to_json(self) -> dict[str, Any]:
        fetched = self.sim_map.fetched_at
        return {
            "sim_map": {
                "fetched_at": fetched,
                "age_s": None if fetched is None else round(self.now - fetched, 1),
                "error": self.sim_map.error,
                "sims": self.sim_map.sims,
            },
            "traffic": {
                "source": self.traffic_source.source,
                "read_at": self.traffic_source.read_at,
                "age_s": self.traffic_age_s(),
                "why": self.traffic_source.why,
            },
            "notes": list(self.notes),
            "devices": self.devices(),
        }

    def traffic_age_s(self) -> float | None:
        read_at = self.traffic_source.read_at
        return None if read_at is None else round(max(0.0, self.now - read_at), 1)


def columns(
    rows: Sequence[Sequence[Any]],
    connections: Mapping[str, int] | None,
    *,
    since: float = 0.0,
    not_devices: frozenset[str] = frozenset(),
) -> list[Sequence[Any]]:
    """Pure: the report's columns from rows of `device_reading.FIELDS` (by address), each age
    `since` seconds older, a connections column added (`connections` by address text, absent:
    none; None: conntrack could not be read). The `not_devices` (the VPG's endpoints and the
    gate peers: the probes' answers are counted too) are left out."""
    if not_devices:
        rows = [r for r in rows if r[_ADDRESS] not in not_devices]
    found: list[Sequence[Any]] = list(zip(*rows, strict=True)) or [
        () for _ in device_reading.FIELDS
    ]
    if since:
        found[_AGE] = [a if a is None else a + since for a in found[_AGE]]
    if connections is None:
        found.append([None] * len(rows))
    else:
        found.append([connections.get(a, 0) for a in found[_ADDRESS]])
    return found


def read_traffic() -> DeviceReading:
    """The packet path's per-device counters (empty when its device sets are absent)."""
    from gatepeer.kernel.device_sets import device_reading

    return device_reading()


def read_connections() -> str:
    from gatepeer.kernel import conntrack

    return conntrack.dump()


def gather(
    config: Config,
    *,
    traffic_reader: TrafficReader | None = None,
    reading_loader: ReadingLoader | None = None,
    connections_reader: ConnectionsReader | None = None,
    now: float | None = None,
    live: bool = False,
) -> DevicesReport:
    """The report for `config`; the readers default to the kernel's and the daemon's kept
    reading (tests pass their own). `live`: read the kernel even when the daemon's reading
    is recent."""
    from gatepeer.kernel.conntrack import count_by_text

    traffic_reader = traffic_reader or read_traffic
    connections_reader = connections_reader or read_connections
    reading_path = device_reading.path_for(config)
    reading_loader = reading_loader or (lambda: device_reading.load(reading_path))
    now = time.time() if now is None else now

    cache = sims.cache_path(config)
    notes: list[str] = []
    rows: Sequence[Sequence[Any]] | None = None
    said: SimMapSaid | None = None
    traffic: DeviceReading | None = None
    since = 0.0
    source = TrafficSource(None)
    if not config.packet_path.device_counters:
        notes.append("traffic: not counted (packet_path.device_counters = false)")
    else:
        reading = None if live else reading_loader()
        if live:
            why = "asked to (--live)"
        elif reading is None:
            why = f"no daemon reading in {reading_path}"
        elif now - reading.read_at > device_reading.MAX_AGE_S:
            why = f"the daemon's reading is {_age(now - reading.read_at)} old"
        elif now - reading.read_at < -5.0:
            why = "the daemon's reading is dated ahead of this clock"
        else:
            why = None
        if reading is not None and why is None:
            source = TrafficSource("daemon", reading.read_at)
            since = max(0.0, now - reading.read_at)
            if reading.sim_map is not None:  # joined by the daemon: shown as kept
                rows = reading.rows
                said = SimMapSaid(**reading.sim_map)
            else:
                traffic = reading.traffic()
        else:
            try:
                counted = traffic_reader()
                traffic = (
                    counted
                    if isinstance(counted, DeviceReading)
                    else DeviceReading.from_traffic(counted)
                )
                source = TrafficSource("kernel", now, why)
            except Exception as exc:  # noqa: BLE001 - nft missing or refusing: said, not fatal
                notes.append(f"traffic: cannot read the per-device counters: {_one_line(exc)}")
    if rows is None or said is None:
        sim_map = sims.load(cache)
        said = SimMapSaid.of(sim_map)
        rows = list(device_reading.joined_rows(traffic or DeviceReading(), sim_map))
    if said.error:
        notes.insert(0, f"SIM map: {said.error}")
    elif said.fetched_at is None and cache is not None:
        notes.insert(0, f"SIM map: none kept in {cache} yet (the daemon fetches it)")
    not_devices = frozenset(map(str, gate_addresses(config)))
    connections: dict[str, int] | None
    try:
        connections = count_by_text(connections_reader(), {r[_ADDRESS] for r in rows})
    except Exception as exc:  # noqa: BLE001 - conntrack missing or refused: said
        connections = None
        notes.append(f"connections: {_one_line(exc)}")
    return DevicesReport(
        columns=columns(rows, connections, since=since, not_devices=not_devices),
        sim_map=said,
        now=now,
        notes=notes,
        traffic_source=source,
    )


def gate_addresses(config: Config) -> frozenset[IPv4Address]:
    """The inner addresses of the VPG's endpoints and of this peer, from the daemon's last gate
    view (state.json): they answer in the tunnel but are no devices. Empty when unknown."""
    from gatepeer.desired_state import GateView

    doc = atomic_json.read(config.agent.state_file) or {}
    try:
        gate = GateView.from_json(doc["gate"]) if doc.get("gate") else None
    except (KeyError, ValueError, TypeError, AttributeError):
        return frozenset()
    if gate is None:
        return frozenset()
    inners = {e.inner for e in gate.endpoints if e.inner is not None}
    return frozenset({gate.inner.ip, *inners})


def render(report: DevicesReport) -> str:
    """The table an operator reads; blanks ("-") where a value is not known. Built a column at
    a time and joined with one format string: no object or call per device but the numbers'."""
    fetched = report.sim_map.fetched_at
    age = "never" if fetched is None else f"{_age(report.now - fetched)} ago"
    lines = [
        f"devices: {len(report)} seen; SIM map: {report.sim_map.sims} SIMs, "
        f"fetched {age}{_traffic_said(report)}"
    ]
    lines += [f"note: {note}" for note in report.notes]
    c = report.columns
    pf, bf, pt, bt = (c[KEYS.index(k)] for k in device_reading.COUNTER_FIELDS[1:])
    cells = [
        ["ADDRESS", *c[_ADDRESS]],
        ["SIM"] + [
            "(unknown)" if imsi is None else (name or "(no name)")
            for name, imsi in zip(c[_NAME], c[_IMSI], strict=True)
        ],
        ["IMSI"] + ["-" if imsi is None else imsi for imsi in c[_IMSI]],
        ["ONLINE"] + ["-" if o is None else ("yes" if o else "no") for o in c[_ONLINE]],
        ["LAST PACKET"] + ["-" if a is None else f"{_age(a)} ago" for a in c[_AGE]],
        ["FROM DEVICE"] + _traffic_cells(pf, bf),
        ["TO DEVICE"] + _traffic_cells(pt, bt),
        ["CONNS"] + ["-" if n is None else str(n) for n in c[-1]],
    ]  # fmt: skip
    widths = [max(map(len, column)) for column in cells]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [line.format(*r).rstrip() for r in zip(*cells, strict=True)]
    return "\n".join(lines)


def _traffic_cells(packets: Sequence[int | None], counts: Sequence[int | None]) -> list[str]:
    return [
        "-" if p is None or b is None else f"{p} pkt / {_bytes(b)}"
        for p, b in zip(packets, counts, strict=True)
    ]


def _traffic_said(report: DevicesReport) -> str:
    src = report.traffic_source
    if src.source == "daemon":
        return f"; traffic: the daemon's reading, {_age(report.traffic_age_s() or 0.0)} old"
    if src.source == "kernel":
        return f"; traffic: read from the kernel now ({src.why})" if src.why else ""
    return ""


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172_800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86_400:.0f}d"


def _bytes(count: int) -> str:
    # Compared with the powers of 1024 rather than divided in a loop: 20,000 calls a report.
    if count < 1024:
        return f"{count} B"
    if count < 1 << 20:
        return f"{count / 1024:.1f} KiB"
    if count < 1 << 30:
        return f"{count / (1 << 20):.1f} MiB"
    return f"{count / (1 << 30):.1f} GiB"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
