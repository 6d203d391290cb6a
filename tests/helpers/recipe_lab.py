"""The AWS side of the closed-network recipes, stood in for beside a lab (docs/recipes/):

- moto's EC2 (tests/helpers/moto_lab_server.py) in the lab's fabric namespace on the HA lab's
  EC2 address (203.0.113.11:5000), holding a VPC with an endpoint subnet, interface endpoints
  and the AWS-managed S3 prefix list (its entries the lab's S3 range);
- a services host (namespace `<prefix>-svc`, behind the fabric, the lab's VPC router) carrying
  each endpoint's address as moto gave it, and the S3 stand-in's, with a TCP server on each port
  a recipe uses;
- a DNS stand-in (Debian's dnsmasq) on the lab's VPC host (198.18.0.20), the Route 53 inbound
  resolver a SIM group's custom DNS points at: it answers each service's private name with the
  endpoint's address and nothing else.

The device resolves a name through the stand-in and connects, from its own address, through the
gate peer. Every process here is started directly (Popen) and stopped by its pid; the services
namespace carries the lab's prefix, so `lab down` removes it too should a test not.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatepeer.lab.network import netns
from gatepeer.lab.processes import vpc_routes
from gatepeer.lab.processes.pids import stop_pid

if TYPE_CHECKING:
    from conftest import LabHandle

REGION = vpc_routes.REGION
# What gatepeer needs to reach moto: boto3's standard endpoint variable, dummy keys, no IMDS.
AWS_ENV = vpc_routes.ENV
# The VPC as moto holds it; the gate peer's subnet is the lab's VPC segment.
VPC_CIDR = "198.18.0.0/16"
PEER_SUBNET = "198.18.0.0/24"
# Interface endpoints' subnet: moto picks each endpoint's address in it.
ENDPOINT_SUBNET = ipaddress.IPv4Network("198.18.4.0/24")
# Between the fabric (the VPC router) and the services host.
SERVICES_LINK_ROUTER = "198.18.5.1"
SERVICES_LINK_HOST = "198.18.5.2"
# The lab's stand-in for S3's public ranges: what com.amazonaws.<region>.s3 lists in moto.
S3_RANGE = ipaddress.IPv4Network("198.18.6.0/24")
S3_HOST = ipaddress.IPv4Address("198.18.6.10")
# The Route 53 inbound resolver stand-in: the lab's VPC host.
RESOLVER = "198.18.0.20"
DNS_PORT = 53
START_TIMEOUT_S = 30.0
MOTO_SCRIPT = Path(__file__).with_name("moto_lab_server.py")


# ----------------------------------------------------------------------------- processes


@contextlib.contextmanager
def started(ns: str, argv: list[str], log: Path | None = None) -> Iterator[Any]:
    """A process in namespace `ns`, started directly and stopped by its pid on the way out. Its
    output goes to `log` (a chatty server must never fill a pipe nobody reads), else to a
    pipe the caller reads."""
    out = open(log, "ab") if log is not None else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            netns.exec_in(ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=out if out is not None else subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    finally:
        if out is not None:
            out.close()  # the child holds its own copy
    try:
        yield proc
    finally:
        if proc.poll() is None:
            stop_pid(proc.pid)
        proc.wait(timeout=10)


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------------- moto


@dataclass(frozen=True)
class AwsPieces:
    """What the stand-in AWS holds for a recipe."""

    vpc_id: str
    peer_subnet_id: str
    endpoint_subnet_id: str
    route_table_id: str
    # Interface endpoints by service (e.g. "ssm"): (vpce id, their addresses).
    endpoints: dict[str, tuple[str, tuple[str, ...]]]
    s3_prefix_list_id: str
    s3_prefix_list_name: str
    s3_cidrs: tuple[str, ...]


@contextlib.contextmanager
def moto_ec2(lab: LabHandle) -> Iterator[None]:
    """moto's EC2 in the lab's fabric namespace, answering on vpc_routes.EC2_URL."""
    fabric = lab.ns("fabric")
    netns.ip(fabric, "addr", "replace", f"{vpc_routes.EC2_ADDR}/32", "dev", "lo")
    argv = [sys.executable, str(MOTO_SCRIPT), "--host", str(vpc_routes.EC2_ADDR),
            "--port", str(vpc_routes.EC2_PORT), "--s3-cidr", str(S3_RANGE)]  # fmt: skip
    log = lab.paths.dir / "recipe-moto.log"
    with started(fabric, argv, log) as proc:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                netns.call_in_netns(fabric, lambda: vpc_routes.ec2().describe_vpcs())
                break
            except Exception as exc:  # noqa: BLE001 - still starting
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto did not answer: {exc}\n{log_tail(log)}") from None
                time.sleep(0.2)
        yield


def ec2_call(lab: LabHandle, name: str, **kwargs: Any) -> Any:
    """One EC2 call to the lab's moto, made from the fabric namespace."""
    return netns.call_in_netns(lab.ns("fabric"), lambda: getattr(vpc_routes.ec2(), name)(**kwargs))


