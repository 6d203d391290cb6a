"""The report behind `gatepeer devices`: each device seen, by address, with its SIM and traffic.

A device is seen when the SIM map names its address (this VPG's sessions and IP address map,
kept by the daemon in `devices.sim_cache`) or the kernel counted traffic for it (the packet
path's per-device counters, `packet_path.device_counters`). For each: the SIM's name and IMSI,
online (as the API last said), the last packet's age, packets and bytes each way, connections
open (one conntrack dump, counted per address). What cannot be read is said once at the top
and left empty in the rows, never shown as zero.

The traffic is the daemon's last reading of the counters (`gatepeer.device_reading`, kept
beside state.json with its time) when one is at most `device_reading.MAX_AGE_S` old: the
report says how old. Else (no daemon, nobody scraping its metrics, or `live`) the report
lists the kernel's sets itself and says so.

Like `gatepeer status`, it stays light: no pyroute2, no prometheus_client; one subprocess
(conntrack) with a daemon's reading, three without, whatever the number of devices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from gatepeer import atomic_json, device_reading, sims
from gatepeer.config import Config
from gatepeer.device_traffic import DeviceTraffic

TrafficReader = Callable[[], Mapping[IPv4Address, DeviceTraffic]]
ReadingLoader = Callable[[], device_reading.Reading | None]
ConnectionsReader = Callable[[], str]


@dataclass(frozen=True, slots=True)
class TrafficSource:
    """Where the traffic came from: "daemon" (its reading, made at `read_at`), "kernel" (read
    now, `why` not the daemon's), or None (not read)."""

    source: str | None
    read_at: float | None = None
    why: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceRow:
    address: IPv4Address
    sim: sims.SimRecord | None  # None: traffic from an address the SIM map does not name
    traffic: DeviceTraffic | None  # None: no counters for it (or none readable)
    connections: int | None  # None: conntrack could not be read

    def to_json(self) -> dict[str, Any]:
        t = self.traffic
        return {
            "address": str(self.address),
            "name": self.sim.name if self.sim else None,
            "imsi": self.sim.imsi if self.sim else None,
            "sim_id": self.sim.sim_id if self.sim else None,
            "group_id": self.sim.group_id if self.sim else None,
            "online": self.sim.online if self.sim else None,
            "source": self.sim.source if self.sim else None,
            "last_packet_age_s": t.last_packet_age_s if t else None,
            "packets_from_device": t.packets_from_device if t else None,
            "bytes_from_device": t.bytes_from_device if t else None,
            "packets_to_device": t.packets_to_device if t else None,
            "bytes_to_device": t.bytes_to_device if t else None,
            "connections": self.connections,
        }


@dataclass
class DevicesReport:
    rows: list[DeviceRow]
    sim_map: sims.SimMap
    now: float
    notes: list[str] = field(default_factory=list)  # what could not be read, one line each
    traffic_source: TrafficSource = TrafficSource(None)

    def to_json(self) -> dict[str, Any]:
        fetched = self.sim_map.fetched_at
        return {
            "sim_map": {
                "fetched_at": fetched,
                "age_s": None if fetched is None else round(self.now - fetched, 1),
                "error": self.sim_map.error,
                "sims": len(self.sim_map.records),
            },
            "traffic": {
                "source": self.traffic_source.source,
                "read_at": self.traffic_source.read_at,
                "age_s": self.traffic_age_s(),
                "why": self.traffic_source.why,
            },
            "notes": list(self.notes),
            "devices": [row.to_json() for row in self.rows],
        }

    def traffic_age_s(self) -> float | None:
        read_at = self.traffic_source.read_at
        return None if read_at is None else round(max(0.0, self.now - read_at), 1)


def rows(
    sim_map: sims.SimMap,
    traffic: Mapping[IPv4Address, DeviceTraffic] | None,
    connections: Mapping[int, int] | None,
    not_devices: frozenset[IPv4Address] = frozenset(),
) -> list[DeviceRow]:
    """Pure: one row per address in the SIM map or the traffic counters, by address. The
    `not_devices` (the VPG's endpoints and the gate peers: the probes' answers are counted
    too) are left out. `connections`: entries by the address's integer (absent: none); None
    when conntrack could not be read."""
    # Joined and sorted by the addresses' integers: IPv4Address hashes and compares in Python
    # (its hash formats the address in hex), 10x the cost of an int's.
    records = sim_map.records
    counted = {int(a): t for a, t in (traffic or {}).items()}
    conns = connections or {}
    unknown = connections is None
    seen = sorted(seen_addresses(sim_map, traffic, not_devices))
    sim_of: Callable[[int, IPv4Address], sims.SimRecord | None] = (
        records.get_by_int
        if isinstance(records, sims.SimRecords)
        else lambda _, address: records.get(address)  # a plain mapping (tests)
    )
    found = []
    for n in seen:
        t = counted.get(n)
        address = t.address if t is not None else IPv4Address(n)
        found.append(
            DeviceRow(address, sim_of(n, address), t, None if unknown else conns.get(n, 0))
        )
    return found


def seen_addresses(
    sim_map: sims.SimMap,
    traffic: Mapping[IPv4Address, DeviceTraffic] | None,
    not_devices: frozenset[IPv4Address],
) -> set[int]:
    """The integers of the addresses in the SIM map or the traffic, less `not_devices`."""
    records = sim_map.records
    known = (
        set(records.integers()) if isinstance(records, sims.SimRecords) else set(map(int, records))
    )
    return (known | set(map(int, traffic or ()))) - set(map(int, not_devices))


def read_traffic() -> Mapping[IPv4Address, DeviceTraffic]:
    """The packet path's per-device counters (empty when its device sets are absent)."""
    from gatepeer.kernel.nftables import device_traffic

    return device_traffic()


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
    from gatepeer.kernel.conntrack import count_by_integer

    traffic_reader = traffic_reader or read_traffic
    connections_reader = connections_reader or read_connections
    reading_path = device_reading.path_for(config)
    reading_loader = reading_loader or (lambda: device_reading.load(reading_path))
    now = time.time() if now is None else now

    cache = sims.cache_path(config)
    sim_map = sims.load(cache)
    notes: list[str] = []
    if sim_map.error:
        notes.append(f"SIM map: {sim_map.error}")
    elif sim_map.fetched_at is None and cache is not None:
        notes.append(f"SIM map: none kept in {cache} yet (the daemon fetches it)")
    traffic: Mapping[IPv4Address, DeviceTraffic] | None = None
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
            try:
                traffic = reading.traffic(now)
                source = TrafficSource("daemon", reading.read_at)
            except ValueError as exc:
                why = f"the daemon's reading in {reading_path} is unreadable: {exc}"
        if source.source is None:
            try:
                traffic = traffic_reader()
                source = TrafficSource("kernel", now, why)
            except Exception as exc:  # noqa: BLE001 - nft missing or refusing: said, not fatal
                notes.append(f"traffic: cannot read the per-device counters: {_one_line(exc)}")
    not_devices = gate_addresses(config)
    seen = seen_addresses(sim_map, traffic, not_devices)
    connections: dict[int, int] | None
    try:
        connections = count_by_integer(connections_reader(), seen)
    except Exception as exc:  # noqa: BLE001 - conntrack missing or refused: said
        connections = None
        notes.append(f"connections: {_one_line(exc)}")
    return DevicesReport(
        rows=rows(sim_map, traffic, connections, not_devices),
        sim_map=sim_map,
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
    """The table an operator reads; blanks ("-") where a value is not known."""
    fetched = report.sim_map.fetched_at
    age = "never" if fetched is None else f"{_age(report.now - fetched)} ago"
    lines = [
        f"devices: {len(report.rows)} seen; SIM map: {len(report.sim_map.records)} SIMs, "
        f"fetched {age}{_traffic_said(report)}"
    ]
    lines += [f"note: {note}" for note in report.notes]
    header = (
        "ADDRESS",
        "SIM",
        "IMSI",
        "ONLINE",
        "LAST PACKET",
        "FROM DEVICE",
        "TO DEVICE",
        "CONNS",
    )
    table = [header] + [_cells(row) for row in report.rows]
    # One format string for every line: 10,000 rows of per-cell ljust cost 3x as much.
    widths = [max(map(len, column)) for column in zip(*table, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [line.format(*r).rstrip() for r in table]
    return "\n".join(lines)


def _traffic_said(report: DevicesReport) -> str:
    src = report.traffic_source
    if src.source == "daemon":
        return f"; traffic: the daemon's reading, {_age(report.traffic_age_s() or 0.0)} old"
    if src.source == "kernel":
        return f"; traffic: read from the kernel now ({src.why})" if src.why else ""
    return ""


def _cells(row: DeviceRow) -> tuple[str, ...]:
    sim, t = row.sim, row.traffic
    online = "-" if sim is None else ("yes" if sim.online else "no")
    last = "-" if t is None or t.last_packet_age_s is None else f"{_age(t.last_packet_age_s)} ago"
    return (
        str(row.address),
        (sim.name or "(no name)") if sim else "(unknown)",
        sim.imsi if sim else "-",
        online,
        last,
        "-" if t is None else f"{t.packets_from_device} pkt / {_bytes(t.bytes_from_device)}",
        "-" if t is None else f"{t.packets_to_device} pkt / {_bytes(t.bytes_to_device)}",
        "-" if row.connections is None else str(row.connections),
    )


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
    if count < 1024:
        return f"{count} B"
    size = float(count)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
