"""conntrackd beside keepalived (gatepeer.ha.conntrackd): conntrackd.conf rendered from [ha]
(golden file; conntrackd's own parser accepts it and refuses a broken one), the primary-backup
handover run on role changes in order and before the claim, and sync health from `conntrackd -s`
outputs recorded from a real conntrackd 1.4.7 pair in two namespaces (tests/golden/ha/conntrackd/).

GATEPEER_UPDATE_GOLDEN=1 rewrites tests/golden/ha/conntrackd/ha-pair.conf.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from gatepeer.config import Config, parse
from gatepeer.ha import install
from gatepeer.ha.check import evaluate_sync
from gatepeer.ha.conntrackd import (
    HANDOVER,
    Conntrackd,
    SyncConfigError,
    SyncFacts,
    SyncHealth,
    SyncReadError,
    SyncTracker,
    conntrackd_test,
    parse_stats,
    problems,
    render,
)
from gatepeer.ha.fifo import Event
from gatepeer.ha.handover import RoleHandover
from gatepeer.ha.keepalived import RenderError
from gatepeer.ha.role import Coordinator, RoleView

RECORDED = Path(__file__).parents[1] / "golden" / "ha" / "conntrackd"
SORACOM = {"auth_key_id": "keyId-testtesttest", "vpg_id": "vpg-0123abcd"}
LOCAL = ipaddress.IPv4Address("198.18.0.10")
FACTS = SyncFacts(LOCAL, "eth0", ipaddress.IPv4Network("198.19.128.0/17"), 524_288)


def ha_config(**ha: Any) -> Config:
    return parse({"soracom": SORACOM, "ha": {"peer_address": "198.18.0.11", **ha}})


def conntrackd_missing() -> str | None:
    return None if shutil.which("conntrackd") else "conntrackd is not installed"


# ---- the file ----------------------------------------------------------------------------


def test_render_matches_golden_file() -> None:
    cfg = ha_config(snat_address="198.18.0.12")
    assert cfg.ha is not None
    text = render(cfg.ha, FACTS)
    path = RECORDED / "ha-pair.conf"
    if os.environ.get("GATEPEER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_rendered_values_follow_the_config() -> None:
    cfg = ha_config(sync_port=3999, conntrackd_socket="/run/lab/peer2.ctl")
    assert cfg.ha is not None
    lines = [ln.strip() for ln in render(cfg.ha, FACTS).splitlines()]
    assert "Mode FTFW {" in lines and "DisableExternalCache Off" in lines
    assert "IPv4_address 198.18.0.10" in lines  # the sync's source: this peer
    assert "IPv4_Destination_Address 198.18.0.11" in lines  # unicast to the other
    assert "Port 3999" in lines and "Interface eth0" in lines
    assert "Path /run/lab/peer2.ctl" in lines and "LockFile /run/lab/peer2.lock" in lines
    assert "IPv4_address 198.19.128.0/17" in lines  # only the device subnet's flows
    assert "HashLimit 1048576" in lines  # twice the kernel's table
    assert "Filter From Userspace {" in lines  # the kernel-space filter let nothing through


def test_render_refuses_our_own_address_as_peer() -> None:
    cfg = ha_config()
    assert cfg.ha is not None
    own = SyncFacts(ipaddress.IPv4Address("198.18.0.11"), "eth0", FACTS.device_subnet, 65536)
    with pytest.raises(SyncConfigError, match=r"^ha\.peer_address: 198\.18\.0\.11 is this host"):
        render(cfg.ha, own)


def test_conntrackd_accepts_the_rendered_file() -> None:
    if conntrackd_missing():
        pytest.skip(conntrackd_missing())
    cfg = ha_config(snat_address="198.18.0.12")
    assert cfg.ha is not None
    assert conntrackd_test(render(cfg.ha, FACTS)) is None


def test_conntrackd_test_reports_what_it_refuses() -> None:
    """The validator must be able to fail: a file conntrackd's parser refuses comes back with
    the line it names."""
    if conntrackd_missing():
        pytest.skip(conntrackd_missing())
    cfg = ha_config()
    assert cfg.ha is not None
    text = render(cfg.ha, FACTS)
    complaint = conntrackd_test(text.replace("IPv4_address 198.18.0.10", "IPv4_address 198.18.0"))
    assert complaint is not None and "parsing config file in line (7)" in complaint
    complaint = conntrackd_test(text.replace("Checksum on", "Checksum maybe"))
    assert complaint is not None and "parsing config file" in complaint


def state_with_gate(subnet: str = "198.19.128.0/17") -> dict[str, Any]:
    return {
        "host": {"local_address": "198.18.0.10", "underlay": "ens5"},
        "gate": {
            "vpg_id": "vpg-0123abcd",
            "vni": 10,
            "device_subnet": subnet,
            "gate_opened": True,
            "inner": "198.19.128.5/17",
            "endpoints": [{"outer": "100.64.0.1", "inner": None}],
            "outer": "198.18.0.10",
            "redirection": None,
        },
    }


def test_sync_facts_from_config_and_state() -> None:
    cfg = ha_config()
    facts = install.sync_facts_for(cfg, state_with_gate())
    assert facts == SyncFacts(LOCAL, "ens5", ipaddress.IPv4Network("198.19.128.0/17"), 524_288)


@pytest.mark.parametrize(
    ("ha", "state", "message"),
    [
        ({"conntrack_sync": False}, state_with_gate(), r"^ha\.conntrack_sync: false"),
        ({}, {"host": state_with_gate()["host"]}, r"device subnet is unknown"),
        ({}, {"gate": state_with_gate()["gate"]}, r"^tunnel\.local_address: unknown"),
    ],
)
def test_sync_facts_that_cannot_be_known_say_why(
    ha: dict[str, Any], state: dict[str, Any], message: str
) -> None:
    with pytest.raises(RenderError, match=message):
        install.sync_facts_for(ha_config(**ha), state)


# ---- the handover ------------------------------------------------------------------------


class FakeRunner:
    """Records each argv; the flags in `fail` exit 1 with a message."""

    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.calls: list[list[str]] = []
        self.fail = set(fail)

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        code = 1 if argv[-1] in self.fail else 0
        return subprocess.CompletedProcess(list(argv), code, "", "ERROR: can't connect\n")

    def flags(self) -> list[str]:
        return [argv[-1] for argv in self.calls]


def test_handover_runs_primary_backup_steps_in_order() -> None:
    """conntrack-tools' primary-backup.sh: master -c -f -R -B; backup -t -n; fault -t."""
    runner = FakeRunner()
    ctl = Conntrackd(Path("/etc/conntrackd/conntrackd.conf"), run=runner)
    assert ctl.handover("master") == []
    assert runner.flags() == ["-c", "-f", "-R", "-B"]
    assert all(c[1:3] == ["-C", "/etc/conntrackd/conntrackd.conf"] for c in runner.calls)
    for role, flags in (
        ("backup", ["-t", "-n"]),
        ("fault", ["-t"]),
        ("stopped", []),  # a gracefully stopping master forwards until the VPG moves
        ("unknown", []),
    ):
        runner.calls.clear()
        ctl.handover(role)
        assert runner.flags() == flags
    assert set(HANDOVER) == {"master", "backup", "fault", "stopped"}


