"""Auto Scaling lifecycle actions (botocore's Stubber: moto lacks CompleteLifecycleAction and
RecordLifecycleActionHeartbeat), the daemon's AWS steps after a reconcile (EC2 on moto), and
scale-in: the IMDS notice leads to unregister, and to unset redirection when it was ours."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from helpers.aws_fakes import ENI, INSTANCE, FakeImds, Moto, offline_aws_env, running_imds

from gatepeer.agent import Agent
from gatepeer.aws import integration as integration_module
from gatepeer.aws.clients import AwsTarget, client
from gatepeer.aws.integration import AwsIntegration, InstanceFactsSource, TerminationWatcher
from gatepeer.aws.lifecycle import (
    HEARTBEAT_INTERVAL_S,
    Hook,
    LaunchGate,
    LifecycleError,
    complete,
    heartbeat,
)
from gatepeer.config import AgentConfig, AwsConfig, Config, MetricsConfig, SoracomConfig
from gatepeer.desired_state import HostFacts
from gatepeer.kernel import nftables
from gatepeer.lab.emulator.model import EmulatorSettings
from gatepeer.lab.emulator.service import Emulator
from gatepeer.soracom import SoracomClient

REGION = "ap-northeast-1"
GROUP = "gatepeer-asg"
LAUNCH_HOOK = "gatepeer-launch"
TERMINATION_HOOK = "gatepeer-terminate"
INSTANCE_ID = INSTANCE["instance-id"]
DEADLINE = 600.0


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    offline_aws_env(monkeypatch, tmp_path)


@pytest.fixture
def autoscaling(offline: None) -> Iterator[tuple[Any, Any]]:
    """An Auto Scaling client whose answers are stubbed; nothing is sent anywhere."""
    from botocore.stub import Stubber

    asg = client("autoscaling", AwsTarget(REGION, endpoint_url="http://127.0.0.1:9"))
    with Stubber(asg) as stubber:
        yield asg, stubber
        stubber.assert_no_pending_responses()


def expect(stubber: Any, method: str, hook: str, **extra: Any) -> None:
    params = {
        "AutoScalingGroupName": GROUP,
        "LifecycleHookName": hook,
        "InstanceId": INSTANCE_ID,
        **extra,
    }
    stubber.add_response(method, {}, params)


# ---- the calls ---------------------------------------------------------------------------------


def test_complete_sends_the_hook_and_result(autoscaling: tuple[Any, Any]) -> None:
    asg, stubber = autoscaling
    expect(stubber, "complete_lifecycle_action", LAUNCH_HOOK, LifecycleActionResult="CONTINUE")
    expect(stubber, "complete_lifecycle_action", LAUNCH_HOOK, LifecycleActionResult="ABANDON")
    hook = Hook(GROUP, LAUNCH_HOOK, INSTANCE_ID)
    assert complete(asg, hook, "CONTINUE") is True
    assert complete(asg, hook, "ABANDON") is True


def test_heartbeat(autoscaling: tuple[Any, Any]) -> None:
    asg, stubber = autoscaling
    expect(stubber, "record_lifecycle_action_heartbeat", LAUNCH_HOOK)
    assert heartbeat(asg, Hook(GROUP, LAUNCH_HOOK, INSTANCE_ID)) is True


def test_no_waiting_action_is_not_an_error(autoscaling: tuple[Any, Any]) -> None:
    asg, stubber = autoscaling
    stubber.add_client_error(
        "complete_lifecycle_action",
        service_error_code="ValidationError",
        service_message=f"No active Lifecycle Action found with instance ID {INSTANCE_ID}",
        http_status_code=400,
    )
    assert complete(asg, Hook(GROUP, LAUNCH_HOOK, INSTANCE_ID), "CONTINUE") is False


def test_access_denied_names_the_permission(autoscaling: tuple[Any, Any]) -> None:
    asg, stubber = autoscaling
    stubber.add_client_error(
        "record_lifecycle_action_heartbeat",
        service_error_code="AccessDenied",
        service_message="User is not authorized",
        http_status_code=403,
    )
    with pytest.raises(LifecycleError) as err:
        heartbeat(asg, Hook(GROUP, LAUNCH_HOOK, INSTANCE_ID))
    assert str(err.value) == (
        f"autoscaling:RecordLifecycleActionHeartbeat for lifecycle hook {LAUNCH_HOOK}: "
        "access denied; the instance role needs autoscaling:RecordLifecycleActionHeartbeat"
    )


# ---- when: the pure decision -----------------------------------------------------------------


def test_launch_gate_steps() -> None:
    gate = LaunchGate(deadline_at=100.0 + DEADLINE, last_heartbeat_at=100.0)
    assert gate.step(110.0, healthy=False) == "wait"
    assert gate.next_due(110.0) == HEARTBEAT_INTERVAL_S - 10.0
    assert gate.step(100.0 + HEARTBEAT_INTERVAL_S, healthy=False) == "heartbeat"
    assert gate.step(100.0 + DEADLINE, healthy=False) == "abandon"
    assert gate.step(100.0 + DEADLINE + 1, healthy=True) == "continue"  # healthy wins
    gate.finished = "CONTINUE"
    assert gate.step(100.0 + DEADLINE + 2, healthy=False) == "done"
    assert gate.next_due(0.0) is None


# ---- after a reconcile: source/destination check, then CONTINUE; ABANDON past the deadline ---


@pytest.fixture
def fake_imds() -> Iterator[FakeImds]:
    with running_imds() as server:
        yield server


def ec2_sysfs(tmp_path: Path) -> Path:
    path = tmp_path / "sys" / "class" / "dmi" / "id" / "board_vendor"
    path.parent.mkdir(parents=True)
    path.write_text("Amazon EC2\n")
    return tmp_path / "sys"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclasses.dataclass
class Setup:
    integration: AwsIntegration
    ec2: Any
    eni_id: str
    stubber: Any
    clock: Clock


@pytest.fixture
def setup(
    moto: Moto,
    fake_imds: FakeImds,
    autoscaling: tuple[Any, Any],
    tmp_path: Path,
) -> Setup:
    moto.reset()
    ec2 = client("ec2", AwsTarget(REGION, endpoint_url=moto.url))
    vpc = ec2.create_vpc(CidrBlock="198.18.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="198.18.0.0/24")["Subnet"]["SubnetId"]
    eni_id = ec2.create_network_interface(SubnetId=subnet)["NetworkInterface"]["NetworkInterfaceId"]
    fake_imds.behaviour.data[f"{ENI}/interface-id"] = eni_id  # IMDS names moto's ENI
    aws = AwsConfig(
        imds_endpoint=fake_imds.url,
        imds_timeout=0.3,
        disable_source_dest_check=True,
        autoscaling_group=GROUP,
        launch_lifecycle_hook=LAUNCH_HOOK,
        lifecycle_deadline=DEADLINE,
    )
    config = dataclasses.replace(Config(), aws=aws)
    source = InstanceFactsSource(aws, sys_root=ec2_sysfs(tmp_path))
    asg, stubber = autoscaling
    clock = Clock()
    clients = {"ec2": ec2, "autoscaling": asg}
    integration = AwsIntegration(config, source, make_client=clients.__getitem__, clock=clock)
    return Setup(integration, ec2, eni_id, stubber, clock)


def check_on(s: Setup) -> bool:
    answer = s.ec2.describe_network_interface_attribute(
        NetworkInterfaceId=s.eni_id, Attribute="sourceDestCheck"
    )
    return bool(answer["SourceDestCheck"]["Value"])


def test_continue_after_the_first_healthy_reconcile(setup: Setup) -> None:
    s = setup
    s.clock.now += 5
    s.integration.after_reconcile(healthy=False)  # nothing yet: no call is stubbed
    assert check_on(s)
    expect(s.stubber, "complete_lifecycle_action", LAUNCH_HOOK, LifecycleActionResult="CONTINUE")
    s.integration.after_reconcile(healthy=True)
    assert not check_on(s)  # turned off before telling Auto Scaling we are ready
    s.stubber.assert_no_pending_responses()
    s.integration.after_reconcile(healthy=True)  # done: no second call (none is stubbed)
    s.integration.after_reconcile(healthy=False)
    assert s.integration.next_due() is None


def test_abandon_when_never_healthy_before_the_deadline(setup: Setup) -> None:
    s = setup
    expect(s.stubber, "record_lifecycle_action_heartbeat", LAUNCH_HOOK)
    s.clock.now += HEARTBEAT_INTERVAL_S
    s.integration.after_reconcile(healthy=False)
    s.stubber.assert_no_pending_responses()
    expect(s.stubber, "complete_lifecycle_action", LAUNCH_HOOK, LifecycleActionResult="ABANDON")
    s.clock.now += DEADLINE
    s.integration.after_reconcile(healthy=False)
    s.stubber.assert_no_pending_responses()
    assert check_on(s)  # never healthy, so never changed
    s.integration.after_reconcile(healthy=True)  # too late: nothing more is sent


def test_failed_source_dest_check_holds_the_launch(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    s = setup
    s.ec2.delete_network_interface(NetworkInterfaceId=s.eni_id)
    s.integration.after_reconcile(healthy=True)  # no CONTINUE stubbed: none must be sent
    assert f"ec2:DescribeNetworkInterfaceAttribute on {s.eni_id}" in caplog.text
    assert s.integration.problem is not None
    expect(s.stubber, "complete_lifecycle_action", LAUNCH_HOOK, LifecycleActionResult="ABANDON")
    s.clock.now += DEADLINE
    s.integration.after_reconcile(healthy=True)  # healthy but not a working peer in time


def test_a_failing_call_is_retried_later_not_at_once(setup: Setup) -> None:
    """A refused ABANDON must not make the daemon loop spin on a deadline already past."""
    s = setup
    s.stubber.add_client_error(
        "complete_lifecycle_action",
        service_error_code="AccessDenied",
        service_message="not authorized",
        http_status_code=403,
    )
    s.clock.now += DEADLINE
    s.integration.after_reconcile(healthy=False)
    assert s.integration.problem is not None and "CompleteLifecycleAction" in s.integration.problem
    assert s.integration.next_due() == integration_module.AWS_RETRY_S
    s.integration.after_reconcile(healthy=False)  # too soon: nothing sent (none is stubbed)
    expect(s.stubber, "complete_lifecycle_action", LAUNCH_HOOK, LifecycleActionResult="ABANDON")
    s.clock.now += integration_module.AWS_RETRY_S
    s.integration.after_reconcile(healthy=False)
    assert s.integration.launch is not None and s.integration.launch.finished == "ABANDON"


# ---- scale-in -----------------------------------------------------------------------------------


class TeardownNetlink:
    """No kernel here: the tunnel is already gone, so teardown only talks to the API."""

    def __init__(self, local: IPv4Address) -> None:
        self.local = local

    def host_facts(self, underlay: Any, local: Any) -> HostFacts:
        return HostFacts(
            underlay="ens5", underlay_index=2, underlay_mtu=9001, local_address=self.local
        )

    def interface_with_mac(self, mac: str) -> str | None:
        return "ens5"

    def observe_link(self, name: str) -> None:
        return None

    def delete_link(self, name: str) -> bool:
        return False

    def close(self) -> None:
        pass


LOCAL = IPv4Address(INSTANCE[f"{ENI}/local-ipv4s"].split()[0])


@dataclasses.dataclass
class Api:
    emulator: Emulator
    url: str


@pytest.fixture
def soracom() -> Iterator[Api]:
    with Emulator(EmulatorSettings()) as emulator:
        yield Api(emulator, emulator.start())


def scale_in_daemon(
    tmp_path: Path,
    soracom: Api,
    fake_imds: FakeImds,
    autoscaling: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    **aws: Any,
) -> Any:
    """A Daemon whose agent talks to the emulator, whose IMDS is the fake and whose Auto
    Scaling client is stubbed; no kernel state is read or changed."""
    from gatepeer.daemon import Daemon

    monkeypatch.setattr(nftables, "nft_available", lambda: False)
    emulator = soracom.emulator
    key = tmp_path / "key"
    key.write_text(emulator.settings.auth_key)
    key.chmod(0o600)
    # The peer manages the redirection (soracom.redirection = "self", where that setting exists):
    # then teardown releases it when it points here.
    managed = {"redirection": "self"} if _redirection_teardown_merged() else {}
    config = Config(
        soracom=SoracomConfig(
            endpoint=soracom.url,
            auth_key_id=emulator.settings.auth_key_id,
            auth_key_file=key,
            vpg_id=emulator.settings.vpg_id,
            **managed,
        ),
        agent=AgentConfig(state_file=tmp_path / "state.json", gate_cache=tmp_path / "gate.json"),
        aws=AwsConfig(
            imds_endpoint=fake_imds.url,
            imds_timeout=0.3,
            autoscaling_group=GROUP,
            termination_lifecycle_hook=TERMINATION_HOOK,
            **aws,
        ),
        metrics=MetricsConfig(listen=""),
    )
    daemon = Daemon(config, lambda: config)
    daemon.agent.close()
    agent = Agent(config, netlink=TeardownNetlink(LOCAL))  # type: ignore[arg-type]
    agent.instance = InstanceFactsSource(config.aws, sys_root=ec2_sysfs(tmp_path))
    agent._flowtable_supported = False  # no nft here; teardown asks for the host's facts
    daemon.agent = agent  # type: ignore[assignment]
    asg, _ = autoscaling
    daemon.aws = AwsIntegration(
        config, agent.instance, make_client=lambda service: asg, sleep=lambda s: None
    )
    return daemon


def wait_for(flag: Any, timeout: float = 5.0) -> None:
    done = threading.Event()
    deadline = threading.Timer(timeout, done.set)
    deadline.start()
    try:
        while not flag() and not done.is_set():
            done.wait(0.02)
    finally:
        deadline.cancel()
    assert flag(), "timed out"


def test_scale_in_notice_unregisters_then_continues(
    tmp_path: Path,
    soracom: Api,
    fake_imds: FakeImds,
    autoscaling: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon = scale_in_daemon(tmp_path, soracom, fake_imds, autoscaling, monkeypatch)
    emulator = soracom.emulator
    api: SoracomClient = daemon.agent.client
    api.register_gate_peer(emulator.settings.vpg_id, str(LOCAL))
    assert str(LOCAL) in [p.outer_ip for p in emulator.peers()]
    fake_imds.behaviour.data["autoscaling/target-lifecycle-state"] = "InService"
    monkeypatch.setattr("gatepeer.aws.integration.TERMINATION_POLL_S", 0.02)
    watcher = daemon._termination_watcher()
    assert isinstance(watcher, TerminationWatcher)
    try:
        threading.Event().wait(0.1)
        assert not daemon.terminating  # InService: keep going
        fake_imds.behaviour.data["autoscaling/target-lifecycle-state"] = "Terminated"
        wait_for(lambda: daemon.terminating)
    finally:
        watcher.stop()
    _, stubber = autoscaling
    expect(stubber, "complete_lifecycle_action", TERMINATION_HOOK, LifecycleActionResult="CONTINUE")
    daemon.leave()
    assert daemon.stopping
    assert str(LOCAL) not in [p.outer_ip for p in emulator.peers()]
    stubber.assert_no_pending_responses()  # CONTINUE was sent, after the unregister


def test_daemon_loop_continues_the_launch_then_leaves_at_scale_in(
    tmp_path: Path,
    soracom: Api,
    fake_imds: FakeImds,
    autoscaling: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wiring in Daemon.run: a healthy reconcile leads to the launch CONTINUE; the scale-in
    notice stops the loop after unregistering and completing the termination hook."""
    import signal

    from gatepeer.agent import ReconcileResult

    daemon = scale_in_daemon(
        tmp_path,
        soracom,
        fake_imds,
        autoscaling,
        monkeypatch,
        launch_lifecycle_hook=LAUNCH_HOOK,
    )
    emulator = soracom.emulator
    daemon.agent.client.register_gate_peer(emulator.settings.vpg_id, str(LOCAL))
    fake_imds.behaviour.data["autoscaling/target-lifecycle-state"] = "InService"
    monkeypatch.setattr("gatepeer.aws.integration.TERMINATION_POLL_S", 0.02)
    steps: list[float] = []

    def healthy_step(now: float, next_refresh: float, interval: float) -> Any:
        steps.append(now)
        # Auto Scaling scales in right after this reconcile.
        fake_imds.behaviour.data["autoscaling/target-lifecycle-state"] = "Terminated"
        return ReconcileResult([], "ok", [], [], 0.0), now + interval

    monkeypatch.setattr(daemon, "step", healthy_step)
    _, stubber = autoscaling
    expect(stubber, "complete_lifecycle_action", LAUNCH_HOOK, LifecycleActionResult="CONTINUE")
    expect(stubber, "complete_lifecycle_action", TERMINATION_HOOK, LifecycleActionResult="CONTINUE")
    caught = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    handlers = {sig: signal.getsignal(sig) for sig in caught}
    stop = threading.Timer(10.0, lambda: setattr(daemon, "stopping", True))  # a safety net
    stop.start()
    try:
        assert daemon.run() == 0
    finally:
        stop.cancel()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert daemon.terminating and len(steps) == 1
    assert str(LOCAL) not in [p.outer_ip for p in emulator.peers()]
    stubber.assert_no_pending_responses()


