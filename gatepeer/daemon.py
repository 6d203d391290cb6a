"""`gatepeer run`: reconcile at start, on the timer, on kernel events and on SIGHUP.

The timer refreshes the gate view from the SORACOM API in a worker thread; kernel events (our
link, address, flood entries or nftables table changed by hand) reconcile at once against the
cached view, without an API call. SIGTERM stops the loop and leaves the data path up: stopping
the agent must never cut the devices off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK, RTMGRP_NEIGH

from gatepeer import health, sims, state_document, systemd
from gatepeer.agent import Agent, ReconcileResult, make_client
from gatepeer.aws.integration import AwsIntegration, TerminationWatcher
from gatepeer.config import Config, ConfigError
from gatepeer.desired_state import DesiredStateError, Endpoint, tunnel_mtu
from gatepeer.health_signals import running_verdict
from gatepeer.kernel import nftables, rtnl
from gatepeer.kernel.netlink import KernelError
from gatepeer.kernel.rtnl import TunnelReading
from gatepeer.probes import IcmpTransport, Prober
from gatepeer.sim_refresh import SimRefresher

if TYPE_CHECKING:
    from ipaddress import IPv4Address

    from gatepeer.flow_logger import FlowLogger
    from gatepeer.ha.claim import RouteTarget
    from gatepeer.ha.role import RoleView
    from gatepeer.ha.watcher import HaWatcher
    from gatepeer.metrics.server import MetricsServer
    from gatepeer.sims import SimMap

log = logging.getLogger(__name__)

# Events come in bursts (a link deletion also deletes its addresses and entries): coalesce them.
EVENT_SETTLE_S = 0.02
# Consecutive reconciles that change something (or fail) before the loop starts backing off.
BUSY_RECONCILES_BEFORE_BACKOFF = 5
CRASH_BACKOFF_S = 5.0
MAX_BACKOFF_S = 30.0
# Without any gate view (a fresh install whose API failed), ask again this soon at the latest.
FIRST_VIEW_RETRY_S = 30.0
WAITING_FOR_API = "waiting for the SORACOM API: no gate view yet (registering or fetching it)"
# At scale-in, how long an API refresh already under way may take before we unregister.
REFRESH_JOIN_S = 15.0
EXIT_BAD_CONFIG = 2  # as the CLI's: systemd's RestartPreventExitStatus=2 stops retrying
# After an event socket failed (ENOBUFS, say): a pause before listening again, so a socket that
# keeps failing cannot spin.
RELISTEN_PAUSE_S = 0.5
# How long the loop waits for the kernel watcher's socket before its first reconcile: events
# from then on are seen; past this, the timer still repairs drift.
WATCHER_READY_S = 5.0


class Wake:
    """A threading.Event whose set() may be called from a signal handler. Python runs handlers
    on the main thread between bytecodes, possibly while that thread holds the event's lock in
    clear() or wait(); Event's plain lock would deadlock there, a reentrant one does not."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._flag = False

    def set(self) -> None:
        with self._cond:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._flag:
                self._cond.wait(timeout)
            return self._flag


