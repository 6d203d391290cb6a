"""`gatepeer doctor`: every reason this host may not be a working gate peer, one line each.

Each check gives `ok`, `warn`, `fail` or `skip`, its name, and one line saying what to change.
The judgments are pure functions of what was read (`gatepeer.doctor.judgments`: the unit
tests call them); `Doctor` here does the reading and asks them in order, the EC2 part through
`gatepeer.doctor.aws`. Read-only throughout:
doctor never registers, opens Gate, sets redirection or touches the kernel, and never prints
the auth key, the API key or the token.

It runs before the first apply (pre-flight: no state file yet, so the tunnel, table and
registration not being there is expected and said as `skip`/`warn`) and on a running peer
(there they must be there: `fail`). Exit 0 when nothing failed, 1 when a check failed, 2 when
the configuration itself is bad.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from gatepeer import atomic_json, sims
from gatepeer.config import VXLAN_OVERHEAD, Config, ConfigError, check_against_system, load
from gatepeer.desired_state import GateView, conntrack_sysctls, neighbour_thresholds
from gatepeer.doctor.judgments import (
    Check,
    TunnelExpectation,
    judge_allowances,
    judge_clock,
    judge_conntrack,
    judge_fdb,
    judge_gate,
    judge_ip_forward,
    judge_neighbours,
    judge_nftables,
    judge_path_mtu,
    judge_redirection,
    judge_registration,
    judge_sim_map,
    judge_tunnel,
    judge_underlay_mtu,
)
from gatepeer.kernel import rtnl, sysctl

__all__ = ["Check", "Doctor", "Report", "diagnose", "render", "to_json"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2
# The doctor asks the API a few times, not for minutes: two tries, short pauses.
API_ATTEMPTS, API_TIMEOUT_S = 2, 5.0


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    bad_config: bool = False
    preflight: bool = False  # no state file: gatepeer has not set this peer up yet

    @property
    def exit_code(self) -> int:
        if self.bad_config:
            return EXIT_BAD_CONFIG
        return EXIT_FAILED if any(c.status == "fail" for c in self.checks) else EXIT_OK

    def counts(self) -> dict[str, int]:
        return {s: sum(c.status == s for c in self.checks) for s in ("ok", "warn", "fail", "skip")}


def render(report: Report) -> str:
    width = max((len(c.name) for c in report.checks), default=0)
    lines = [f"{c.status:<4}  {c.name:<{width}}  {c.detail}" for c in report.checks]
    counts = report.counts()
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    mode = "pre-flight (not set up yet)" if report.preflight else "running peer"
    lines.append(f"# doctor ({mode}): {summary}; exit {report.exit_code}")
    return "\n".join(lines)


def to_json(report: Report) -> dict[str, Any]:
    return {
        "exit_code": report.exit_code,
        "preflight": report.preflight,
        "counts": report.counts(),
        "checks": [c.to_json() for c in report.checks],
    }


# ---- the runner: reads, then asks the judgments ----------------------------------------------


def _guarded(name: str, fn: Callable[[], list[Check]]) -> list[Check]:
    """A check that crashes is a failed check saying why, never a crashed doctor."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported as the check's own failure
        return [Check("fail", name, f"the check itself failed: {type(exc).__name__}: {exc}")]


@dataclass
class Gathered:
    """What the API said, for the kernel checks (or the last saved view when it said nothing)."""

    vni: int | None = None
    device_subnet: IPv4Network | None = None
    endpoints: tuple[IPv4Address, ...] = ()