def test_a_failed_step_is_reported_and_the_rest_still_run() -> None:
    runner = FakeRunner(fail=["-c"])
    failures = Conntrackd(Path("/c.conf"), run=runner).handover("master")
    assert runner.flags() == ["-c", "-f", "-R", "-B"]
    assert failures == [
        "conntrackd -c (commit the external cache into the kernel table) exited 1: "
        "ERROR: can't connect"
    ]


class FakeNat:
    """Records hold/release among the conntrackd calls."""

    def __init__(self, runner: FakeRunner) -> None:
        self.runner = runner

    def hold(self) -> list[str]:
        self.runner.calls.append(["hold"])
        return []

    def release(self) -> list[str]:
        self.runner.calls.append(["release"])
        return ["release failed"]


def test_the_nat_address_is_taken_right_after_the_commit_and_dropped_first() -> None:
    """Becoming master: commit the other's connections, then take the address (the replies
    come here from then on), then flush, resync and bulk send. Any other role: the address goes
    before conntrackd's steps. A failure is reported and the rest still run."""
    runner = FakeRunner()
    nat = FakeNat(runner)
    handover = RoleHandover(Conntrackd(Path("/c.conf"), run=runner), nat)  # type: ignore[arg-type]
    assert handover("master") == []
    assert runner.flags() == ["-c", "hold"]  # before the claim
    assert handover.after_claim("master") == []
    assert runner.flags() == ["-c", "hold", "-f", "-R", "-B"]
    for role, flags in (
        ("backup", ["release", "-t", "-n"]),
        ("fault", ["release", "-t"]),
        ("stopped", ["release"]),
        ("unknown", []),
    ):
        runner.calls.clear()
        failures = handover(role)
        assert handover.after_claim(role) == []  # nothing after a claim there is not
        assert runner.flags() == flags
        assert failures == (["release failed"] if flags else [])
    # Without conntrackd (ha.conntrack_sync off), the address alone; without it, conntrackd alone.
    runner.calls.clear()
    assert RoleHandover(None, nat)("master") == []  # type: ignore[arg-type]
    assert runner.flags() == ["hold"]
    runner.calls.clear()
    alone = RoleHandover(Conntrackd(Path("/c.conf"), run=runner), None)
    assert alone("master") == [] and alone.after_claim("master") == []
    assert runner.flags() == ["-c", "-f", "-R", "-B"]


