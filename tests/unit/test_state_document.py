"""The state document: built once from what the agent knows and the probes, judged once, and
read back by `status`, the metrics and `gatepeer check` as the same typed values."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gatepeer.desired_state import Endpoint, GateView, HostFacts, IPv4Address, IPv4Interface
from gatepeer.state_document import (
    AgentSnapshot,
    LastReconcile,
    ProbeResult,
    Probes,
    StateSummary,
    build,
)

A = IPv4Address
EP1 = Endpoint(A("198.18.1.11"), A("198.19.0.1"))
EP2 = Endpoint(A("198.18.1.12"), A("198.19.0.2"))
GATE = GateView.from_json(
    {
        "vpg_id": "vpg-1",
        "vni": 10,
        "device_subnet": "198.19.0.0/16",
        "gate_opened": True,
        "inner": "198.19.0.3/16",
        "outer": "198.18.0.10",
        "endpoints": [{"outer": str(e.outer), "inner": str(e.inner)} for e in (EP1, EP2)],
    }
)
FACTS = HostFacts("eth0", 2, 9001, A("198.18.0.10"), flowtable_supported=True)
CONVERGED = LastReconcile("ok", (), (), ("ip link set vxlan0 up",), 0.0123456789, None)
FAILED = LastReconcile("failed", ("cannot create vxlan0",), (), (), 0.5, "cannot create vxlan0")
UP, DOWN = ProbeResult("up", 0.0012345678, 0.1), ProbeResult("down", None, 1.0)


def record(**changes: Any) -> AgentSnapshot:
    base: dict[str, Any] = {
        "pid": 4242,
        "now": 1_760_000_000.0,
        "reconciled_at": 1_759_999_999.0,
        "config_file": "/etc/gatepeer/gatepeer.toml",
        "interface": "vxlan0",
        "redirection_mode": "unmanaged",
        "packet_path_mode": "route",
        "flowtable_allowed": True,
        "last": CONVERGED,
        "gate": GATE,
        "facts": FACTS,
        "owned_addresses": frozenset({IPv4Interface("198.19.0.3/16")}),
        "reconciles": 7,
        "failures": 1,
        "last_success_at": 1_759_999_999.0,
    }
    base.update(changes)
    return AgentSnapshot(**base)


def test_the_daemons_document_carries_the_endpoints_and_judges_them_once() -> None:
    doc = build(record(), probes=Probes({EP1.outer: UP, EP2.outer: DOWN}, frozenset({EP1.outer})))
    assert doc.data["health"] == "degraded"
    assert doc.data["reasons"] == [
        "VPG endpoint 198.18.1.12 (inner 198.19.0.2) does not answer probes through the tunnel"
    ]
    assert doc.data["endpoints"] == [
        {
            "outer": "198.18.1.11",
            "inner": "198.19.0.1",
            "fdb_present": True,
            "probe": {"state": "up", "rtt_s": 0.001235, "loss": 0.1, "error": None},
        },
        {
            "outer": "198.18.1.12",
            "inner": "198.19.0.2",
            "fdb_present": False,
            "probe": {"state": "down", "rtt_s": None, "loss": 1.0, "error": None},
        },
    ]
    # The reconcile's own verdict stays where it was recorded.
    assert doc.data["last_reconcile"]["health"] == "ok"
    assert (doc.summary.health, list(doc.summary.reasons)) == ("degraded", doc.data["reasons"])


def test_a_failed_reconcile_stays_failed_and_nobody_probing_leaves_its_verdict() -> None:
    failed = record(last=FAILED)
    probed = build(failed, probes=Probes({EP1.outer: UP, EP2.outer: UP}, None))
    assert probed.data["health"] == "failed"
    quiet = build(record(), probes=Probes(None, None))
    assert (quiet.data["health"], quiet.data["reasons"]) == ("ok", [])
    assert quiet.data["endpoints"][0]["probe"]["state"] == "unknown"
    assert quiet.data["endpoints"][0]["fdb_present"] is False
    # `apply` writes no endpoints: the document holds the reconcile's verdict.
    applied = build(failed)
    assert "endpoints" not in applied.data
    assert (applied.data["health"], applied.data["reasons"]) == ("failed", ["cannot create vxlan0"])


@pytest.mark.parametrize(
    "changes, probes, ha",
    [
        ({}, None, None),
        ({}, Probes({EP1.outer: UP, EP2.outer: DOWN}, frozenset({EP2.outer})), None),
        ({"last": None, "gate": None, "facts": None}, None, None),
        ({"last": FAILED, "refused_field": "vni", "gate_error": "refused"}, Probes({}, None), None),
        ({"redirection_mode": "self", "redirection_error": "503"}, Probes({}, frozenset()), None),
        ({}, Probes({EP1.outer: DOWN, EP2.outer: DOWN}, None), {"role": "backup"}),
        (
            {"managed_link": {"name": "vxlan0", "ifindex": 5, "vni": 10, "dst_port": 4789}},
            None,
            None,
        ),
    ],
)
def test_the_summary_built_is_what_a_reader_parses_from_the_file(
    changes: dict[str, Any], probes: Probes | None, ha: dict[str, Any] | None
) -> None:
    doc = build(record(**changes), probes=probes, ha=ha)
    on_disk = json.loads(json.dumps(doc.data))  # what atomic_json writes and a reader loads
    assert StateSummary.from_state(on_disk) == doc.summary
    assert doc.summary.damaged == ()
