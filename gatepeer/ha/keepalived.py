"""keepalived.conf rendered from `[ha]`: pure, no I/O (the golden files in tests/golden/ha/).

The shape, and why:

- One VRRP instance, VRRPv3 (centisecond adverts), unicast between the two VPC addresses: a VPC
  carries no multicast. `unicast_fault_no_peer` makes a config without a peer a FAULT instead
  of a silent fallback to multicast; `check_unicast_src` accepts adverts from the peer only.
- `state BACKUP` on both peers and `nopreempt` (by default): whoever is master stays master, so
  a peer coming back does not cause a second failover.
- `higher_prio_send_advert`: when a split brain heals, the master that steps down first sends
  one advert at its own, lower priority, so the winner always hears MASTER_RX_LOWER_PRI and
  claims the gateway back at once. Without it the loser could step down silently, and the
  VPG kept pointing at it until the winner's next refresh (3.4-3.7 s in 2 of 4 lab runs; up to
  `reconcile_interval`, 30 s by default).
- `vrrp_script` reads the daemon's verdict with weight 0 (gatepeer/ha/verdict.py: `gatepeer
  check`'s rules, applied by the daemon each probe round, where a Python process per second
  timed out on a loaded peer): a failing check puts the instance into FAULT, which gives the
  role away. (A negative weight would only lower the priority, and with nopreempt a
  lower-priority master is never pre-empted.) `init_fail`: a peer that just started is not a
  candidate until its check has passed `rise` times.
- The tunnel interface is tracked, so losing it is a FAULT at once, without waiting for the
  check; `dynamic_interfaces` lets keepalived start before gatepeer has built it.
- State changes go to a notify FIFO, which keepalived writes in order (notify scripts run
  concurrently and can reorder); gatepeer's daemon reads it (`gatepeer.ha.fifo`).
- vip mode: keepalived owns the virtual address on the tunnel, as a /32 so it adds no second
  connected route beside the inner address's. Without one, VRRPv3 still needs an address in
  its adverts: see ADVERT_MARKER.
- `ha.snat_address` is not keepalived's: keepalived adds its addresses and sends gratuitous ARP
  before it reports MASTER, so the VPC hosts' replies reached a new master before conntrackd's
  commit and were dropped. gatepeer's daemon takes the address after the commit
  (gatepeer/ha/nat_address.py, gatepeer/ha/handover.py); the advert carries the marker below.
  Letting go needs no order, and must work when the daemon cannot: keepalived's notify on
  BACKUP, FAULT and stop removes the address too (a daemon killed on the master fails the
  check, and its address would otherwise stay beside the new master's on the same network).
- With `ha.conntrack_sync`, a second script (the sync verdict, `gatepeer check --sync`'s
  rules) with a negative weight:
  broken sync lowers the priority below any healthy peer's, so an election prefers the peer
  whose copy of the connections is good, but never puts the instance into FAULT (a master
  whose peer is down hears no sync, and must stay master; the check ignores that silence on
  the master, so its priority stays above a returning peer's).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from gatepeer.config import HaConfig

INSTANCE = "gatepeer"  # the name in the FIFO's lines: INSTANCE "gatepeer" MASTER 100
SCRIPT = "gatepeer_check"
SYNC_SCRIPT = "gatepeer_sync"
# keepalived clamps the effective priority to 1..254: this takes any peer to the bottom.
SYNC_WEIGHT = -253
# VRRPv3 adverts must carry at least one address (keepalived refuses a v3 instance without
# one). Without a virtual address, the advert carries RFC 7600's IPv4 dummy address, which the
# master holds on its loopback with host scope: it routes nothing and shows who is master.
ADVERT_MARKER = ipaddress.IPv4Address("192.0.0.8")
# Where Debian's iproute2 puts `ip` (a link to /bin/ip on a merged /usr, the file itself before).
IP_BINARY = "/sbin/ip"
# keepalived splits a script line on spaces and has no escaping: refuse anything else.
_SAFE_WORD = re.compile(r"^[A-Za-z0-9_./:=+@,-]+$")


class RenderError(ValueError):
    """The inputs cannot make a valid keepalived.conf; the message names the setting."""


@dataclass(frozen=True)
class HaFacts:
    """What the render needs beyond `[ha]`: this host's side, resolved by the caller."""

    local_address: ipaddress.IPv4Address  # this peer's VPC address: unicast_src_ip
    vrrp_interface: str  # where adverts go: ha.interface, else the tunnel's underlay
    tunnel_interface: str  # tracked; carries the virtual address in vip mode
    check_command: tuple[str, ...]  # argv of the health check (verdict.command)
    sync_command: tuple[str, ...] = ()  # argv of the sync check, with ha.conntrack_sync
    underlay: str | None = None  # the interface holding ha.snat_address; None without one