def test_the_coordinator_claims_between_the_handover_and_what_comes_after() -> None:
    order: list[str] = []
    c = Coordinator(
        lambda: order.append("claim"),
        handover=lambda role: order.append(f"handover {role}") or [],
        after_claim=lambda role: order.append(f"after {role}") or ["-B failed"],
    )
    c.handle([Event("INSTANCE", "gatepeer", "MASTER", 100)])
    assert order == ["handover master", "claim", "after master"]
    assert c.view().handover_error == "-B failed"


def test_coordinator_hands_over_once_per_role_change_before_the_claim() -> None:
    order: list[str] = []
    c = Coordinator(
        lambda: order.append("claim"),
        handover=lambda role: order.append(f"handover {role}") or [],
    )
    c.handle([Event("INSTANCE", "gatepeer", "BACKUP", 100)])
    c.handle([Event("INSTANCE", "gatepeer", "BACKUP", 100)])  # no change: nothing
    c.handle([Event("INSTANCE", "gatepeer", "MASTER", 100)])
    c.handle([Event("INSTANCE", "gatepeer", "MASTER_RX_LOWER_PRI", 100)])  # re-claim only
    assert order == ["handover backup", "handover master", "claim", "claim"]
    # A stale MASTER followed by BACKUP in one read: the role ends where it was, nothing runs.
    order.clear()
    c.handle(
        [Event("INSTANCE", "gatepeer", "BACKUP", 100), Event("INSTANCE", "gatepeer", "FAULT", 0)]
    )
    assert order == ["handover fault"]


def test_handover_failures_are_shown_but_the_claim_still_happens() -> None:
    claimed: list[bool] = []
    c = Coordinator(lambda: claimed.append(True), handover=lambda role: ["conntrackd -c failed"])
    c.handle([Event("INSTANCE", "gatepeer", "MASTER", 100)])
    assert claimed == [True]
    view = c.view()
    assert view.handover_error == "conntrackd -c failed"
    assert RoleView.from_json(view.to_json()).handover_error == "conntrackd -c failed"


