"""The lab's emulator process: `python -m gatepeer.lab.emulator --lab-dir DIR`.

Reads the lab record (lab.json) and the auth key that `gatepeer lab up` wrote into DIR, then
serves the SORACOM API emulator on two sockets: 203.0.113.10:8080 inside the fabric namespace
(what the gate peer reaches through its default route) and 127.0.0.1 in the root namespace (for
the CLI and the tests). Registering or unregistering a gate peer points the VPG endpoints'
VXLAN FDBs at exactly the registered peers, and setting or unsetting Junction redirection
moves the devices' outbound traffic between the redirection gateway and the VPG's own NATed
way out, as SORACOM's VPG does; both before the API call is answered.

Unless --foreground is given it forks: the launcher exits as soon as the child is on its own,
so `lab up` never has a child to reap. The child writes emulator.pid, then emulator.json (pid
and URLs) once both sockets listen, and removes both when it stops on SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gatepeer.lab.emulator.model import EmulatorSettings, Peer, Sim
from gatepeer.lab.emulator.service import Emulator
from gatepeer.lab.network import netns
from gatepeer.lab.network.build import ensure_topology
from gatepeer.lab.network.layout import API_ADDR, API_PORT, Layout
from gatepeer.lab.network.vpg import (
    customer_peers,
    redirection_gateway,
    sync_peers,
    sync_redirection,
)
from gatepeer.lab.record import LabRecord, Paths

log = logging.getLogger("gatepeer.lab.emulator")  # one logger for the whole emulator


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def bind_host_socket(port: int) -> socket.socket:
    """127.0.0.1:port in the root namespace; any free port when that one is taken (the lab's
    folder says which one we got)."""
    try:
        return socket.create_server(("127.0.0.1", port))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning("127.0.0.1:%d is taken; using a free port instead", port)
        return socket.create_server(("127.0.0.1", 0))


def bind_lab_socket(fabric_ns: str) -> socket.socket:
    """The API address inside the fabric namespace (the socket stays there once made)."""
    return netns.call_in_netns(fabric_ns, lambda: socket.create_server((str(API_ADDR), API_PORT)))


class PeerHook:
    """The emulator's callbacks: keep the VPG endpoints in step with the API's state."""

    def __init__(self, record: LabRecord, paths: Paths) -> None:
        self.record = record
        self.paths = paths
        self.layout = record.layout
        self.peers: list[tuple[str, str]] = []
        self.gateway: str | None = None  # the Junction redirection gateway, when enabled
        self.lock = threading.Lock()

    def on_redirection_changed(self, redirection: Mapping[str, Any] | None) -> None:
        with self.lock:
            self.gateway = redirection_gateway(redirection)
            for change in sync_redirection(self.layout, self.gateway):
                log.info("%s", change)

    def on_peers_changed(self, peers: Sequence[Any]) -> None:
        with self.lock:
            self.peers = customer_peers(peers)
            for change in sync_peers(self.layout, self.peers):
                log.info("%s", change)

    def on_vpg_changed(self, settings: Any) -> None:
        """A new VNI re-creates the endpoints' vxlan0; closing Gate takes them down (SORACOM:
        opening or closing Gate interrupts traffic). Other changes are not mirrored."""
        with self.lock:
            vni = int(settings.vxlan_id)
            if vni != self.layout.vni:
                log.info(
                    "VNI %d -> %d: re-creating the VPG endpoints' vxlan0", self.layout.vni, vni
                )
                self.layout = Layout(
                    prefix=self.layout.prefix,
                    vni=vni,
                    device_subnet=self.layout.device_subnet,
                    endpoint_count=self.layout.endpoint_count,
                    device_count=self.layout.device_count,
                )
                self.record = LabRecord(self.layout, self.record.credentials, self.record.host_port)
                # `lab up` and `lab status` read the layout from here.
                _write_atomic(self.paths.lab_json, self.record.to_json() + "\n")
                ensure_topology(self.layout)
                sync_peers(self.layout, self.peers)
            if str(settings.device_subnet) != str(self.layout.device_subnet) or len(
                settings.endpoints
            ) != len(self.layout.endpoints):
                log.warning(
                    "device subnet or endpoints changed in the emulator; the namespaces still "
                    "have %s and %d endpoints (run `gatepeer lab up` with the new values)",
                    self.layout.device_subnet,
                    self.layout.endpoint_count,
                )
            state = "up" if settings.gate_opened else "down"
            for ep in self.layout.endpoints:
                netns.ip(ep.ns, "link", "set", "dev", "vxlan0", state, check=False)
            # A tunnel that went down or was re-created lost its route to the gateway.
            sync_redirection(self.layout, self.gateway)


def build_settings(record: LabRecord, auth_key: str) -> EmulatorSettings:
    layout = record.layout
    return EmulatorSettings(
        operator_id=record.credentials.operator_id,
        auth_key_id=record.credentials.auth_key_id,
        auth_key=auth_key,
        vpg_id=record.credentials.vpg_id,
        vxlan_id=layout.vni,
        device_subnet=str(layout.device_subnet),
        endpoints=tuple(Peer(str(ep.outer), str(ep.inner)) for ep in layout.endpoints),
        gate_opened=True,
    )


# A VPG that is not the lab's: a SIM in session there is no device of the lab's gate peer.
OTHER_VPG_ID = "00000000-0000-4000-8000-0000000000aa"


def lab_sims(record: LabRecord) -> list[Sim]:
    """The lab's SIMs: one named SIM in session on the lab's VPG per device address (test
    network IMSIs, MCC 001), and one on another VPG, whose address no lab device holds."""
    layout, vpg_id = record.layout, record.credentials.vpg_id
    out = [
        Sim(
            sim_id=f"8900100000000000{i:03d}",
            imsi=f"00101000000{i:04d}",
            name=f"lab-device-{i}",
            group_id="lab-devices",
            vpg_id=vpg_id,
            address=str(address),
        )
        for i, address in enumerate(layout.devices, start=1)
    ]
    elsewhere = layout.device_half.broadcast_address - 1
    if elsewhere not in layout.devices:  # a full /29 of devices leaves no room for it
        out.append(
            Sim(
                sim_id="8900100000000000999",
                imsi="001010000009999",
                name="on-another-vpg",
                vpg_id=OTHER_VPG_ID,
                address=str(elsewhere),
            )
        )
    return out


def serve(paths: Paths) -> int:
    record = LabRecord.load(paths.lab_json)
    if record is None:
        log.error("%s: no lab record; run `gatepeer lab up`", paths.lab_json)
        return 2
    auth_key = paths.auth_key.read_text().strip()
    hook = PeerHook(record, paths)
    emulator = Emulator(
        build_settings(record, auth_key),
        on_peers_changed=hook.on_peers_changed,
        on_vpg_changed=hook.on_vpg_changed,
        on_redirection_changed=hook.on_redirection_changed,
    )
    emulator.set_sims(lab_sims(record))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        lab_url = emulator.serve_on(bind_lab_socket(record.layout.fabric_ns))
        host_url = emulator.serve_on(bind_host_socket(record.host_port))
        # A new emulator knows no peers: clear what an earlier one left in the endpoints.
        hook.on_peers_changed(emulator.peers())
        hook.on_redirection_changed(emulator.redirection())
        info = {"pid": os.getpid(), "lab_url": lab_url, "host_url": host_url}
        _write_atomic(paths.emulator_json, json.dumps(info) + "\n")
        log.info("ready: %s (lab), %s (host)", lab_url, host_url)
        done.wait()
    finally:
        emulator.stop()
        for path in (paths.emulator_json, paths.emulator_pid):
            with contextlib.suppress(OSError, ValueError):
                if path.suffix == ".pid" and int(path.read_text().strip()) != os.getpid():
                    continue
                if path.suffix == ".json" and json.loads(path.read_text())["pid"] != os.getpid():
                    continue
                path.unlink()
    log.info("stopped")
    return 0


def run(lab_dir: Path, *, foreground: bool = False) -> int:
    """Serve the lab in `lab_dir` until SIGTERM; fork first unless `foreground`."""
    paths = Paths(lab_dir)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s emulator[%(process)d] %(levelname)s %(message)s",
        stream=sys.stdout,
    )
    if not foreground:
        if os.fork() != 0:
            os._exit(0)  # the launcher: `lab up` waits for this exit, then for emulator.json
        os.chdir("/")  # a daemon pins no directory (imports use sys.path, fixed at start)
    _write_atomic(paths.emulator_pid, f"{os.getpid()}\n")
    try:
        return serve(paths)
    except Exception:
        log.exception("emulator failed")
        return 1
