"""`lab up`, `lab down` and `lab status`: build or repair a lab and its emulator, remove it,
report what exists."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from gatepeer.lab.api_client import lab_api
from gatepeer.lab.network import netns
from gatepeer.lab.network.build import BuildReport, ensure_topology
from gatepeer.lab.network.layout import (
    MAX_PEERS,
    PEER_ADDR,
    PREFIX_RE,
    Layout,
    parse_subnet,
)
from gatepeer.lab.network.netns import LabError, ip
from gatepeer.lab.network.vpg import (
    customer_peers,
    endpoint_fdb,
    endpoint_gateway,
    redirection_gateway,
    sync_peers,
    sync_redirection,
)
from gatepeer.lab.processes.emulator_process import (
    emulator_pid,
    read_emulator_json,
    start_emulator,
    stop_emulator,
    stop_recorded_iperf,
)
from gatepeer.lab.record import (
    RUN_ROOT,
    Credentials,
    LabInfo,
    LabRecord,
    Paths,
    default_host_port,
    render_config,
    write_private,
)

GatePeerBringUp = Callable[[LabInfo], dict[str, Any]]


def resolve_layout(
    prefix: str,
    *,
    vni: int | None = None,
    device_subnet: str | None = None,
    endpoints: int | None = None,
    devices: int | None = None,
    peers: int | None = None,
) -> Layout:
    """The layout `up` builds: the given options over the existing lab's, over the defaults."""
    layout = Layout(prefix=prefix)
    record = LabRecord.load(Paths.for_prefix(prefix).lab_json)
    if record is not None:
        layout = record.layout
    changes: dict[str, Any] = {}
    if vni is not None:
        changes["vni"] = vni
    if device_subnet is not None:
        changes["device_subnet"] = parse_subnet(device_subnet)
    if endpoints is not None:
        changes["endpoint_count"] = endpoints
    if devices is not None:
        changes["device_count"] = devices
    if peers is not None:
        changes["peer_count"] = peers
    return replace(layout, **changes) if changes else layout


def lab_namespaces(prefix: str) -> list[str]:
    """Every existing namespace of this lab (`{prefix}-*`), expected or not."""
    return [n for n in netns.list_netns() if n.startswith(f"{prefix}-")]


def up(
    layout: Layout,
    *,
    host_port: int | None = None,
    gate_peer: GatePeerBringUp | None = None,
) -> LabInfo:
    """Build or repair the lab, start its emulator, and optionally bring the gate peer up."""
    paths = Paths.for_prefix(layout.prefix)
    notes: list[str] = []
    record = LabRecord.load(paths.lab_json)
    if record is not None and record.layout != layout:
        notes.append("layout changed: rebuilt the lab")
        down(layout.prefix)
        record = None
    elif record is None and lab_namespaces(layout.prefix):
        # Left by a crash before lab.json was written: its shape is unknown, start clean.
        notes.append("removed leftovers of an earlier lab")
        down(layout.prefix)

    paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.dir, 0o700)
    port_changed = record is not None and host_port is not None and record.host_port != host_port
    if record is None or port_changed:
        creds = record.credentials if record else Credentials.generate()
        port = host_port if host_port is not None else default_host_port(layout.prefix)
        record = LabRecord(layout=layout, credentials=creds, host_port=port)
    # Written before building so that a crash half-way leaves a lab `up` can repair.
    write_private(paths.lab_json, record.to_json() + "\n")
    if not paths.auth_key.exists():
        write_private(paths.auth_key, f"secret-{secrets.token_urlsafe(32)}\n")
    os.chmod(paths.auth_key, 0o600)
    pair = layout.peer_count > 1
    for gp in layout.gate_peers:
        write_private(
            paths.peer_config(gp.index), render_config(paths, record.credentials, gp, pair)
        )

    report = ensure_topology(layout)
    if report.created:
        notes.append(f"created {len(report.created)} namespaces/links")
    notes += [f"repaired {r}" for r in report.repaired]
    if not report.created and not report.repaired:
        notes.append("topology already up: kept as it was")

    pid = emulator_pid(paths)
    info = read_emulator_json(paths)
    if pid is not None and (report.fabric_created or port_changed or info is None):
        # Its lab socket would sit in the old fabric namespace, or on the old host port.
        notes.append("restarting the emulator (fabric namespace re-created or new port)")
        stop_emulator(paths)
        pid = None
    if pid is None or info is None:
        stop_emulator(paths)  # clears a stale pid file
        info = start_emulator(paths)
        pid = int(info["pid"])
        notes.append(f"started the emulator (pid {pid})")
    else:
        notes.append(f"emulator already running (pid {pid}): kept")
        _follow_emulator(layout, str(info["host_url"]), paths, record, report)
    lab = LabInfo(
        layout=layout,
        paths=paths,
        credentials=record.credentials,
        emulator_pid=pid,
        host_url=str(info["host_url"]),
        notes=notes,
    )
    if gate_peer is not None:
        lab.gate_peer = gate_peer(lab)
    return lab


