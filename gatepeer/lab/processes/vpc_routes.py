"""Route mode in the HA lab: an EC2 stand-in (moto's server, in the fabric namespace) holds the
VPC route table, and the lab's VPC router follows it, as a VPC does.

- moto listens on EC2_ADDR in the fabric namespace, which every lab namespace routes to (the
  gate peers reach it as they reach the SORACOM API emulator). The lab creates a VPC, one ENI
  per gate peer holding its VPC address, and a route table whose route for the device subnet
  targets peer 1's ENI.
- The follower (`python -m gatepeer.lab.processes.vpc_routes`, in the fabric namespace) asks
  moto for that route every FOLLOW_INTERVAL_S and points the VPC host's route for the device
  subnet at the address of the ENI the route targets. The VPC host's route is the lab's VPC router.
- The master's claim (ReplaceRoute) reaches moto through AWS_ENDPOINT_URL_EC2, set in the
  daemons' environment (`ENV`), with moto's dummy credentials.

Both processes are recorded by pid in the lab's folder and stopped by that pid.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import VPC_NET, Layout
from gatepeer.lab.network.netns import LabError, ip
from gatepeer.lab.processes.pids import read_pid, runs, stop_pid
from gatepeer.lab.record import Paths

log = logging.getLogger(__name__)

# TEST-NET-3, beside the API emulator's 203.0.113.10, on the fabric's loopback.
EC2_ADDR = ipaddress.IPv4Address("203.0.113.11")
EC2_PORT = 5000
EC2_URL = f"http://{EC2_ADDR}:{EC2_PORT}"
REGION = "us-east-1"
MOTO_IMAGE = "ami-12c6146b"
FOLLOW_INTERVAL_S = 0.1
# The route follower's entry (`python -m`), also how its command line is recognised.
FOLLOWER_MODULE = "gatepeer.lab.processes.vpc_routes"
START_TIMEOUT_S = 30.0
# What a process needs to use the stand-in: its URL, moto's dummy credentials, no IMDS.
ENV = {
    "AWS_ENDPOINT_URL_EC2": EC2_URL,
    "AWS_ACCESS_KEY_ID": "lab",
    "AWS_SECRET_ACCESS_KEY": "lab",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class RouteTable:
    table_id: str
    eni_addresses: dict[str, str]  # ENI id -> the gate peer's VPC address


def _start(layout: Layout, paths: Paths, name: str, argv: list[str]) -> int:
    with open(paths.dir / f"{name}.log", "ab") as out:
        proc = subprocess.Popen(
            netns.exec_in(layout.fabric_ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV},
            start_new_session=True,
        )
    paths.dir.joinpath(f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def ec2() -> Any:
    """A boto3 EC2 client for the stand-in, with moto's dummy credentials (nothing taken from
    this process's environment). Inside the lab's namespaces only: from the root namespace
    use it within `netns.call_in_netns(fabric)`, as its sockets are made at each call, in the
    calling thread's namespace."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=REGION,
    )
    return session.client("ec2", endpoint_url=EC2_URL)


def start(layout: Layout, paths: Paths) -> RouteTable:
    """moto in the fabric, the VPC and its route table, then the follower."""
    ip(layout.fabric_ns, "addr", "replace", f"{EC2_ADDR}/32", "dev", "lo")
    _start(layout, paths, "moto", [sys.executable, "-m", "moto.server", "-H", str(EC2_ADDR),
                                   "-p", str(EC2_PORT)])  # fmt: skip
    table = netns.call_in_netns(layout.fabric_ns, lambda: _make_vpc(layout))
    follower = [
        sys.executable, "-m", FOLLOWER_MODULE, "--table", table.table_id,
        "--subnet", str(layout.device_subnet), "--vpc-ns", layout.vpc_ns,
        *(f"--eni={eni}={addr}" for eni, addr in table.eni_addresses.items()),
    ]  # fmt: skip
    _start(layout, paths, "vpc-router", follower)
    return table


def _make_vpc(layout: Layout) -> RouteTable:
    client = ec2()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            client.describe_vpcs()
            break
        except Exception as exc:  # noqa: BLE001 - still starting
            if time.monotonic() > deadline:
                raise LabError(f"moto at {EC2_URL} did not answer: {exc}") from None
            time.sleep(0.2)
    vpc = client.create_vpc(CidrBlock=str(VPC_NET.supernet(new_prefix=16)))["Vpc"]["VpcId"]
    subnet = client.create_subnet(VpcId=vpc, CidrBlock=str(VPC_NET))["Subnet"]["SubnetId"]
    enis = {}
    for peer in layout.gate_peers:
        eni = client.create_network_interface(SubnetId=subnet, PrivateIpAddress=str(peer.address))
        enis[eni["NetworkInterface"]["NetworkInterfaceId"]] = str(peer.address)
    table = client.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    first = next(iter(enis))
    client.create_route(
        RouteTableId=table, DestinationCidrBlock=str(layout.device_subnet), NetworkInterfaceId=first
    )
    return RouteTable(table, enis)


def route_target(layout: Layout, table_id: str) -> str | None:
    """The ENI the stand-in's route for the device subnet targets (asked from the fabric)."""

    def ask() -> str | None:
        return _target(ec2(), table_id, str(layout.device_subnet))

    return netns.call_in_netns(layout.fabric_ns, ask)


def _target(client: Any, table_id: str, subnet: str) -> str | None:
    tables = client.describe_route_tables(RouteTableIds=[table_id])["RouteTables"]
    for route in tables[0].get("Routes", []) if tables else []:
        if route.get("DestinationCidrBlock") == subnet:
            return str(route.get("NetworkInterfaceId") or "") or None
    return None


def stop(paths: Paths) -> list[str]:
    """The follower, then moto, by their recorded pids (checked against their command line)."""
    out = []
    for name, needle in (("vpc-router", FOLLOWER_MODULE), ("moto", "moto.server")):
        pid = read_pid(paths.dir / f"{name}.pid")
        if pid is not None and runs(pid, needle):
            stop_pid(pid)
            out.append(f"{name} (pid {pid})")
        paths.dir.joinpath(name + ".pid").unlink(missing_ok=True)
    return out


def follow(table_id: str, subnet: str, vpc_ns: str, enis: dict[str, str]) -> None:
    """The lab's VPC router: the VPC host's route for the device subnet follows the table."""
    client = ec2()
    current = None
    while True:
        try:
            target = _target(client, table_id, subnet)
        except Exception as exc:  # noqa: BLE001 - moto restarting; keep the last route
            log.warning("route table %s: %s", table_id, exc)
            target = current
        if target != current and target in enis:
            try:
                ip(vpc_ns, "route", "replace", subnet, "via", enis[target], "dev", "eth0")
            except LabError as exc:  # the lab going down under us; try again next round
                log.warning("%s", exc)
            else:
                log.warning("%s -> %s (%s)", subnet, enis[target], target)
                current = target
        time.sleep(FOLLOW_INTERVAL_S)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table", required=True)
    parser.add_argument("--subnet", required=True)
    parser.add_argument("--vpc-ns", required=True)
    parser.add_argument("--eni", action="append", default=[], help="ENI=ADDRESS")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="vpc-router: %(message)s")
    enis = dict(item.split("=", 1) for item in args.eni)
    follow(args.table, args.subnet, args.vpc_ns, enis)


if __name__ == "__main__":
    main()
