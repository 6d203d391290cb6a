"""The failover tests' traffic: `flow_probe.py` run as an echo server in the lab's VPC host
namespace and as a client in the devices namespace, each started directly with `ip netns exec`
(Popen: the pid is the program's own) and stopped by that pid only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROBE = str(Path(__file__).with_name("flow_probe.py"))
PORT = 7007
READY_S = 60.0  # 1,000 connections on a loaded host take a while


@dataclass
class ProbeResult:
    """What the client saw (flow_probe.py's JSON)."""

    raw: dict[str, Any]

    @property
    def connections(self) -> int:
        return int(self.raw["tcp"]["connections"])

    @property
    def survived(self) -> int:
        return int(self.raw["tcp"]["survived"])

    @property
    def resets(self) -> int:
        return int(self.raw["tcp"]["resets"])

    @property
    def errors(self) -> dict[str, int]:
        return dict(self.raw["tcp"]["errors"])

    @property
    def longest_stall(self) -> float:
        return float(self.raw["tcp"]["longest_stall_s"])

    @property
    def udp(self) -> dict[str, Any] | None:
        return self.raw["udp"]

    def line(self) -> str:
        tcp = self.raw["tcp"]
        text = ""
        if tcp["connections"]:
            text = (
                f"TCP {tcp['survived']} of {tcp['connections']} connections survived, "
                f"{tcp['resets']} reset, errors {tcp['errors'] or 'none'}, longest stall "
                f"{tcp['longest_stall_s']:.3f} s (median of the connections' longest "
                f"{tcp['median_stall_s']:.3f} s)"
            )
        if self.udp is not None:
            u = self.udp
            text += (
                f"{'; ' if text else ''}UDP {u['lost']} of {u['sent']} datagrams lost, "
                f"longest gap {u['longest_gap_s']:.3f} s"
            )
        return text


class Process:
    """One probe process in a namespace, started by Popen, stopped by its pid."""

    def __init__(self, ns: str, args: list[str], workdir: Path, name: str) -> None:
        self.ready = workdir / f"{name}.ready"
        self.log = workdir / f"{name}.log"
        self.ready.unlink(missing_ok=True)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, PROBE, *args,
                 "--ready", str(self.ready)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = READY_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"flow probe (pid {self.pid}) not ready: "
                    + self.log.read_text(errors="replace")[-2000:]
                )
            time.sleep(0.02)
        return dict(json.loads(self.ready.read_text()))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to our pid; SIGKILL if it has not ended within `timeout`."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)


@contextlib.contextmanager
def echo_server(ns: str, bind: str, workdir: Path) -> Iterator[Process]:
    server = Process(ns, ["server", "--bind", bind, "--port", str(PORT)], workdir, "echo-server")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


class Client:
    """The device's side: TCP connections and/or a UDP flow to the echo server."""

    def __init__(
        self,
        ns: str,
        source: str,
        target: str,
        workdir: Path,
        *,
        tcp: int = 1,
        interval: float = 0.02,
        udp_interval: float = 0.0,
        duration: float = 600.0,
        drain: float = 10.0,
    ) -> None:
        self.out = workdir / f"client-{time.monotonic_ns()}.json"
        self.process = Process(
            ns,
            ["client", "--target", target, "--port", str(PORT), "--bind", source,
             "--tcp", str(tcp), "--interval", str(interval), "--size", "32",
             "--udp-interval", str(udp_interval), "--duration", str(duration),
             "--drain", str(drain), "--out", str(self.out)],
            workdir,
            f"client-{self.out.stem}",
        )  # fmt: skip
        self.info = self.process.wait_ready()

    def finish(self, timeout: float = 60.0) -> ProbeResult:
        """Stop sending, let the echoes in flight come home (its drain), read the result."""
        self.process.stop(timeout)
        assert self.out.exists(), (
            "flow probe wrote no result: " + self.process.log.read_text(errors="replace")[-2000:]
        )
        return ProbeResult(json.loads(self.out.read_text()))

    def kill(self) -> None:
        """On a failed test: gone at once, by its pid."""
        if self.process.proc.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.proc.wait(5)
