"""The flow log on the real kernel (issue 19): the lab's gate peer in nat mode, and in route
mode (where the flow log makes the packet path track device flows), runs `gatepeer run` with
[flow_log] on; a device opens one TCP connection and one UDP exchange to the VPC
host; their conntrack entries are then deleted (what their timeouts would do later), and the
log holds exactly four records, not the peer's own probes of the VPG endpoints: each
connection's "new" and "destroy", with the device, the VPC host, the ports, the peer's
address as the NAT address (nat mode; none in route mode) and, on destroy, the bytes each
way (exact for UDP: 28 bytes of headers plus the payload)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.lab_agent import METRICS_URL, running_agent
from helpers.packet_path import DEVICE, PEER, PORT, VPC_HOST, connect_and_see, popen

pytestmark = pytest.mark.netns

UDP_PORT = 5353
QUERY, ANSWER = b"q" * 40, b"a" * 300
UDP_SERVER = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], {UDP_PORT}))
print("ready", flush=True)
data, peer = s.recvfrom(2000)
s.sendto(b"a" * {len(ANSWER)}, peer)
"""
UDP_CLIENT = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[2], 0))
s.settimeout(5)
s.sendto(b"q" * {len(QUERY)}, (sys.argv[1], {UDP_PORT}))
print(len(s.recv(2000)), s.getsockname()[1])
"""


def _flow_log_metrics(lab: Any) -> dict[str, float]:
    """The flow log's counters, scraped from inside the peer's namespace (where it listens)."""
    code = (
        "import sys, urllib.request\n"
        f"sys.stdout.write(urllib.request.urlopen({METRICS_URL!r}, timeout=5).read().decode())\n"
    )
    text = lab.run("peer", sys.executable, "-c", code, check=False).stdout
    return {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("gatepeer_flow_log_records")
    }


def _wait_for(check: Any, what: str, log: Path, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except OSError:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}; the agent's log:\n{log.read_text()}"
            )
        time.sleep(0.2)


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("mode", ["nat", "route"])
def test_known_connections_make_exactly_their_records(make_lab, mode: str) -> None:
    lab = make_lab()
    flows = Path(lab.paths.dir) / "flows.jsonl"
    lab.set_config("packet_path", "mode", json.dumps(mode))
    lab.set_config("flow_log", "enabled", "true")
    lab.set_config("flow_log", "file", json.dumps(str(flows)))
    with running_agent(lab) as agent:
        lab.set_redirection("peer")  # once registered: devices' outbound traffic to the peer
        # The flow log starts after the first reconcile; its counters appear with it.
        _wait_for(
            lambda: "gatepeer_flow_log_records_total" in _flow_log_metrics(lab),
            "flow log",
            agent.log,
        )
        time.sleep(0.5)  # conntrack -E subscribed
        seen, _reply = connect_and_see(lab, "vpc", VPC_HOST, "dev", DEVICE)
        assert seen == (PEER if mode == "nat" else DEVICE)
        with popen(lab, "vpc", sys.executable, "-c", UDP_SERVER, VPC_HOST) as server:
            assert server.stdout is not None and server.stdout.readline().strip() == "ready"
            client = lab.run("dev", sys.executable, "-c", UDP_CLIENT, VPC_HOST, DEVICE)
        got, udp_port = (int(x) for x in client.stdout.split())
        assert got == len(ANSWER)
        # Their entries end now rather than after TIME_WAIT and the UDP timeout.
        lab.run("peer", "conntrack", "-D", "-s", DEVICE, check=False)
        _wait_for(lambda: len(_records(flows)) >= 4, "four records", agent.log)
        time.sleep(1.0)  # anything extra would show up by now
        assert agent.alive()
    records = _records(flows)
    shape = sorted(
        (r["event"], r["protocol"], r["device"], r["direction"], r["peer"], r["peer_port"])
        for r in records
    )
    assert shape == [
        ("destroy", "tcp", DEVICE, "from_device", VPC_HOST, PORT),
        ("destroy", "udp", DEVICE, "from_device", VPC_HOST, UDP_PORT),
        ("new", "tcp", DEVICE, "from_device", VPC_HOST, PORT),
        ("new", "udp", DEVICE, "from_device", VPC_HOST, UDP_PORT),
    ], records
    if mode == "nat":
        assert all(r["nat_address"] == PEER for r in records)
    else:  # route mode keeps the device's address: tracked (track_flows), not NATed
        assert all("nat_address" not in r for r in records)
    udp = next(r for r in records if r["protocol"] == "udp" and r["event"] == "destroy")
    assert udp["device_port"] == udp_port
    assert (udp["packets_from_device"], udp["bytes_from_device"]) == (1, 28 + len(QUERY))
    assert (udp["packets_to_device"], udp["bytes_to_device"]) == (1, 28 + len(ANSWER))
    tcp = next(r for r in records if r["protocol"] == "tcp" and r["event"] == "destroy")
    assert tcp["packets_from_device"] >= 3 and tcp["bytes_to_device"] > 0
    assert all("packets_from_device" not in r for r in records if r["event"] == "new")
    assert lab.paths.auth_key.read_text().strip() not in flows.read_text()
