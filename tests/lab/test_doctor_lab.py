"""`gatepeer doctor` in the lab's gate peer namespace: a healthy peer passes (exit 0, the AWS
checks skipped off EC2); then each fault is injected on its own and reverted (Gate closed,
redirection elsewhere, underlay MTU 1500 with tunnel MTU 1500, ip_forward off, the nftables
table deleted, the API down, the auth key wrong, not registered), and each gives exit 1 with a
`fail` line naming it and no other failure. No output ever holds the auth key.

One lab for the whole module: building it and the first apply take about a second.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import LabHandle

from gatepeer.aws.detect import on_ec2

pytestmark = pytest.mark.netns

PEER_OUTER = "198.18.0.10"
AWS_CHECKS = (
    "aws-source-dest-check",
    "aws-security-group",
    "aws-route",
    "aws-return-path",
    "aws-iam",
)


@pytest.fixture
def peer(make_lab: Callable[..., LabHandle]) -> Iterator[LabHandle]:
    """A lab whose gate peer `gatepeer apply` set up (registered, redirection to it)."""
    lab = make_lab()
    applied = lab.gatepeer("apply")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    yield lab


class Doctor:
    """Runs `gatepeer doctor --json` in the peer namespace; keeps every output for the
    secret check at the end."""

    def __init__(self, lab: LabHandle) -> None:
        self.lab = lab
        self.outputs: list[str] = []

    def __call__(self) -> tuple[int, dict[str, str], dict[str, str]]:
        """(exit code, name -> status, name -> detail); a name seen twice keeps the worst."""
        proc = self.lab.gatepeer("doctor", "--json", timeout=60)
        self.outputs.append(proc.stdout + proc.stderr)
        doc = json.loads(proc.stdout)
        assert doc["exit_code"] == proc.returncode
        statuses: dict[str, str] = {}
        details: dict[str, str] = {}
        rank = {"ok": 0, "skip": 1, "warn": 2, "fail": 3}
        for c in doc["checks"]:
            if rank[c["status"]] >= rank[statuses.get(c["name"], "ok")]:
                statuses[c["name"]], details[c["name"]] = c["status"], c["detail"]
        return proc.returncode, statuses, details

    def text(self) -> str:
        proc = self.lab.gatepeer("doctor")
        self.outputs.append(proc.stdout + proc.stderr)
        return proc.stdout


def failing(statuses: dict[str, str]) -> set[str]:
    return {name for name, status in statuses.items() if status == "fail"}


def test_doctor_passes_a_healthy_peer_and_names_each_fault(peer: LabHandle) -> None:
    doctor = Doctor(peer)
    key = peer.paths.auth_key.read_text().strip()

    code, statuses, details = doctor()
    assert code == 0 and failing(statuses) == set(), details
    for name in ("api", "vpg", "gate", "registration", "redirection", "underlay-mtu",
                 "path-mtu", "ip-forward", "tunnel", "fdb", "nftables", "clock"):  # fmt: skip
        assert statuses[name] == "ok", (name, details[name])
    if not on_ec2():
        assert all(statuses[n] == "skip" for n in AWS_CHECKS)
    text = doctor.text()
    assert text.splitlines()[-1].endswith("exit 0")
    assert any(ln.split()[:2] == ["ok", "path-mtu"] for ln in text.splitlines())

    def expect(fault: str, *names: str, contains: str = "") -> None:
        code, statuses, details = doctor()
        assert code == 1, f"{fault}: exit {code}"
        assert failing(statuses) == set(names), f"{fault}: {details}"
        assert contains in details[names[0]], details[names[0]]

    # Gate closed.
    peer.control("settings", {"gate_opened": False})
    expect("Gate closed", "gate", contains="Gate is closed")
    assert peer.state()["settings"]["gate_opened"] is False  # doctor opened nothing
    peer.control("settings", {"gate_opened": True})

    # Redirection elsewhere (soracom.redirection = "self" in the lab's config).
    peer.set_redirection("198.19.0.200")
    expect("redirection elsewhere", "redirection", contains="198.19.0.200")
    assert peer.state()["redirection"]["gateway"] == "198.19.0.200"  # nor set it back
    peer.set_redirection("peer")

    # Underlay MTU 1500 with tunnel MTU 1500: the DF probe fails at this host too.
    peer.run("peer", "ip", "link", "set", "eth0", "mtu", "1500")
    try:
        expect("underlay MTU", "underlay-mtu", "path-mtu", contains="needs 1550")
    finally:
        peer.run("peer", "ip", "link", "set", "eth0", "mtu", "9001")

    # ip_forward off.
    peer.run("peer", "sysctl", "-qw", "net.ipv4.ip_forward=0")
    try:
        expect("ip_forward off", "ip-forward", contains="ip_forward = 0")
    finally:
        peer.run("peer", "sysctl", "-qw", "net.ipv4.ip_forward=1")

    # The nftables table deleted (apply loads it again).
    peer.run("peer", "nft", "delete", "table", "inet", "gatepeer")
    expect("nft table deleted", "nftables", contains="inet gatepeer is not loaded")
    assert peer.gatepeer("apply").returncode == 0

    # The API down: connections closed without an answer.
    peer.control("faults", {"drop_next": 1000})
    try:
        expect("API down", "api", contains="soracom.endpoint")
    finally:
        peer.control("reset_faults")

    # The auth key wrong.
    peer.paths.auth_key.write_text("keyId-wrong-secret-0000\n")
    try:
        expect("auth key wrong", "api", contains="HTTP 401")
    finally:
        peer.paths.auth_key.write_text(key + "\n")

    # Beyond the list: a router on the way with a smaller MTU answers "fragmentation needed".
    peer.run("fabric", "ip", "link", "set", "sorabr", "mtu", "1500")
    try:
        expect("router MTU 1500", "path-mtu", contains="a router on the way allows only 1500")
    finally:
        peer.run("fabric", "ip", "link", "set", "sorabr", "mtu", "9001")
        peer.run("peer", "ip", "route", "flush", "cache")  # the learned path MTU

    code, statuses, details = doctor()
    assert code == 0 and failing(statuses) == set(), details  # every fault reverted

    # Not registered: removed through the API (by hand, or by another tool).
    peer.api().unregister_gate_peer(PEER_OUTER)
    expect("not registered", "registration", contains=f"{PEER_OUTER} is not registered")

    leaked = [i for i, out in enumerate(doctor.outputs) if key in out]
    assert leaked == [], "doctor printed the auth key"
    assert len(doctor.outputs) >= 11


def test_doctor_before_the_first_apply_passes_with_what_apply_will_do(
    make_lab: Callable[..., LabHandle],
) -> None:
    lab = make_lab()
    proc = lab.gatepeer("doctor", "--json")
    doc: dict[str, Any] = json.loads(proc.stdout)
    statuses = {c["name"]: c["status"] for c in doc["checks"]}
    assert proc.returncode == 0 and doc["preflight"] is True, proc.stdout
    assert statuses["registration"] == "warn" and statuses["tunnel"] == "skip"
    assert statuses["api"] == statuses["path-mtu"] == "ok"
    assert lab.state()["peers"] == []  # doctor registered nothing
