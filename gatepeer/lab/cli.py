"""`gatepeer lab`: build, inspect and remove the emulated SORACOM side on this host.

Imported by gatepeer/cli.py at start-up, so only click and the standard library are imported
here; the lab's modules load inside the commands.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import click

if TYPE_CHECKING:
    from gatepeer.lab.control import Status
    from gatepeer.lab.record import LabInfo

DEFAULT_PREFIX = "gplab"  # same as topology.DEFAULT_PREFIX, kept here to avoid the import

prefix_option = click.option(
    "--prefix",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Name prefix of the lab's namespaces ({prefix}-peer, ...); 1-8 letters and digits.",
)


def _require_root() -> None:
    missing = [tool for tool in ("ip", "bridge") if shutil.which(tool) is None]
    if missing:
        raise click.ClickException(f"needs iproute2 ({', '.join(missing)} not found)")
    if os.geteuid() != 0:
        raise click.ClickException(
            "needs root: creating network namespaces takes CAP_SYS_ADMIN and CAP_NET_ADMIN"
        )


def _fail(command: str, exc: Exception, code: int = 1) -> NoReturn:
    click.echo(f"gatepeer lab {command}: {exc}", err=True)
    sys.exit(code)


@click.group()
def lab() -> None:
    """The lab: SORACOM's side of Gate (VPG endpoints, devices, API) in network namespaces.

    Everything lives in namespaces named PREFIX-*, uses only 198.18.0.0/15 and TEST-NET
    addresses, and keeps its files in /run/gatepeer-lab/PREFIX/.
    """


@lab.command()
@prefix_option
@click.option(
    "--vni", type=click.IntRange(1, 16777215), help="VXLAN id.  [default: 10, or the lab's]"
)
@click.option(
    "--device-subnet",
    metavar="CIDR",
    help="Device subnet (devices in its upper half).  [default: 198.19.0.0/16, or the lab's]",
)
@click.option("--endpoints", type=click.IntRange(1, 8), help="VPG tunnel endpoints.  [default: 2]")
@click.option("--devices", type=click.IntRange(1, 250), help="Device addresses.  [default: 4]")
@click.option(
    "--peers",
    type=click.IntRange(1, 2),
    help="Gate peer namespaces; 2 makes an HA pair (PREFIX-peer2 at 198.18.0.11, [ha] in both "
    "configs with the NAT address 198.18.0.12 and conntrackd's sync; `lab ha start` runs "
    "gatepeer, conntrackd and keepalived in each).  [default: 1]",
)
@click.option(
    "--host-port",
    type=click.IntRange(0, 65535),
    help="Emulator port on 127.0.0.1 (0: any free one).  [default: 18080 for the default "
    "prefix, one derived from the prefix otherwise]",
)
@click.option(
    "--baseline",
    is_flag=True,
    help="Also bring the gate peer up by hand (bench/handmade_gate_init.sh).",
)
def up(
    prefix: str,
    vni: int | None,
    device_subnet: str | None,
    endpoints: int | None,
    devices: int | None,
    peers: int | None,
    host_port: int | None,
    baseline: bool,
) -> None:
    """Build the lab, or repair it; running it again on a lab that is up changes nothing."""
    _require_root()
    from gatepeer.lab import control
    from gatepeer.lab.network.netns import LabError
    from gatepeer.lab.processes.gate_peer import baseline_gate_peer

    try:
        layout = control.resolve_layout(
            prefix,
            vni=vni,
            device_subnet=device_subnet,
            endpoints=endpoints,
            devices=devices,
            peers=peers,
        )
    except LabError as exc:
        _fail("up", exc, code=2)
    try:
        info = control.up(
            layout,
            host_port=host_port,
            gate_peer=baseline_gate_peer if baseline else None,
        )
    except LabError as exc:
        _fail("up", exc)
    _print_summary(info)


@lab.command()
@prefix_option
def down(prefix: str) -> None:
    """Remove the lab: emulator, every PREFIX-* namespace, its folder. Works on half-built or
    crashed labs; exits 0 when there is nothing to remove."""
    _require_root()
    from gatepeer.lab import control
    from gatepeer.lab.network.netns import LabError

    try:
        report = control.down(prefix)
    except LabError as exc:
        _fail("down", exc)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if report.removed:
        click.echo(f"lab {prefix}: removed " + ", ".join(report.removed))
    else:
        click.echo(f"lab {prefix}: nothing to remove")


@lab.group("ha")
def ha_group() -> None:
    """The HA pair of a `lab up --peers 2` lab: gatepeer, conntrackd and keepalived in both
    peers."""


@ha_group.command("start")
@prefix_option
def ha_start(prefix: str) -> None:
    """Start `gatepeer run`, conntrackd (config from `gatepeer ha render --conntrackd`), then
    keepalived (config from `gatepeer ha render`), in each gate peer namespace; pids recorded in
    the lab's folder (`lab ha stop` and `lab down` use them)."""
    _require_root()
    from gatepeer.lab.network.netns import LabError
    from gatepeer.lab.processes import ha_pair
    from gatepeer.lab.record import LabRecord, Paths

    paths = Paths.for_prefix(prefix)
    try:
        record = LabRecord.load(paths.lab_json)
        if record is None:
            raise LabError(f"lab {prefix} is not up: run `lab up --peers 2`")
        started = ha_pair.start_pair(record.layout, paths)
    except LabError as exc:
        _fail("ha start", exc)
    for ns, pids in started.items():
        click.echo(f"{ns}: " + ", ".join(f"{name} pid {pid}" for name, pid in pids.items()))