def make_aws_pieces(lab: LabHandle, interface_services: tuple[str, ...]) -> AwsPieces:
    """The recipe's VPC in moto: the peer's and the endpoints' subnets, a route table with the
    S3 gateway endpoint, one interface endpoint (private DNS on) per service in
    `interface_services` ("ssm", "iot.data": com.amazonaws.<region>.<service>)."""

    def build() -> AwsPieces:
        ec2 = vpc_routes.ec2()
        vpc = ec2.create_vpc(CidrBlock=VPC_CIDR)["Vpc"]["VpcId"]
        peer_subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=PEER_SUBNET)["Subnet"]["SubnetId"]
        ep_subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=str(ENDPOINT_SUBNET))["Subnet"][
            "SubnetId"
        ]
        table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
        ec2.associate_route_table(RouteTableId=table, SubnetId=peer_subnet)
        s3_name = f"com.amazonaws.{REGION}.s3"
        ec2.create_vpc_endpoint(
            VpcId=vpc, ServiceName=s3_name, VpcEndpointType="Gateway", RouteTableIds=[table]
        )
        lists = ec2.describe_managed_prefix_lists(
            Filters=[{"Name": "prefix-list-name", "Values": [s3_name]}]
        )["PrefixLists"]
        s3_list = lists[0]["PrefixListId"]
        entries = ec2.get_managed_prefix_list_entries(PrefixListId=s3_list)["Entries"]
        endpoints = {}
        for service in interface_services:
            vpce = ec2.create_vpc_endpoint(
                VpcId=vpc,
                ServiceName=f"com.amazonaws.{REGION}.{service}",
                VpcEndpointType="Interface",
                SubnetIds=[ep_subnet],
                PrivateDnsEnabled=True,
            )["VpcEndpoint"]
            enis = ec2.describe_network_interfaces(NetworkInterfaceIds=vpce["NetworkInterfaceIds"])[
                "NetworkInterfaces"
            ]
            addresses = tuple(str(eni["PrivateIpAddress"]) for eni in enis)
            endpoints[service] = (str(vpce["VpcEndpointId"]), addresses)
        return AwsPieces(
            vpc_id=vpc,
            peer_subnet_id=peer_subnet,
            endpoint_subnet_id=ep_subnet,
            route_table_id=table,
            endpoints=endpoints,
            s3_prefix_list_id=s3_list,
            s3_prefix_list_name=s3_name,
            s3_cidrs=tuple(str(e["Cidr"]) for e in entries),
        )

    pieces = netns.call_in_netns(lab.ns("fabric"), build)
    for _vpce, addresses in pieces.endpoints.values():
        for address in addresses:
            # Only lab addresses ever carry traffic: moto must have kept to the subnet.
            assert ipaddress.IPv4Address(address) in ENDPOINT_SUBNET, pieces
    return pieces


# ----------------------------------------------------------------------------- services host


@contextlib.contextmanager
def services_host(lab: LabHandle, addresses: list[str]) -> Iterator[str]:
    """A namespace behind the lab's VPC router carrying `addresses` (endpoints', S3's); the
    router sends the endpoint subnet and the S3 range to it. Yields its name."""
    ns = lab.ns("svc")
    fabric = lab.ns("fabric")
    netns.add_netns(ns)
    try:
        netns.ip(fabric, "link", "add", "to-svc", "type", "veth", "peer", "name", "eth0",
                 "netns", ns)  # fmt: skip
        netns.ip(fabric, "addr", "add", f"{SERVICES_LINK_ROUTER}/30", "dev", "to-svc")
        netns.ip(fabric, "link", "set", "to-svc", "up")
        netns.ip(ns, "link", "set", "lo", "up")
        netns.ip(ns, "addr", "add", f"{SERVICES_LINK_HOST}/30", "dev", "eth0")
        for address in addresses:
            netns.ip(ns, "addr", "add", f"{address}/32", "dev", "eth0")
        netns.ip(ns, "link", "set", "eth0", "up")
        netns.ip(ns, "route", "add", "default", "via", SERVICES_LINK_ROUTER)
        for net in (ENDPOINT_SUBNET, S3_RANGE):
            netns.ip(fabric, "route", "add", str(net), "via", SERVICES_LINK_HOST)
        yield ns
    finally:
        netns.delete_netns(ns)  # takes the veth pair, and the fabric's routes through it


# One TCP server per (address, port) given: prints "ready", then "peer LOCAL:PORT CLIENT" for
# each connection, and answers "seen CLIENT".
SERVERS = """
import socket, sys, selectors
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    addr, port = spec.rsplit(":", 1)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(port)))
    s.listen(8)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        c, a = key.fileobj.accept()
        local = "%s:%d" % c.getsockname()
        print("peer", local, a[0], flush=True)
        c.sendall(("seen " + a[0]).encode())
        c.close()
"""