def _follow_emulator(
    layout: Layout, host_url: str, paths: Paths, record: LabRecord, report: BuildReport
) -> None:
    """A kept emulator holds the truth: re-point re-created endpoints at its peers, keep them
    down while its Gate is closed (ensure_topology brought every vxlan0 up), and route the
    devices' outbound traffic as its redirection says."""
    if report.vxlan_recreated:
        api = lab_api(paths, record, host_url)
        sync_peers(layout, customer_peers(api.list_gate_peers()))
    state = emulator_state(host_url)
    if state.get("settings", {}).get("gate_opened") is False:
        for ep in layout.endpoints:
            ip(ep.ns, "link", "set", "dev", "vxlan0", "down")
    sync_redirection(layout, redirection_gateway(state.get("redirection")))


def emulator_state(host_url: str) -> dict[str, Any]:
    """GET /_emulator/state: the emulator's true state (answer overrides do not show here)."""
    try:
        with urllib.request.urlopen(f"{host_url}/_emulator/state", timeout=10) as resp:
            return dict(json.loads(resp.read()))
    except (OSError, ValueError) as exc:
        raise LabError(f"{host_url}/_emulator/state: {exc}") from None


def redirect(prefix: str, gateway: str | None) -> dict[str, Any]:
    """Set the lab's Junction redirection through its API, as a person would with soracom-cli
    until the agent manages it: devices' traffic leaving the device subnet then goes to
    `gateway` (an IPv4 address, or "peer" for the lab gate peer's registered inner address);
    None unsets it (the VPG's own NATed way out). Returns the VPG as the API answered."""
    if gateway not in (None, "peer"):
        try:
            gateway = str(ipaddress.IPv4Address(gateway))
        except ValueError:
            raise LabError(f"gateway {gateway!r}: not an IPv4 address (or `peer`)") from None
    paths = Paths.for_prefix(prefix)
    record = LabRecord.load(paths.lab_json)
    info = read_emulator_json(paths) if emulator_pid(paths) is not None else None
    if record is None or info is None:
        raise LabError(f"lab {prefix} is not up (its emulator is not running): run `lab up`")
    api = lab_api(paths, record, str(info["host_url"]))
    if gateway is None:
        return api.unset_redirection()
    if gateway == "peer":
        mine = [p for p in api.list_gate_peers() if p.get("outerIpAddress") == str(PEER_ADDR)]
        if not mine:
            raise LabError(f"the gate peer {PEER_ADDR} is not registered: no inner address yet")
        gateway = str(mine[0]["innerIpAddress"])
    return api.set_redirection(gateway, description="gatepeer lab: via the gate peer")


