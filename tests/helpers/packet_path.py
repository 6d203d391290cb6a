"""Traffic through a lab's gate peer: the lab's addresses, a TCP server and client in
namespaces, and the peer's nftables counters."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from gatepeer.kernel.nftables import counters

if TYPE_CHECKING:
    from conftest import LabHandle


PEER = "198.18.0.10"


VPC_HOST = "198.18.0.20"


DEVICE = "198.19.128.1"


PORT = 8000


# One TCP connection: prints "ready", then "peer ADDR" of whoever connects, answers with it.
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
print("ready", flush=True)
c, a = s.accept()
print("peer", a[0], flush=True)
c.sendall(("seen " + a[0]).encode())
c.close()
"""


CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5,
                             source_address=(sys.argv[3], 0))
print(s.recv(200).decode())
"""


def peer_counters(lab: LabHandle) -> dict[str, int]:
    return {name: packets for name, (packets, _b) in counters(netns=lab.ns("peer")).items()}


@contextlib.contextmanager
def popen(lab: LabHandle, role: str, *cmd: str) -> Iterator[subprocess.Popen[str]]:
    """A process in a lab namespace, stopped by its pid on the way out."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns(role), *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def connect_and_see(lab: LabHandle, server_role: str, server_addr: str, client_role: str,
                    source: str) -> tuple[str, str]:  # fmt: skip
    """A TCP connection from `source` in client_role to a server started in server_role: the
    peer address the server accepted, and what the client got back."""
    with popen(lab, server_role, sys.executable, "-c", SERVER, server_addr, str(PORT)) as srv:
        assert srv.stdout is not None
        assert srv.stdout.readline().strip() == "ready"
        client = lab.run(
            client_role, sys.executable, "-c", CLIENT, server_addr, str(PORT), source,
            check=False, timeout=15,
        )  # fmt: skip
        assert client.returncode == 0, f"client failed: {client.stderr}"
        line = srv.stdout.readline().split()
        assert line[:1] == ["peer"], line
        return line[1], client.stdout.strip()
