"""What status and metrics show about HA: the status JSON object and line, the health reasons,
the other peer's inferred state, and the collector against a golden exposition file
(GATEPEER_UPDATE_GOLDEN=1 rewrites tests/golden/ha/ha.prom)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gatepeer.config import HaConfig
from gatepeer.ha.conntrackd import SyncHealth
from gatepeer.ha.fifo import Event
from gatepeer.ha.metrics import HaCollector
from gatepeer.ha.report import claims, line, lines, reasons, summary
from gatepeer.ha.role import Coordinator, RoleView

GOLDEN = Path(__file__).parents[1] / "golden" / "ha" / "ha.prom"
NOW = 1_760_000_000.0
HA = HaConfig(
    peer_address=ipaddress.IPv4Address("198.18.0.11"),
    virtual_address=ipaddress.IPv4Address("198.19.0.100"),
    route_tables=("rtb-0123abcd",),
)


def recorded(*states: str, claim_fails: bool = False, at: float = NOW - 30) -> dict[str, object]:
    """The "ha" object the daemon would write after these keepalived events."""

    def claim() -> None:
        if claim_fails:
            raise RuntimeError("API answered 503")

    c = Coordinator(claim, clock=lambda: at)
    c.handle([Event("INSTANCE", "gatepeer", s, 150) for s in states])
    return c.view().to_json()


def test_no_ha_section_shows_nothing() -> None:
    assert summary(None, recorded("MASTER"), NOW) is None
    assert reasons(None, None) == []


def test_master_summary() -> None:
    s = summary(HA, recorded("BACKUP", "MASTER"), NOW)
    assert s == {
        "role": "master",
        "since": NOW - 30,
        "for_s": 30.0,
        "priority": 150,
        "transitions": 2,
        "peer": {"address": "198.18.0.11", "state": "backup or down"},
        "claims": ["redirection", "virtual_address 198.19.0.100", "route_table rtb-0123abcd"],
        "claimed_at": NOW - 30,
        "claim_error": None,
        "handover_error": None,
        "snat_address": None,
        "connections_survive_failover": False,
        "connections_note": "nat mode's connections will not survive a failover: set "
        "ha.snat_address (the new master masquerades to its own address, which the VPC hosts "
        "have never seen)",
        # Sync is on by default; this record has no reading of conntrackd yet.
        "sync": {"state": "unknown", "problems": ["sync: no reading of conntrackd yet"]},
        "check": None,  # keepalived's verdict: status reads it (verdict.report)
    }
    assert reasons(HA, recorded("MASTER")) == []
    assert line(s) == (
        "ha            MASTER for 30 s, priority 150; peer 198.18.0.11 backup or down; "
        "claims redirection, virtual_address 198.19.0.100, route_table rtb-0123abcd"
    )


@pytest.mark.parametrize(
    ("states", "peer", "reason"),
    [
        (("BACKUP",), "master", None),
        (("MASTER", "FAULT"), "unknown", "ha: keepalived reports FAULT"),
        (("MASTER", "STOP"), "unknown", "ha: keepalived stopped"),
        ((), "unknown", "ha: no state from keepalived yet"),
        (("MASTER", "MASTER_RX_LOWER_PRI"), "master too (split brain, re-asserted)", None),
    ],
)
def test_peer_state_and_reasons(states: tuple[str, ...], peer: str, reason: str | None) -> None:
    s = summary(HA, recorded(*states), NOW)
    assert s is not None and s["peer"]["state"] == peer
    got = reasons(HA, recorded(*states))
    if reason is None:
        assert got == []
    else:
        assert len(got) == 1 and got[0].startswith(reason)


def test_split_brain_is_forgotten_after_a_while() -> None:
    s = summary(HA, recorded("MASTER", "MASTER_RX_LOWER_PRI", at=NOW - 3600), NOW)
    assert s is not None and s["peer"]["state"] == "backup or down"


def test_a_failing_claim_is_shown_and_degrades() -> None:
    rec = recorded("MASTER", claim_fails=True)
    s = summary(HA, rec, NOW)
    assert s is not None and s["claim_error"] == "API answered 503"
    assert reasons(HA, rec) == ["ha: master, but claiming the gateway failed: API answered 503"]
    assert line(s).endswith("; CLAIM FAILING: API answered 503")


def test_unreadable_record_is_unknown() -> None:
    s = summary(HA, "garbage", NOW)
    assert s is not None and s["role"] == "unknown" and s["for_s"] is None
    assert line(s).startswith("ha            UNKNOWN; peer 198.18.0.11 unknown")


def test_claims_follow_the_config() -> None:
    assert claims(HaConfig(peer_address=ipaddress.IPv4Address("198.18.0.11"))) == ["redirection"]


def expose(view: RoleView | None) -> str:
    registry = CollectorRegistry()
    registry.register(HaCollector(lambda: view))
    return generate_latest(registry).decode()


def test_collector_matches_golden_file() -> None:
    text = expose(RoleView.from_json(recorded("BACKUP", "MASTER", claim_fails=True)))
    if os.environ.get("GATEPEER_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_collector_exports_nothing_without_ha() -> None:
    assert expose(None) == ""


def test_collector_output_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    health = SyncHealth(NOW, None, 12, 340, 99, 3, 1, NOW - 1, NOW - 10)
    text = expose(RoleView.from_json({**recorded("MASTER"), "sync": health.to_json()}))
    assert "gatepeer_ha_sync_entries" in text
    out = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---- connections across a failover: snat_address and conntrackd's sync ----------------------

SNAT = dataclasses.replace(HA, snat_address=ipaddress.IPv4Address("198.18.0.12"))


def with_sync(rec: dict[str, object], health: SyncHealth) -> dict[str, object]:
    return {**rec, "sync": health.to_json()}


def test_without_snat_address_status_says_connections_will_not_survive() -> None:
    s = summary(HA, recorded("BACKUP"), NOW)
    assert s is not None and s["connections_survive_failover"] is False
    assert lines(s)[1].startswith(
        "ha sync       nat mode's connections will not survive a failover: set ha.snat_address"
    )
    off = dataclasses.replace(SNAT, conntrack_sync=False)
    s = summary(off, recorded("BACKUP"), NOW)
    assert s is not None and s["connections_survive_failover"] is False
    assert "ha.conntrack_sync is off" in s["connections_note"] and s["sync"] is None


def test_healthy_sync_is_shown_and_does_not_degrade() -> None:
    health = SyncHealth(NOW - 2, None, 12, 340, 99, 0, 0, NOW - 2.5, None)
    rec = with_sync(recorded("BACKUP"), health)
    s = summary(SNAT, rec, NOW)
    assert s is not None and s["connections_survive_failover"] is True
    assert s["claims"] == ["redirection", "snat_address 198.18.0.12", "virtual_address "
                           "198.19.0.100", "route_table rtb-0123abcd"]  # fmt: skip
    assert s["sync"] == {
        "state": "ok",
        "problems": [],
        "read_at": NOW - 2,
        "last_sync_age_s": 0.5,
        "internal_entries": 12,
        "external_entries": 340,
        "errors": 0,
        "lost": 0,
        "port": 3780,
    }
    assert reasons(SNAT, rec) == []
    assert lines(s)[1] == (
        "ha sync       OK: 12 own / 340 peer's flows, peer heard 0 s ago, 0 errors"
    )


def test_broken_sync_degrades_and_says_why() -> None:
    silent = SyncHealth(NOW, None, 12, 340, 99, 0, 0, NOW - 20, None)
    rec = with_sync(recorded("BACKUP"), silent)
    assert reasons(SNAT, rec) == ["ha: sync: no message from the other peer's conntrackd for 20 s"]
    s = summary(SNAT, rec, NOW)
    assert s is not None and s["sync"]["state"] == "broken"
    assert lines(s)[1].endswith("; sync: no message from the other peer's conntrackd for 20 s")
    down = SyncHealth(NOW, "conntrackd -s: can't connect")
    assert reasons(SNAT, with_sync(recorded("BACKUP"), down)) == [
        "ha: sync: conntrackd does not answer (conntrackd -s: can't connect)"
    ]


def test_sync_metrics_from_the_view() -> None:
    health = SyncHealth(NOW, None, 12, 340, 99, 3, 1, NOW - 1, NOW - 10)
    text = expose(RoleView(role="backup", sync=health))
    assert 'gatepeer_ha_sync_entries{cache="external"} 340.0' in text
    assert 'gatepeer_ha_sync_entries{cache="internal"} 12.0' in text
    assert "gatepeer_ha_sync_errors_total 3.0" in text
    assert "gatepeer_ha_sync_lost_messages_total 1.0" in text
    assert "gatepeer_ha_sync_up 1.0" in text
    assert "gatepeer_ha_sync_broken 1.0" in text  # errors 10 s ago
    assert f"gatepeer_ha_sync_last_message_timestamp_seconds {NOW - 1:.9e}" in text
    assert "gatepeer_ha_sync" not in expose(RoleView(role="backup"))


def test_keepalived_check_verdict_is_shown_with_its_reasons() -> None:
    ok = {"verdict": "ok", "reasons": [], "age_s": 0.4, "file": "/run/gatepeer/state.ha-check"}
    s = summary(HA, recorded("BACKUP"), NOW, ok)
    assert s is not None and s["check"] == ok
    assert lines(s)[2] == "ha check      OK (0 s ago)"
    failing = {**ok, "verdict": "fail", "reasons": ["no VPG endpoint answers its probe"]}
    s = summary(HA, recorded("FAULT"), NOW, failing)
    assert s is not None
    assert lines(s)[2] == "ha check      FAIL (0 s ago): no VPG endpoint answers its probe"
    missing = {**ok, "verdict": "missing", "age_s": None}
    s = summary(HA, recorded("FAULT"), NOW, missing)
    assert s is not None
    assert lines(s)[2] == (
        "ha check      missing: /run/gatepeer/state.ha-check (is the daemon running?)"
    )
    s = summary(HA, recorded("BACKUP"), NOW)
    assert s is not None and len(lines(s)) == 2  # not read: no line