class KernelWatcher(threading.Thread):
    """Listens to rtnetlink and calls `kick` when something the agent owns changes."""

    def __init__(self, interface: str, kick: Callable[[str], None]) -> None:
        super().__init__(name="kernel-watcher", daemon=True)
        self.interface = interface
        self.kick = kick
        self.ready = threading.Event()
        self._stopping = threading.Event()
        self._ipr: IPRoute | None = None

    def stop(self) -> None:
        self._stopping.set()
        if self._ipr is not None:
            with contextlib.suppress(OSError):
                self._ipr.close()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._listen()
            except Exception as exc:  # noqa: BLE001 - ENOBUFS, a bad message, closed at stop
                if self._stopping.is_set():
                    return
                # pyroute2 keeps a receive error and raises it again on every later read:
                # open a fresh socket, and reconcile, since whatever was lost may matter.
                log.warning("kernel events: %s; listening again", exc or type(exc).__name__)
                self.kick("kernel events lost")
                self._stopping.wait(RELISTEN_PAUSE_S)

    def _listen(self) -> None:
        with IPRoute() as ipr:
            self._ipr = ipr
            ipr.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_NEIGH)
            self.ready.set()
            while not self._stopping.is_set():
                for msg in ipr.get():
                    why = self.relevant(msg)
                    if why:
                        self.kick(why)

    def relevant(self, msg: object) -> str | None:
        """A short reason when the event concerns what the agent owns, else None."""
        event = getattr(msg, "get", lambda *_: None)("event")
        get_attr = getattr(msg, "get_attr", lambda *_: None)
        if event in ("RTM_DELLINK", "RTM_NEWLINK"):
            if get_attr("IFLA_IFNAME") == self.interface:
                return f"{event} {self.interface}"
            return None
        if event == "RTM_DELADDR":
            if get_attr("IFA_LABEL") == self.interface:
                return f"address removed from {self.interface}"
            return None
        # Learned MAC entries come and go all the time; only our flood entries matter.
        if (
            event == "RTM_DELNEIGH"
            and getattr(msg, "get", lambda *_: None)("family") == rtnl.AF_BRIDGE
            and get_attr("NDA_LLADDR") == "00:00:00:00:00:00"
        ):
            return f"flood entry to {get_attr('NDA_DST')} removed"
        return None


class NftablesWatcher(threading.Thread):
    """Listens to nftables' netlink group and kicks the loop when our table is changed by
    someone else (a flushed chain, a deleted element); rtnetlink does not carry these."""

    NETLINK_NETFILTER = 12
    NFNLGRP_NFTABLES = 7
    SOL_NETLINK = 270
    NETLINK_ADD_MEMBERSHIP = 1

    def __init__(self, table: str, kick: Callable[[str], None]) -> None:
        super().__init__(name="nftables-watcher", daemon=True)
        # Every message about a table's objects carries the table's name as a string attribute.
        self.needle = table.encode() + b"\0"
        self.table = table
        self.kick = kick
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self.NETLINK_NETFILTER)
            sock.bind((0, 0))
            sock.setsockopt(self.SOL_NETLINK, self.NETLINK_ADD_MEMBERSHIP, self.NFNLGRP_NFTABLES)
        except OSError as exc:
            log.warning(
                "nftables events unavailable (%s): table drift is repaired on the timer", exc
            )
            return
        with sock:
            sock.settimeout(1.0)  # to notice stop()
            while not self._stopping.is_set():
                try:
                    data = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                except OSError as exc:
                    # ENOBUFS: a burst (another tool loading a large ruleset) overflowed the
                    # buffer; ours may have changed in it.
                    log.warning("nftables events: %s", exc.strerror or exc)
                    self.kick("nftables events lost")
                    self._stopping.wait(RELISTEN_PAUSE_S)
                    continue
                if self.needle in data:
                    self.kick(f"nftables table {self.table} changed")


class ProbedAgent(Agent):
    """The daemon's agent: its state (state.json and the metrics) also carries what the probes
    found about each VPG endpoint and the health that implies. The prober thread writes the
    state too, hence the lock (shared by the agents a reload swaps)."""

    prober: Prober | None = None
    ha_view: Callable[[], RoleView] | None = None  # with [ha]: the role keepalived gave us
    aws_view: Callable[[], dict[str, Any] | None] | None = None  # [aws] routes, stale sweep
    sim_view: Callable[[], dict[str, Any] | None] | None = None  # the SIM map's last refresh
    _write_lock = threading.Lock()

    def document(self) -> state_document.StateDocument:
        results = self.prober.results() if self.prober else None
        try:
            flood = rtnl.flood_destinations_of(self.config.tunnel.interface)
        except OSError:
            flood = None  # reported as missing; the state must still be written
        ha = self.ha_view().to_json() if self.ha_view is not None else None
        aws = self.aws_view() if self.aws_view is not None else None
        sim_map = self.sim_view() if self.sim_view is not None else None
        return state_document.build(
            self.snapshot(),
            probes=state_document.Probes(results, flood),
            ha=ha,
            aws=aws,
            sim_map=sim_map,
        )

    def write_state(self) -> None:
        with self._write_lock:
            super().write_state()
            if self.config.ha is not None and self.written is not None:
                # keepalived's checks read these lines (gatepeer/ha/verdict.py).
                from gatepeer.ha import verdict

                verdict.write(self.config, self.written.data, time.time())


