"""The lab's folder and what it holds: the paths, lab.json (the layout, the public half of the
credentials, the host port), the auth key, the agent's configs; and `LabInfo`, a running lab as
`lab up` leaves it and `lab status` finds it.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gatepeer.lab.network.layout import (
    API_ADDR,
    API_PORT,
    DEFAULT_HOST_PORT,
    DEFAULT_PREFIX,
    PAIR_SNAT_ADDR,
    PEER2_ADDR,
    PEER_ADDR,
    GatePeer,
    Layout,
)
from gatepeer.lab.network.netns import LabError

RUN_ROOT = Path("/run/gatepeer-lab")
BASELINE_SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "handmade_gate_init.sh"


@dataclass(frozen=True)
class Paths:
    """The lab's folder: credentials, the agent's config, the emulator's pid, log and URLs."""

    dir: Path

    @classmethod
    def for_prefix(cls, prefix: str) -> Paths:
        return cls(RUN_ROOT / prefix)

    @property
    def lab_json(self) -> Path:
        return self.dir / "lab.json"

    @property
    def auth_key(self) -> Path:
        return self.dir / "auth-key"

    @property
    def config(self) -> Path:
        return self.dir / "gatepeer.toml"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def gate_cache(self) -> Path:
        return self.dir / "gate.json"

    @property
    def emulator_pid(self) -> Path:
        return self.dir / "emulator.pid"

    @property
    def emulator_log(self) -> Path:
        return self.dir / "emulator.log"

    @property
    def emulator_json(self) -> Path:
        return self.dir / "emulator.json"

    @property
    def iperf_pid(self) -> Path:
        return self.dir / "iperf3.pid"

    # Per gate peer: peer 1 keeps the single-peer names above.

    def peer_config(self, index: int) -> Path:
        return self.config if index == 1 else self.dir / f"gatepeer-peer{index}.toml"

    def peer_state_file(self, index: int) -> Path:
        return self.state_file if index == 1 else self.dir / f"state-peer{index}.json"

    def peer_gate_cache(self, index: int) -> Path:
        return self.gate_cache if index == 1 else self.dir / f"gate-peer{index}.json"

    def peer_sim_cache(self, index: int) -> Path:
        return self.dir / ("sims.json" if index == 1 else f"sims-peer{index}.json")

    def peer_file(self, index: int, name: str) -> Path:
        """The HA pair's files: keepalived.conf, its FIFO, pid files and logs."""
        return self.dir / f"peer{index}-{name}"


@dataclass(frozen=True)
class Credentials:
    operator_id: str
    auth_key_id: str
    vpg_id: str

    @classmethod
    def generate(cls) -> Credentials:
        return cls(
            operator_id=f"OP{secrets.randbelow(10**10):010d}",
            auth_key_id=f"keyId-{secrets.token_hex(16)}",
            vpg_id=str(uuid.uuid4()),
        )


@dataclass(frozen=True)
class LabRecord:
    """What lab.json holds: the layout, the public half of the credentials, the host port."""

    layout: Layout
    credentials: Credentials
    host_port: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "layout": self.layout.to_dict(),
                "credentials": asdict(self.credentials),
                "host_port": self.host_port,
            },
            indent=2,
        )

    @classmethod
    def load(cls, path: Path) -> LabRecord | None:
        try:
            d = json.loads(path.read_text())
            return cls(
                layout=Layout.from_dict(d["layout"]),
                credentials=Credentials(**d["credentials"]),
                host_port=int(d["host_port"]),
            )
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, LabError) as exc:
            raise LabError(f"{path}: unreadable lab record ({exc}); run `lab down` first") from None


def default_host_port(prefix: str) -> int:
    """18080 for the default lab, a stable port per prefix otherwise (the emulator falls back to
    any free port when this one is taken and writes the one it got to emulator.json)."""
    if prefix == DEFAULT_PREFIX:
        return DEFAULT_HOST_PORT
    return DEFAULT_HOST_PORT + 1 + zlib.crc32(prefix.encode()) % 2000