# ---- sync health ---------------------------------------------------------------------------


def test_parse_recorded_stats() -> None:
    master = parse_stats((RECORDED / "stats-master.txt").read_text())
    assert (master.internal_entries, master.external_entries) == (4, 0)
    assert (master.messages_sent, master.messages_received, master.errors) == (233, 231, 0)
    backup = parse_stats((RECORDED / "stats-backup.txt").read_text())
    assert (backup.internal_entries, backup.external_entries) == (0, 3)
    committed = parse_stats((RECORDED / "stats-after-commit.txt").read_text())
    assert (committed.internal_entries, committed.external_entries) == (3, 0)
    down = parse_stats((RECORDED / "stats-link-down.txt").read_text())
    assert (down.send_errors, down.receive_errors, down.errors) == (3, 0, 3)
    assert down.messages_sent == 262 and down.messages_received == 232


def test_parse_refuses_an_answer_without_sync() -> None:
    text = (RECORDED / "stats-master.txt").read_text()
    cut = text[: text.index("UDP traffic")]
    with pytest.raises(ValueError, match="no UDP traffic, message tracking"):
        parse_stats(cut)


def stats_text(received: int, errors: int = 0, internal: int = 1, external: int = 2) -> str:
    """A recorded answer with the counters this test moves."""
    text = (RECORDED / "stats-after-commit.txt").read_text()
    text = text.replace(
        "271 Pckts sent                  272 Pckts recv", f"1 Pckts sent {received} Pckts recv"
    )
    text = text.replace("0 Error send", f"{errors} Error send")
    text = text.replace(
        "current active connections:\t           3", f"current active connections:\t{internal}", 1
    )
    return text.replace(
        "current active connections:\t           0", f"current active connections:\t{external}", 1
    )


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_tracker_dates_the_last_message_by_the_received_count() -> None:
    answers = iter([stats_text(10), stats_text(10), stats_text(11)])
    clock = Clock()
    tracker = SyncTracker(lambda: next(answers), clock)
    first = tracker.update()
    assert first.last_message_at == 1000.0 and first.external_entries == 2
    clock.now = 1003.0
    assert tracker.update().last_message_at == 1000.0  # nothing new arrived
    assert problems(tracker.health(), 1003.0) == []
    assert problems(tracker.health(), 1006.0) == [
        "sync: no message from the other peer's conntrackd for 6 s"
    ]
    clock.now = 1004.0
    assert tracker.update().last_message_at == 1004.0


def test_tracker_keeps_the_last_counts_when_conntrackd_stops_answering() -> None:
    answers: list[str | Exception] = [stats_text(5), SyncReadError("conntrackd -s: can't connect")]

    def read() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = Clock()
    tracker = SyncTracker(read, clock)
    tracker.update()
    clock.now = 1001.0
    health = tracker.update()
    assert health.error == "conntrackd -s: can't connect" and health.external_entries == 2
    assert problems(health, 1001.0) == [
        "sync: conntrackd does not answer (conntrackd -s: can't connect)"
    ]


def test_growing_errors_degrade_for_a_while() -> None:
    answers = iter([stats_text(5), stats_text(6, errors=3), stats_text(7, errors=3)])
    clock = Clock()
    tracker = SyncTracker(lambda: next(answers), clock)
    tracker.update()
    clock.now = 1001.0
    tracker.update()
    clock.now = 1002.0
    health = tracker.update()
    assert health.errors_at == 1001.0
    assert problems(health, 1002.0) == ["sync: 3 send/receive errors, the last 1 s ago"]
    assert problems(health, 1001.0 + 61) != []  # silent by then, but the errors are old
    assert all("errors" not in p for p in problems(health, 1001.0 + 61))


