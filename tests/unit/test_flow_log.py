"""The flow log: conntrack's event lines parsed, made into records (direction, NAT, bytes on
destroy), the peer's own connections (its probes too) left out, the rate limit counting what
it drops, the records written as JSON lines to a rotated file, nothing else in them; the
daemon's sysctl."""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from helpers.plan_inputs import FACTS, GATE, make_config

from gatepeer import flow_log
from gatepeer.config import FlowLogConfig
from gatepeer.desired_state import desired_state
from gatepeer.flow_logger import FlowLogger

# The peer's inner address and a VPG endpoint's: in the subnet, never devices.
SCOPE = flow_log.DeviceScope(
    IPv4Network("10.128.0.0/9"), frozenset({IPv4Address("10.128.0.3"), IPv4Address("10.128.0.1")})
)
NAMES = {IPv4Address("10.128.0.5"): "meter-005"}

NEW_TCP_NAT = (
    "[1796593110.955174]\t    [NEW] tcp      6 120 SYN_SENT src=10.128.0.5 dst=198.51.100.7 "
    "sport=40542 dport=443 [UNREPLIED] src=198.51.100.7 dst=172.31.5.10 sport=443 dport=40542 "
    "id=178016247\n"
)
DESTROY_TCP_NAT = (
    "[1796593112.500000]\t[DESTROY] tcp      6 src=10.128.0.5 dst=198.51.100.7 sport=40542 "
    "dport=443 packets=12 bytes=1830 src=198.51.100.7 dst=172.31.5.10 sport=443 dport=40542 "
    "packets=10 bytes=5120 [ASSURED] id=178016247\n"
)
DESTROY_UDP_TO_DEVICE = (
    "[1796593113.000000]\t[DESTROY] udp      17 src=198.51.100.20 dst=10.128.0.9 sport=5000 "
    "dport=161 packets=2 bytes=120 src=10.128.0.9 dst=198.51.100.20 sport=161 dport=5000 "
    "packets=1 bytes=300 id=1\n"
)
NEW_ICMP = (
    "[1796593114.000000]\t    [NEW] icmp     1 30 src=10.128.0.5 dst=198.51.100.7 type=8 "
    "code=0 id=77 [UNREPLIED] src=198.51.100.7 dst=10.128.0.5 type=0 code=0 id=77 id=5\n"
)
NOT_A_DEVICE = (
    "[1796593115.000000]\t    [NEW] tcp      6 120 SYN_SENT src=172.31.5.10 dst=198.51.100.9 "
    "sport=50000 dport=443 [UNREPLIED] src=198.51.100.9 dst=172.31.5.10 sport=443 "
    "dport=50000 id=9\n"
)


def make(text: str) -> dict[str, object] | None:
    event = flow_log.parse_event(text)
    assert event is not None
    return flow_log.record(event, SCOPE, NAMES.get)


def test_a_device_connection_through_nat_new_then_destroyed_with_bytes() -> None:
    assert make(NEW_TCP_NAT) == {
        "time": "2026-12-06T21:38:30.955Z",
        "event": "new",
        "protocol": "tcp",
        "device": "10.128.0.5",
        "sim": "meter-005",
        "direction": "from_device",
        "peer": "198.51.100.7",
        "device_port": 40542,
        "peer_port": 443,
        "nat_address": "172.31.5.10",
        "nat_port": 40542,
    }
    destroyed = make(DESTROY_TCP_NAT)
    assert destroyed is not None
    assert destroyed["event"] == "destroy"
    assert (destroyed["packets_from_device"], destroyed["bytes_from_device"]) == (12, 1830)
    assert (destroyed["packets_to_device"], destroyed["bytes_to_device"]) == (10, 5120)


def test_a_connection_opened_to_a_device_without_nat() -> None:
    fields = make(DESTROY_UDP_TO_DEVICE)
    assert fields is not None
    assert fields["direction"] == "to_device" and fields["device"] == "10.128.0.9"
    assert fields["sim"] is None and "nat_address" not in fields
    assert (fields["device_port"], fields["peer"], fields["peer_port"]) == (
        161,
        "198.51.100.20",
        5000,
    )
    # The device's bytes are the reply direction's here.
    assert (fields["bytes_from_device"], fields["bytes_to_device"]) == (300, 120)


def test_icmp_has_no_ports_and_no_nat() -> None:
    fields = make(NEW_ICMP)
    assert fields is not None
    assert fields["protocol"] == "icmp"
    assert "device_port" not in fields and "nat_address" not in fields


PROBE = (
    "[1796593116.000000]\t    [NEW] icmp     1 30 src=10.128.0.3 dst=10.128.0.1 type=8 "
    "code=0 id=7 [UNREPLIED] src=10.128.0.1 dst=10.128.0.3 type=0 code=0 id=7\n"
)


def test_the_peers_own_connections_and_other_lines_are_not_logged() -> None:
    assert make(NOT_A_DEVICE) is None
    assert make(PROBE) is None  # the peer's probe of a VPG endpoint's inner address
    assert flow_log.parse_event("conntrack v1.4.7 (conntrack-tools): 3 flow events\n") is None
    assert flow_log.parse_event("[1.0]\t[UPDATE] tcp 6 src=10.128.0.5 dst=1 \n") is None
    v6 = (
        "[1.0]\t    [NEW] tcp 6 120 SYN_SENT src=fd00::1 dst=fd00::2 sport=1 dport=2 "
        "src=fd00::2 dst=fd00::1 sport=2 dport=1\n"
    )
    assert flow_log.parse_event(v6) is None