def test_scale_in_still_continues_when_the_api_is_down(
    tmp_path: Path,
    soracom: Api,
    fake_imds: FakeImds,
    autoscaling: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Auto Scaling must not wait out the hook's timeout because SORACOM is unreachable."""
    daemon = scale_in_daemon(tmp_path, soracom, fake_imds, autoscaling, monkeypatch)
    emulator = soracom.emulator
    api: SoracomClient = daemon.agent.client
    api.register_gate_peer(emulator.settings.vpg_id, str(LOCAL))
    api.attempts = 1
    emulator.set_faults(fail_next=100, fail_status=503)
    _, stubber = autoscaling
    for _ in range(2):  # between the three tries
        expect(stubber, "record_lifecycle_action_heartbeat", TERMINATION_HOOK)
    expect(stubber, "complete_lifecycle_action", TERMINATION_HOOK, LifecycleActionResult="CONTINUE")
    assert daemon.aws.on_termination(daemon.agent) is False
    assert "scale-in: teardown failed (try 3)" in caplog.text
    stubber.assert_no_pending_responses()


def _redirection_teardown_merged() -> bool:
    return hasattr(SoracomClient, "unset_redirection")


def set_redirection(api: SoracomClient, vpg: str, gateway: str) -> None:
    api._call(
        "setRedirectionConfiguration",
        "POST",
        api._vpg_path(vpg, "/junction/set_redirection"),
        {"gateway": gateway, "enabled": True},
    )


def scale_in_with_redirection(
    ours: bool,
    tmp_path: Path,
    soracom: Api,
    fake_imds: FakeImds,
    autoscaling: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, Any]:
    """Register, point redirection at us (or at someone else), get the notice, leave."""
    daemon = scale_in_daemon(tmp_path, soracom, fake_imds, autoscaling, monkeypatch)
    emulator = soracom.emulator
    api: SoracomClient = daemon.agent.client
    vpg = emulator.settings.vpg_id
    peer = api.register_gate_peer(vpg, str(LOCAL))
    gateway = peer["innerIpAddress"] if ours else emulator.settings.endpoints[0].inner_ip
    set_redirection(api, vpg, gateway)
    _, stubber = autoscaling
    expect(stubber, "complete_lifecycle_action", TERMINATION_HOOK, LifecycleActionResult="CONTINUE")
    daemon._on_terminated()
    daemon.leave()
    assert str(LOCAL) not in [p.outer_ip for p in emulator.peers()]
    return gateway, emulator.state().get("redirection")


@pytest.mark.xfail(
    not _redirection_teardown_merged(),
    reason="Agent.teardown(unregister=True) unsets redirection once the redir branch "
    "(SoracomClient.unset_redirection) is merged",
    strict=True,
)
def test_scale_in_unsets_redirection_when_ours(
    tmp_path: Path,
    soracom: Api,
    fake_imds: FakeImds,
    autoscaling: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, redirection = scale_in_with_redirection(
        True, tmp_path, soracom, fake_imds, autoscaling, monkeypatch
    )
    assert redirection is None


def test_scale_in_leaves_someone_elses_redirection(
    tmp_path: Path,
    soracom: Api,
    fake_imds: FakeImds,
    autoscaling: tuple[Any, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, redirection = scale_in_with_redirection(
        False, tmp_path, soracom, fake_imds, autoscaling, monkeypatch
    )
    assert redirection is not None and redirection["gateway"] == gateway