@ha_group.command("stop")
@prefix_option
def ha_stop(prefix: str) -> None:
    """Stop keepalived, gatepeer, then conntrackd, in each gate peer namespace (by the recorded
    pids)."""
    _require_root()
    from gatepeer.lab.network.layout import MAX_PEERS
    from gatepeer.lab.processes import ha_pair
    from gatepeer.lab.record import Paths

    stopped = ha_pair.stop_pair(Paths.for_prefix(prefix), MAX_PEERS)
    click.echo(f"lab {prefix}: stopped " + (", ".join(stopped) or "nothing"))


@lab.command()
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(prefix: str, as_json: bool) -> None:
    """What exists, whether the emulator runs, the registered gate peers. Exit 0 when the lab
    is complete and its emulator runs, 1 otherwise."""
    _require_root()
    from gatepeer.lab import control
    from gatepeer.lab.network.netns import LabError

    try:
        st = control.status(prefix)
    except LabError as exc:
        _fail("status", exc)
    healthy = st.layout is not None and not st.missing and st.emulator_pid is not None
    if as_json:
        click.echo(json.dumps({**st.to_dict(), "healthy": healthy}, indent=2))
    else:
        _print_status(st)
    sys.exit(0 if healthy else 1)


@lab.command()
@prefix_option
@click.argument("gateway", required=False, metavar="GATEWAY")
@click.option("--off", is_flag=True, help="Unset the redirection instead.")
def redirect(prefix: str, gateway: str | None, off: bool) -> None:
    """Set the emulated VPG's Junction redirection through the lab's API, as
    setRedirectionConfiguration does: the devices' traffic that leaves the device subnet goes
    over the tunnel to GATEWAY (an IPv4 address, or `peer` for the lab gate peer's inner
    address). With --off (unsetRedirectionConfiguration) it takes the VPG's own way out,
    source-NATed to the VPG's address, and never reaches a gate peer."""
    import ipaddress

    if off == (gateway is not None):
        click.echo("gatepeer lab redirect: give either GATEWAY or --off", err=True)
        sys.exit(2)
    if gateway not in (None, "peer"):
        try:
            ipaddress.IPv4Address(gateway)
        except ValueError:
            click.echo(
                f"gatepeer lab redirect: GATEWAY {gateway!r} is not an IPv4 address (or `peer`)",
                err=True,
            )
            sys.exit(2)
    _require_root()
    from gatepeer.lab import control
    from gatepeer.lab.network.netns import LabError

    try:
        vpg = control.redirect(prefix, gateway)
    except LabError as exc:
        _fail("redirect", exc)
    _print_redirection(prefix, vpg.get("redirection"))


def _print_redirection(prefix: str, redirection: dict[str, Any] | None) -> None:
    if redirection and redirection.get("enabled"):
        click.echo(
            f"lab {prefix}: Junction redirection on: the devices' traffic leaving the device "
            f"subnet goes to {redirection.get('gateway')} over the tunnel"
        )
    else:
        click.echo(
            f"lab {prefix}: Junction redirection off: the devices' traffic leaving the device "
            "subnet takes the VPG's own way out, source-NATed to the VPG's address"
        )