def test_the_rate_limit_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    limit = flow_log.RateLimit(10, lambda: now[0])
    assert sum(limit.allow() for _ in range(50)) == 10
    now[0] = 0.5
    assert sum(limit.allow() for _ in range(50)) == 5


class NoEvents:
    def __init__(self, *_: object) -> None:
        self.started = False

    def start(self) -> None:
        self.started = True

    def running(self) -> bool:
        return self.started

    def stop(self) -> None:
        self.started = False


def test_records_go_to_a_rotated_file_rate_limited_with_a_count_of_the_dropped(
    tmp_path: Path,
) -> None:
    cfg = FlowLogConfig(
        enabled=True,
        file=tmp_path / "flows" / "flows.jsonl",
        file_max_bytes=2000,
        file_backups=2,
        rate_per_second=20,
    )
    logger = FlowLogger(cfg, lambda: SCOPE, NAMES.get, clock=lambda: 0.0, events=NoEvents)
    try:
        logger.ensure_running()
        for _ in range(30):
            logger.handle(NEW_TCP_NAT)
        logger.handle(NOT_A_DEVICE)
        logger.handle("garbage\n")
    finally:
        logger.stop()
    assert (logger.stats.written, logger.stats.dropped_rate_limit) == (20, 10)
    assert logger.stats.starts == 1
    files = sorted(p.name for p in (tmp_path / "flows").iterdir())
    assert files == ["flows.jsonl", "flows.jsonl.1", "flows.jsonl.2"]  # rotated, 2 kept
    for path in (tmp_path / "flows").iterdir():
        for text in path.read_text().splitlines():
            assert set(json.loads(text)) <= {
                "time",
                "event",
                "protocol",
                "device",
                "sim",
                "direction",
                "peer",
                "device_port",
                "peer_port",
                "nat_address",
                "nat_port",
                "packets_from_device",
                "bytes_from_device",
                "packets_to_device",
                "bytes_to_device",
            }


def test_nothing_is_logged_before_the_device_subnet_is_known(tmp_path: Path) -> None:
    cfg = FlowLogConfig(enabled=True, file=tmp_path / "f.jsonl")
    logger = FlowLogger(cfg, lambda: None, events=NoEvents)
    logger.handle(NEW_TCP_NAT)
    logger.stop()
    assert logger.stats.written == 0 and (tmp_path / "f.jsonl").read_text() == ""


@pytest.mark.parametrize("enabled", [True, False])
def test_the_flow_log_turns_conntrack_accounting_and_route_mode_tracking_on(enabled: bool) -> None:
    config = replace(make_config(), flow_log=FlowLogConfig(enabled=enabled))
    desired = desired_state(config, FACTS, GATE)
    wanted = {s.path: s.value for s in desired.sysctls}
    assert wanted.get("net/netfilter/nf_conntrack_acct") == (1 if enabled else None)
    # Route mode (the default) then tracks device flows, so the flow log sees them.
    assert desired.packet_path is not None
    assert desired.packet_path.track_flows is enabled
    assert desired.packet_path.tracked is True or not enabled


def test_the_daemon_runs_the_flow_log_as_its_config_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gatepeer import flow_logger
    from gatepeer.config import parse
    from gatepeer.daemon import Daemon

    monkeypatch.setattr(flow_logger, "ConntrackEvents", NoEvents)
    flows = tmp_path / "flows.jsonl"
    config = parse(
        {
            "soracom": {"auth_key_id": "keyId-test", "vpg_id": "vpg-test"},
            "agent": {"state_file": str(tmp_path / "state.json"), "gate_cache": ""},
            "metrics": {"listen": ""},
            "flow_log": {"enabled": True, "file": str(flows)},
        }
    )
    daemon = Daemon(config, lambda: config)
    daemon.agent.gate = GATE  # the helpers' gate view: devices in 198.19.0.0/16
    daemon._flow_log()
    logger = daemon.flow_logger
    assert logger is not None and logger.stats.starts == 1
    device = "[1796593110.9]\t    [NEW] udp 17 30 src=198.19.0.50 dst=198.51.100.7 sport=1 dport=2 "
    logger.handle(device + "[UNREPLIED] src=198.51.100.7 dst=198.19.0.50 sport=2 dport=1\n")
    probe = "[1796593111.0]\t    [NEW] icmp 1 30 src=198.19.0.3 dst=198.19.0.1 type=8 code=0 id=1 "
    logger.handle(probe + "[UNREPLIED] src=198.19.0.1 dst=198.19.0.3 type=0 code=0 id=1\n")
    daemon._flow_log()  # running: nothing to do
    assert logger.stats.starts == 1
    daemon.config = replace(config, flow_log=FlowLogConfig(enabled=False))
    daemon._flow_log()  # turned off by a reload
    assert daemon.flow_logger is None
    (record,) = [json.loads(x) for x in flows.read_text().splitlines()]
    assert (record["device"], record["peer"]) == ("198.19.0.50", "198.51.100.7")
    daemon.agent.close()