@contextlib.contextmanager
def tcp_servers(ns: str, listen: list[str]) -> Iterator[subprocess.Popen[str]]:
    """SERVERS in `ns` on each "ADDRESS:PORT"; read its stdout for who connected."""
    with started(ns, [sys.executable, "-u", "-c", SERVERS, *listen]) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first == "ready", first + (proc.stdout.read() if proc.poll() is not None else "")
        yield proc


# ----------------------------------------------------------------------------- DNS stand-in


@contextlib.contextmanager
def dns_stand_in(lab: LabHandle, records: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """dnsmasq on the lab's VPC host answering each name in `records` (and names under it)
    with its address, and nothing else (no upstream, no hosts file, no config file)."""
    argv = [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-interfaces", f"--listen-address={RESOLVER}", f"--port={DNS_PORT}",
        "--pid-file=", "--log-facility=-", "--log-queries", "--user=root",
        *(f"--address=/{name}/{address}" for name, address in records.items()),
    ]  # fmt: skip
    log = lab.paths.dir / "recipe-dnsmasq.log"
    with started(lab.ns("vpc"), argv, log) as proc:
        deadline = time.monotonic() + START_TIMEOUT_S
        name = next(iter(records))
        while resolve(lab, "vpc", name) != records[name]:
            assert proc.poll() is None, "dnsmasq exited: " + log_tail(log)
            assert time.monotonic() < deadline, f"dnsmasq on {RESOLVER} does not answer {name}"
            time.sleep(0.1)
        yield proc


# A device's lookup and connection: an A query to argv[1] for argv[2] (sent from argv[4]; argv[1]
# "-": argv[2] is the address, no lookup), then a TCP connection from argv[4] to the answer on
# port argv[3] (0: none). Prints "resolved ADDR" or "unresolved WHY", then "connected REPLY" or
# "no reply: ERROR".
DEVICE_CLIENT = r"""
import random, socket, struct, sys
resolver, name, port, source = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

def lookup():
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query = struct.pack(">HHHHHH", random.getrandbits(16), 0x0100, 1, 0, 0, 0) + qname
    query += struct.pack(">HH", 1, 1)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind((source, 0))
    u.settimeout(3)
    try:
        u.sendto(query, (resolver, 53))
        answer = u.recv(512)
    except OSError as exc:
        return None, type(exc).__name__
    rcode, count = answer[3] & 0xF, struct.unpack(">H", answer[6:8])[0]
    at = 12 + len(qname) + 4
    for _ in range(count):
        while answer[at] and answer[at] & 0xC0 != 0xC0:
            at += answer[at] + 1
        at += 2 if answer[at] else 1
        rtype, _cls, _ttl, length = struct.unpack(">HHIH", answer[at:at + 10])
        at += 10
        if rtype == 1:
            return socket.inet_ntoa(answer[at:at + 4]), ""
        at += length
    return None, "rcode %d" % rcode

address, why = (name, "") if resolver == "-" else lookup()
print("resolved", address) if address else print("unresolved", why)
if address and port:
    try:
        s = socket.create_connection((address, port), timeout=3, source_address=(source, 0))
    except OSError as exc:
        print("no reply:", type(exc).__name__)
    else:
        print("connected", s.recv(200).decode())
"""


def _device_client(lab: LabHandle, role: str, resolver: str, name: str, port: int,
                   source: str) -> list[str]:  # fmt: skip
    proc = lab.run(role, sys.executable, "-c", DEVICE_CLIENT, resolver, name, str(port), source,
                   check=False, timeout=20)  # fmt: skip
    assert not proc.stderr.strip(), proc.stderr
    return proc.stdout.strip().splitlines() + ["", ""]


def resolve(lab: LabHandle, role: str, name: str, source: str = RESOLVER) -> str | None:
    """The address the stand-in gives `name`, asked from `role`, or None."""
    words = _device_client(lab, role, RESOLVER, name, 0, source)[0].split()
    return words[1] if words[:1] == ["resolved"] else None


def device_connects(lab: LabHandle, device: str, name: str, port: int) -> tuple[str, str]:
    """From the device: resolve `name` through the stand-in, connect to it on `port` through the
    gate peer. (the address it resolved or "unresolved ...", the connection's outcome)."""
    first, outcome = _device_client(lab, "dev", RESOLVER, name, port, device)[:2]
    return (first.split()[1] if first.startswith("resolved ") else first), outcome


def device_connects_to(lab: LabHandle, device: str, address: str, port: int) -> str:
    """From the device straight to `address` (no lookup): "connected ..." or "no reply: ..."."""
    return _device_client(lab, "dev", "-", address, port, device)[1]


# ----------------------------------------------------------------------------- gatepeer


def gatepeer(lab: LabHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """`gatepeer ARGS...` in the peer namespace with the lab's config and moto as its EC2
    (boto3's AWS_ENDPOINT_URL_EC2), as the daemon would run there; never raises on exit."""
    script = Path(sys.executable).with_name("gatepeer")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "gatepeer"]
    env = [f"GATEPEER_CONFIG={lab.paths.config}", *(f"{k}={v}" for k, v in AWS_ENV.items())]
    return lab.run("peer", "env", *env, *command, *args, check=False, timeout=120)
