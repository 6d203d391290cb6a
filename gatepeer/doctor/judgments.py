"""The doctor's judgments: each a pure function from what was read to one `Check`.

`gatepeer.doctor.runner` reads the config, the API and the kernel, `gatepeer.doctor.aws` reads
EC2, and both ask these in turn; the unit tests call them directly. A detail is one line that
says what to change. Nothing here does I/O: the readings' types are imported for annotations
only, so this module pulls in no kernel or AWS code.
"""

from __future__ import annotations

import email.utils
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import TYPE_CHECKING, Literal, NamedTuple

from gatepeer import redirection
from gatepeer.config import VXLAN_OVERHEAD, Config
from gatepeer.desired_state import GateView
from gatepeer.ruleset import FAMILY, TABLE, loaded_endpoints

if TYPE_CHECKING:
    from gatepeer.aws.ec2 import IngressRule, VpcRoute
    from gatepeer.aws.imds import InstanceFacts
    from gatepeer.aws.permissions import Verdict
    from gatepeer.kernel.pmtu import PathProbe
    from gatepeer.kernel.rtnl import LinkReading

Status = Literal["ok", "warn", "fail", "skip"]

# Clock skew: Date has one-second resolution; AWS refuses requests signed more than 5 min off.
CLOCK_WARN_S, CLOCK_FAIL_S = 5.0, 300.0
# Share of a table's hard limit in use that deserves a look, and that is about to drop.
TABLE_WARN, TABLE_FAIL = 0.75, 0.95


class Check(NamedTuple):
    status: Status
    name: str
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"status": self.status, "name": self.name, "detail": self.detail}


def judge_gate(vpg_id: str, opened: bool, open_gate: bool) -> Check:
    if opened:
        return Check("ok", "gate", f"Gate is open on VPG {vpg_id}")
    if open_gate:
        return Check(
            "warn",
            "gate",
            f"Gate is closed on VPG {vpg_id}; soracom.open_gate = true, so the next gatepeer "
            "apply (or the daemon's refresh) opens it",
        )
    return Check(
        "fail",
        "gate",
        f"Gate is closed on VPG {vpg_id}: open it (console or soracom-cli), or set "
        "soracom.open_gate = true to let gatepeer open it",
    )


def judge_registration(
    vpg_id: str,
    outer: IPv4Address,
    registered_inner: IPv4Address | None,
    asked_inner: IPv4Address | None,
    on_link: Sequence[IPv4Interface] | None,
    *,
    preflight: bool,
) -> Check:
    """`on_link`: the tunnel's addresses, None when the tunnel does not exist."""
    if registered_inner is None:
        if preflight:
            return Check(
                "warn",
                "registration",
                f"{outer} is not registered with VPG {vpg_id} yet: gatepeer apply registers it",
            )
        return Check(
            "fail",
            "registration",
            f"{outer} is not registered as a gate peer of VPG {vpg_id}: gatepeer apply (or the "
            "daemon's next refresh) registers it; is tunnel.local_address this host's VPC "
            "address?",
        )
    if asked_inner is not None and asked_inner != registered_inner:
        return Check(
            "fail",
            "registration",
            f"{outer} is registered with inner address {registered_inner}, tunnel.inner_address "
            f'is {asked_inner}: set inner_address = "{registered_inner}", or gatepeer down '
            "--unregister and apply again",
        )
    if on_link is not None and registered_inner not in {a.ip for a in on_link}:
        have = ", ".join(str(a) for a in on_link) or "none"
        return Check(
            "fail",
            "registration",
            f"{outer} is registered with inner address {registered_inner}, but the tunnel has "
            f"{have}: gatepeer apply puts the registered one there",
        )
    return Check(
        "ok",
        "registration",
        f"{outer} is registered with VPG {vpg_id}, inner address {registered_inner}"
        + (" (on the tunnel)" if on_link is not None else ""),
    )