@dataclass
class DownReport:
    removed: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def down(prefix: str) -> DownReport:
    """Remove the lab whatever state it is in: emulator, namespaces, folder. Idempotent."""
    if not PREFIX_RE.match(prefix):
        raise LabError(f"prefix {prefix!r}: 1-8 lowercase letters and digits")
    paths = Paths.for_prefix(prefix)
    report = DownReport()
    pid = stop_emulator(paths)
    if pid is not None:
        report.removed.append(f"emulator (pid {pid})")
    iperf = stop_recorded_iperf(paths, prefix)
    if iperf is not None:
        report.removed.append(f"iperf3 server (pid {iperf})")
    if paths.dir.exists():
        from gatepeer.lab.processes import vpc_routes
        from gatepeer.lab.processes.ha_pair import (
            stop_pair,  # the HA pair's processes, by their pids
        )

        report.removed += stop_pair(paths, MAX_PEERS)
        report.removed += vpc_routes.stop(paths)
    for name in lab_namespaces(prefix):
        pids = netns.netns_pids(name)
        if pids:
            # Not ours to kill: they keep the namespace alive after it is unlinked.
            report.warnings.append(
                f"{name}: processes still inside (pids {' '.join(map(str, pids))}); "
                "they keep its links alive until they exit"
            )
        netns.delete_netns(name)
        report.removed.append(name)
    if paths.dir.exists():
        shutil.rmtree(paths.dir)
        report.removed.append(str(paths.dir))
    with contextlib.suppress(OSError):
        RUN_ROOT.rmdir()  # only when no other lab is left
    return report


# ----------------------------------------------------------------------------- status


@dataclass
class Status:
    prefix: str
    namespaces: list[str]
    missing: list[str]
    layout: Layout | None
    emulator_pid: int | None
    host_url: str | None
    peers: list[dict[str, Any]] | None
    peer_error: str | None
    endpoint_fdb: dict[str, list[str]]
    gate_peer_vxlan: bool
    # The emulator's Junction redirection, and the gateway each endpoint routes the devices'
    # outbound traffic to (None: the VPG's own NATed way out).
    redirection: dict[str, Any] | None = None
    endpoint_gateway: dict[str, str | None] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return bool(self.namespaces) or self.layout is not None or self.emulator_pid is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "namespaces": self.namespaces,
            "missing": self.missing,
            "layout": self.layout.to_dict() if self.layout else None,
            "emulator": {"pid": self.emulator_pid, "host_url": self.host_url},
            "peers": self.peers,
            "peer_error": self.peer_error,
            "endpoint_fdb": self.endpoint_fdb,
            "gate_peer_vxlan": self.gate_peer_vxlan,
            "redirection": self.redirection,
            "endpoint_gateway": self.endpoint_gateway,
        }


def status(prefix: str) -> Status:
    paths = Paths.for_prefix(prefix)
    present = lab_namespaces(prefix)
    record = LabRecord.load(paths.lab_json)
    layout = record.layout if record else None
    missing = [n for n in layout.namespaces if n not in present] if layout else []
    pid = emulator_pid(paths)
    info = read_emulator_json(paths) if pid is not None else None
    host_url = str(info["host_url"]) if info else None
    peers: list[dict[str, Any]] | None = None
    peer_error = None
    redirection = None
    if record is not None and host_url is not None:
        try:
            peers = lab_api(paths, record, host_url).list_gate_peers()
            redirection = emulator_state(host_url).get("redirection")
        except (LabError, OSError, KeyError) as exc:
            peer_error = str(exc)
    fdb: dict[str, list[str]] = {}
    gateways: dict[str, str | None] = {}
    for ep in layout.endpoints if layout else []:
        if ep.ns in present and netns.link_exists(ep.ns, "vxlan0"):
            fdb[ep.ns] = endpoint_fdb(ep.ns)
            gateways[ep.ns] = endpoint_gateway(ep.ns)
    peer_vxlan = bool(
        layout and layout.peer_ns in present and netns.link_exists(layout.peer_ns, "vxlan0")
    )
    return Status(
        prefix=prefix,
        namespaces=present,
        missing=missing,
        layout=layout,
        emulator_pid=pid,
        host_url=host_url,
        peers=peers,
        peer_error=peer_error,
        endpoint_fdb=fdb,
        gate_peer_vxlan=peer_vxlan,
        redirection=redirection,
        endpoint_gateway=gateways,
    )