def test_sync_health_round_trips_through_the_state_document() -> None:
    health = SyncHealth(1000.0, None, 3, 4, 10, 0, 0, 999.0, None)
    view = RoleView(role="backup", sync=health)
    assert RoleView.from_json(view.to_json()).sync == health
    assert SyncHealth.from_json({"read_at": "x"}) is None
    assert RoleView.from_json({"role": "backup", "sync": [1]}).sync is None


def test_check_sync_judges_the_daemons_reading() -> None:
    fresh = RoleView(sync=SyncHealth(1000.0, None, 3, 4, 10, 0, 0, 999.5, None)).to_json()
    assert evaluate_sync(fresh, 1002.0, fresh_for=5.0) == []
    assert evaluate_sync(fresh, 1010.0, fresh_for=5.0) == [
        "sync: the daemon's last reading of conntrackd is 10 s old"
    ]
    silent = RoleView(sync=SyncHealth(1000.0, None, 3, 4, 10, 0, 0, 990.0, None)).to_json()
    assert evaluate_sync(silent, 1000.0, fresh_for=5.0) == [
        "sync: no message from the other peer's conntrackd for 10 s"
    ]
    assert evaluate_sync({"role": "backup"}, 1000.0, 5.0)[0].startswith("sync: the daemon")


def test_check_sync_on_the_master_counts_only_a_conntrackd_that_does_not_answer() -> None:
    """A master whose peer is gone hears no sync and gets send errors; lowering its priority
    then would hand the role to the returning peer before that one has resynced."""
    silent = SyncHealth(1000.0, None, 3, 4, 10, 5, 0, 990.0, 999.0)
    as_master = RoleView(role="master", sync=silent).to_json()
    assert evaluate_sync(as_master, 1000.0, fresh_for=5.0) == []
    as_backup = RoleView(role="backup", sync=silent).to_json()
    assert len(evaluate_sync(as_backup, 1000.0, fresh_for=5.0)) == 2
    dead = RoleView(role="master", sync=SyncHealth(1000.0, "conntrackd -s: refused")).to_json()
    assert evaluate_sync(dead, 1000.0, fresh_for=5.0) == [
        "sync: conntrackd does not answer (conntrackd -s: refused)"
    ]
    stale = RoleView(role="master", sync=silent).to_json()
    assert evaluate_sync(stale, 1010.0, fresh_for=5.0)[0].startswith("sync: the daemon's last")


# ---- the commands ------------------------------------------------------------------------


def write_config(tmp_path: Path, ha: str, *, interface: str = "eth0") -> Path:
    import json

    key = tmp_path / "auth-key"
    key.write_text("secret\n")
    key.chmod(0o600)
    (tmp_path / "state.json").write_text(json.dumps({"format": 1, **state_with_gate()}))
    path = tmp_path / "gatepeer.toml"
    path.write_text(
        f'[soracom]\nauth_key_id = "keyId-x"\nauth_key_file = "{key}"\nvpg_id = "vpg-1"\n'
        f'[tunnel]\nlocal_address = "198.18.0.10"\nunderlay_interface = "{interface}"\n'
        f'[agent]\nstate_file = "{tmp_path / "state.json"}"\n[ha]\npeer_address = "198.18.0.11"\n'
        f"{ha}"
    )
    return path


def gatepeer(*args: str) -> subprocess.CompletedProcess[str]:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gatepeer", *args], capture_output=True, text=True, timeout=60
    )


def test_ha_render_conntrackd_prints_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, 'snat_address = "198.18.0.12"\n')
    out = gatepeer("ha", "render", "--conntrackd", "--config", str(path))
    assert out.returncode == 0, out.stderr
    assert "IPv4_Destination_Address 198.18.0.11" in out.stdout
    assert "IPv4_address 198.19.128.0/17" in out.stdout  # from the recorded gate view
    off = write_config(tmp_path, "conntrack_sync = false\n")
    out = gatepeer("ha", "render", "--conntrackd", "--config", str(off))
    assert out.returncode == 2 and out.stderr.startswith(
        "gatepeer: config error: ha.conntrack_sync"
    )