def judge_redirection(config: Config, gate: GateView) -> Check:
    mode, setting = config.packet_path.mode, config.soracom.redirection
    current = redirection.describe(gate.redirection)
    here = redirection.own_gateway(gate)
    if redirection.points_here(gate):
        return Check("ok", "redirection", f"the VPG's redirection gateway is this peer ({here})")
    ha_vip = config.ha.virtual_address if config.ha else None
    r = gate.redirection
    if ha_vip is not None and r is not None and r.enabled and r.gateway == ha_vip:
        return Check("ok", "redirection", f"the VPG's redirection gateway is [ha]'s {ha_vip}")
    needs = (
        'soracom.redirection is "self"'
        if setting == "self"
        else "packet_path.mode is nat"
        if mode == "nat"
        else None
    )
    if needs is None:
        return Check(
            "warn",
            "redirection",
            f"the VPG's redirection gateway is {current}, not this peer ({here}): devices' "
            "replies to connections VPC hosts open go the VPG's own way; set "
            'soracom.redirection = "self" if VPC hosts connect to devices',
        )
    status: Status = "warn" if config.ha is not None else "fail"
    fix = (
        "gatepeer apply sets it"
        if setting == "self"
        else 'set soracom.redirection = "self", or point it at this peer'
    )
    ha = "; with [ha] only the master holds it" if config.ha is not None else ""
    return Check(
        status,
        "redirection",
        f"{needs}, but the VPG's redirection gateway is {current}, not this peer ({here}): "
        f"devices' traffic does not come here; {fix}{ha}",
    )


def judge_underlay_mtu(underlay: str, underlay_mtu: int, tunnel_mtu: int | str) -> Check:
    if tunnel_mtu == "auto":
        mtu = underlay_mtu - VXLAN_OVERHEAD
        if mtu < 1500:
            return Check(
                "warn",
                "underlay-mtu",
                f'tunnel.mtu "auto" gives {mtu} on {underlay} (MTU {underlay_mtu}): devices\' '
                f"1500-byte packets will not fit; raise {underlay}'s MTU to 1550 or more",
            )
        return Check("ok", "underlay-mtu", f"{underlay} MTU {underlay_mtu}: tunnel MTU {mtu}")
    assert isinstance(tunnel_mtu, int)
    want = tunnel_mtu + VXLAN_OVERHEAD
    if underlay_mtu < want:
        return Check(
            "fail",
            "underlay-mtu",
            f"{underlay} has MTU {underlay_mtu}, tunnel.mtu {tunnel_mtu} needs {want} "
            f"({VXLAN_OVERHEAD} bytes of VXLAN): raise {underlay}'s MTU, or set tunnel.mtu to "
            f"at most {underlay_mtu - VXLAN_OVERHEAD}",
        )
    return Check(
        "ok", "underlay-mtu", f"{underlay} MTU {underlay_mtu} >= tunnel MTU {tunnel_mtu} + 50"
    )


def judge_path_mtu(probe: PathProbe, tunnel_mtu: int) -> Check:
    t, size = probe.target, probe.size
    if probe.error is not None:
        return Check("warn", "path-mtu", f"{t}: the probe could not be sent: {probe.error}")
    if probe.answered:
        return Check(
            "ok", "path-mtu", f"{t} answered {size} bytes with DF set (tunnel MTU {tunnel_mtu})"
        )
    if probe.local_mtu is not None:
        return Check(
            "fail",
            "path-mtu",
            f"{t}: this host's route allows {probe.local_mtu} bytes, a full tunnel packet is "
            f"{size}: set tunnel.mtu to at most {probe.local_mtu - VXLAN_OVERHEAD}, or raise "
            "the underlay's MTU",
        )
    if probe.reported_mtu is not None:
        return Check(
            "fail",
            "path-mtu",
            f"{t}: a router on the way allows only {probe.reported_mtu} bytes (ICMP "
            f"fragmentation needed), a full tunnel packet is {size}: set tunnel.mtu to at most "
            f"{probe.reported_mtu - VXLAN_OVERHEAD}",
        )
    if probe.small_answered:
        return Check(
            "fail",
            "path-mtu",
            f"{t} answers small pings but not {size} bytes with DF set: the path drops large "
            f"packets without saying so; lower tunnel.mtu until it passes",
        )
    return Check(
        "warn",
        "path-mtu",
        f"{t} answered no ICMP echo (neither {size} bytes nor small): the path MTU is not "
        "known; allow ICMP echo from this host to verify it",
    )


