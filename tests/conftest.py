"""Shared fixtures. The lab fixtures build real labs (network namespaces, an emulator process)
under a unique prefix per test, and always remove them, checking that nothing is left.

Tests marked `netns` are skipped, with the reason, when this is not root or `ip netns` does not
work here; every other test runs anywhere.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
        from gatepeer.lab.topology import Paths

        return Paths.for_prefix(self.prefix)

    @property
    def layout(self) -> Any:
        from gatepeer.lab.topology import LabRecord

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
        from gatepeer.lab.topology import LabRecord, lab_api

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

        from gatepeer.lab.commands import lab

        return CliRunner().invoke(lab, [*args, "--prefix", self.prefix], catch_exceptions=False)

    def leftovers(self) -> list[str]:
        """What of this lab still exists: namespaces, folder, a live emulator."""
        from gatepeer.lab import topology

        left = list(topology.lab_namespaces(self.prefix))
        if self.paths.dir.exists():
            left.append(str(self.paths.dir))
        for pid in self.emulator_pids_seen:
            if topology._pid_alive(pid) and "gatepeer.lab.run_emulator" in " ".join(
                topology._proc_cmdline(pid)
            ):
                left.append(f"emulator pid {pid}")
        return left

    def remember_emulator(self) -> None:
        from gatepeer.lab.topology import emulator_pid

        pid = emulator_pid(self.paths)
        if pid is not None and pid not in self.emulator_pids_seen:
            self.emulator_pids_seen.append(pid)


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

    from gatepeer.lab import topology

    problems = []
    for handle in handles:
        handle.remember_emulator()
        topology.down(handle.prefix)
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