def test_ha_install_writes_both_files_only_when_both_pass(tmp_path: Path) -> None:
    if conntrackd_missing() or not shutil.which("keepalived"):
        pytest.skip("keepalived or conntrackd is not installed")
    k, c = tmp_path / "keepalived.conf", tmp_path / "conntrackd.conf"
    files = ["--keepalived", str(k), "--conntrackd", str(c)]
    # keepalived refuses VRRP on lo: neither file is written.
    bad = write_config(tmp_path, 'snat_address = "198.18.0.12"\ninterface = "lo"\n')
    out = gatepeer("ha", "install", "--config", str(bad), *files)
    assert out.returncode == 1 and "keepalived -t refused" in out.stderr
    assert not k.exists() and not c.exists()
    good = write_config(tmp_path, 'snat_address = "198.18.0.12"\n')
    out = gatepeer("ha", "install", "--config", str(good), *files)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"wrote {k} (keepalived -t passed)",
        f"wrote {c} (conntrackd's parse passed)",
    ]
    # The NAT address is the daemon's to take (gatepeer/ha/handover.py); keepalived only
    # removes it, in its notify lines.
    holding = [ln for ln in k.read_text().splitlines() if "198.18.0.12" in ln]
    assert holding and all("notify_" in ln and "address del" in ln for ln in holding)
    assert "gatepeer_sync" in k.read_text()
    assert "Mode FTFW" in c.read_text()


def write_sync_state(tmp_path: Path, health: SyncHealth) -> None:
    import json

    state = {"format": 1, **state_with_gate(), "ha": RoleView(role="backup", sync=health).to_json()}
    (tmp_path / "state.json").write_text(json.dumps(state))


def test_check_sync_exit_codes(tmp_path: Path) -> None:
    import time

    from gatepeer.ha.check import run_sync

    path = write_config(tmp_path, "")
    now = time.time()
    write_sync_state(tmp_path, SyncHealth(now - 1, None, 3, 4, 10, 0, 0, now - 1.5, None))
    out = gatepeer("check", "--sync", "--config", str(path))
    assert (out.returncode, out.stdout.strip()) == (0, "sync healthy"), out.stderr
    write_sync_state(tmp_path, SyncHealth(now - 1, None, 3, 4, 10, 0, 0, now - 30, None))
    out = gatepeer("check", "--sync", "--config", str(path))
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "unhealthy: sync: no message from the other peer's conntrackd for 29 s"
    )
    # The same judgment in process, and a daemon that stopped reading: its reading ages.
    assert run_sync(path, clock=lambda: now + 60)[1].startswith(
        "unhealthy: sync: the daemon's last reading of conntrackd is 61 s old"
    )
    off = write_config(tmp_path, "conntrack_sync = false\n")
    assert run_sync(off) == (0, "sync not configured (ha.conntrack_sync is off)")


def test_watcher_reads_sync_once_a_second_and_shows_it_in_its_view(tmp_path: Path) -> None:
    from gatepeer.ha.watcher import HaWatcher

    reads: list[float] = []
    clock = Clock(0.0)

    def read() -> str:
        reads.append(clock.now)
        return stats_text(len(reads))

    watcher = HaWatcher(
        tmp_path / "ka.fifo", lambda: None, sync=SyncTracker(read, Clock(5000.0)), clock=clock
    )
    assert watcher.view().sync is None  # nothing read yet
    for t in (0.0, 0.5, 0.9, 1.0, 1.4, 2.1):
        clock.now = t
        watcher.read_sync()
    assert reads == [0.0, 1.0, 2.1]
    sync = watcher.view().sync
    assert sync is not None and sync.messages_received == 3 and sync.external_entries == 2
    plain = HaWatcher(tmp_path / "kb.fifo", lambda: None)
    plain.read_sync()
    assert plain.view().sync is None