def judge_ip_forward(value: int | None, *, preflight: bool) -> Check:
    if value == 1:
        return Check("ok", "ip-forward", "net.ipv4.ip_forward = 1")
    if value is None:
        return Check("fail", "ip-forward", "net.ipv4.ip_forward cannot be read here")
    if preflight:
        return Check("skip", "ip-forward", "net.ipv4.ip_forward = 0 now; gatepeer apply sets it")
    return Check(
        "fail",
        "ip-forward",
        "net.ipv4.ip_forward = 0: this peer forwards nothing; gatepeer apply sets it to 1 "
        "(something else turned it off: check sysctl.d and other agents)",
    )


@dataclass(frozen=True)
class TunnelExpectation:
    """What the tunnel should look like, from the config, the host and the API."""

    interface: str
    vni: int | None
    local: IPv4Address | None
    dst_port: int
    underlay_index: int | None
    mtu: int | None


def judge_tunnel(link: LinkReading | None, want: TunnelExpectation, *, preflight: bool) -> Check:
    name = want.interface
    if link is None:
        if preflight:
            return Check("skip", "tunnel", f"{name} does not exist yet: gatepeer apply creates it")
        return Check(
            "fail",
            "tunnel",
            f"{name} does not exist: gatepeer apply creates it (is the daemon running?)",
        )
    if link.kind != "vxlan":
        return Check(
            "fail",
            "tunnel",
            f"{name} is a {link.kind or 'plain'} link, not vxlan: gatepeer never deletes it; "
            "remove it or set tunnel.interface",
        )
    wrong = []
    if want.vni is not None and link.vni != want.vni:
        wrong.append(f"VNI {link.vni} (the VPG's: {want.vni})")
    if want.local is not None and link.local != want.local:
        wrong.append(f"local {link.local} (want {want.local})")
    if link.dst_port != want.dst_port:
        wrong.append(f"dstport {link.dst_port} (tunnel.destination_port: {want.dst_port})")
    if want.underlay_index is not None and link.underlay_index != want.underlay_index:
        wrong.append("another underlay device")
    if wrong:
        return Check(
            "fail", "tunnel", f"{name} has {'; '.join(wrong)}: gatepeer apply re-creates it"
        )
    if not link.oper_up:
        state = "admin down" if not link.admin_up else f"operationally {link.oper_state}"
        return Check("fail", "tunnel", f"{name} is {state}: ip link set {name} up, or apply")
    if want.mtu is not None and link.mtu != want.mtu:
        return Check(
            "warn", "tunnel", f"{name} has MTU {link.mtu}, want {want.mtu}: gatepeer apply sets it"
        )
    return Check("ok", "tunnel", f"{name} up: VNI {link.vni}, local {link.local}, MTU {link.mtu}")


def judge_fdb(
    interface: str,
    flood: frozenset[IPv4Address] | None,
    endpoints: Sequence[IPv4Address],
    *,
    preflight: bool,
) -> Check:
    if flood is None:
        status: Status = "skip" if preflight else "fail"
        return Check(status, "fdb", f"no {interface}, so no flood entries")
    if not endpoints:
        return Check("skip", "fdb", "no VPG endpoint is known (the API was not reached)")
    missing = [str(e) for e in endpoints if e not in flood]
    stale = sorted(str(d) for d in flood - set(endpoints))
    if missing:
        return Check(
            "fail",
            "fdb",
            f"{interface} has no flood entry for VPG endpoint {', '.join(missing)}: traffic "
            "to devices behind it is lost; gatepeer apply adds it",
        )
    if stale:
        return Check(
            "warn",
            "fdb",
            f"{interface} floods also to {', '.join(stale)}, not a VPG endpoint now: gatepeer "
            "apply removes it",
        )
    return Check("ok", "fdb", f"one flood entry per VPG endpoint ({len(endpoints)})")