@lab.command()
@prefix_option
@click.option(
    "--teardown/--keep",
    default=False,
    show_default=True,
    help="Remove the lab afterwards, or leave it up to look around.",
)
def demo(prefix: str, teardown: bool) -> None:
    """Bring the lab up and the gate peer with the real agent (one `gatepeer apply` in the
    peer namespace), then send traffic from the VPC host to the devices through the tunnel:
    ping and a 2-second TCP transfer. Exit 1 if any fails. (`lab up --baseline` brings the
    hand-made gate peer up instead.)"""
    _require_root()
    from gatepeer.lab import control
    from gatepeer.lab.network.netns import LabError
    from gatepeer.lab.processes.traffic import demo_traffic

    failed = True
    try:
        layout = control.resolve_layout(prefix)
        click.echo(
            f"Bringing lab {prefix} up, and its gate peer with the agent: one `gatepeer apply` "
            "in the peer namespace ..."
        )
        info = control.up(layout, gate_peer=demo_gate_peer())
        _print_summary(info)
        if info.gate_peer and info.gate_peer.get("output"):
            click.echo("")
            click.echo(f"$ {info.gate_peer['command']}")
            for line in _apply_outline(info.gate_peer["output"]):
                click.echo(f"  {line}")
            click.echo(
                "  (one-shot: nothing repairs drift or follows the API from here on; "
                f"`gatepeer run` in {layout.peer_ns} would)"
            )
        click.echo("")
        click.echo(
            "Junction redirection: without it the VPG sends the devices' replies and their own "
            'traffic its own way, never through the gate peer. The agent\'s `redirection = "self"` '
            "pointed it at the peer; the VPG now says:"
        )
        click.echo("  ", nl=False)
        _print_redirection(prefix, control.status(prefix).redirection)
        click.echo("")
        click.echo("Traffic from the VPC host to the devices, through the gate peer:")
        steps = demo_traffic(info)
        for step in steps:
            mark = "ok    " if step.ok else "FAILED"
            click.echo(f"  {mark} {step.name}")
            click.echo(f"         {step.detail}")
        failed = not all(step.ok for step in steps)
        click.echo("")
        click.echo("demo: " + ("FAILED" if failed else "everything works"))
    except LabError as exc:
        click.echo(f"gatepeer lab demo: {exc}", err=True)
    finally:
        if teardown:
            control.down(prefix)
            click.echo(f"lab {prefix} removed")
        else:
            click.echo(f"The lab stays up; remove it with: gatepeer lab down --prefix {prefix}")
    sys.exit(1 if failed else 0)


def _apply_outline(lines: list[str]) -> list[str]:
    """`gatepeer apply`'s output without here-document bodies (the nftables ruleset)."""
    out: list[str] = []
    body: list[str] | None = None
    for line in lines:
        if body is not None:
            if line.strip() == "EOF":
                out.append(f"  ... {len(body)} lines of ruleset (nft list table inet gatepeer)")
                body = None
            else:
                body.append(line)
        elif line.rstrip().endswith("<<'EOF'"):
            out.append(line)
            body = []
        else:
            out.append(line)
    return out


def demo_gate_peer() -> Any:
    """The gate-peer bring-up step of the demo: the real agent, one `gatepeer apply`."""
    from gatepeer.lab.processes.gate_peer import agent_gate_peer

    return agent_gate_peer


