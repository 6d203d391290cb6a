"""Issue 9, hole 1, in the lab: what devices may open on the gate peer itself.

`gatepeer apply` in the gate peer namespace, a listener bound to 0.0.0.0 there, and TCP
connections from the devices' namespace to the peer's inner address and to its VPC address:
refused (silently dropped and counted) unless the port is listed in
`[packet_path] host_services`; ping still works.

One lab for the whole story (building a lab is most of the cost). Every process a test starts
is stopped by its pid; the lab fixture removes the namespaces even on failure.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from conftest import LabHandle

from gatepeer.kernel.nftables import counters
from gatepeer.lab.network import netns

pytestmark = pytest.mark.netns

DEVICE = "198.19.128.1"  # the default lab's first device (its links' own addresses are not)
PEER_VPC_ADDRESS = "198.18.0.10"  # the peer's ENI address
BLOCKED_PORT = 8022  # stands for sshd, the metrics port, anything bound to 0.0.0.0
LISTED_PORT = 8053

# Accepts on every port in argv on 0.0.0.0 and closes each connection at once.
LISTENER = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(8)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.close()
"""

# Exit 0 when the connection is made, 1 when it times out or is refused.
CONNECT = """
import socket, sys
try:
    socket.create_connection(
        (sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]), source_address=(sys.argv[4], 0)
    ).close()
except OSError as exc:
    print(exc)
    sys.exit(1)
"""


@contextlib.contextmanager
def listener(lab: LabHandle, *ports: int) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("peer"), sys.executable, "-c", LISTENER, *map(str, ports)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield
    finally:
        proc.terminate()  # ours, by its Popen handle
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def connects(lab: LabHandle, address: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a device can open a TCP connection to address:port. A dropped SYN shows as a
    timeout, so `timeout` bounds what each refused attempt costs."""
    proc = lab.run(
        "dev", sys.executable, "-c", CONNECT, address, str(port), str(timeout), DEVICE,
        check=False, timeout=timeout + 10,
    )  # fmt: skip
    return proc.returncode == 0


def pings(lab: LabHandle, address: str) -> bool:
    proc = lab.run(
        "dev",
        "ping",
        "-n",
        "-q",
        "-I",
        DEVICE,
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "2",
        address,
        check=False,
    )
    return proc.returncode == 0


def dropped(lab: LabHandle) -> int:
    return counters(netns=lab.ns("peer"))["host_service_dropped"][0]


def apply(lab: LabHandle, host_services: list[str]) -> None:
    lab.set_config("packet_path", "host_services", json.dumps(host_services))
    proc = lab.gatepeer("apply")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def peer_inner_address(lab: LabHandle) -> str:
    for entry in netns.ip_json(lab.ns("peer"), "-4", "addr", "show", "dev", "vxlan0"):
        for info in entry.get("addr_info", []):
            return str(info["local"])
    raise AssertionError("vxlan0 has no IPv4 address in the peer namespace")


def send_device_traffic_outside_the_subnet_via_the_peer(lab: LabHandle) -> None:
    """Make the devices' traffic to addresses outside the device subnet (the peer's VPC
    address) reach the peer, as Junction redirection pointing at the peer does."""
    lab.set_redirection("peer")


def test_devices_open_only_listed_services_on_the_peer(make_lab) -> None:
    lab = make_lab()
    apply(lab, [])
    inner = peer_inner_address(lab)
    send_device_traffic_outside_the_subnet_via_the_peer(lab)

    assert pings(lab, inner), "a device cannot ping the peer's inner address"
    with listener(lab, BLOCKED_PORT, LISTED_PORT):
        # The control: the listener answers on the VPC side.
        assert lab.run(
            "vpc", sys.executable, "-c", CONNECT, PEER_VPC_ADDRESS, str(BLOCKED_PORT), "5",
            "198.18.0.20", check=False,
        ).returncode == 0, "the listener does not answer from the VPC"  # fmt: skip

        for address in (inner, PEER_VPC_ADDRESS):
            before = dropped(lab)
            assert not connects(lab, address, BLOCKED_PORT), f"a device opened {address}"
            assert dropped(lab) > before, f"the refused connection to {address} was not counted"

        apply(lab, [f"tcp/{LISTED_PORT}"])
        for address in (inner, PEER_VPC_ADDRESS):
            assert connects(lab, address, LISTED_PORT, timeout=5), f"{address}:{LISTED_PORT}"
            before = dropped(lab)
            assert not connects(lab, address, BLOCKED_PORT), f"{address}:{BLOCKED_PORT} opened"
            assert dropped(lab) > before
    assert pings(lab, inner), "ping stopped working after the reload"