def judge_nftables(
    listing: str | None, endpoints: Sequence[IPv4Address], *, preflight: bool
) -> Check:
    if listing is None:
        if preflight:
            return Check("skip", "nftables", f"table {FAMILY} {TABLE} not loaded yet")
        return Check(
            "fail",
            "nftables",
            f"table {FAMILY} {TABLE} is not loaded: no VXLAN filter, MSS clamp or NAT; "
            "gatepeer apply loads it",
        )
    admitted = loaded_endpoints(listing)
    shut = [str(e) for e in endpoints if e not in admitted]
    if shut:
        return Check(
            "fail",
            "nftables",
            f"table {FAMILY} {TABLE} drops VXLAN from VPG endpoint {', '.join(shut)}: gatepeer "
            "apply updates its vpg_endpoints set",
        )
    return Check("ok", "nftables", f"table {FAMILY} {TABLE} loaded, admits every VPG endpoint")


def _table_use(name: str, used: float, detail: str, full: str, undersized: str | None) -> Check:
    """A kernel table's headroom: `full` is what to do when it is nearly full, `undersized`
    (None: it is not) when its limit is below what gatepeer sizes for this config."""
    if used >= TABLE_FAIL:
        return Check("fail", name, f"{detail}: {full}")
    if used >= TABLE_WARN:
        return Check("warn", name, f"{detail}: little headroom left")
    if undersized is not None:
        return Check("warn", name, f"{detail}; {undersized}")
    return Check("ok", name, detail)


def judge_conntrack(
    count: int | None, limit: int | None, wanted: int, *, limit_writable: bool
) -> Check:
    if count is None or limit is None:
        return Check("skip", "conntrack", "no conntrack table here (nothing tracked yet)")
    fix = (
        "gatepeer apply raises it"
        if limit_writable
        else "only the initial network namespace can raise it: set it on the host"
    )
    return _table_use(
        "conntrack",
        count / limit if limit else 1.0,
        f"{count} of {limit} entries ({count / max(limit, 1):.0%})",
        "new flows are about to be dropped; raise net.netfilter.nf_conntrack_max "
        "(kernel.neighbour_table_devices, packet_path.flows_per_device)",
        f"the limit is below the {wanted} sized for this config: {fix}" if limit < wanted else None,
    )


def judge_neighbours(count: int, gc_thresh3: int | None, wanted: int) -> Check:
    if gc_thresh3 is None:
        return Check(
            "skip",
            "neighbours",
            f"{count} on the tunnel; gc_thresh3 exists only in the initial network namespace",
        )
    used = count / gc_thresh3 if gc_thresh3 else 1.0
    return _table_use(
        "neighbours",
        used,
        f"{count} neighbour entries on the tunnel, gc_thresh3 {gc_thresh3} ({used:.0%})",
        '"neighbor table overflow" and drops are near; raise kernel.neighbour_table_devices',
        f"below the {wanted} sized for kernel.neighbour_table_devices: gatepeer apply raises it"
        if gc_thresh3 < wanted
        else None,
    )