def _print_summary(info: LabInfo) -> None:
    from gatepeer.lab.network.layout import (
        API_ADDR,
        FABRIC_SORACOM_ADDR,
        FABRIC_VPC_ADDR,
        INTERNET_ADDR,
        PAIR_SNAT_ADDR,
        PEER_ADDR,
        VPC_HOST_ADDR,
    )

    layout, paths = info.layout, info.paths
    plen = layout.device_subnet.prefixlen
    devices = layout.devices
    echo = click.echo
    echo(f"lab {layout.prefix} is up ({'; '.join(info.notes)})")
    echo("  namespaces:")
    echo(
        f"    {layout.fabric_ns:<14} VPC router: {FABRIC_VPC_ADDR}/24 (VPC subnet), "
        f"{FABRIC_SORACOM_ADDR}/24 (toward the VPG), API {API_ADDR}, "
        f"internet host {INTERNET_ADDR}"
    )
    echo(f"    {layout.peer_ns:<14} gate peer: eth0 {PEER_ADDR}/24, default via {FABRIC_VPC_ADDR}")
    for second in layout.gate_peers[1:]:
        echo(
            f"    {second.ns:<14} gate peer {second.index} (HA pair): eth0 {second.address}/24, "
            f"default via {FABRIC_VPC_ADDR}"
        )
    echo(
        f"    {layout.vpc_ns:<14} VPC host: eth0 {VPC_HOST_ADDR}/24, "
        f"{layout.device_subnet} via {PEER_ADDR}"
    )
    for ep in layout.endpoints:
        echo(
            f"    {ep.ns:<14} VPG endpoint {ep.index}: outer {ep.outer}, vxlan0 {ep.inner}/{plen} "
            f"VNI {layout.vni}, devices link {ep.link_addr}/30, NAT address {ep.nat_addr}"
        )
    echo(
        f"    {layout.dev_ns:<14} devices: {devices[0]}"
        + (f" - {devices[-1]}" if len(devices) > 1 else "")
        + f" (in {layout.device_half})"
    )
    echo(f"  emulator (pid {info.emulator_pid}):")
    echo(f"    inside the lab: {info.lab_url}/v1")
    echo(f"    from this host: {info.host_url}/v1  (control: {info.host_url}/_emulator/state)")
    echo(f"    log: {paths.emulator_log}")
    echo(
        f"  credentials: operator {info.credentials.operator_id}, VPG {info.credentials.vpg_id},"
        f" auth key id {info.credentials.auth_key_id}, secret in {paths.auth_key}"
    )
    echo(f"  agent config: {paths.config}")
    if layout.peer_count > 1:
        configs = ", ".join(str(paths.peer_config(p.index)) for p in layout.gate_peers)
        echo(
            f"  HA pair: configs {configs} ([ha], nat mode, NAT address {PAIR_SNAT_ADDR}, "
            f"conntrackd sync); start gatepeer, conntrackd and keepalived in both with "
            f"`gatepeer lab ha start --prefix {layout.prefix}`"
        )
    if info.gate_peer:
        gp = info.gate_peer
        echo(
            f"  gate peer ({gp['method']}): inner {gp['inner']}, VNI {gp['vni']}, "
            f"endpoints {', '.join(gp['endpoints'])}"
        )
        if gp.get("redirection"):
            echo(f"  Junction redirection (set through the API): gateway {gp['redirection']}")
    echo("  run commands in the gate peer:")
    echo(f"    ip netns exec {layout.peer_ns} ip -d link show vxlan0")
    echo(f"    ip netns exec {layout.peer_ns} env GATEPEER_CONFIG={paths.config} gatepeer ...")
    echo(f"    ip netns exec {layout.vpc_ns} ping {devices[0]}")


def _print_status(st: Status) -> None:
    echo = click.echo
    if not st.exists:
        echo(f"lab {st.prefix}: not present")
        return
    echo(f"lab {st.prefix}:")
    echo(f"  namespaces: {' '.join(st.namespaces) or '(none)'}")
    if st.missing:
        echo(f"  missing:    {' '.join(st.missing)}  (gatepeer lab up --prefix {st.prefix})")
    if st.layout is None:
        echo("  no lab record: a crashed or foreign lab; remove it with `gatepeer lab down`")
    else:
        lay = st.layout
        echo(
            f"  layout:     VNI {lay.vni}, device subnet {lay.device_subnet}, "
            f"{lay.endpoint_count} VPG endpoints, {lay.device_count} devices"
        )
    if st.emulator_pid is None:
        echo("  emulator:   not running")
    else:
        echo(f"  emulator:   running, pid {st.emulator_pid}, {st.host_url}")
    if st.peers is not None:
        customers = [p for p in st.peers if p.get("ownedByCustomer")]
        echo(f"  gate peers: {len(customers)} registered")
        for p in st.peers:
            who = "customer" if p.get("ownedByCustomer") else "VPG endpoint"
            echo(f"    {p.get('outerIpAddress'):<15} inner {p.get('innerIpAddress'):<15} {who}")
    elif st.peer_error:
        echo(f"  gate peers: unknown ({st.peer_error})")
    for ns, dsts in st.endpoint_fdb.items():
        echo(f"  {ns} vxlan0 floods to: {' '.join(dsts) or '(nobody)'}")
    if st.redirection is not None and st.redirection.get("enabled"):
        echo(f"  redirection: on, gateway {st.redirection.get('gateway')}")
    elif st.emulator_pid is not None:
        echo("  redirection: off (the devices' outbound traffic takes the VPG's NATed way out)")
    for ns, gw in st.endpoint_gateway.items():
        echo(f"  {ns} sends device traffic out of the subnet to: {gw or 'its NAT way out'}")
    echo(f"  gate peer vxlan0: {'present' if st.gate_peer_vxlan else 'absent'}")
