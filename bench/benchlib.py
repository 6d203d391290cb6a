"""Shared pieces of the benchmarks: a throw-away lab, the agent and the hand-made script in its
gate peer namespace, ping streams, and robust statistics.

The benchmarks run as root on the host (they build network namespaces). Each one builds its own
lab under a fresh prefix and removes it on the way out, also on Ctrl-C. Processes they start are
stopped by their pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HANDMADE = ROOT / "bench" / "handmade_gate_init.sh"
ZERO_MAC = "00:00:00:00:00:00"

if str(ROOT) not in sys.path:  # `python bench/x.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

from gatepeer.lab import control  # noqa: E402
from gatepeer.lab.api_client import LabApi, lab_api  # noqa: E402
from gatepeer.lab.network import netns  # noqa: E402
from gatepeer.lab.network.layout import PEER_ADDR, Layout  # noqa: E402
from gatepeer.lab.processes.gate_peer import prefixlen  # noqa: E402
from gatepeer.lab.record import LabInfo, LabRecord, Paths  # noqa: E402


def gatepeer_command() -> list[str]:
    """The console script next to this interpreter, else `python -m gatepeer`."""
    script = Path(sys.executable).with_name("gatepeer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gatepeer"]


@dataclass
class Lab:
    """A lab built for one benchmark run."""

    info: LabInfo

    @property
    def layout(self) -> Layout:
        return self.info.layout

    @property
    def paths(self) -> Paths:
        return self.info.paths

    @property
    def peer_ns(self) -> str:
        return self.layout.peer_ns

    def api(self) -> LabApi:
        record = LabRecord(self.layout, self.info.credentials, 0)
        assert self.info.host_url is not None
        return lab_api(self.paths, record, self.info.host_url)

    def emulator_state(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(f"{self.info.host_url}/_emulator/state", timeout=10) as r:
            return dict(json.loads(r.read()))

    def in_peer(self, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.peer_ns, *cmd]

    def gatepeer(self, *args: str) -> list[str]:
        return self.in_peer(
            "env", f"GATEPEER_CONFIG={self.paths.config}", *gatepeer_command(), *args
        )

    def handmade(self) -> list[str]:
        """The hand-made script with this lab's registration (the peer must be registered)."""
        api = self.api()
        peers = api.list_gate_peers()
        me = next(p for p in peers if p.get("outerIpAddress") == str(PEER_ADDR))
        plen = prefixlen(me.get("netmask"), self.layout.device_subnet.prefixlen)
        endpoints = [str(p["outerIpAddress"]) for p in peers if p.get("ownedByCustomer") is False]
        vni = int(api.get_vpg().get("gateVxlanId") or self.layout.vni)
        return self.in_peer(
            "bash", str(HANDMADE), "eth0", str(PEER_ADDR),
            f"{me['innerIpAddress']}/{plen}", str(vni), *endpoints,
        )  # fmt: skip

    def redirect_to_peer(self) -> None:
        """Junction redirection to the gate peer's inner address (`gatepeer lab redirect peer`):
        without it the devices' replies take the VPG's own way, not the tunnel. Until the agent
        manages it; the peer must be registered."""
        cmd = [*gatepeer_command(), "lab", "redirect", "peer", "--prefix", self.layout.prefix]
        timed(cmd)

    def reset_peer(self, *, unregister: bool) -> None:
        """Back to "from scratch": no vxlan0, no state.json, the sysctls the lab starts with,
        and (unregister) no registration."""
        netns.ip(self.peer_ns, "link", "del", "dev", "vxlan0", check=False)
        self.paths.state_file.unlink(missing_ok=True)
        netns.write_sysctls(
            self.peer_ns, {"net.ipv4.ip_forward": 0, "net.ipv4.conf.eth0.rp_filter": 0}
        )
        if unregister:
            api = self.api()
            if any(p.get("outerIpAddress") == str(PEER_ADDR) for p in api.list_gate_peers()):
                api.unregister_gate_peer(str(PEER_ADDR))


@contextlib.contextmanager
def lab(**options: Any) -> Iterator[Lab]:
    """Build a lab under a fresh prefix; always remove it (SIGTERM too)."""
    if os.geteuid() != 0:
        sys.exit("the benchmarks need root (network namespaces)")
    prefix = f"bn{secrets.token_hex(2)}"
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        layout = control.resolve_layout(prefix, **options)
        yield Lab(control.up(layout))
    finally:
        control.down(prefix)
        signal.signal(signal.SIGTERM, previous)


def timed(cmd: Sequence[str], *, expect: int = 0) -> float:
    """Wall-clock seconds of one command; fails loudly when it fails."""
    started = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    if proc.returncode != expect:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return took


# ----------------------------------------------------------------------------- statistics


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and quartiles: the machine is shared, means would follow its noise."""
    if not values:
        return {"n": 0}
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p25": q[0],
        "p75": q[2],
        "min": min(values),
        "max": max(values),
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# ----------------------------------------------------------------------------- ping streams


class PingStream:
    """`ping -i INTERVAL -c COUNT` from a namespace; losses located by their icmp_seq."""

    def __init__(self, ns: str, target: str, interval: float, count: int) -> None:
        self.interval = interval
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "ping", "-n", "-W", "1"]
            + ["-i", f"{interval:g}", "-c", str(count), target],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def result(self, timeout: float = 120) -> dict[str, float]:
        """sent, received, lost, and the outage: the longest run of consecutive lost
        packets times the interval (a stream that never recovers counts to its end)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()  # ours, by its handle
                self.proc.wait()
        match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        if not match:
            raise SystemExit(f"no ping summary:\n{out[-2000:]}")
        sent, received = int(match.group(1)), int(match.group(2))
        replies = {int(n) for n in re.findall(r"bytes from .*icmp_seq=(\d+)", out)}
        longest = run = 0
        for seq in range(1, sent + 1):
            run = 0 if seq in replies else run + 1
            longest = max(longest, run)
        return {
            "sent": sent,
            "received": received,
            "lost": sent - received,
            "outage_s": longest * self.interval,
        }


def wait_ping(ns: str, target: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", "1", target],
            capture_output=True,
            check=False,
        )
        if proc.returncode == 0:
            return
    raise SystemExit(f"{target} unreachable from {ns}")


# ----------------------------------------------------------------------------- the daemon


class Daemon:
    """`gatepeer run` in the lab's peer namespace, stopped by its pid."""

    def __init__(self, lab: Lab, log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                lab.gatepeer("run"), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = _read_json(lab.paths.state_file)
            if state and state.get("pid") == self.proc.pid and state.get("health") == "ok":
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise SystemExit(f"gatepeer run did not converge:\n{log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def machine() -> str:
    cpus = os.cpu_count()
    kernel = os.uname().release
    try:
        model = next(
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        )
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{cpus} CPUs ({model}), Linux {kernel}, Python {sys.version.split()[0]}"