def judge_clock(date_header: str | None, local_time: float) -> Check:
    if not date_header:
        return Check("skip", "clock", "the API's answer had no Date header")
    try:
        server = email.utils.parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError):
        return Check("skip", "clock", "the API's Date header is not a date")
    # Date is truncated to the second: the server's clock was somewhere in [server, server+1).
    skew = local_time - (server + 0.5)
    side = "ahead of" if skew > 0 else "behind"
    detail = f"this host's clock is {abs(skew):.1f} s {side} the API's"
    if abs(skew) > CLOCK_FAIL_S:
        return Check(
            "fail",
            "clock",
            f"{detail}: AWS refuses signed requests more than 5 min off; run NTP (chrony, "
            "Amazon Time Sync Service 169.254.169.123)",
        )
    if abs(skew) > CLOCK_WARN_S:
        return Check("warn", "clock", f"{detail}: run NTP (chrony)")
    return Check("ok", "clock", f"{detail} (within {CLOCK_WARN_S:g} s)")


# ---- EC2 (read by gatepeer.doctor.aws) -----------------------------------------------------------

SOURCE_DEST = "aws-source-dest-check"
SECURITY_GROUP = "aws-security-group"
ROUTE = "aws-route"
RETURN_PATH = "aws-return-path"
IAM = "aws-iam"
NAMES = (SOURCE_DEST, SECURITY_GROUP, ROUTE, RETURN_PATH, IAM)


def judge_source_dest_check(enabled: bool, eni_id: str) -> Check:
    if enabled:
        return Check(
            "fail",
            SOURCE_DEST,
            f"the source/destination check is on for {eni_id}: EC2 drops every packet this "
            "peer forwards; turn it off (aws ec2 modify-network-interface-attribute "
            f"--network-interface-id {eni_id} --no-source-dest-check, or set "
            "aws.disable_source_dest_check = true)",
        )
    return Check("ok", SOURCE_DEST, f"off for {eni_id}: EC2 passes the traffic this peer forwards")


def judge_security_groups(
    groups: Sequence[str],
    rules: Sequence[IngressRule],
    endpoints: Sequence[IPv4Address],
    port: int,
    *,
    forwarded_from: Sequence[IPv4Network] = (),
) -> Check:
    """UDP `port` from every VPG endpoint; in route mode also `forwarded_from` (the VPC's
    CIDRs): EC2 applies the ENI's inbound rules to the packets VPC hosts send to devices
    through this peer, so without a rule for them cloud-to-device connections never arrive."""
    if not endpoints:
        return Check("skip", SECURITY_GROUP, "no VPG endpoint is known (the API was not reached)")
    named = ", ".join(groups) or "none"
    shut = [e for e in endpoints if not any(r.admits_udp(port, e) for r in rules)]
    unjudged = sorted({s for r in rules for s in r.other_sources})
    if shut:
        addresses = ", ".join(str(e) for e in shut)
        if unjudged:
            return Check(
                "warn",
                SECURITY_GROUP,
                f"no CIDR rule of {', '.join(groups) or 'the ENI'} admits UDP {port} from "
                f"{addresses}; rules naming {', '.join(unjudged)} were not judged: make sure one "
                f"of them holds those addresses, or add inbound UDP {port} from each /32",
            )
        return Check(
            "fail",
            SECURITY_GROUP,
            f"no security group on the ENI ({named}) admits UDP {port} from VPG endpoint "
            f"{addresses}: the VPG's VXLAN is dropped; add an inbound rule for UDP {port} from "
            "each endpoint's /32",
        )
    vxlan_ok = (
        f"{', '.join(groups)} admit UDP {port} from every VPG endpoint "
        f"({', '.join(map(str, endpoints))})"
    )
    closed = [n for n in forwarded_from if not any(_admits_everything(r, n) for r in rules)]
    if not closed:
        if forwarded_from:
            vxlan_ok += (
                f" and all traffic from {', '.join(map(str, forwarded_from))} "
                "(forwarded to the devices)"
            )
        return Check("ok", SECURITY_GROUP, vxlan_ok)
    nets = ", ".join(map(str, closed))
    partial = sorted({r.group_id for r in rules for n in closed if _admits_some(r, n)})
    if partial or unjudged:
        why = (
            f"{', '.join(partial)} admit only some protocols or ports from {nets}"
            if partial
            else f"rules naming {', '.join(unjudged)} were not judged"
        )
        return Check(
            "warn",
            SECURITY_GROUP,
            f"{why}: in route mode EC2 applies {named}'s inbound rules to what VPC hosts send "
            f"to devices through this peer; make sure it admits what they open, or add an "
            f"inbound rule for all traffic from {nets}",
        )
    return Check(
        "fail",
        SECURITY_GROUP,
        f"no security group on the ENI ({named}) admits traffic from {nets}: in route mode EC2 "
        "applies them to what VPC hosts send to devices through this peer, so cloud-to-device "
        f"connections are dropped; add an inbound rule for all traffic from {nets} to "
        f"{groups[0] if groups else 'the ENI'}",
    )


