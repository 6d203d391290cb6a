"""What the agent and the daemon do with AWS: instance facts, the key's SSM region, the
source/destination check and the lifecycle actions after a reconcile, and scale-in.

How the instance learns that it is being scaled in: it polls IMDS's
`autoscaling/target-lifecycle-state` (AWS documents this for lifecycle hooks) until it reads
"Terminated". That needs nothing beyond the hook itself; the alternative (an EventBridge rule
running an SSM document or feeding an SQS queue) needs more infrastructure and permissions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gatepeer.aws import AwsError
from gatepeer.aws.clients import AwsTarget, client
from gatepeer.aws.destinations import DestinationResolver
from gatepeer.aws.detect import SYS_ROOT, ec2_evidence
from gatepeer.aws.ec2 import disable_source_dest_check
from gatepeer.aws.imds import Imds, InstanceFacts, resolve_endpoint
from gatepeer.aws.lifecycle import Hook, LaunchGate, complete, heartbeat
from gatepeer.aws.routes import RouteKeeper
from gatepeer.aws.ssm import auth_key_reader
from gatepeer.aws.stale import Sweep, sweep
from gatepeer.config import AwsConfig, Config
from gatepeer.desired_state import GateView

log = logging.getLogger(__name__)

# After a failed IMDS lookup, the next reconciles use the fallback until this much time passed.
FACTS_RETRY_S = 60.0
# AWS suggests polling target-lifecycle-state every 5 s.
TERMINATION_POLL_S = 5.0
TERMINATED = "Terminated"
# Unregistering at scale-in: tries, and the pause between them (heartbeats keep the hook open).
TERMINATION_ATTEMPTS = 3
TERMINATION_RETRY_S = 5.0
# After a failed AWS call, the next try waits this long (kernel events must not hammer the API).
AWS_RETRY_S = 15.0


class InstanceFactsSource:
    """The instance's facts from IMDSv2, asked only when DMI says EC2, then kept.

    A failure is logged with what the caller falls back to, remembered in `error`, and not
    asked again for FACTS_RETRY_S, so a broken IMDS cannot slow every reconcile."""

    def __init__(
        self,
        aws: AwsConfig,
        *,
        sys_root: Path = SYS_ROOT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.aws = aws
        self.sys_root = sys_root
        self.clock = clock
        self.error: str | None = None
        self._evidence: str | None = None
        self._detected = False
        self._facts: InstanceFacts | None = None
        self._failed_at: float | None = None
        self._lock = threading.Lock()  # the daemon's refresher thread may ask too

    def on_ec2(self) -> bool:
        if not self._detected:
            self._evidence = ec2_evidence(self.sys_root)
            self._detected = True
            if self._evidence:
                log.debug("this host is an EC2 instance (%s)", self._evidence)
        return self._evidence is not None

    def imds(self) -> Imds:
        return Imds(resolve_endpoint(self.aws.imds_endpoint), timeout=self.aws.imds_timeout)

    def get(self) -> InstanceFacts | None:
        """The facts, or None off EC2 (no request made) or after a failure (logged)."""
        with self._lock:
            if self._facts is not None or not self.on_ec2():
                return self._facts
            now = self.clock()
            if self._failed_at is not None and now - self._failed_at < FACTS_RETRY_S:
                return None
            try:
                from gatepeer.aws import require_boto3

                require_boto3()
                self._facts = self.imds().instance_facts()
            except AwsError as exc:
                self.error = str(exc)
                self._failed_at = now
                log.warning("instance facts from IMDS unavailable: %s", exc)
                return None
            self.error = None
            if self._facts.note:
                log.warning("%s", self._facts.note)
            return self._facts

    def why_missing(self) -> str:
        if not self.on_ec2():
            return "this host is not an EC2 instance (DMI says otherwise), so IMDS was not asked"
        return self.error or "IMDS has not been asked yet"

    def region(self) -> str:
        """aws.region, else the instance's own region."""
        if self.aws.region:
            return self.aws.region
        facts = self.get()
        if facts is None:
            raise AwsError(f"aws.region: not set, and no instance region: {self.why_missing()}")
        return facts.region


