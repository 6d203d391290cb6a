"""The rendered keepalived.conf and conntrackd.conf on this host: the facts they need, each
tool's own check (`keepalived -t`; conntrackd's parse), the files.

The facts come from config first and from state.json (what the last reconcile found: the
underlay, this host's VPC address, the VPG's device subnet) otherwise, so rendering needs no
netlink library.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gatepeer.config import Config
from gatepeer.desired_state import GateView, conntrack_sysctls
from gatepeer.ha import verdict
from gatepeer.ha.conntrackd import SyncFacts
from gatepeer.ha.keepalived import HaFacts, RenderError

KEEPALIVED_TIMEOUT = 30.0


def facts_for(cfg: Config, state: Mapping[str, Any] | None) -> HaFacts:
    """Pure: `[ha]` and `[tunnel]` first, the state document's `host` for what they leave out."""
    if cfg.ha is None:
        raise RenderError("ha: no [ha] section in the config: nothing to render")
    local = _local_address(cfg, state)
    interface = cfg.ha.interface or _underlay(cfg, state, "ha.interface")
    return HaFacts(
        local_address=local,
        vrrp_interface=str(interface),
        tunnel_interface=cfg.tunnel.interface,
        check_command=verdict.command(cfg, verdict.CHECK_FILE),
        sync_command=verdict.command(cfg, verdict.SYNC_FILE) if cfg.ha.conntrack_sync else (),
        underlay=(
            _underlay(cfg, state, "tunnel.underlay_interface")
            if cfg.ha.snat_address is not None
            else None
        ),
    )


def sync_facts_for(cfg: Config, state: Mapping[str, Any] | None) -> SyncFacts:
    """Pure: what conntrackd.conf needs; the device subnet is the VPG's, from the last gate
    view the daemon recorded."""
    if cfg.ha is None:
        raise RenderError("ha: no [ha] section in the config: nothing to render")
    if not cfg.ha.conntrack_sync:
        raise RenderError("ha.conntrack_sync: false; there is no conntrackd.conf to render")
    gate_json = (state or {}).get("gate")
    try:
        subnet = GateView.from_json(gate_json).device_subnet if gate_json else None
    except (KeyError, ValueError, TypeError, AttributeError):
        subnet = None
    if subnet is None:
        raise RenderError(
            "the VPG's device subnet is unknown: the state file has no gate view yet; start "
            "gatepeer (or run `gatepeer apply`) first"
        )
    sizes = dict(
        conntrack_sysctls(cfg.kernel.neighbour_table_devices, cfg.packet_path.flows_per_device)
    )
    return SyncFacts(
        local_address=_local_address(cfg, state),
        interface=_underlay(cfg, state, "tunnel.underlay_interface"),
        device_subnet=subnet,
        conntrack_max=sizes["net/netfilter/nf_conntrack_max"],
    )


def _local_address(cfg: Config, state: Mapping[str, Any] | None) -> ipaddress.IPv4Address:
    host = (state or {}).get("host") or {}
    local = cfg.tunnel.local_address
    if local is None and host.get("local_address"):
        try:
            local = ipaddress.IPv4Address(host["local_address"])
        except ValueError:
            local = None
    if local is None:
        raise RenderError(
            "tunnel.local_address: unknown; set it, or run `gatepeer apply` once so the state "
            "file records this host's address"
        )
    return local


def _underlay(cfg: Config, state: Mapping[str, Any] | None, key: str) -> str:
    host = (state or {}).get("host") or {}
    interface = cfg.tunnel.underlay_interface or host.get("underlay")
    if not interface:
        also = " (or tunnel.underlay_interface)" if key != "tunnel.underlay_interface" else ""
        raise RenderError(
            f"{key}: unknown; set it{also}, or run `gatepeer apply` once so the state file "
            "records the underlay"
        )
    return str(interface)


def keepalived_test(text: str) -> str | None:
    """keepalived's own verdict on `text` (`keepalived -t`): None when it passes, else its
    complaint. Raises FileNotFoundError when keepalived is not installed."""
    binary = shutil.which("keepalived") or "/usr/sbin/keepalived"
    with tempfile.NamedTemporaryFile("w", prefix="keepalived-", suffix=".conf") as fh:
        fh.write(text)
        fh.flush()
        proc = subprocess.run(
            [binary, "-t", "-f", fh.name],
            capture_output=True,
            text=True,
            timeout=KEEPALIVED_TIMEOUT,
            check=False,
        )
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return "; ".join(lines) or f"keepalived -t exited {proc.returncode}"


def write(path: Path, text: str) -> None:
    """Write-then-rename: keepalived (on reload) reads the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