def _admits_everything(rule: IngressRule, net: IPv4Network) -> bool:
    return rule.protocol == "-1" and any(net.subnet_of(s) for s in rule.sources)


def _admits_some(rule: IngressRule, net: IPv4Network) -> bool:
    return any(net.overlaps(s) for s in rule.sources)


def judge_routes(
    mode: str,
    routes: Sequence[VpcRoute],
    facts: InstanceFacts,
    device_subnet: IPv4Network | None,
) -> Check:
    if mode != "route":
        return Check(
            "skip", ROUTE, f"packet_path.mode is {mode}: the VPC needs no route to the devices"
        )
    if device_subnet is None:
        return Check("skip", ROUTE, "the device subnet is not known (the API was not reached)")
    ours = [r for r in routes if r.points_to(facts.eni_id, facts.instance_id)]
    if not ours:
        elsewhere = [f"{r.table_id} sends {r.destination} to {r.target}" for r in routes]
        return Check(
            "fail",
            ROUTE,
            f"no route table of {facts.vpc_id} sends {device_subnet} to {facts.eni_id} or "
            f"{facts.instance_id}"
            + (f" ({'; '.join(elsewhere)})" if elsewhere else "")
            + f": add a route {device_subnet} -> {facts.eni_id} to the route table of each "
            "subnet whose hosts talk to the devices",
        )
    own_subnet = [r for r in ours if facts.subnet_id in r.subnets or r.main]
    names = ", ".join(r.table_id + (" (main)" if r.main else "") for r in ours)
    note = "" if own_subnet else f"; {facts.subnet_id}'s own table has no such route"
    return Check("ok", ROUTE, f"{names} send {device_subnet} to this peer{note}")


@dataclass(frozen=True)
class NatReturnPath:
    """A NAT gateway of the VPC, and what its subnet's route table does with the device subnet
    (`target` None: no route covers it)."""

    nat_gateway_id: str
    subnet_id: str
    table_id: str | None
    target: str | None


def return_path_needed(config: Config) -> str | None:
    """Why a return route for internet-bound device traffic matters here, or None: only route
    mode with redirection to this peer and `outside_vpc = "route"` sends devices' traffic out
    of the VPC with the devices' own addresses."""
    pp = config.packet_path
    if pp.mode != "route":
        return f"packet_path.mode is {pp.mode}: device traffic leaves with this peer's address"
    if config.soracom.redirection != "self":
        return (
            "soracom.redirection is not self: devices' internet traffic does not come through "
            "this peer"
        )
    if pp.outside_vpc != "route":
        return (
            f'packet_path.outside_vpc is "{pp.outside_vpc}": traffic leaving the VPC is '
            "masqueraded to this peer's address"
        )
    return None