class Doctor:
    def __init__(
        self,
        config: Config,
        *,
        sys_root: Path | None = None,
        probe_timeout: float = 1.0,
        aws_client: Callable[[str], Any] | None = None,
    ) -> None:
        from gatepeer.aws.detect import SYS_ROOT
        from gatepeer.aws.integration import InstanceFactsSource

        self.config = config
        self.probe_timeout = probe_timeout
        self.aws_client = aws_client
        self.instance = InstanceFactsSource(config.aws, sys_root=sys_root or SYS_ROOT)
        state = atomic_json.read(config.agent.state_file)
        self.preflight = state is None
        self.saved_gate = _saved_gate(state, config.soracom.vpg_id)
        self.report = Report(preflight=self.preflight)
        self.ssm_read: bool | None = None
        self.gathered = Gathered()
        self.outer: IPv4Address | None = None
        self.underlay: tuple[str, int, int] | None = None  # name, index, MTU

    def add(self, *checks: Check) -> None:
        self.report.checks.extend(checks)

    def run(self) -> Report:
        self.add(*_guarded("secret", self.check_secret))
        self.add(*_guarded("underlay", self.check_host))
        self.add(*_guarded("api", self.check_api))
        if not self.gathered.endpoints and self.saved_gate is not None:
            g = self.saved_gate
            self.gathered = Gathered(g.vni, g.device_subnet, tuple(e.outer for e in g.endpoints))
        self.add(*_guarded("underlay-mtu", self.check_underlay_mtu))
        self.add(*_guarded("path-mtu", self.check_path_mtu))
        self.add(*_guarded("ip-forward", self.check_ip_forward))
        self.add(*_guarded("tunnel", self.check_tunnel))
        self.add(*_guarded("nftables", self.check_nftables))
        self.add(*_guarded("conntrack", self.check_conntrack))
        self.add(*_guarded("neighbours", self.check_neighbours))
        self.add(*_guarded("ena-allowances", self.check_allowances))
        self.add(*_guarded("aws", self.check_aws))
        return self.report

    # ---- config and secret --------------------------------------------------------------

    def check_secret(self) -> list[Check]:
        s = self.config.soracom
        try:
            check_against_system(self.config)  # the key file's mode, the underlay's name
        except ConfigError as exc:
            self.report.bad_config = True
            name = "secret" if str(exc).startswith("soracom.auth_key_file") else "config"
            return [Check("fail", name, str(exc))]
        if s.auth_key_ssm_parameter:
            from gatepeer.aws.integration import ssm_key_reader

            try:
                ssm_key_reader(self.config, self.instance)()
            except OSError as exc:
                self.ssm_read = False if "access denied" in str(exc) else None
                return [Check("fail", "secret", str(exc))]
            self.ssm_read = True
            return [
                Check(
                    "ok",
                    "secret",
                    f"SSM SecureString {s.auth_key_ssm_parameter} read and decrypted (not shown)",
                )
            ]
        try:
            empty = not s.read_auth_key()
        except OSError as exc:
            empty, why = True, f"{exc.strerror or exc}"
        else:
            why = "empty"
        if empty:
            self.report.bad_config = True
            return [Check("fail", "secret", f"soracom.auth_key_file: {s.auth_key_file}: {why}")]
        return [
            Check("ok", "secret", f"soracom.auth_key_file {s.auth_key_file}: mode 0600, readable")
        ]

    # ---- this host ----------------------------------------------------------------------

    def check_host(self) -> list[Check]:
        from gatepeer.kernel.netlink import KernelError, Netlink

        t = self.config.tunnel
        underlay, local = t.underlay_interface, t.local_address
        with Netlink() as nl:
            if (underlay is None or local is None) and self.config.aws.instance_facts:
                facts = self.instance.get()
                if facts is not None:
                    underlay = underlay or nl.interface_with_mac(facts.mac)
                    local = local or facts.private_ipv4
            try:
                host = nl.host_facts(underlay, local)
            except KernelError as exc:
                return [Check("fail", "underlay", str(exc))]
        self.outer = host.local_address
        self.underlay = (host.underlay, host.underlay_index, host.underlay_mtu)
        return [
            Check(
                "ok",
                "underlay",
                f"{host.underlay} (MTU {host.underlay_mtu}), local address {host.local_address}",
            )
        ]

    # ---- the SORACOM API ----------------------------------------------------------------

    def _client(self) -> Any:
        from gatepeer.aws.integration import key_reader
        from gatepeer.soracom import SoracomClient

        s = self.config.soracom
        return SoracomClient(
            s.endpoint,
            s.auth_key_id,
            key_reader(self.config, self.instance),
            timeout=min(s.request_timeout, API_TIMEOUT_S),
            attempts=API_ATTEMPTS,
            backoff_base=0.2,
            backoff_max=1.0,
        )

    def check_api(self) -> list[Check]:
        from gatepeer.registration import AnswerRefused, find_own_peer, read_vpg, vpg_endpoints
        from gatepeer.soracom import AuthenticationError, SoracomError

        after = ("vpg", "gate", "registration", "redirection", "clock")
        s = self.config.soracom
        if self.report.bad_config:
            return [Check("skip", n, "needs a readable auth key") for n in ("api", *after)]
        client = self._client()
        try:
            client.authenticate()
        except AuthenticationError as exc:
            source = s.auth_key_ssm_parameter or s.auth_key_file
            fix = (
                f"the key id is soracom.auth_key_id, the key is read from {source}"
                if exc.status == 401
                else "see the secret check"
            )
            return [Check("fail", "api", f"{exc}; {fix}"), *self._skipped(after, "api")]
        except SoracomError as exc:
            return [
                Check("fail", "api", f"{exc}; check soracom.endpoint and the way to it"),
                *self._skipped(after, "api"),
            ]
        out = [
            Check(
                "ok",
                "api",
                f"{client.endpoint}: authenticated with {s.auth_key_id} "
                f"(operator {client.operator_id})",
            )
        ]
        out.append(judge_clock(*(client.last_date or (None, 0.0))))
        try:
            vpg = read_vpg(client, s.vpg_id)
            peers = client.list_gate_peers(s.vpg_id)
            endpoints = vpg_endpoints(peers, vpg.device_subnet, self.outer or IPv4Address(0))
        except (SoracomError, AnswerRefused) as exc:
            out.append(Check("fail", "vpg", str(exc)))
            return out + self._skipped(("gate", "registration", "redirection"), "vpg")
        if not endpoints:
            out.append(
                Check("fail", "vpg", f"VPG {s.vpg_id}: the API lists no VPG tunnel endpoints")
            )
        else:
            out.append(
                Check(
                    "ok",
                    "vpg",
                    f"VPG {s.vpg_id}: VNI {vpg.vni}, devices {vpg.device_subnet}, endpoints "
                    + ", ".join(str(e.outer) for e in endpoints),
                )
            )
        out.append(judge_gate(s.vpg_id, vpg.gate_opened, s.open_gate))
        out.append(self._sim_map_check(client))
        self.gathered = Gathered(vpg.vni, vpg.device_subnet, tuple(e.outer for e in endpoints))
        if self.outer is None:
            return out + self._skipped(("registration", "redirection"), "underlay")
        own = find_own_peer(peers, self.outer)
        inner = _inner(own, vpg.device_subnet)
        link = rtnl.link(self.config.tunnel.interface)
        on_link = rtnl.addresses(link.index) if link is not None else None
        out.append(
            judge_registration(
                s.vpg_id,
                self.outer,
                inner.ip if inner else None,
                self.config.tunnel.inner_address,
                on_link,
                preflight=self.preflight,
            )
        )
        if inner is None:
            return out + self._skipped(("redirection",), "registration")
        gate = GateView(
            vpg_id=s.vpg_id,
            vni=vpg.vni,
            device_subnet=vpg.device_subnet,
            gate_opened=vpg.gate_opened,
            inner=inner,
            endpoints=endpoints,
            outer=self.outer,
            redirection=vpg.redirection,
        )
        out.append(judge_redirection(self.config, gate))
        return out

    def _sim_map_check(self, client: Any) -> Check:
        """One page of each SIM map call: enough to learn whether the key may call them."""
        from gatepeer.soracom import SoracomError

        enabled = sims.cache_path(self.config) is not None
        refused: dict[str, tuple[int, str]] = {}
        if enabled:
            calls = {
                "listSims": lambda: client.list_sims(page_size=1, first_page_only=True),
                "listVirtualPrivateGatewayIpAddressMapEntries": lambda: client.list_ip_address_map(
                    self.config.soracom.vpg_id, page_size=1, first_page_only=True
                ),
            }
            for operation, call in calls.items():
                try:
                    call()
                except SoracomError as exc:
                    refused[operation] = (exc.status, str(exc))
        return judge_sim_map(refused, enabled=enabled)

    @staticmethod
    def _skipped(names: Sequence[str], because: str) -> list[Check]:
        return [Check("skip", n, f"needs the {because} check to pass") for n in names]

    # ---- the kernel ---------------------------------------------------------------------

    def _tunnel_mtu(self) -> int | None:
        mtu = self.config.tunnel.mtu
        if mtu == "auto":
            return self.underlay[2] - VXLAN_OVERHEAD if self.underlay else None
        return mtu

    def check_underlay_mtu(self) -> list[Check]:
        if self.underlay is None:
            return [Check("skip", "underlay-mtu", "needs the underlay check to pass")]
        name, _, mtu = self.underlay
        return [judge_underlay_mtu(name, mtu, self.config.tunnel.mtu)]

    def check_path_mtu(self) -> list[Check]:
        from gatepeer.kernel.icmp import ProbeUnavailable
        from gatepeer.kernel.pmtu import probe_paths

        tunnel_mtu = self._tunnel_mtu()
        endpoints = self.gathered.endpoints
        if not endpoints or tunnel_mtu is None:
            return [Check("skip", "path-mtu", "no VPG endpoint is known (the API was not reached)")]
        try:
            probes = probe_paths(
                endpoints,
                tunnel_mtu + VXLAN_OVERHEAD,
                interface=self.underlay[0] if self.underlay else None,
                source=self.outer,
                timeout=self.probe_timeout,
            )
        except ProbeUnavailable as exc:
            return [Check("skip", "path-mtu", str(exc))]
        except OSError as exc:  # the local address is not on this host, say
            why = exc.strerror or str(exc)
            return [Check("warn", "path-mtu", f"cannot probe from {self.outer}: {why}")]
        return [judge_path_mtu(p, tunnel_mtu) for p in probes]

    def check_ip_forward(self) -> list[Check]:
        return [judge_ip_forward(sysctl.read("net/ipv4/ip_forward"), preflight=self.preflight)]

    def check_tunnel(self) -> list[Check]:
        t = self.config.tunnel
        link = rtnl.link(t.interface)
        want = TunnelExpectation(
            interface=t.interface,
            vni=self.gathered.vni,
            local=self.outer,
            dst_port=t.destination_port,
            underlay_index=self.underlay[1] if self.underlay else None,
            mtu=self._tunnel_mtu(),
        )
        flood = rtnl.flood_destinations(link.index) if link is not None else None
        return [
            judge_tunnel(link, want, preflight=self.preflight),
            judge_fdb(t.interface, flood, self.gathered.endpoints, preflight=self.preflight),
        ]

    def check_nftables(self) -> list[Check]:
        from gatepeer.kernel import nftables

        if not nftables.nft_available():
            missing = "the nft command is not installed (Debian: nftables)"
            return [Check("fail", "nftables", missing)]
        try:
            listing = nftables.current()
        except nftables.NftError as exc:  # not root, say: unknown, not absent
            return [Check("warn", "nftables", f"cannot list the table: {exc}")]
        return [judge_nftables(listing, self.gathered.endpoints, preflight=self.preflight)]

    def check_conntrack(self) -> list[Check]:
        pp, devices = self.config.packet_path, self.config.kernel.neighbour_table_devices
        wanted = dict(conntrack_sysctls(devices, pp.flows_per_device))
        return [
            judge_conntrack(
                sysctl.read("net/netfilter/nf_conntrack_count"),
                sysctl.read("net/netfilter/nf_conntrack_max"),
                wanted["net/netfilter/nf_conntrack_max"],
                limit_writable=sysctl.read_writable("net/netfilter/nf_conntrack_max") is not None,
            )
        ]

    def check_neighbours(self) -> list[Check]:
        link = rtnl.link(self.config.tunnel.interface)
        count = rtnl.neighbour_count(link.index) if link is not None else 0
        wanted = neighbour_thresholds(self.config.kernel.neighbour_table_devices)[2]
        gc3 = sysctl.read("net/ipv4/neigh/default/gc_thresh3")
        return [judge_neighbours(count, gc3, wanted)]

    def check_allowances(self) -> list[Check]:
        from gatepeer.aws import ena

        if self.underlay is None:
            return [Check("skip", "ena-allowances", "needs the underlay check to pass")]
        return [judge_allowances(self.underlay[0], ena.read(self.underlay[0]))]

    # ---- EC2 ----------------------------------------------------------------------------

    def check_aws(self) -> list[Check]:
        from gatepeer.doctor import aws

        return aws.run(
            self.config,
            self.instance,
            endpoints=self.gathered.endpoints,
            device_subnet=self.gathered.device_subnet,
            ssm_read=self.ssm_read,
            make_client=self.aws_client,
        )


def _inner(own: dict[str, Any] | None, subnet: IPv4Network) -> IPv4Interface | None:
    """The registered inner address with the device subnet's prefix; None if absent or odd."""
    if own is None:
        return None
    try:
        return IPv4Interface(f"{IPv4Address(own.get('innerIpAddress'))}/{subnet.prefixlen}")
    except ValueError:
        return None


def _saved_gate(state: dict[str, Any] | None, vpg_id: str) -> GateView | None:
    raw = (state or {}).get("gate")
    if not isinstance(raw, dict):
        return None
    try:
        gate = GateView.from_json(raw)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    return gate if gate.vpg_id == vpg_id else None


def diagnose(config_path: Path, **options: Any) -> Report:
    """Load the config (a bad one ends here: exit 2), then run every check."""
    try:
        config = load(config_path, check_system=False)
    except ConfigError as exc:
        return Report([Check("fail", "config", str(exc))], bad_config=True)
    doctor = Doctor(config, **options)
    doctor.add(Check("ok", "config", f"{config_path}: valid"))
    return doctor.run()
