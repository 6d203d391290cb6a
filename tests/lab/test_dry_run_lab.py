"""The dry run's twin, in the lab (STYLE.md section 2, after ifupdown2's `--no-act`): the lines
`gatepeer apply --dry-run` prints are the commands that make the change. Run the kernel's
lines (ip, bridge, sysctl, nft) in the gate peer namespace by hand, make the API's through the
emulator, and the next dry run plans nothing.

The `soracom` lines are not run as printed: they are for SORACOM's own CLI, which talks to the
real API (nothing here may). Their effect is made through the lab's API client instead: the
registration before the first dry run (so the plan knows the inner address the API assigns),
the redirection after the script.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
from conftest import LabHandle
from helpers.lab_checks import flood_entries, inner_address

from gatepeer.lab.network.layout import PEER_ADDR

pytestmark = pytest.mark.netns

KERNEL_TOOLS = ("ip", "bridge", "sysctl", "nft")
CONVERGED = "nothing to change: already converged"


def split_plan(output: str) -> tuple[list[str], list[str], list[str]]:
    """A dry run's output as (the kernel's script lines, the `soracom` lines, the first word of
    each kernel command). Comments stay in the script (bash skips them); a heredoc's body is
    data, kept whole and not read as commands."""
    script: list[str] = []
    api: list[str] = []
    tools: list[str] = []
    heredoc_end: str | None = None
    for line in output.splitlines():
        if heredoc_end is not None:
            script.append(line)
            if line == heredoc_end:
                heredoc_end = None
            continue
        if line.startswith("soracom "):
            api.append(line)
            continue
        script.append(line)
        if not line.strip() or line.startswith("#"):
            continue
        tools.append(line.split()[0])
        if "<<'" in line:
            heredoc_end = line.split("<<'", 1)[1].split("'", 1)[0]
    return script, api, tools


def dry_run(lab: LabHandle) -> str:
    proc = lab.gatepeer("apply", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_running_the_printed_plan_leaves_nothing_to_plan(
    make_lab: Callable[..., LabHandle],
) -> None:
    lab = make_lab()
    registered = lab.api().register_gate_peer(str(PEER_ADDR))  # the register-gate-peer line
    inner = registered["innerIpAddress"]

    first = dry_run(lab)
    script, api, tools = split_plan(first)
    assert set(tools) == set(KERNEL_TOOLS), first  # every kind of kernel change, nothing else
    assert f"ip addr add {inner}/" in first
    # Registered already: only the redirection to this peer is left to the API.
    assert [line.split()[:3] for line in api] == [["soracom", "vpg", "set-redirection"]], api
    assert f'"gateway":"{inner}"' in api[0]

    ran = subprocess.run(
        ["ip", "netns", "exec", lab.ns("peer"), "bash", "-e", "-u", "-o", "pipefail", "-s"],
        input="\n".join(script) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert str(inner_address(lab)).startswith(f"{inner}/")
    assert flood_entries(lab) == {str(ep.outer) for ep in lab.layout.endpoints}
    lab.set_redirection("peer")  # the set-redirection line, through the emulator

    second = dry_run(lab)
    planned = [line for line in second.splitlines() if not line.startswith("# note:")]
    assert planned == [CONVERGED], second
