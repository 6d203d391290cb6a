"""The control loop: gather, plan, apply, verify, record.

Two sources feed a reconcile: the SORACOM API (asked by `apply`, and by the daemon in the
background on its timer and on SIGHUP) and the kernel (read every time). A kernel event
reconciles against the cached gate view without calling the API, so drift is repaired in
milliseconds and a flapping interface cannot hammer the API. When the API fails, the last known
good gate view stays applied and health turns degraded."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from gatepeer import __version__, statefile
from gatepeer.aws.integration import InstanceFactsSource, ssm_key_reader
from gatepeer.config import Config
from gatepeer.gate import GateError, fetch_gate_view, find_own_peer, vpg_endpoints
from gatepeer.kernel import nftables
from gatepeer.kernel.netlink import KernelError, Netlink
from gatepeer.plan import Action, LoadRuleset, SetSysctl, UpdateEndpointSet, describe, plan
from gatepeer.soracom import ApiStats, SoracomClient, SoracomError
from gatepeer.state import (
    DesiredState,
    DesiredStateError,
    GateView,
    HostFacts,
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    ObservedState,
    desired_state,
    tunnel_mtu,
)

log = logging.getLogger(__name__)


class ReconcileError(RuntimeError):
    """The kernel could not be brought to the desired state; the message says what differs."""


@dataclass
class ReconcileResult:
    actions: list[Action]
    health: str  # "ok", "degraded" or "failed"
    reasons: list[str]
    notes: list[str]
    duration_s: float
    dry_run: bool = False
    bad_config: bool = False  # the settings themselves cannot work (exit 2, not 1)
    preview: list[str] = field(default_factory=list)  # dry run: changes outside the kernel


@dataclass
class AgentRecord:
    """Counters and the last outcome, persisted in state.json after every reconcile."""

    reconciles: int = 0
    failures: int = 0
    last_success_at: float | None = None
    durations: list[float] = field(default_factory=list)


def make_client(
    config: Config,
    stats: ApiStats | None = None,
    instance: InstanceFactsSource | None = None,
) -> SoracomClient:
    s = config.soracom
    read_key = s.read_auth_key
    if s.auth_key_ssm_parameter:  # asked at each authentication, never kept on disk
        read_key = ssm_key_reader(config, instance or InstanceFactsSource(config.aws))
    return SoracomClient(
        s.endpoint, s.auth_key_id, read_key, timeout=s.request_timeout, stats=stats
    )


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        client: SoracomClient | None = None,
        netlink: Netlink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.api_stats = ApiStats()
        # EC2 only (DMI decides, locally): IMDS facts stand in for unset tunnel settings.
        self.instance = InstanceFactsSource(config.aws)
        self.client = client or make_client(config, self.api_stats, self.instance)
        self.netlink = netlink or Netlink()
        self.clock = clock
        self.record = AgentRecord()
        self.gate: GateView | None = None
        self.gate_error: str | None = None
        self.gate_fetched_at: float | None = None
        self.last: ReconcileResult | None = None
        self.facts: HostFacts | None = None
        self.preview: list[str] = []
        self.reconciled_at: float | None = None
        self._gate_kept = False  # written to the gate cache by this process
        self._flowtable_supported: bool | None = None
        self._load_last_good()

    def close(self) -> None:
        self.netlink.close()

    def _load_last_good(self) -> None:
        previous = statefile.read(self.config.agent.state_file) or {}
        try:
            counters = previous.get("counters") or {}
            self.record.reconciles = int(counters.get("reconciles") or 0)
            self.record.failures = int(counters.get("failures") or 0)
            self.record.last_success_at = counters.get("last_success_at")
            if previous.get("gate"):
                self.gate = GateView.from_json(previous["gate"])
                self.gate_fetched_at = previous.get("gate_fetched_at")
        except (AttributeError, KeyError, ValueError, TypeError):
            # A damaged file must not stop the agent: start as if it were not there.
            log.warning("ignoring unreadable parts of %s", self.config.agent.state_file)
        if self.gate is None:
            self._load_gate_cache()

    def _load_gate_cache(self) -> None:
        """After a reboot (state_file is on tmpfs): the last view the API gave, if kept."""
        path = self.config.agent.gate_cache
        cached = statefile.read(path) if path else None
        if not cached or not isinstance(cached.get("gate"), dict):
            return
        try:
            self.gate = GateView.from_json(cached["gate"])
            self.gate_fetched_at = cached.get("fetched_at")
        except (KeyError, ValueError, TypeError):
            log.warning("ignoring an unreadable gate view in %s", path)
            return
        log.info("starting from the gate view kept in %s", path)

    def _keep_gate(self, gate: GateView) -> None:
        path = self.config.agent.gate_cache
        if path is None:
            return
        try:
            statefile.write(path, {"gate": gate.to_json(), "fetched_at": self.clock()})
        except OSError as exc:
            log.warning("cannot keep the gate view in %s: %s", path, exc.strerror or exc)

    # ---- gathering ---------------------------------------------------------------------

    def host_facts(self) -> HostFacts:
        t = self.config.tunnel
        underlay, local = t.underlay_interface, t.local_address
        if (underlay is None or local is None) and self.config.aws.instance_facts:
            underlay, local = self._instance_defaults(underlay, local)
        facts = self.netlink.host_facts(underlay, local)
        self.facts = replace(facts, flowtable_supported=self.flowtable_supported())
        return self.facts

    def _instance_defaults(
        self, underlay: str | None, local: IPv4Address | None
    ) -> tuple[str | None, IPv4Address | None]:
        """On EC2: the primary ENI's interface and private address, from IMDS. Off EC2, or
        when IMDS fails (logged once per try), the default route decides, as elsewhere."""
        instance = self.instance.get()
        if instance is None:
            return underlay, local
        if underlay is None:
            underlay = self.netlink.interface_with_mac(instance.mac)
            if underlay is None:
                log.warning(
                    "no interface has the primary ENI's MAC %s: using the default route's",
                    instance.mac,
                )
        return underlay, local or instance.private_ipv4

    def flowtable_supported(self) -> bool:
        """Probed once per agent (nft check mode: the kernel validates, nothing is created)."""
        if self.config.packet_path.flowtable is False:
            return False
        if self._flowtable_supported is None:
            self._require_nft()
            try:
                self._flowtable_supported = nftables.flowtable_supported()
            except nftables.NftError as exc:
                raise KernelError(f"nftables: {exc}") from None
            if not self._flowtable_supported:
                log.info("this kernel has no nftables flowtable: the fast path stays off")
        return self._flowtable_supported

    @staticmethod
    def _require_nft() -> None:
        if not nftables.nft_available():
            raise KernelError("nftables: the nft command is not installed (Debian: nftables)")

    def refresh_gate(self, *, dry_run: bool = False, facts: HostFacts | None = None) -> bool:
        """Ask the API; on failure keep the last good view and remember why. True on success.

        The daemon calls this from a worker thread with the facts of the last reconcile, so
        that it never touches this agent's netlink socket (one IPRoute per thread)."""
        facts = facts or self.facts or self.host_facts()
        try:
            if dry_run and self._preview_registration(facts):
                return True
            previous = self.gate
            self.gate = fetch_gate_view(
                self.client,
                self.config.soracom.vpg_id,
                facts.local_address,
                open_gate=self.config.soracom.open_gate and not dry_run,
            )
        except (SoracomError, GateError) as exc:
            self.gate_error = str(exc)
            log.error("%s", exc)
            return False
        if not dry_run and self.gate is not None and (self.gate != previous or not self._gate_kept):
            self._keep_gate(self.gate)
            self._gate_kept = True
        self.gate_error = None
        self.gate_fetched_at = self.clock()
        return True

    def _preview_registration(self, facts: HostFacts) -> bool:
        """In a dry run an unregistered peer is not registered: say so and plan with a
        placeholder inner address. True when that placeholder view was set."""
        vpg_id = self.config.soracom.vpg_id
        peers = self.client.list_gate_peers(vpg_id)
        if find_own_peer(peers, facts.local_address) is not None:
            return False
        vpg = self.client.get_virtual_private_gateway(vpg_id)
        try:
            subnet = IPv4Network(vpg["deviceSubnetCidrRange"])
            vni = int(vpg.get("gateVxlanId") or 10)
        except (KeyError, ValueError, TypeError):
            raise GateError(
                f"VPG {vpg_id}: no usable deviceSubnetCidrRange or gateVxlanId"
            ) from None
        self.preview.append(
            f"# would register {facts.local_address} as a gate peer of VPG {vpg_id} "
            "(registerGatePeer); the inner address below is a placeholder until the API assigns one"
        )
        if not vpg.get("gateOpened"):
            self.preview.append(f"# would open Gate on VPG {vpg_id} (openGate)")
        self.gate = GateView(
            vpg_id=vpg_id,
            vni=vni,
            device_subnet=subnet,
            gate_opened=bool(vpg.get("gateOpened")),
            inner=IPv4Interface(f"{subnet.network_address}/{subnet.prefixlen}"),
            endpoints=vpg_endpoints(peers),
            outer=facts.local_address,
        )
        return True

    # ---- reconcile ---------------------------------------------------------------------

    def desired(self) -> DesiredState:
        if self.gate is None:
            raise ReconcileError(
                "no gate view yet: the SORACOM API has not answered since this peer was set up"
                + (f" ({self.gate_error})" if self.gate_error else "")
            )
        facts = self.facts or self.host_facts()
        try:
            return desired_state(self.config, facts, self.gate)
        except (ValueError, TypeError) as exc:
            if isinstance(exc, DesiredStateError):
                raise
            # Values from the host or the API the packet path cannot take (an odd interface
            # name from the default route, say): name what to set instead.
            raise DesiredStateError(
                f"tunnel.underlay_interface: cannot build the packet path for {facts.underlay}: "
                f"{exc}"
            ) from None

    def observe(self, desired: DesiredState) -> ObservedState:
        observed = self.netlink.observe(desired.link.name, desired.sysctls)
        if desired.packet_path is None:
            return observed
        self._require_nft()
        try:
            return replace(observed, nft_table=nftables.current())
        except nftables.NftError as exc:
            raise KernelError(f"nftables: {exc}") from None

    def apply_action(self, action: Action) -> None:
        try:
            if isinstance(action, LoadRuleset):
                # Carry the counters over a reload: they feed metrics and must not reset.
                kept = nftables.counters_from_listing(action.current) if action.current else None
                nftables.load(action.spec, counters=kept)
            elif isinstance(action, UpdateEndpointSet):
                nftables.update_endpoints(action.spec.endpoints)
            else:
                self.netlink.apply(action)
        except nftables.NftError as exc:
            raise KernelError(f"nftables: {exc}") from None

    def notes(self, observed: ObservedState, desired: DesiredState) -> list[str]:
        """Settings this network namespace cannot take: said, not treated as failures."""
        missing = [
            s.dotted
            for s in desired.sysctls
            if s.init_netns_only and observed.sysctl(s.path) is None
        ]
        if missing:
            return [
                "only the initial network namespace can set "
                + ", ".join(missing)
                + "; left to the host"
            ]
        return []

    def reconcile(self, *, dry_run: bool = False, refresh: bool = True) -> ReconcileResult:
        started = time.monotonic()
        reasons: list[str] = []
        actions: list[Action] = []
        notes: list[str] = []
        health = "ok"
        bad_config = False
        try:
            facts = self.host_facts()
            # Settings this host cannot satisfy are refused before anything reaches the API.
            tunnel_mtu(self.config, facts)
            self.preview = []
            if refresh:
                self.refresh_gate(dry_run=dry_run)
            if self.gate_error:
                reasons.append(f"SORACOM API: {self.gate_error}; keeping the last applied state")
            desired = self.desired()
            observed = self.observe(desired)
            notes = self.notes(observed, desired)
            actions = plan(desired, observed, self.facts.underlay if self.facts else "")
            if not dry_run and actions:
                for action in actions:
                    log.info("apply: %s", action.command())
                    self.apply_action(action)
                underlay = self.facts.underlay if self.facts else ""
                final = self.observe(desired)
                leftover = plan(desired, final, underlay)
                # Keys that appear only once what we applied loaded their module (conntrack's,
                # after the first ruleset with `ct state`) get a second pass, then are checked.
                absent_before = {path for path, value in observed.sysctls if value is None}
                late = [
                    a
                    for a in leftover
                    if isinstance(a, SetSysctl) and a.setting.path in absent_before
                ]
                if late and len(late) == len(leftover):
                    for action in late:
                        log.info("apply: %s", action.command())
                        self.apply_action(action)
                    actions.extend(late)
                    final = self.observe(desired)
                    leftover = plan(desired, final, underlay)
                notes = self.notes(final, desired)
                if leftover:
                    raise ReconcileError(
                        "read back differs from what was applied: " + "; ".join(describe(leftover))
                    )
            if reasons:
                health = "degraded"
        except (KernelError, ReconcileError, DesiredStateError, NetlinkError, OSError) as exc:
            # NetlinkError and OSError: a read raced with a change (the link went away between
            # lookup and get, say); the next event or timer reconciles again.
            bad_config = isinstance(exc, DesiredStateError)
            health = "failed"
            reasons.append(str(exc))
            if not bad_config:  # a bad setting is reported once, by the caller
                log.error("%s", exc)
        result = ReconcileResult(
            actions=actions,
            health=health,
            reasons=reasons,
            notes=notes,
            duration_s=time.monotonic() - started,
            dry_run=dry_run,
            bad_config=bad_config,
            preview=list(self.preview),
        )
        if not dry_run:
            self.reconciled_at = self.clock()
            self._count(result)
            self.last = result
            self.write_state()
        return result

    def record_crash(self, exc: BaseException) -> ReconcileResult:
        """Account for a reconcile that raised something unexpected (a bug): failed, and said."""
        result = ReconcileResult(
            actions=[],
            health="failed",
            reasons=[f"internal error: {type(exc).__name__}: {exc}"],
            notes=[],
            duration_s=0.0,
        )
        self._count(result)
        self.last = result
        self.write_state()
        return result

    def _count(self, result: ReconcileResult) -> None:
        self.record.reconciles += 1
        if result.health == "failed":
            self.record.failures += 1
        else:
            self.record.last_success_at = self.clock()
        self.record.durations.append(result.duration_s)
        del self.record.durations[:-1000]

    # ---- teardown ----------------------------------------------------------------------

    def teardown(self, *, unregister: bool) -> tuple[bool, list[str]]:
        """Remove what gatepeer created; sysctls stay (other services may rely on them)."""
        messages: list[str] = []
        name = self.config.tunnel.interface
        removed = self.netlink.delete_link(name)
        if removed:
            messages.append(f"removed {name}")
        if nftables.nft_available() and nftables.current() is not None:
            nftables.remove()
            removed = True
            messages.append(f"removed nftables table {nftables.FAMILY} {nftables.TABLE}")
        if unregister:
            facts = self.host_facts()
            vpg_id = self.config.soracom.vpg_id
            try:
                self.client.unregister_gate_peer(vpg_id, str(facts.local_address))
            except SoracomError as exc:
                if exc.status != 404:
                    raise
                messages.append(f"{facts.local_address} was not registered with VPG {vpg_id}")
            else:
                removed = True
                messages.append(f"unregistered {facts.local_address} from VPG {vpg_id}")
            # The kept view names an inner address that is no longer ours.
            if self.config.agent.gate_cache is not None:
                self.config.agent.gate_cache.unlink(missing_ok=True)
        self.config.agent.state_file.unlink(missing_ok=True)
        return removed, messages

    # ---- state file --------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        last = self.last
        return {
            "version": __version__,
            "pid": os.getpid(),
            "updated_at": self.clock(),
            # The prober rewrites this file too: staleness of the loop is judged by this one.
            "reconciled_at": self.reconciled_at,
            "config_file": str(self.config.source) if self.config.source else None,
            "health": last.health if last else "unknown",
            "reasons": last.reasons if last else [],
            "notes": last.notes if last else [],
            "gate": self.gate.to_json() if self.gate else None,
            "gate_fetched_at": self.gate_fetched_at,
            "gate_error": self.gate_error,
            "host": {
                "underlay": self.facts.underlay,
                "underlay_mtu": self.facts.underlay_mtu,
                "local_address": str(self.facts.local_address),
            }
            if self.facts
            else None,
            "tunnel": {"interface": self.config.tunnel.interface},
            "packet_path": {
                "mode": self.config.packet_path.mode,
                "flowtable_supported": self.facts.flowtable_supported if self.facts else None,
                "fast_path_active": bool(
                    self.facts
                    and self.facts.flowtable_supported
                    and self.config.packet_path.flowtable is not False
                ),
            },
            "last_reconcile": {
                "health": last.health,
                "actions": describe(last.actions),
                "duration_s": round(last.duration_s, 6),
                "error": "; ".join(last.reasons) or None,
            }
            if last
            else None,
            "counters": {
                "reconciles": self.record.reconciles,
                "failures": self.record.failures,
                "last_success_at": self.record.last_success_at,
            },
        }

    def write_state(self) -> None:
        path: Path = self.config.agent.state_file
        try:
            statefile.write(path, self.state())
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc.strerror or exc)