def judge_return_path(
    config: Config,
    paths: Sequence[NatReturnPath],
    facts: InstanceFacts,
    device_subnet: IPv4Network | None,
) -> Check:
    """Route mode, redirection to this peer and `outside_vpc = "route"`: devices' traffic to
    the internet leaves with device addresses, so each NAT gateway's subnet must route the
    device subnet back to this peer or the replies are lost."""
    why_not = return_path_needed(config)
    if why_not is not None:
        return Check("skip", RETURN_PATH, why_not)
    if device_subnet is None:
        return Check(
            "skip", RETURN_PATH, "the device subnet is not known (the API was not reached)"
        )
    if not paths:
        return Check(
            "skip",
            RETURN_PATH,
            f"{facts.vpc_id} has no NAT gateway; traffic to an internet gateway with device "
            "addresses is not translated and gets no answer",
        )
    mine = (facts.eni_id, facts.instance_id)
    lacking = [p for p in paths if p.target not in mine]
    if not lacking:
        return Check(
            "ok",
            RETURN_PATH,
            f"the subnets of {', '.join(p.nat_gateway_id for p in paths)} route "
            f"{device_subnet} to this peer",
        )
    gaps = "; ".join(
        f"{p.nat_gateway_id} in {p.subnet_id} ({p.table_id or 'no route table'} "
        + (f"sends it to {p.target})" if p.target else "has no route for it)")
        for p in lacking
    )
    return Check(
        "warn",
        RETURN_PATH,
        f'route mode with redirection to this peer and packet_path.outside_vpc = "route": '
        f"devices' internet traffic leaves with {device_subnet} addresses, but {gaps}; add a "
        f'route {device_subnet} -> {facts.eni_id} there, or set outside_vpc = "masquerade"',
    )


def judge_permissions(verdict: Verdict) -> Check:
    if verdict.denied:
        missing = ", ".join(f"{p.action} (for {p.why})" for p in verdict.denied)
        return Check("warn", IAM, f"the instance role lacks {missing}: add them to its policy")
    detail = f"allowed: {', '.join(verdict.allowed) or 'nothing needed'}"
    if verdict.unverified:
        detail += "; not verified: " + ", ".join(f"{a} ({why})" for a, why in verdict.unverified)
    return Check("ok", IAM, detail)


# The SORACOM permissions (SAM policy "api" entries) the SIM map needs.
SIM_MAP_PERMISSIONS = (
    "Sim:listSims",
    "VirtualPrivateGateway:listVirtualPrivateGatewayIpAddressMapEntries",
)


def judge_sim_map(refused: dict[str, tuple[int, str]], *, enabled: bool) -> Check:
    """May the auth key read the SIM map? `refused`: operationId -> (HTTP status, error) of
    the calls that failed. Never a failure: the data path works without names."""
    if not enabled:
        return Check("skip", "sim-map", "devices.sim_refresh_seconds = 0: the SIM map is off")
    if not refused:
        return Check("ok", "sim-map", "the auth key may call listSims and the VPG's IP address map")
    denied = [op for op, (status, _) in refused.items() if status in (401, 403)]
    if denied:
        return Check(
            "warn",
            "sim-map",
            f"the auth key may not call {', '.join(denied)}: `gatepeer devices` shows no SIM "
            "names; give the key's SAM user (or role) the permissions "
            + ", ".join(SIM_MAP_PERMISSIONS),
        )
    op, (_, error) = next(iter(refused.items()))
    return Check("warn", "sim-map", f"cannot read the SIM map ({op}): {error}")


def judge_allowances(interface: str, allowances: Mapping[str, int]) -> Check:
    """The ENA allowance counters (`gatepeer.aws.ena`; empty off ENA). They count from the
    driver's start, so any above zero means the instance hit an EC2 limit since then."""
    if not allowances:
        return Check("skip", "ena-allowances", f"{interface} is not an ENA interface")
    exceeded = {n: v for n, v in allowances.items() if n.endswith("_exceeded") and v > 0}
    if not exceeded:
        return Check("ok", "ena-allowances", f"{interface}: no EC2 network allowance exceeded")
    counts = ", ".join(f"{n} {v}" for n, v in sorted(exceeded.items()))
    return Check(
        "warn",
        "ena-allowances",
        f"{interface}: EC2 shaped traffic since the driver started ({counts}): a larger "
        "instance type, or fewer connections or packets per second (docs/devices.md)",
    )
