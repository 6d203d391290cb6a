"""Packet path throughput in the lab: iperf3, TCP (1 and 4 flows) and small UDP packets, for

- plain:    routing without a tunnel: VPC host -> 198.51.100.1 on the fabric (one routed hop,
            no gate peer, no VXLAN). An upper bound for reference, not the target's baseline.
- handmade: the hand-made script's tunnel (`lab up --baseline`): VPC host -> device 198.19.128.1.
- route:    gatepeer `route` mode, same direction as handmade: VPC host -> device.
- nat:      gatepeer `nat` mode: device 198.19.128.1 -> iperf3 server on the VPC host, masqueraded.

The runs are interleaved (run 1 of every case, then run 2, ...) so drift on a shared machine hits
every case alike; each number is the median of --runs runs of --seconds each. Targets: route
>= 95 % and nat >= 85 % of handmade's small-packet rate.

    sudo .venv/bin/python bench/bench_throughput.py [--runs 3] [--seconds 3] [--json out.json]

Builds two labs under fresh prefixes and removes them at the end (also on failure/Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
GATEPEER = str(BIN / "gatepeer") if (BIN / "gatepeer").exists() else None
DEVICE = "198.19.128.1"
VPC_HOST = "198.18.0.20"
INTERNET = "198.51.100.1"
CASES = ("plain", "handmade", "handmade_up", "route", "nat")
# Each case is compared with the hand-made tunnel carrying traffic in the same direction:
# route like handmade (VPC host -> device), nat like handmade_up (device -> VPC host).
BASELINE = {"route": "handmade", "nat": "handmade_up"}
TESTS = ("tcp1", "tcp4", "udp64", "udp64x4")
TARGETS = {"route": 0.95, "nat": 0.85}


def gatepeer(*args: str, ns: str | None = None, env: dict[str, str] | None = None) -> str:
    cmd = [GATEPEER] if GATEPEER else [sys.executable, "-m", "gatepeer"]
    cmd = [*cmd, *args]
    if ns:
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        cmd = ["ip", "netns", "exec", ns, "env", *extra, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def config_path(prefix: str) -> Path:
    sys.path.insert(0, str(ROOT))
    from gatepeer.lab.record import Paths

    return Path(Paths.for_prefix(prefix).config)


@contextlib.contextmanager
def lab(baseline: bool) -> Iterator[str]:
    prefix = f"bt{secrets.token_hex(2)}"
    try:
        gatepeer("lab", "up", "--prefix", prefix, *(["--baseline"] if baseline else []))
        yield prefix
    finally:
        gatepeer("lab", "down", "--prefix", prefix)


def set_mode(prefix: str, mode: str, outside_vpc: str | None = None) -> None:
    path = config_path(prefix)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() != "[packet_path]"]
    lines = [ln for ln in lines if not ln.startswith(("mode =", "outside_vpc ="))]
    extra = f'outside_vpc = "{outside_vpc}"\n' if outside_vpc else ""
    path.write_text("\n".join(lines) + f'\n\n[packet_path]\nmode = "{mode}"\n{extra}')
    gatepeer("apply", ns=f"{prefix}-peer", env={"GATEPEER_CONFIG": str(path)})
    # The devices' traffic through the peer: Junction redirection, until the agent manages it.
    gatepeer("lab", "redirect", "peer", "--prefix", prefix)


@contextlib.contextmanager
def iperf_server(ns: str, addr: str) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, "iperf3", "-s", "-B", addr],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    try:
        yield
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # `ip netns exec` execs: this is iperf3's pid
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def iperf(ns: str, server: str, bind: str, test: str, seconds: int) -> float:
    """bits/s received (TCP) or packets/s received (UDP -l 64 -b 0)."""
    args = ["iperf3", "-c", server, "-B", bind, "-t", str(seconds), "-J"]
    if test == "tcp4":
        args += ["-P", "4"]
    elif test == "udp64":
        args += ["-u", "-l", "64", "-b", "0"]
    elif test == "udp64x4":
        args += ["-u", "-l", "64", "-b", "0", "-P", "4"]
    for _attempt in range(3):
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
            timeout=seconds + 30,
        )  # fmt: skip
        if proc.returncode == 0:
            break
        time.sleep(1)  # the server may still be finishing the previous test
    else:
        raise SystemExit(f"iperf3 {test} in {ns} failed:\n{proc.stdout[-1500:]}{proc.stderr}")
    end = json.loads(proc.stdout)["end"]
    if test.startswith("udp64"):
        s = end["sum"]
        return (s["packets"] - s["lost_packets"]) / s["seconds"]
    return float(end["sum_received"]["bits_per_second"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    started = time.monotonic()
    results: dict[str, dict[str, list[float]]] = {c: {t: [] for t in TESTS} for c in CASES}
    with lab(baseline=True) as hand, lab(baseline=False) as gp:
        # (client ns, server ns, server address, client source) per case.
        where = {
            "plain": (f"{gp}-vpc", f"{gp}-fabric", INTERNET, VPC_HOST),
            "handmade": (f"{hand}-vpc", f"{hand}-dev", DEVICE, VPC_HOST),
            "handmade_up": (f"{hand}-dev", f"{hand}-vpc", VPC_HOST, DEVICE),
            "route": (f"{gp}-vpc", f"{gp}-dev", DEVICE, VPC_HOST),
            "nat": (f"{gp}-dev", f"{gp}-vpc", VPC_HOST, DEVICE),
        }
        for run in range(opts.runs):
            for case in CASES:
                if case in ("route", "nat"):
                    set_mode(gp, case)
                client, server_ns, server, bind = where[case]
                with iperf_server(server_ns, server):
                    for test in TESTS:
                        value = iperf(client, server, bind, test, opts.seconds)
                        results[case][test].append(value)
                        print(f"run {run + 1} {case:8} {test:5} {value:,.0f}", flush=True)
    med = {c: {t: statistics.median(v) for t, v in tests.items()} for c, tests in results.items()}
    print()
    print(
        "| case | TCP 1 flow (Gbit/s) | TCP 4 flows (Gbit/s) | UDP 64 B 1 flow (kpps rx) "
        "| pps vs hand | UDP 64 B 4 flows (kpps rx) | pps vs hand |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for case in CASES:
        m = med[case]
        base = med[BASELINE.get(case, "handmade")]
        ratio, ratio4 = m["udp64"] / base["udp64"], m["udp64x4"] / base["udp64x4"]
        target = f" (target ≥ {TARGETS[case]:.0%})" if case in TARGETS else ""
        print(
            f"| {case} | {m['tcp1'] / 1e9:.2f} | {m['tcp4'] / 1e9:.2f} | "
            f"{m['udp64'] / 1e3:.0f} | {ratio:.0%}{target} | "
            f"{m['udp64x4'] / 1e3:.0f} | {ratio4:.0%} |"
        )
    verdict = {c: med[c]["udp64"] / med[BASELINE[c]]["udp64"] >= t for c, t in TARGETS.items()}
    print(f"\ntargets met: {verdict}; took {time.monotonic() - started:.0f} s")
    if opts.json:
        opts.json.write_text(json.dumps({"runs": results, "median": med}, indent=1))
    return 0 if all(verdict.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
