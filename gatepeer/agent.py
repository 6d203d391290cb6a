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

from gatepeer import (
    atomic_json,
    gate_cache,
    gate_refresh,
    health,
    kernel_reconcile,
    redirection,
    state_document,
    teardown,
)
from gatepeer.api_actions import ApiAction
from gatepeer.aws.integration import InstanceFactsSource, destination_resolver, key_reader
from gatepeer.config import Config
from gatepeer.desired_state import (
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
from gatepeer.kernel import nftables
from gatepeer.kernel.netlink import KernelError, Netlink
from gatepeer.kernel_reconcile import ReconcileError
from gatepeer.plan import (
    Action,
    describe,
    owned_after,
    plan,
)
from gatepeer.soracom import ApiStats, SoracomClient

log = logging.getLogger(__name__)


@dataclass
class ReconcileResult:
    actions: list[Action]
    health: str  # health.evaluate's verdict on this reconcile: "ok", "degraded" or "failed"
    reasons: list[str]
    notes: list[str]
    duration_s: float
    dry_run: bool = False
    bad_config: bool = False  # the settings themselves cannot work (exit 2, not 1)
    # A dry run's planned API changes (a real run makes them before planning the kernel's).
    api_actions: list[ApiAction] = field(default_factory=list)
    failure: str | None = None  # why the kernel could not be converged (health "failed")


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
    return SoracomClient(
        s.endpoint,
        s.auth_key_id,
        key_reader(config, instance),
        timeout=s.request_timeout,
        stats=stats,
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
        # packet_path.allowed_destinations' AWS names: the last good set from disk until EC2
        # answers; refreshed with the gate view, on its own cadence.
        self.destinations = destination_resolver(config, self.instance)
        self.netlink = netlink or Netlink()
        self.clock = clock
        self.record = AgentRecord()
        self.gate: GateView | None = None
        self.gate_error: str | None = None
        # The field of a refused answer (gate_error says more); None: the last answer passed.
        self.refused_field: str | None = None
        self.redirection_error: str | None = None  # the last setRedirectionConfiguration failed
        self.gate_fetched_at: float | None = None
        self.last: ReconcileResult | None = None
        self.facts: HostFacts | None = None
        self.api_actions: list[ApiAction] = []  # a dry run's planned API changes
        self.reconciled_at: float | None = None
        self.written: state_document.StateDocument | None = None  # the last state.json
        self._gate_kept = False  # written to the gate cache by this process
        self._flowtable_supported: bool | None = None
        # The vxlan link this agent (or its predecessor) made: {"name", "ifindex", "vni",
        # "dst_port"}. Kept in the state file, so a renamed tunnel.interface can remove it.
        self.managed_link: dict[str, Any] | None = None
        # Addresses this agent (or its predecessor) put on the tunnel: the only ones the plan
        # may remove. Others (keepalived's virtual address) are not ours.
        self.owned_addresses: frozenset[IPv4Interface] = frozenset()
        self._resume()

    def close(self) -> None:
        self.netlink.close()

    def _resume(self) -> None:
        resumed = gate_cache.resume(self.config)
        self.record.reconciles = resumed.reconciles
        self.record.failures = resumed.failures
        self.record.last_success_at = resumed.last_success_at
        self.gate, self.gate_fetched_at = resumed.gate, resumed.gate_fetched_at
        self.managed_link = resumed.managed_link
        self.owned_addresses = resumed.owned_addresses

    # ---- gathering ---------------------------------------------------------------------

    def host_facts(self) -> HostFacts:
        t = self.config.tunnel
        underlay, local = t.underlay_interface, t.local_address
        if (underlay is None or local is None) and self.config.aws.instance_facts:
            underlay, local = self._instance_defaults(underlay, local)
        facts = self.netlink.host_facts(underlay, local)
        self.facts = self._with_vpc_networks(
            replace(facts, flowtable_supported=self.flowtable_supported())
        )
        return self.facts

    def _with_vpc_networks(self, facts: HostFacts) -> HostFacts:
        """What "inside the VPC" means: packet_path.vpc_cidrs, else the VPC's CIDR blocks from
        IMDS (on EC2), else the underlay's connected prefix (already in `facts`)."""
        if self.config.packet_path.vpc_cidrs:
            return replace(
                facts, vpc_networks=self.config.packet_path.vpc_cidrs, vpc_networks_source="config"
            )
        instance = self.instance.get() if self.config.aws.instance_facts else None
        if instance is not None and instance.vpc_cidrs:
            return replace(facts, vpc_networks=instance.vpc_cidrs, vpc_networks_source="imds")
        return facts

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
            kernel_reconcile.require_nft()
            try:
                self._flowtable_supported = nftables.flowtable_supported()
            except nftables.NftError as exc:
                raise KernelError(f"nftables: {exc}") from None
            if not self._flowtable_supported:
                log.info("this kernel has no nftables flowtable: the fast path stays off")
        return self._flowtable_supported

    def refresh_gate(self, *, dry_run: bool = False, facts: HostFacts | None = None) -> bool:
        """Ask the API; on failure keep the last good view and remember why. True on success.
        The registration's changes (openGate, registerGatePeer) and the redirection's are
        planned first, then made (or, in a dry run, kept in `api_actions` to be printed).

        The daemon calls this from a worker thread with the facts of the last reconcile, so
        that it never touches this agent's netlink socket (one IPRoute per thread)."""
        facts = facts or self.facts or self.host_facts()
        previous = self.gate
        got = gate_refresh.refresh(self.config, self.client, facts.local_address, dry_run=dry_run)
        self.api_actions.extend(got.api_actions)
        if got.gate is None:
            # The last good view stays: a refused answer must never reach the kernel.
            self.gate_error, self.refused_field = got.error, got.refused_field
            return False
        if got.redirection_checked:
            self.redirection_error = got.redirection_error
        self.gate = got.gate
        if got.placeholder:
            return True  # a dry run's view before registering: neither kept nor fetched
        if not dry_run and (self.gate != previous or not self._gate_kept):
            gate_cache.keep(self.config, self.gate, self.clock())
            self._gate_kept = True
        self.gate_error = None
        self.refused_field = None
        self.gate_fetched_at = self.clock()
        return True

    def refresh_destinations(self, *, force: bool = False) -> bool:
        """Resolve the allow-list's AWS names when due; True when the prefixes changed."""
        if self.destinations is None or not (force or self.destinations.due()):
            return False
        return self.destinations.refresh()

    # ---- reconcile ---------------------------------------------------------------------

    def desired(self) -> DesiredState:
        if self.gate is None:
            raise ReconcileError(
                "no gate view yet: the SORACOM API has not answered since this peer was set up"
                + (f" ({self.gate_error})" if self.gate_error else "")
            )
        facts = self.facts or self.host_facts()
        try:
            return desired_state(self.config, facts, self.gate, self._resolved_destinations())
        except (ValueError, TypeError) as exc:
            if isinstance(exc, DesiredStateError):
                raise
            # Values from the host or the API the packet path cannot take (an odd interface
            # name from the default route, say): name what to set instead.
            raise DesiredStateError(
                f"tunnel.underlay_interface: cannot build the packet path for {facts.underlay}: "
                f"{exc}"
            ) from None

    def _resolved_destinations(self) -> tuple[IPv4Network, ...]:
        """What the allow-list's AWS names stand for: the last good set (none resolved yet:
        desired_state closes the path to the VPC only until they are)."""
        return self.destinations.prefixes() if self.destinations else ()

    def observe(self, desired: DesiredState) -> ObservedState:
        return kernel_reconcile.observe(self.netlink, desired)

    def apply_action(self, action: Action) -> None:
        kernel_reconcile.apply_action(self.config, self.netlink, action)

    def reconcile(self, *, dry_run: bool = False, refresh: bool = True) -> ReconcileResult:
        started = time.monotonic()
        findings: list[str] = []
        actions: list[Action] = []
        notes: list[str] = []
        failure: str | None = None
        bad_config = False
        try:
            facts = self.host_facts()
            # Settings this host cannot satisfy are refused before anything reaches the API.
            tunnel_mtu(self.config, facts)
            self.api_actions = []
            if refresh:
                self.refresh_gate(dry_run=dry_run)
                self.refresh_destinations(force=True)
            # A dry run with "self" previews the post that would fix the gateway instead.
            previewed = dry_run and self.config.soracom.redirection == "self"
            if self.gate is not None and not previewed:
                findings = redirection.findings(
                    self.config.packet_path.mode,
                    self.config.soracom.redirection,
                    self.gate,
                    ha=self.config.ha,
                )
            desired = self.desired()
            observed = self.observe(desired)
            notes = kernel_reconcile.notes(observed, desired)
            underlay = self.facts.underlay if self.facts else ""
            # The old link goes first: it holds the VNI and port the new one needs.
            actions = kernel_reconcile.previous_link(
                self.netlink, self.managed_link, desired
            ) + plan(desired, observed, underlay, self.owned_addresses)
            if not dry_run and actions:
                notes, leftover = kernel_reconcile.converge(
                    desired,
                    observed,
                    actions,
                    underlay=underlay,
                    read=self.observe,
                    apply=lambda action: self.apply_action(action),
                    remember=lambda final: self._remember(desired, final),
                )
                kernel_reconcile.refuse_leftover(leftover)
            elif not dry_run:
                self._remember(desired, observed)
        except (KernelError, ReconcileError, DesiredStateError, NetlinkError, OSError) as exc:
            # NetlinkError and OSError: a read raced with a change (the link went away between
            # lookup and get, say); the next event or timer reconciles again.
            bad_config = isinstance(exc, DesiredStateError)
            failure = str(exc)
            if not bad_config:  # a bad setting is reported once, by the caller
                log.error("%s", exc)
        verdict = health.evaluate(
            health.Signals(
                reconcile_failure=failure,
                api_error=self.gate_error,
                api_answer_refused=self.refused_field is not None,
                redirection_error=self.redirection_error,
                redirection_findings=tuple(findings),
            )
        )
        result = ReconcileResult(
            actions=actions,
            health=verdict.health,
            reasons=list(verdict.reasons),
            notes=notes,
            duration_s=time.monotonic() - started,
            dry_run=dry_run,
            bad_config=bad_config,
            api_actions=list(self.api_actions),
            failure=failure,
        )
        if not dry_run:
            self.reconciled_at = self.clock()
            self._count(result)
            self.last = result
            self.write_state()
        return result

    def _remember(self, desired: DesiredState, observed: ObservedState) -> frozenset[IPv4Interface]:
        """Record the link and the addresses that are ours, as read back."""
        self.managed_link = kernel_reconcile.link_record(observed) or self.managed_link
        self.owned_addresses = owned_after(desired, observed, self.owned_addresses)
        return self.owned_addresses

    def record_crash(self, exc: BaseException) -> ReconcileResult:
        """Account for a reconcile that raised something unexpected (a bug): failed, and said."""
        failure = f"internal error: {type(exc).__name__}: {exc}"
        verdict = health.evaluate(health.Signals(reconcile_failure=failure))
        result = ReconcileResult(
            actions=[],
            health=verdict.health,
            reasons=list(verdict.reasons),
            notes=[],
            duration_s=0.0,
            failure=failure,
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
        """Remove what gatepeer created (`gatepeer down`); see gatepeer.teardown."""
        return teardown.teardown(
            self.config,
            self.netlink,
            self.client,
            gate=self.gate,
            managed_link=self.managed_link,
            local_address=lambda: self.host_facts().local_address,
            unregister=unregister,
        )

    # ---- state file --------------------------------------------------------------------

    def snapshot(self) -> state_document.AgentSnapshot:
        """What this agent knows now, for the state document."""
        last = self.last
        return state_document.AgentSnapshot(
            pid=os.getpid(),
            now=self.clock(),
            reconciled_at=self.reconciled_at,
            config_file=str(self.config.source) if self.config.source else None,
            interface=self.config.tunnel.interface,
            redirection_mode=self.config.soracom.redirection,
            packet_path_mode=self.config.packet_path.mode,
            flowtable_allowed=self.config.packet_path.flowtable is not False,
            outside_vpc=self.config.packet_path.outside_vpc,
            last=state_document.LastReconcile(
                health=last.health,
                reasons=tuple(last.reasons),
                notes=tuple(last.notes),
                actions=tuple(describe(last.actions)),
                duration_s=last.duration_s,
                failure=last.failure,
            )
            if last
            else None,
            gate=self.gate,
            gate_fetched_at=self.gate_fetched_at,
            gate_error=self.gate_error,
            refused_field=self.refused_field,
            redirection_error=self.redirection_error,
            facts=self.facts,
            managed_link=self.managed_link,
            owned_addresses=self.owned_addresses,
            reconciles=self.record.reconciles,
            failures=self.record.failures,
            last_success_at=self.record.last_success_at,
        )

    def document(self) -> state_document.StateDocument:
        """The state document as of now (the daemon's agent adds the probes and HA)."""
        return state_document.build(self.snapshot())

    def state(self) -> dict[str, Any]:
        return self.document().data

    def write_state(self) -> None:
        """Build the document once, keep it for readers in this process, write it."""
        path: Path = self.config.agent.state_file
        self.written = self.document()
        try:
            atomic_json.write(path, self.written.data)
        except OSError as exc:
            log.error("cannot write %s: %s", path, exc.strerror or exc)