def ssm_key_reader(config: Config, source: InstanceFactsSource) -> Callable[[], str]:
    """The auth key reader for soracom.auth_key_ssm_parameter, in aws.region (else the
    instance's region)."""
    name = config.soracom.auth_key_ssm_parameter
    assert name is not None
    return auth_key_reader(name, lambda: AwsTarget(source.region()))


def destination_resolver(config: Config, source: InstanceFactsSource) -> DestinationResolver | None:
    """The AWS names of packet_path.allowed_destinations, resolved in aws.region (else the
    instance's region); None when the list names none."""
    pp = config.packet_path
    if not pp.allowed_names:
        return None
    return DestinationResolver(
        pp.allowed_names,
        lambda: client("ec2", AwsTarget(source.region())),
        cache=pp.destinations_cache,
        interval_s=pp.destinations_refresh,
    )


def key_reader(config: Config, source: InstanceFactsSource | None = None) -> Callable[[], str]:
    """Where the SORACOM auth key comes from: the SSM parameter (asked at each authentication,
    never kept on disk) or the key file. The agent and `doctor` both take theirs here."""
    if config.soracom.auth_key_ssm_parameter:
        return ssm_key_reader(config, source or InstanceFactsSource(config.aws))
    return config.soracom.read_auth_key


class _Agent(Protocol):
    def teardown(self, *, unregister: bool) -> tuple[bool, list[str]]: ...


@dataclass
class _Done:
    source_dest_check: bool


