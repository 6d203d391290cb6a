"""The last good gate view kept across restarts, and what else a restarted agent takes over.

Two places keep it: state.json (on tmpfs: a restart of the daemon finds it, a reboot does not)
and `agent.gate_cache` (on disk: a reboot with a failing API still builds the data path). A
view saved for another VPG or outer address is never applied (nor unregistered).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gatepeer import atomic_json
from gatepeer.config import Config
from gatepeer.desired_state import GateView, IPv4Interface

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """What a starting agent takes over from the last state document and the gate cache."""

    reconciles: int = 0
    failures: int = 0
    last_success_at: float | None = None
    gate: GateView | None = None
    gate_fetched_at: float | None = None
    # The vxlan link made by this agent's predecessor: {"name", "ifindex", "vni", "dst_port"}.
    managed_link: dict[str, Any] | None = None
    owned_addresses: frozenset[IPv4Interface] = frozenset()


def resume(config: Config) -> Resumed:
    """The last state document's counters, view and ownership; the gate cache's view when
    the document has none that fits. A damaged document never stops the agent: what could
    not be read is left at its start value."""
    path = config.agent.state_file
    previous = atomic_json.read(path) or {}
    found = Resumed()
    try:
        counters = previous.get("counters") or {}
        found.reconciles = int(counters.get("reconciles") or 0)
        found.failures = int(counters.get("failures") or 0)
        found.last_success_at = counters.get("last_success_at")
        if previous.get("gate"):
            gate = GateView.from_json(previous["gate"])
            if view_fits(config, gate, path):
                found.gate = gate
                found.gate_fetched_at = previous.get("gate_fetched_at")
        found.managed_link = _managed_link(previous.get("managed_link"))
        found.owned_addresses = frozenset(
            IPv4Interface(a) for a in previous.get("owned_addresses") or ()
        )
    except (AttributeError, KeyError, ValueError, TypeError):
        log.warning("ignoring unreadable parts of %s", path)
    if found.gate is None:
        cached = load(config)
        if cached is not None:
            found.gate, found.gate_fetched_at = cached
    return found


def load(config: Config) -> tuple[GateView, float | None] | None:
    """After a reboot (state_file is on tmpfs): the last view the API gave, if kept."""
    path = config.agent.gate_cache
    cached = atomic_json.read(path) if path else None
    if path is None or not cached or not isinstance(cached.get("gate"), dict):
        return None
    try:
        gate = GateView.from_json(cached["gate"])
    except (KeyError, ValueError, TypeError):
        log.warning("ignoring an unreadable gate view in %s", path)
        return None
    if not view_fits(config, gate, path):
        return None
    log.info("starting from the gate view kept in %s", path)
    return gate, cached.get("fetched_at")


def keep(config: Config, gate: GateView, now: float) -> None:
    """Keep `gate` in the gate cache; a failure is said, not raised (the view still works)."""
    path = config.agent.gate_cache
    if path is None:
        return
    try:
        atomic_json.write(path, {"gate": gate.to_json(), "fetched_at": now})
    except OSError as exc:
        log.warning("cannot keep the gate view in %s: %s", path, exc.strerror or exc)


def forget(config: Config) -> None:
    """The kept view names an inner address that is no longer ours (after unregistering)."""
    if config.agent.gate_cache is not None:
        config.agent.gate_cache.unlink(missing_ok=True)


def view_fits(config: Config, gate: GateView, path: Path) -> bool:
    """A view saved for another VPG or outer address must not be applied (nor unregistered)."""
    vpg_id, local = config.soracom.vpg_id, config.tunnel.local_address
    if gate.vpg_id != vpg_id:
        log.warning(
            "ignoring the gate view in %s: it is for VPG %s, soracom.vpg_id is %s",
            path,
            gate.vpg_id,
            vpg_id,
        )
        return False
    if local is not None and gate.outer != local:
        log.warning(
            "ignoring the gate view in %s: it is for outer address %s, tunnel.local_address is %s",
            path,
            gate.outer,
            local,
        )
        return False
    return True


def _managed_link(data: Any) -> dict[str, Any] | None:
    """The state file's record of our link, or None when absent or damaged."""
    if not isinstance(data, dict):
        return None
    name, vni, port = data.get("name"), data.get("vni"), data.get("dst_port")
    if isinstance(name, str) and isinstance(vni, int) and isinstance(port, int):
        return {"name": name, "ifindex": data.get("ifindex"), "vni": vni, "dst_port": port}
    return None