def write_private(path: Path, text: str) -> None:
    """Write atomically with mode 0600 from the start (the key must never be readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def render_config(
    paths: Paths, creds: Credentials, peer: GatePeer | None = None, pair: bool = False
) -> str:
    """The agent's configuration for this lab (TOML, keys as in the project's config spec):
    for its single gate peer, or for one peer of an HA pair (`pair`)."""
    index = peer.index if peer else 1
    address = peer.address if peer else PEER_ADDR
    text = (
        "# Written by `gatepeer lab up`: the agent in the lab's gate peer namespace uses this.\n"
        "[soracom]\n"
        f'endpoint = "http://{API_ADDR}:{API_PORT}"\n'
        f'auth_key_id = "{creds.auth_key_id}"\n'
        f'auth_key_file = "{paths.auth_key}"\n'
        f'vpg_id = "{creds.vpg_id}"\n'
        "# Junction redirection to this peer: without it the VPG sends the devices' traffic\n"
        "# (and their replies to VPC hosts) its own way, never through the gate peer.\n"
        'redirection = "self"\n'
        "\n"
        "[tunnel]\n"
        'interface = "vxlan0"\n'
        'underlay_interface = "eth0"\n'
        f'local_address = "{address}"\n'
        "\n"
        "[agent]\n"
        # An HA master checks at each refresh that the VPG's gateway is still its claim.
        f'reconcile_interval = "{"10s" if pair else "30s"}"\n'
        f'state_file = "{paths.peer_state_file(index)}"\n'
        f'gate_cache = "{paths.peer_gate_cache(index)}"\n'
        "\n"
        "[devices]\n"
        "# The lab's SIMs (one per device, named lab-device-N) by address, for gatepeer devices.\n"
        f'sim_cache = "{paths.peer_sim_cache(index)}"\n'
    )
    if pair:
        text += render_ha_settings(paths, index)
    return text


def render_ha_settings(paths: Paths, index: int) -> str:
    """The HA pair's sections: nat mode (the lab's VPC host routes the device subnet to peer
    1 only, so route mode would need its route to move too), 1 s probes (`gatepeer check`
    wants a recent answer from the VPG), and [ha] pointing at the other peer, with the moving
    NAT address and conntrackd's sync (its config and control socket in the lab's folder, one
    per peer), so connections survive a failover without extra steps."""
    other = PEER2_ADDR if index == 1 else PEER_ADDR
    return (
        "\n"
        "[packet_path]\n"
        'mode = "nat"\n'
        "\n"
        "[probes]\n"
        'interval = "1s"\n'
        'timeout = "0.3s"\n'
        "\n"
        "[ha]\n"
        f'peer_address = "{other}"\n'
        "# Peer 1 wins when both start together; afterwards nopreempt keeps whoever is master.\n"
        f"priority = {254 if index == 1 else 253}\n"
        'advert_interval = "1s"\n'
        f'notify_fifo = "{paths.peer_file(index, "keepalived.fifo")}"\n'
        "# The address the VPC host sees for the devices, held by the master only.\n"
        f'snat_address = "{PAIR_SNAT_ADDR}"\n'
        "conntrack_sync = true\n"
        f'conntrackd_config = "{paths.peer_file(index, "conntrackd.conf")}"\n'
        f'conntrackd_socket = "{paths.peer_file(index, "conntrackd.ctl")}"\n'
    )


@dataclass
class LabInfo:
    """A running lab, as `up` leaves it and `status` finds it."""

    layout: Layout
    paths: Paths
    credentials: Credentials
    emulator_pid: int | None
    host_url: str | None
    lab_url: str = f"http://{API_ADDR}:{API_PORT}"
    notes: list[str] = field(default_factory=list)
    gate_peer: dict[str, Any] | None = None