def render(ha: HaConfig, facts: HaFacts) -> str:
    if facts.local_address == ha.peer_address:
        raise RenderError(
            f"ha.peer_address: {ha.peer_address} is this host's own address; "
            "set the other peer's VPC address"
        )
    if ha.conntrack_sync and not facts.sync_command:
        raise RenderError("ha.conntrack_sync: no sync check command to render")
    release: list[str] = []
    if ha.snat_address is not None:
        if facts.underlay is None:
            raise RenderError("ha.snat_address: the underlay that holds it is unknown")
        drop = f"{IP_BINARY} address del {ha.snat_address}/32 dev {facts.underlay}"
        release = [f'    notify_{state} "{drop}"' for state in ("backup", "fault", "stop")]
    for word in (*facts.check_command, *facts.sync_command):
        if not _SAFE_WORD.match(word):
            raise RenderError(
                f"the health check command has a word keepalived cannot pass: {word!r} "
                "(install gatepeer and its config at paths without spaces or quotes)"
            )
    nopreempt = ["    nopreempt"] if ha.nopreempt else []
    vips = []
    if ha.virtual_address is not None:
        vips.append(f"{ha.virtual_address}/32 dev {facts.tunnel_interface}")
    if not vips:
        vips.append(f"{ADVERT_MARKER}/32 dev lo scope host")
    sync_script: list[str] = []
    if ha.conntrack_sync:
        sync_script = [
            f"vrrp_script {SYNC_SCRIPT} {{",
            f'    script "{" ".join(facts.sync_command)}"',
            f"    interval {ha.check_interval}",
            f"    timeout {ha.check_timeout}",
            f"    fall {ha.check_fall}",
            f"    rise {ha.check_rise}",
            f"    weight {SYNC_WEIGHT}",
            "}",
            "",
        ]
    lines = [
        "# Rendered by gatepeer from [ha] (`gatepeer ha render`); edits here are overwritten.",
        "global_defs {",
        "    script_user root",
        "    enable_script_security",
        f"    vrrp_notify_fifo {ha.notify_fifo}",
        "    fifo_write_vrrp_states_on_reload",
        "    dynamic_interfaces",
        "}",
        "",
        f"vrrp_script {SCRIPT} {{",
        f'    script "{" ".join(facts.check_command)}"',
        f"    interval {ha.check_interval}",
        f"    timeout {ha.check_timeout}",
        f"    fall {ha.check_fall}",
        f"    rise {ha.check_rise}",
        "    weight 0",
        "    init_fail",
        "}",
        "",
        *sync_script,
        f"vrrp_instance {INSTANCE} {{",
        "    state BACKUP",
        f"    interface {facts.vrrp_interface}",
        f"    virtual_router_id {ha.virtual_router_id}",
        f"    priority {ha.priority}",
        f"    advert_int {_seconds(ha.advert_interval)}",
        "    version 3",
        *nopreempt,
        "    higher_prio_send_advert",
        f"    unicast_src_ip {facts.local_address}",
        "    unicast_peer {",
        f"        {ha.peer_address}",
        "    }",
        "    unicast_fault_no_peer",
        "    check_unicast_src",
        "    track_interface {",
        f"        {facts.tunnel_interface}",
        "    }",
        "    track_script {",
        f"        {SCRIPT}",
        *([f"        {SYNC_SCRIPT}"] if ha.conntrack_sync else []),
        "    }",
        "    virtual_ipaddress {",
        *(f"        {vip}" for vip in vips),
        "    }",
        *release,
        "}",
    ]
    return "\n".join(lines) + "\n"


def _seconds(value: float) -> str:
    """0.1 -> "0.1", 1.0 -> "1": keepalived reads decimal seconds."""
    return f"{value:.2f}".rstrip("0").rstrip(".")