class AwsIntegration:
    """The daemon's AWS side: after each reconcile, the source/destination check (once) and
    the launch lifecycle action; at scale-in, unregister and let the instance go."""

    def __init__(
        self,
        config: Config,
        source: InstanceFactsSource,
        *,
        make_client: Callable[[str], Any] | None = None,
        soracom: Callable[[], Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.aws = config.aws
        self.vpg_id = config.soracom.vpg_id
        # The SORACOM client for the stale sweep (its own: the refresher thread has the agent's).
        self._soracom_factory = soracom
        self._soracom: Any = None
        self.routes = (
            RouteKeeper(self.aws.route_tables, clock=clock) if self.aws.route_tables else None
        )
        self.stale = Sweep() if self.aws.remove_stale_registrations else None
        self._swept_for: tuple[str, str] | None = None  # the registration last swept after
        self.source = source
        self.clock = clock
        self.sleep = sleep
        self._make_client = make_client or (
            lambda service: client(service, AwsTarget(self.source.region()))
        )
        self._clients: dict[str, Any] = {}
        self.done = _Done(source_dest_check=not self.aws.disable_source_dest_check)
        now = clock()
        self.launch = (
            LaunchGate(deadline_at=now + self.aws.lifecycle_deadline, last_heartbeat_at=now)
            if self.aws.launch_lifecycle_hook
            else None
        )
        self.problem: str | None = None  # the last AWS step that failed, for the log
        self.retry_at = 0.0

    @classmethod
    def for_config(
        cls,
        config: Config,
        source: InstanceFactsSource,
        soracom: Callable[[], Any] | None = None,
    ) -> AwsIntegration | None:
        """None when no [aws] flag needs the AWS API."""
        return cls(config, source, soracom=soracom) if config.aws.any_api_feature else None

    def to_json(self) -> dict[str, Any]:
        """The state document's "aws" object: the route claim's and the sweep's last result."""
        out: dict[str, Any] = {}
        if self.routes is not None:
            out["route_tables"] = self.routes.claim.to_json()
        if self.stale is not None:
            out["stale_registrations"] = self.stale.to_json()
        return out

    def client(self, service: str) -> Any:
        if service not in self._clients:
            self._clients[service] = self._make_client(service)
        return self._clients[service]

    def _hook(self, name: str, instance: InstanceFacts) -> Hook:
        assert self.aws.autoscaling_group is not None
        return Hook(self.aws.autoscaling_group, name, instance.instance_id)

    def _fail(self, message: str) -> None:
        if message != self.problem:
            log.error("%s", message)
        self.problem = message

    # ---- after a reconcile -------------------------------------------------------------

    def after_reconcile(self, healthy: bool, gate: GateView | None = None) -> None:
        """`healthy`: the reconcile ended with health "ok"; `gate`: the view the data path is
        built from. Never raises: AWS trouble is logged and retried after the next reconcile;
        the data path does not depend on it."""
        try:
            self._after_reconcile(healthy, gate)
        except Exception as exc:  # noqa: BLE001 - a bug here must not end the daemon's loop
            log.exception("aws: after the reconcile")
            self._fail(f"aws: unexpected {type(exc).__name__}: {exc}")
            self.retry_at = self.clock() + AWS_RETRY_S

    def _after_reconcile(self, healthy: bool, gate: GateView | None) -> None:
        if gate is not None:
            self._keep_routes(gate)
            self._sweep_stale(gate)
        if self.done.source_dest_check and (self.launch is None or self.launch.finished):
            return
        if self.clock() < self.retry_at:
            return
        instance = self.source.get()
        if instance is None:
            self._fail(f"aws: the [aws] flags need instance facts: {self.source.why_missing()}")
            return
        try:
            if healthy and not self.done.source_dest_check:
                if disable_source_dest_check(self.client("ec2"), instance.eni_id):
                    log.info("source/destination check turned off on %s", instance.eni_id)
                self.done.source_dest_check = True
            ready = healthy and self.done.source_dest_check
            self._launch_step(ready, instance)
        except AwsError as exc:
            self._fail(f"aws: {exc}")
            self.retry_at = self.clock() + AWS_RETRY_S
            if self.launch is not None and not self.launch.finished:
                # The prerequisite failed: the launch may still run out of time.
                try:
                    self._launch_step(False, instance)
                except AwsError as again:
                    self._fail(f"aws: {again}")
            return
        self.problem = None

    def _keep_routes(self, gate: GateView) -> None:
        """aws.route_tables: the device subnet's route on this instance's ENI."""
        if self.routes is None:
            return
        instance = self.source.get()
        if instance is None:
            message = (
                f"aws.route_tables: this instance's ENI is unknown: {self.source.why_missing()}"
            )
            self.routes.fail(message)
            self._fail(message)
            return
        if not self.routes.due(gate.device_subnet, instance.eni_id):
            return
        try:
            self.routes.keep(self.client("ec2"), gate.device_subnet, instance.eni_id)
        except AwsError as exc:
            self._fail(f"aws.route_tables: {exc}")

    def _sweep_stale(self, gate: GateView) -> None:
        """aws.remove_stale_registrations: once per registration (at start, and again when
        this peer's registration changed)."""
        if self.stale is None:
            return
        registration = (str(gate.outer), str(gate.inner))
        if registration == self._swept_for or self.clock() < self.retry_at:
            return
        from gatepeer.soracom import SoracomError

        instance = self.source.get()
        try:
            if instance is None:
                raise AwsError(f"the VPC is unknown: {self.source.why_missing()}")
            if self._soracom is None:
                if self._soracom_factory is None:
                    raise AwsError("no SORACOM API client to unregister with")
                self._soracom = self._soracom_factory()
            removed = sweep(
                self._soracom,
                self.client("ec2"),
                self.vpg_id,
                gate.outer,
                instance.vpc_id,
                instance.vpc_cidrs,
            )
        except (AwsError, SoracomError) as exc:
            self.stale.error = f"aws.remove_stale_registrations: {exc}"
            self.stale.checked_at = time.time()
            self._fail(self.stale.error)
            self.retry_at = self.clock() + AWS_RETRY_S
            return
        self.stale.removed += [str(a) for a in removed]
        self.stale.error = None
        self.stale.checked_at = time.time()
        self._swept_for = registration

    def _launch_step(self, ready: bool, instance: InstanceFacts) -> None:
        if self.launch is None or self.aws.launch_lifecycle_hook is None:
            return
        now = self.clock()
        step = self.launch.step(now, ready)
        hook = self._hook(self.aws.launch_lifecycle_hook, instance)
        if step == "continue":
            complete(self.client("autoscaling"), hook, "CONTINUE")
            self.launch.finished = "CONTINUE"
        elif step == "abandon":
            log.error(
                "not a working gate peer %.0fs after start (aws.lifecycle_deadline): "
                "abandoning the launch, Auto Scaling will replace this instance",
                self.aws.lifecycle_deadline,
            )
            complete(self.client("autoscaling"), hook, "ABANDON")
            self.launch.finished = "ABANDON"
        elif step == "heartbeat":
            heartbeat(self.client("autoscaling"), hook)
            self.launch.last_heartbeat_at = now

    def next_due(self) -> float | None:
        """Seconds until after_reconcile has something to do without a new reconcile."""
        if self.launch is None:
            return None
        now = self.clock()
        due = self.launch.next_due(now)
        return None if due is None else max(due, self.retry_at - now)

    # ---- scale-in ----------------------------------------------------------------------

    def on_termination(self, agent: _Agent) -> bool:
        """Unregister from SORACOM (teardown also unsets redirection when ours), then
        complete the termination hook with CONTINUE. True when the unregister succeeded."""
        instance = self.source.get()
        hook_name = self.aws.termination_lifecycle_hook
        hook = self._hook(hook_name, instance) if hook_name and instance else None
        unregistered = False
        for attempt in range(1, TERMINATION_ATTEMPTS + 1):
            try:
                _, messages = agent.teardown(unregister=True)
            except Exception as exc:  # noqa: BLE001 - any failure: try again, then let go
                log.error("scale-in: teardown failed (try %d): %s", attempt, exc)
                if attempt < TERMINATION_ATTEMPTS:
                    if hook is not None:
                        self._quiet(heartbeat, self.client("autoscaling"), hook)
                    self.sleep(TERMINATION_RETRY_S)
                continue
            for message in messages:
                log.info("scale-in: %s", message)
            unregistered = True
            break
        if hook is not None:
            self._quiet(complete, self.client("autoscaling"), hook, "CONTINUE")
        elif hook_name:
            self._fail(f"aws: cannot complete {hook_name}: {self.source.why_missing()}")
        return unregistered

    def _quiet(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except AwsError as exc:
            self._fail(f"aws: {exc}")


class TerminationWatcher(threading.Thread):
    """Polls IMDS for Auto Scaling's target state; calls `on_terminated` once on "Terminated"."""

    def __init__(
        self,
        imds: Callable[[], Imds],
        on_terminated: Callable[[], None],
        *,
        interval: float | None = None,
    ) -> None:
        super().__init__(name="termination-watcher", daemon=True)
        self._imds = imds
        self.on_terminated = on_terminated
        self.interval = TERMINATION_POLL_S if interval is None else interval
        self._stopping = threading.Event()
        self.last_error: str | None = None

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        try:
            imds = self._imds()  # one per thread
        except AwsError as exc:  # a malformed AWS_EC2_METADATA_SERVICE_ENDPOINT
            self.last_error = str(exc)
            log.error("scale-in watch: %s", exc)
            return
        while not self._stopping.is_set():
            try:
                state = imds.target_lifecycle_state()
            except AwsError as exc:
                if str(exc) != self.last_error:
                    log.warning("scale-in watch: %s", exc)
                self.last_error = str(exc)
            else:
                self.last_error = None
                if state == TERMINATED:
                    log.warning("Auto Scaling is terminating this instance: leaving SORACOM")
                    self.on_terminated()
                    return
            self._stopping.wait(self.interval)