class Daemon:
    def __init__(self, config: Config, load_config: Callable[[], Config]) -> None:
        self.config = config
        self.load_config = load_config
        self.prober = Prober(
            config.probes.interval,
            config.probes.timeout,
            self._probe_targets,
            IcmpTransport(config.tunnel.interface),
            on_update=lambda: self.agent.write_state(),
        )
        # [ha] as at start, like [aws]: keepalived's own config changes only with a restart,
        # and the claim (its API client included) keeps the config it started with.
        self.ha_config = config
        self.ha = self._ha_watcher(config)
        self.agent = self._new_agent(config)
        # The [aws] flags as at start: a reload keeps the lifecycle's progress (restart to change).
        self.aws = AwsIntegration.for_config(
            config, self.agent.instance, soracom=lambda: make_client(config)
        )
        self.terminating = False  # Auto Scaling is taking this instance away
        self.wake = Wake()
        self._refresher: threading.Thread | None = None
        self.stopping = False
        self.reload_requested = False
        self.event_reasons: list[str] = []
        self.lock = threading.Lock()
        self._route_target_cache: RouteTarget | None = None
        self.sim_refresher: SimRefresher | None = None
        self._sim_settings: tuple[object, ...] | None = None  # what the refresher runs with
        self.flow_logger: FlowLogger | None = None

    def _new_agent(self, config: Config) -> ProbedAgent:
        agent = ProbedAgent(config)
        agent.prober = self.prober
        agent.aws_view = self._aws_view
        agent.sim_view = self._sim_view
        if self.ha is not None:
            agent.ha_view = self.ha.view
        return agent

    def _aws_view(self) -> dict[str, Any] | None:
        aws: AwsIntegration | None = getattr(self, "aws", None)  # made after the first agent
        view = aws.to_json() if aws is not None else None
        agent = getattr(self, "agent", None)
        if agent is not None and agent.destinations is not None:
            # The allow-list's AWS names: what each stands for, and what failed.
            view = {**(view or {}), "destinations": agent.destinations.to_json()}
        return view

    def _sim_view(self) -> dict[str, Any] | None:
        refresher: SimRefresher | None = getattr(self, "sim_refresher", None)
        return refresher.to_json() if refresher is not None else None

    # ---- the SIM map: fetched at start, then on its own slow cadence ----------------

    def _start_sim_refresher(self) -> None:
        """With the SIM map on: a thread that fetches it now and every sim_refresh_seconds.
        A refresher already running for other settings is stopped first."""
        devices, soracom = self.config.devices, self.config.soracom
        running = self.sim_refresher
        wanted = (devices, soracom)
        if running is not None and self._sim_settings == wanted:
            return
        if running is not None:
            running.stop()
            self.sim_refresher = None
        self._sim_settings = wanted
        path = sims.cache_path(self.config)
        if path is None:
            return
        refresher = SimRefresher(
            make_client(self.config),
            soracom.vpg_id,
            path,
            devices.sim_refresh_seconds,
            on_change=lambda: self.agent.write_state(),
        )
        self.sim_refresher = refresher
        refresher.start()

    # ---- HA: keepalived's notify FIFO and the claim on MASTER ------------------------

    def _ha_watcher(self, config: Config) -> HaWatcher | None:
        """With [ha]: the FIFO reader whose coordinator claims the gateway when keepalived
        makes this peer master. Not started yet (`run` does, before the first reconcile)."""
        if config.ha is None:
            return None
        from gatepeer.agent import make_client
        from gatepeer.ha.claim import GatewayClaim
        from gatepeer.ha.watcher import HaWatcher

        nat = None
        if config.ha.snat_address is not None:
            from gatepeer.ha.nat_address import NatAddress

            # The underlay is known after the first reconcile, before keepalived starts.
            nat = NatAddress(
                config.ha.snat_address,
                lambda: self.agent.facts.underlay if self.agent.facts is not None else None,
            )
        claim = GatewayClaim(
            config=lambda: config,
            gate=lambda: self.agent.gate,
            # Its own client: the claim runs on the FIFO thread, beside the refresher's.
            api=make_client(config),
            route_target=self._route_target if config.ha.route_tables else None,
            address_target=self._address_target if config.ha.snat_address else None,
            announce=nat.hold if nat is not None else None,
        )
        conntrackd = sync = None
        if config.ha.conntrack_sync:
            from gatepeer.ha.conntrackd import Conntrackd, SyncTracker

            conntrackd = Conntrackd(config.ha.conntrackd_config)
            sync = SyncTracker(conntrackd.stats)
        handover = None
        if conntrackd is not None or nat is not None:
            from gatepeer.ha.handover import RoleHandover

            handover = RoleHandover(conntrackd, nat)
        return HaWatcher(
            config.ha.notify_fifo,
            claim,
            on_change=lambda _view: self.agent.write_state(),
            handover=handover,
            sync=sync,
            after_claim=handover.after_claim if handover is not None else None,
        )

    def _address_target(self) -> RouteTarget | None:
        """Where the claim moves ha.snat_address: this instance's ENI on EC2; None elsewhere
        (the lab, a host with L2 to its peer), where keepalived's address alone is enough."""
        from gatepeer.ha.claim import ClaimError

        instance = self.agent.instance
        if not instance.on_ec2():
            return None
        if instance.get() is None:  # on EC2, but IMDS did not answer: retried with the claim
            raise ClaimError(
                f"ha.snat_address: this instance's ENI is unknown ({instance.why_missing()})"
            )
        return self._route_target()

    def _keep_claim(self) -> None:
        """As master, claim again when a refresh after our claim shows the gateway elsewhere:
        the pair converges even when a late claim (a peer that was master only briefly) landed
        after ours. Only the master ever posts, so the backup cannot start a fight."""
        if self.ha is None:
            return
        from gatepeer.ha.claim import claim_lost

        view = self.ha.view()
        if view.role != "master":
            return
        agent = self.agent
        why = claim_lost(self.ha_config, agent.gate, agent.gate_fetched_at, view.claimed_at)
        if why is not None:
            self.ha.coordinator.reassert(why)

    def _route_target(self) -> RouteTarget:
        """This instance's ENI and an EC2 client in its region, found at the first claim: the
        ENI from IMDS on EC2, else the one holding this host's VPC address in the VPC of the
        first route table (aws.region must then be set)."""
        from gatepeer.aws import AwsError
        from gatepeer.aws.clients import AwsTarget, client
        from gatepeer.aws.ec2 import eni_of_address
        from gatepeer.ha.claim import ClaimError, RouteTarget

        if self._route_target_cache is None:
            instance = self.agent.instance
            tables = self.ha_config.ha.route_tables if self.ha_config.ha else ()
            try:
                ec2 = client("ec2", AwsTarget(instance.region()))
                facts = instance.get()
                if facts is not None:
                    eni = facts.eni_id
                elif self.agent.facts is not None and tables:
                    eni = eni_of_address(ec2, tables[0], str(self.agent.facts.local_address))
                else:
                    raise ClaimError("ha.route_tables: this host's VPC address is not known yet")
            except AwsError as exc:
                raise ClaimError(f"ha.route_tables: {exc}") from None
            self._route_target_cache = RouteTarget(ec2, eni)
        return self._route_target_cache

    def _probe_targets(self) -> tuple[Endpoint, ...]:
        return self.agent.gate.endpoints if self.agent.gate else ()

    def start_refresh(self) -> bool:
        """Refresh the gate view from the API in a worker thread; False if one still runs."""
        if self._refresher is not None and self._refresher.is_alive():
            return False
        agent = self.agent
        if agent.facts is None:
            return False  # the reconcile could not read this host; it says why

        def refresh() -> None:
            try:
                agent.refresh_gate(facts=agent.facts)
                agent.refresh_destinations()
            except Exception as exc:  # noqa: BLE001 - must not die silently with health "ok"
                log.exception("refreshing the gate view failed")
                agent.gate_error = f"refreshing the gate view failed: {exc}"
            finally:
                self.wake.set()  # reconcile against the new view, or report the failure

        self._refresher = threading.Thread(target=refresh, name="gate-refresh", daemon=True)
        self._refresher.start()
        return True

    def step(
        self, now: float, next_refresh: float, interval: float
    ) -> tuple[ReconcileResult | None, float]:
        """One reconcile against the cached gate view; the API is asked in the background.
        None while the first gate view is awaited: there is nothing to reconcile against yet,
        and the loop must keep feeding the watchdog and hearing SIGTERM meanwhile (a slow or
        rate-limited API can take minutes)."""
        if self.agent.gate is None:
            if self._refresher is not None and self._refresher.is_alive():
                return None, next_refresh
            if now >= next_refresh:
                next_refresh = now + min(interval, FIRST_VIEW_RETRY_S)
                if self._start_first_refresh():
                    return None, next_refresh
            # The host cannot be read or the last attempt failed: the reconcile says why.
            return self.agent.reconcile(refresh=False), next_refresh
        result = self.agent.reconcile(refresh=False)
        if now >= next_refresh:
            # Still running: look again shortly; its end wakes the loop anyway.
            next_refresh = now + (interval if self.start_refresh() else 1.0)
        return result, next_refresh

    def _start_first_refresh(self) -> bool:
        """Read the host (on this thread: it owns the netlink socket), refuse settings it
        cannot satisfy before anything reaches the API, then ask the API in the worker."""
        try:
            facts = self.agent.host_facts()
            tunnel_mtu(self.config, facts)
        except (KernelError, DesiredStateError, NetlinkError, OSError):
            return False  # the reconcile reports it
        if not self.start_refresh():
            return False
        self.agent.write_state()  # `status` sees the daemon while it waits
        return True

    def pause(self, seconds: float) -> None:
        """Sleep that events cannot cut short (they may be our own), but a signal can."""
        deadline = time.monotonic() + seconds
        while (
            not self.stopping
            and not self.reload_requested
            and not self.terminating
            and time.monotonic() < deadline
        ):
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def kick(self, reason: str) -> None:
        with self.lock:
            self.event_reasons.append(reason)
        self.wake.set()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        else:
            self.stopping = True
        self.wake.set()

    def reload(self) -> None:
        try:
            config = self.load_config()
        except ConfigError as exc:
            # Keep running on the old, working config: a typo must not take the tunnel down.
            log.error("reload refused, keeping the running config: %s", exc)
            return
        log.info("configuration reloaded from %s", config.source)
        started = self.ha_config
        ha_in_play = config.ha is not None or started.ha is not None
        if ha_in_play and (config.ha != started.ha or config.soracom != started.soracom):
            log.warning(
                "ha: the claim keeps the [ha] and [soracom] settings gatepeer started with; "
                "restart gatepeer (and keepalived after `gatepeer ha render -o`) to change them"
            )
        self.agent.close()
        self.config = config
        self.agent = self._new_agent(config)
        self.prober.interval, self.prober.timeout = config.probes.interval, config.probes.timeout
        if isinstance(self.prober.transport, IcmpTransport):
            self.prober.transport.interface = config.tunnel.interface

    def _wait(self, next_refresh: float, watchdog: float | None) -> None:
        """Feed the watchdog, then sleep until the next refresh, an event or a signal."""
        timeout = max(0.0, next_refresh - time.monotonic())
        aws_due = self.aws.next_due() if self.aws is not None else None
        if aws_due is not None:
            timeout = min(timeout, aws_due)
        if watchdog:
            timeout = min(timeout, watchdog)
            systemd.notify("WATCHDOG=1")
        self.wake.wait(timeout)
        self.wake.clear()
        if self.event_reasons:
            time.sleep(EVENT_SETTLE_S)

    # ---- AWS: the lifecycle after each reconcile, and scale-in -------------------------

    def _termination_watcher(self) -> TerminationWatcher | None:
        if self.aws is None or not self.config.aws.termination_lifecycle_hook:
            return None
        if not self.agent.instance.on_ec2():
            log.warning(
                "aws.termination_lifecycle_hook: %s; scale-in is not watched",
                self.agent.instance.why_missing(),
            )
            return None
        watcher = TerminationWatcher(self.agent.instance.imds, self._on_terminated)
        watcher.start()
        return watcher

    def _on_terminated(self) -> None:
        self.terminating = True
        self.wake.set()

    def leave(self) -> None:
        """Scale-in: let a refresh under way finish (it could register again), unregister
        (teardown also unsets redirection when ours), complete the hook, and stop."""
        if self._refresher is not None:
            self._refresher.join(REFRESH_JOIN_S)
        if self.aws is not None:
            self.aws.on_termination(self.agent)
        self.stopping = True

    def _flow_log(self) -> None:
        """Run the flow log while [flow_log] enabled says so, as the current config says;
        called after every reconcile (it restarts conntrack -E if that ended)."""
        cfg = self.config.flow_log
        if self.flow_logger is not None and self.flow_logger.cfg != cfg:
            self.flow_logger.stop()
            self.flow_logger = None
        if not cfg.enabled:
            return
        if self.flow_logger is None:
            from gatepeer.flow_log import DeviceScope
            from gatepeer.flow_logger import FlowLogger

            def devices() -> DeviceScope | None:
                gate = self.agent.gate
                if gate is None:
                    return None
                inner = {e.inner for e in gate.endpoints if e.inner is not None}
                return DeviceScope(gate.device_subnet, frozenset({gate.inner.ip, *inner}))

            def sim_name(address: IPv4Address) -> str | None:
                sims = self._sim_map()
                return sims.name_for(address) if sims is not None else None

            self.flow_logger = FlowLogger(cfg, devices, sim_name)
        self.flow_logger.ensure_running()

    def _sim_map(self) -> SimMap | None:
        """The SIM map the refresher holds (None while the map is off)."""
        refresher = self.sim_refresher
        return refresher.current if refresher is not None else None

    def _metrics_server(self) -> MetricsServer | None:
        """The /metrics listener for the current config; None when `listen = ""` turns it off.
        It binds after a reconcile, once the default (local) address is known."""
        if self.config.metrics.listen == "":
            return None
        from gatepeer.metrics.server import for_agent

        return for_agent(
            self.config.metrics.listen,
            lambda: self.agent,
            lambda: self.flow_logger.stats if self.flow_logger is not None else None,
            self._sim_map,
        )

    def _live_verdict(self) -> health.Verdict:
        """The verdict of the document just written, with the live tunnel and this daemon
        added through the one evaluator: what `gatepeer status` says while we run."""
        written = self.agent.written or self.agent.document()
        st = written.summary
        return running_verdict(
            st,
            TunnelReading.read(st.interface),
            pid=os.getpid(),
            now=time.time(),
            reconcile_interval=self.config.agent.reconcile_interval,
            packet_path_mode=self.config.packet_path.mode,
            redirection_mode=self.config.soracom.redirection,
            ha=self.config.ha,
        )

    def _status_line(self, result: ReconcileResult) -> str:
        """What status and the metrics say too: the probes, the live tunnel, HA. A read that
        fails (a netlink dump cut short, say) must not end the loop: the reconcile's own
        verdict stands in."""
        try:
            verdict = self._live_verdict()
            health_word, reasons = verdict.health, list(verdict.reasons)
        except (OSError, ValueError) as exc:
            log.warning("cannot read the live state for STATUS=: %s", exc)
            health_word, reasons = result.health, result.reasons
        return f"{health_word}: {'; '.join(reasons) or 'converged'}"

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        if self.ha is not None:
            # Before the first reconcile, so before READY: keepalived, ordered after us, finds
            # the FIFO made and held open by us (gatepeer.ha.fifo says why that matters).
            from gatepeer.ha.fifo import FifoError

            try:
                self.ha.start()
            except FifoError as exc:
                log.error("ha.notify_fifo: %s", exc.strerror or exc)
                return 1
        watcher = KernelWatcher(self.config.tunnel.interface, self.kick)
        watcher.start()
        watcher.ready.wait(WATCHER_READY_S)
        nft_watcher = NftablesWatcher(nftables.TABLE, self.kick)
        nft_watcher.start()
        self.prober.start()
        termination = self._termination_watcher()
        self._start_sim_refresher()
        metrics_listen = self.config.metrics.listen
        metrics = self._metrics_server()
        interval = self.config.agent.reconcile_interval
        watchdog = systemd.watchdog_interval()
        next_refresh = 0.0
        first = True
        busy = 0
        exit_code = 0
        try:
            while not self.stopping:
                if self.terminating:
                    self.leave()
                    break
                if self.reload_requested:
                    self.reload_requested = False
                    self.reload()
                    self._start_sim_refresher()
                    watcher.interface = self.config.tunnel.interface
                    interval = self.config.agent.reconcile_interval
                    next_refresh = 0.0
                    if self.config.metrics.listen != metrics_listen:
                        if metrics is not None:
                            metrics.stop()
                        metrics_listen = self.config.metrics.listen
                        metrics = self._metrics_server()
                now = time.monotonic()
                with self.lock:
                    reasons, self.event_reasons = self.event_reasons, []
                trigger = "kernel event: " + ", ".join(reasons[:3]) if reasons else "timer"
                try:
                    result, next_refresh = self.step(now, next_refresh, interval)
                except Exception as exc:  # noqa: BLE001 - the daemon outlives any one bug
                    log.exception("reconcile crashed")
                    result = self.agent.record_crash(exc)
                    self.pause(CRASH_BACKOFF_S)
                if not reasons:
                    # An event that arrived during the reconcile was handled by it: name it.
                    with self.lock:
                        late = list(self.event_reasons[:3])
                    if late:
                        trigger = "kernel event: " + ", ".join(late)
                if metrics is not None:
                    metrics.ensure_started()  # the default address is known after a reconcile
                self._flow_log()
                if result is None:
                    if self.aws is not None:  # the launch deadline runs on without a view
                        self.aws.after_reconcile(False)
                    # READY waits for the first view; the watchdog must not.
                    systemd.notify(f"STATUS={WAITING_FOR_API}")
                    self._wait(next_refresh, watchdog)
                    continue
                if self.aws is not None:
                    self.aws.after_reconcile(result.health == "ok", self.agent.gate)
                self._keep_claim()
                if result.actions or result.health != "ok":
                    log.info(
                        "reconcile (%s): %s, %d action(s) in %.1f ms",
                        trigger,
                        result.health,
                        len(result.actions),
                        result.duration_s * 1000,
                    )
                # Our own changes raise events too; a reconcile that keeps changing things (a
                # kernel that never converges) must not spin: back off up to the interval.
                evented = trigger != "timer"
                changed = bool(result.actions) or result.health == "failed"
                busy = busy + 1 if evented and changed else 0
                if busy > BUSY_RECONCILES_BEFORE_BACKOFF:
                    excess = busy - BUSY_RECONCILES_BEFORE_BACKOFF
                    # Capped well inside any sensible WatchdogSec.
                    pause = min(interval, MAX_BACKOFF_S, EVENT_SETTLE_S * 2**excess)
                    log.warning("reconcile keeps changing things; pausing %.2fs", pause)
                    self.pause(pause)
                if first and result.bad_config:
                    # Settings this host cannot take, before the peer ever worked: exit 2, so
                    # systemd (RestartPreventExitStatus=2) fails the unit at once, loudly.
                    log.error("bad configuration: %s", "; ".join(result.reasons))
                    exit_code = EXIT_BAD_CONFIG
                    break
                if first and result.failure is None:
                    # READY once the data path is up: from the API's view or the cached one.
                    # Until then the watchdog is fed and TimeoutStartSec= bounds the wait.
                    systemd.notify("READY=1")
                    first = False
                systemd.notify(f"STATUS={self._status_line(result)}")
                self._wait(next_refresh, watchdog)
        finally:
            systemd.notify("STOPPING=1")
            watcher.stop()
            nft_watcher.stop()
            if termination is not None:
                termination.stop()
            self.prober.stop()
            if self.sim_refresher is not None:
                self.sim_refresher.stop()
            if self.ha is not None:
                self.ha.stop()
            if metrics is not None:
                metrics.stop()
            if self.flow_logger is not None:
                self.flow_logger.stop()
            self.agent.close()
        log.info("stopped; the data path stays up")
        return exit_code
