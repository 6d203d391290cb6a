"""`lab demo`'s traffic: pings and a TCP transfer from the VPC host to the devices."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass

from gatepeer.lab.network import netns
from gatepeer.lab.network.layout import VPC_HOST_ADDR, Layout
from gatepeer.lab.record import LabInfo, Paths


@dataclass
class DemoStep:
    name: str
    ok: bool
    detail: str


def _ping(ns: str, target: str, count: int = 3) -> tuple[bool, str]:
    proc = netns.run(
        netns.exec_in(ns, ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2", target]),
        check=False,
    )
    summary = [ln for ln in proc.stdout.splitlines() if "packets transmitted" in ln or "rtt" in ln]
    return proc.returncode == 0, "; ".join(summary) or (proc.stderr.strip() or "no output")


def start_iperf_server(layout: Layout, paths: Paths, bind: str) -> subprocess.Popen[bytes]:
    """iperf3 server in the devices namespace, recorded by pid so `lab down` can stop it."""
    server = subprocess.Popen(
        netns.exec_in(layout.dev_ns, ["iperf3", "-s", "-1", "-B", bind]),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    paths.iperf_pid.write_text(f"{server.pid}\n")
    # Ready when it listens on 5201 inside the devices namespace.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.poll() is None:
        out = netns.run(
            netns.exec_in(layout.dev_ns, ["ss", "-Htln", "sport", "= :5201"]), check=False
        )
        if out.stdout.strip():
            break
        time.sleep(0.05)
    return server


def stop_iperf_server(server: subprocess.Popen[bytes], paths: Paths) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    paths.iperf_pid.unlink(missing_ok=True)


def iperf(layout: Layout, paths: Paths, target: str, seconds: int = 2) -> tuple[bool, str]:
    """A short TCP transfer from the VPC host to a device; (ok, summary)."""
    server = start_iperf_server(layout, paths, target)
    try:
        proc = netns.run(
            netns.exec_in(layout.vpc_ns, ["iperf3", "-c", target, "-t", str(seconds), "-J"]),
            check=False,
            timeout=seconds + 20,
        )
    finally:
        stop_iperf_server(server, paths)
    try:
        result = json.loads(proc.stdout)
    except ValueError:
        return False, (proc.stderr or proc.stdout).strip()[:300] or "iperf3 gave no output"
    if result.get("error"):
        return False, str(result["error"])
    end = result.get("end", {})
    sent = end.get("sum_sent", {})
    received = end.get("sum_received", {})
    rate = float(received.get("bits_per_second", 0.0))
    nbytes = int(received.get("bytes", 0))
    ok = proc.returncode == 0 and nbytes > 0
    detail = (
        f"{nbytes / 1e6:.1f} MB in {float(received.get('seconds', 0)):.1f} s, "
        f"{rate / 1e6:.0f} Mbit/s, {int(sent.get('retransmits', 0))} retransmits"
    )
    return ok, detail


def demo_traffic(lab: LabInfo) -> list[DemoStep]:
    """Traffic from the VPC host to the devices through the gate peer's tunnel."""
    layout = lab.layout
    steps: list[DemoStep] = []
    device = str(layout.devices[0])
    before = netns.link_stats(layout.peer_ns, "vxlan0")
    ok, detail = _ping(layout.vpc_ns, device)
    steps.append(DemoStep(f"ping {device} from the VPC host ({VPC_HOST_ADDR})", ok, detail))
    after = netns.link_stats(layout.peer_ns, "vxlan0")
    grew = after["tx_packets"] > before["tx_packets"] and after["rx_packets"] > before["rx_packets"]
    steps.append(
        DemoStep(
            "the packets went through the gate peer's vxlan0",
            grew,
            f"tx +{after['tx_packets'] - before['tx_packets']} packets, "
            f"rx +{after['rx_packets'] - before['rx_packets']} packets",
        )
    )
    for ep in layout.endpoints:
        ok, detail = _ping(layout.peer_ns, str(ep.inner), count=2)
        steps.append(
            DemoStep(f"ping VPG endpoint {ep.index} inner {ep.inner} from the peer", ok, detail)
        )
    if shutil.which("iperf3"):
        ok, detail = iperf(layout, lab.paths, device)
        steps.append(DemoStep(f"TCP transfer (iperf3, 2 s) VPC host -> {device}", ok, detail))
    else:
        steps.append(
            DemoStep("TCP transfer", False, "iperf3 is not installed (apt-get install iperf3)")
        )
    return steps
