"""`gatepeer status` in a lab: the stdlib rtnetlink reader against iproute2, and the whole life:
never set up, applied, daemon running, one VPG endpoint cut off and restored (status and
metrics within two probe intervals), daemon gone, tunnel gone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

# ---- the stdlib rtnetlink reader against iproute2, in a lab -------------------------------------

RTNL_DUMP = """
import json
from gatepeer.kernel import rtnl
link = rtnl.link("vxlan0")
print(json.dumps({
    "link": {"index": link.index, "kind": link.kind, "mtu": link.mtu, "vni": link.vni,
             "local": str(link.local), "port": link.dst_port, "oper": link.oper_state,
             "up": link.admin_up, "rx_packets": link.stats.rx_packets},
    "addresses": [str(a) for a in rtnl.addresses(link.index)],
    "flood": sorted(str(a) for a in rtnl.flood_destinations(link.index)),
    "neighbours": rtnl.neighbour_count(link.index),
    "missing": rtnl.link("nosuchlink0") is None,
    "missing_flood": rtnl.flood_destinations_of("nosuchlink0"),
}))
"""


@pytest.mark.netns
def test_rtnl_reads_what_iproute2_shows(make_lab: Callable[..., Any]) -> None:
    from helpers.lab_agent import GATEPEER

    lab = make_lab()
    config = str(lab.paths.config)
    lab.run("peer", GATEPEER, "apply", "--config", config)
    lab.run("peer", "ping", "-c1", "-W2", str(lab.layout.endpoints[0].inner))  # a neighbour
    ours = json.loads(lab.run("peer", sys.executable, "-c", RTNL_DUMP).stdout)
    shown = json.loads(lab.run("peer", "ip", "-j", "-d", "-s", "link", "show", "vxlan0").stdout)[0]
    data = shown["linkinfo"]["info_data"]
    assert ours["link"]["index"] == shown["ifindex"]
    assert (ours["link"]["kind"], ours["link"]["vni"], ours["link"]["port"]) == (
        "vxlan", data["id"], data["port"]
    )  # fmt: skip
    assert ours["link"]["local"] == data["local"]
    assert ours["link"]["mtu"] == shown["mtu"]
    assert ours["link"]["oper"] == shown["operstate"].lower()
    assert ours["link"]["up"] and ours["link"]["rx_packets"] <= shown["stats64"]["rx"]["packets"]
    addrs = json.loads(lab.run("peer", "ip", "-j", "-4", "addr", "show", "dev", "vxlan0").stdout)
    assert ours["addresses"] == [f"{a['local']}/{a['prefixlen']}" for a in addrs[0]["addr_info"]]
    fdb = json.loads(lab.run("peer", "bridge", "-j", "fdb", "show", "dev", "vxlan0").stdout)
    assert ours["flood"] == sorted(
        e["dst"] for e in fdb if e["mac"] == "00:00:00:00:00:00" and "dst" in e
    )
    assert ours["flood"] == sorted(str(e.outer) for e in lab.layout.endpoints)
    neigh = json.loads(lab.run("peer", "ip", "-j", "-4", "neigh", "show", "dev", "vxlan0").stdout)
    assert ours["neighbours"] == len(neigh) >= 1
    assert ours["missing"] and ours["missing_flood"] is None


# ---- the whole life, in a lab -------------------------------------------------------------------


def _scrape(lab: Any) -> str:
    from helpers.lab_agent import METRICS_URL

    code = f"import urllib.request; print(urllib.request.urlopen({METRICS_URL!r}).read().decode())"
    return str(lab.run("peer", sys.executable, "-c", code).stdout)


def _until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `check()` held; fails after `timeout`."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:.1f} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.netns
def test_status_and_metrics_follow_the_gate_peer_through_its_life(
    make_lab: Callable[..., Any],
) -> None:
    from helpers.lab_agent import GATEPEER, PROBE_INTERVAL, running_agent

    lab = make_lab()
    config = str(lab.paths.config)

    def status() -> tuple[int, dict[str, Any]]:
        proc = lab.run("peer", GATEPEER, "status", "--json", "--config", config, check=False)
        return proc.returncode, json.loads(proc.stdout)

    code, report = status()
    assert code == 2
    assert report["reasons"][0].startswith("never set up")

    lab.run("peer", GATEPEER, "apply", "--config", config)
    code, report = status()
    assert (code, report["health"]) == (1, "degraded")  # set up, but nobody keeps it so
    assert report["tunnel"]["present"] and report["tunnel"]["oper_up"]

    secret = lab.paths.auth_key.read_text().strip()
    shown = lab.run("peer", GATEPEER, "status", "--config", config, check=False).stdout
    assert secret not in shown and secret not in json.dumps(report)
    cut = lab.layout.endpoints[1]
    with running_agent(lab) as agent:
        _until(lambda: status()[0] == 0, 10, "status ok with the daemon running")
        code, report = status()
        assert report["daemon"]["pid"] == agent.proc.pid
        assert [e["probe"]["state"] for e in report["endpoints"]] == ["up", "up"]
        assert all(e["fdb_present"] for e in report["endpoints"])
        assert os.path.basename(report["state_file"]["path"]) == "state.json"

        # The fabric side of the endpoint's link: the endpoint itself keeps its routes.
        lab.run("fabric", "ip", "link", "set", "dev", f"to-vpg{cut.index}", "down")
        cut_at = time.monotonic()
        try:
            _until(lambda: status()[0] == 1, 5, "status degraded")
            seen_by_status = time.monotonic() - cut_at
            code, report = status()
            assert any(str(cut.outer) in r for r in report["reasons"]), report["reasons"]
            states = {e["outer"]: e["probe"]["state"] for e in report["endpoints"]}
            assert states == {str(lab.layout.endpoints[0].outer): "up", str(cut.outer): "down"}
            text = _scrape(lab)
            seen_by_metrics = time.monotonic() - cut_at
            assert 'gatepeer_health{state="degraded"} 1.0' in text
            assert f'gatepeer_vpg_endpoint_up{{endpoint="{cut.outer}"}} 0.0' in text
            print(f"cut noticed: status {seen_by_status:.2f} s, metrics {seen_by_metrics:.2f} s")
            assert seen_by_metrics <= 2 * PROBE_INTERVAL + 0.5
        finally:
            lab.run("fabric", "ip", "link", "set", "dev", f"to-vpg{cut.index}", "up")
        restored = _until(lambda: status()[0] == 0, 2 * PROBE_INTERVAL + 0.5, "ok again")
        print(f"restore noticed: {restored:.2f} s")
        assert 'gatepeer_health{state="ok"} 1.0' in _scrape(lab)
        assert f'gatepeer_vpg_endpoint_up{{endpoint="{cut.outer}"}} 1.0' in _scrape(lab)

    code, report = status()
    assert (code, report["daemon"]["running"]) == (1, False)
    lab.run("peer", "ip", "link", "del", "vxlan0")
    code, report = status()
    assert code == 2
    assert "vxlan0 does not exist" in report["reasons"]
