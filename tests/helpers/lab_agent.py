"""`gatepeer run` in a lab's gate peer namespace, for the integration tests of metrics, probes
and status: the lab's config gets a [metrics] listener on the peer's address and 1 s probes;
the agent is stopped by its pid when the block ends (the lab fixture removes the rest)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GATEPEER = str(Path(sys.executable).parent / "gatepeer")
METRICS_URL = "http://198.18.0.10:8479/metrics"  # the lab's gate peer address (PEER_ADDR)
PROBE_INTERVAL, PROBE_TIMEOUT = 1.0, 0.3


@dataclass
class RunningAgent:
    lab: Any
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def config(self) -> Path:
        return Path(self.lab.paths.config)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.lab.run(  # type: ignore[no-any-return]
            "peer", GATEPEER, "status", "--config", str(self.config), *args, check=False
        )

    def status_json(self) -> dict[str, Any]:
        return dict(json.loads(self.status("--json").stdout))

    def state(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(Path(self.lab.paths.state_file).read_text()))
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def add_settings(config: Path, *, metrics: bool = True) -> None:
    extra = f'\n[probes]\ninterval = "{PROBE_INTERVAL}s"\ntimeout = "{PROBE_TIMEOUT}s"\n'
    if metrics:
        extra += f'\n[metrics]\nlisten = "{METRICS_URL.split("/")[2]}"\n'
    config.write_text(config.read_text() + extra)


@contextmanager
def running_agent(lab: Any, *, metrics: bool = True) -> Iterator[RunningAgent]:
    add_settings(Path(lab.paths.config), metrics=metrics)
    log = Path(lab.paths.dir) / "agent.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns("peer"), GATEPEER, "run", "--config",
             str(lab.paths.config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    agent = RunningAgent(lab, proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            state = agent.state()
            if state and state.get("pid") == proc.pid and state.get("last_reconcile"):
                break
            if not agent.alive() or time.monotonic() > deadline:
                raise AssertionError(f"the agent did not come up:\n{log.read_text()}")
            time.sleep(0.1)
        yield agent
    finally:
        agent.stop()
