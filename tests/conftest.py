"""Shared fixtures. The lab fixtures build real labs (network namespaces, an emulator process)
under a unique prefix per test, and always remove them, checking that nothing is left.

Tests marked `netns` are skipped, with the reason, when this is not root or `ip netns` does not
work here; every other test runs anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@functools.cache
def netns_unavailable() -> str | None:
    """Why lab tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"needs iproute2 (`{tool}` not found)"
    probe = f"gpprobe{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("netns") is not None:
        reason = netns_unavailable()
        if reason:
            pytest.skip(reason)


@dataclass
class LabHandle:
    """One lab under test: its prefix and files, the emulator, and helpers to act inside."""

    prefix: str
    up_result: Any = None  # click's Result of the `lab up` that built it
    options: dict[str, Any] = field(default_factory=dict)
    emulator_pids_seen: list[int] = field(default_factory=list)  # checked dead at teardown

    @property
    def paths(self) -> Any:
        from gatepeer.lab.record import Paths

        return Paths.for_prefix(self.prefix)

    @property
    def layout(self) -> Any:
        from gatepeer.lab.record import LabRecord

        record = LabRecord.load(self.paths.lab_json)
        assert record is not None, f"lab {self.prefix} has no lab.json"
        return record.layout

    def ns(self, role: str) -> str:
        """Full namespace name of a role: 'peer', 'vpc', 'fabric', 'vpg1', 'dev'..."""
        return f"{self.prefix}-{role}"

    @property
    def control_url(self) -> str:
        """The emulator's base URL on 127.0.0.1 (API under /v1, control under /_emulator/)."""
        info = json.loads(self.paths.emulator_json.read_text())
        return str(info["host_url"])

    def state(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.control_url}/_emulator/state", timeout=10) as r:
            return dict(json.loads(r.read()))

    def api(self) -> Any:
        """An authenticated SORACOM API client for this lab's emulator."""
        from gatepeer.lab.api_client import lab_api
        from gatepeer.lab.record import LabRecord

        record = LabRecord.load(self.paths.lab_json)
        assert record is not None
        return lab_api(self.paths, record, self.control_url)

    def run(
        self, role: str, *cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the lab namespace of `role`."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(role), *cmd],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def cli(self, *args: str) -> Any:
        """`gatepeer lab ARGS... --prefix PREFIX` in process; returns click's Result."""
        from click.testing import CliRunner

        from gatepeer.lab.cli import lab

        return CliRunner().invoke(lab, [*args, "--prefix", self.prefix], catch_exceptions=False)

    def leftovers(self) -> list[str]:
        """What of this lab still exists: namespaces, folder, a live emulator."""
        from gatepeer.lab import control
        from gatepeer.lab.processes.pids import runs

        left = list(control.lab_namespaces(self.prefix))
        if self.paths.dir.exists():
            left.append(str(self.paths.dir))
        for pid in self.emulator_pids_seen:
            if runs(pid, "gatepeer.lab.emulator --lab-dir"):
                left.append(f"emulator pid {pid}")
        return left

    def remember_emulator(self) -> None:
        from gatepeer.lab.processes.emulator_process import emulator_pid

        pid = emulator_pid(self.paths)
        if pid is not None and pid not in self.emulator_pids_seen:
            self.emulator_pids_seen.append(pid)

    # ---- the agent under test, in the gate peer namespace ----------------------------------

    def gatepeer(
        self, *args: str, config: Path | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """`gatepeer ARGS...` in the peer namespace with this lab's config (GATEPEER_CONFIG),
        as a user would run it; never raises on a non-zero exit."""
        env = f"GATEPEER_CONFIG={config or self.paths.config}"
        return self.run(
            "peer", "env", env, *gatepeer_command(), *args, check=False, timeout=timeout
        )

    def set_config(self, section: str, key: str, value: str | None) -> None:
        """Set `key = value` (value is TOML text, e.g. '"1h"' or '1400') in [section] of the
        lab's gatepeer.toml, adding the key or the section when missing; None removes it."""
        path = self.paths.config
        path.write_text(edit_toml(path.read_text(), section, key, value))

    def control(self, name: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /_emulator/NAME (settings, faults, reset_faults, ...); the state document."""
        req = urllib.request.Request(
            f"{self.control_url}/_emulator/{name}",
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def set_redirection(self, gateway: str | None = "peer") -> dict[str, Any]:
        """Junction redirection through the lab's API (setRedirectionConfiguration), until the
        agent manages it: devices' traffic leaving the device subnet goes over the tunnel to
        `gateway` ("peer": the lab gate peer's registered inner address); None unsets it (the
        VPG's own NATed way out). The lab's routing has followed when this returns."""
        from gatepeer.lab import control

        return dict(control.redirect(self.prefix, gateway))

    def agent_state(self) -> dict[str, Any] | None:
        """The agent's state.json ([agent] state_file of the lab's config), or None."""
        try:
            return dict(json.loads(self.paths.state_file.read_text()))
        except (OSError, ValueError):
            return None


def gatepeer_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m gatepeer`."""
    script = Path(sys.executable).with_name("gatepeer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gatepeer"]


def edit_toml(text: str, section: str, key: str, value: str | None) -> str:
    """A line-level edit of a flat TOML file (what the lab writes): no TOML writer needed."""
    lines = text.splitlines()
    header = f"[{section}]"
    key_re = re.compile(rf"^\s*{re.escape(key)}\s*=")
    if header not in (ln.strip() for ln in lines):
        if value is not None:
            lines += ["", header, f"{key} = {value}"]
        return "\n".join(lines) + "\n"
    start = next(i for i, ln in enumerate(lines) if ln.strip() == header)
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines)
    )
    for i in range(start + 1, end):
        if key_re.match(lines[i]):
            if value is None:
                del lines[i]
            else:
                lines[i] = f"{key} = {value}"
            break
    else:
        if value is not None:
            # After the section's last non-blank line.
            at = end
            while at > start + 1 and not lines[at - 1].strip():
                at -= 1
            lines.insert(at, f"{key} = {value}")
    return "\n".join(lines) + "\n"


def new_prefix() -> str:
    """Short and unique, so parallel runs never share a namespace or a folder."""
    return f"gt{secrets.token_hex(2)}"


@pytest.fixture
def make_lab() -> Iterator[Callable[..., LabHandle]]:
    """A factory: make_lab(vni=4711, device_subnet="198.19.5.0/24", baseline=True, up=True)
    builds a lab with `gatepeer lab up` under a fresh prefix. Every lab it made is removed at
    teardown, even when the test or the build failed, and the teardown fails if anything of
    it is left (namespaces, folder, emulator process)."""
    handles: list[LabHandle] = []

    def make(*, up: bool = True, baseline: bool = False, **options: Any) -> LabHandle:
        handle = LabHandle(prefix=new_prefix(), options=options)
        handles.append(handle)  # registered before building: a failed build is removed too
        if up:
            args = ["up"]
            for key, value in options.items():
                args += [f"--{key.replace('_', '-')}", str(value)]
            if baseline:
                args.append("--baseline")
            result = handle.cli(*args)
            handle.remember_emulator()
            assert result.exit_code == 0, result.output
            handle.up_result = result
        return handle

    yield make

    from gatepeer.lab import control

    problems = []
    for handle in handles:
        handle.remember_emulator()
        control.down(handle.prefix)
        left = handle.leftovers()
        if left:
            problems.append(f"{handle.prefix}: {left}")
    assert not problems, f"lab teardown left things behind: {problems}"


@pytest.fixture
def lab(make_lab: Callable[..., LabHandle]) -> LabHandle:
    """A default lab (VNI 10, 198.19.0.0/16, two VPG endpoints), gate peer not set up."""
    return make_lab()


@pytest.fixture
def baseline_lab(make_lab: Callable[..., LabHandle]) -> LabHandle:
    """A default lab whose gate peer runs the hand-made setup (bench/handmade_gate_init.sh)."""
    return make_lab(baseline=True)


@dataclass
class AgentDaemon:
    """`gatepeer run` started by a test in a lab's peer namespace; stopped by its pid only."""

    lab: LabHandle
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        # `ip netns exec` execs in place: this is the daemon's own pid.
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def running(self) -> bool:
        return self.proc.poll() is None

    def state(self) -> dict[str, Any] | None:
        """state.json as this daemon wrote it (None before its first write)."""
        state = self.lab.agent_state()
        return state if state is not None and state.get("pid") == self.pid else None

    def wait_state(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15, what: str = ""
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            assert self.running(), f"gatepeer run exited {self.proc.returncode}:\n{self.log()}"
            state = self.state()
            if state is not None and predicate(state):
                return state
            time.sleep(0.05)
        raise AssertionError(
            f"state.json never showed {what or 'the expected state'} within {timeout:g}s; "
            f"last: {json.dumps(state, indent=1)[:1500]}\nlog:\n{self.log()[-3000:]}"
        )

    def wait_log(self, text: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert self.running(), f"gatepeer run exited {self.proc.returncode}:\n{self.log()}"
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log()[-3000:]}"
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM by pid and wait (an API call in flight may delay the exit); SIGKILL if it
        does not exit. Returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


@pytest.fixture
def agent_daemon(tmp_path: Path) -> Iterator[Callable[..., AgentDaemon]]:
    """A factory: agent_daemon(lab, ready=True) starts `gatepeer run -v` in the lab's peer
    namespace with the lab's config, and (ready) waits for its first converged reconcile.
    Every daemon it started is stopped by its pid at teardown, before the lab is removed."""
    daemons: list[AgentDaemon] = []

    def start(lab: LabHandle, *, ready: bool = True) -> AgentDaemon:
        log_path = tmp_path / f"gatepeer-run-{lab.prefix}-{len(daemons)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    "ip", "netns", "exec", lab.ns("peer"),
                    "env", f"GATEPEER_CONFIG={lab.paths.config}",
                    *gatepeer_command(), "run", "-v",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        daemon = AgentDaemon(lab, proc, log_path)
        daemons.append(daemon)
        if ready:
            daemon.wait_state(lambda s: s["health"] == "ok", what="health ok")
        return daemon

    yield start

    for daemon in daemons:
        daemon.stop()


@pytest.fixture(scope="module")
def moto() -> Iterator[Any]:
    """moto's server (helpers/aws_fakes.Moto) on 127.0.0.1, one per test module."""
    from helpers.aws_fakes import Moto

    server = Moto()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def contract() -> Any:
    """SORACOM's API spec as a validating contract (helpers/soracom_spec.py)."""
    from helpers.soracom_spec import load_contract

    return load_contract()
