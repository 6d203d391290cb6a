"""The rendered keepalived.conf on this host: the facts it needs, `keepalived -t`, the file.

The facts come from config first and from state.json (what the last reconcile found: the
underlay and this host's VPC address) otherwise, so rendering needs no netlink library.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gatepeer.config import Config
from gatepeer.ha.keepalived import HaFacts, RenderError, check_command

KEEPALIVED_TIMEOUT = 30.0


def gatepeer_executable() -> str:
    """The console script of this installation (beside the interpreter in a venv)."""
    beside = Path(sys.executable).with_name("gatepeer")
    if beside.exists():
        return str(beside)
    found = shutil.which("gatepeer")
    return found or str(beside)


def facts_for(cfg: Config, state: Mapping[str, Any] | None, executable: str) -> HaFacts:
    """Pure: `[ha]` and `[tunnel]` first, the state document's `host` for what they leave out."""
    if cfg.ha is None:
        raise RenderError("ha: no [ha] section in the config: nothing to render")
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
    interface = cfg.ha.interface or cfg.tunnel.underlay_interface or host.get("underlay")
    if not interface:
        raise RenderError(
            "ha.interface: unknown; set it (or tunnel.underlay_interface), or run "
            "`gatepeer apply` once so the state file records the underlay"
        )
    config_file = str(cfg.source.resolve()) if cfg.source else None
    return HaFacts(
        local_address=local,
        vrrp_interface=str(interface),
        tunnel_interface=cfg.tunnel.interface,
        check_command=check_command(executable, config_file),
    )


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
