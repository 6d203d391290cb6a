"""Packets lost while the gate peer is set up again on a working tunnel: `gatepeer apply`
against the hand-made script (bench/handmade_gate_init.sh, which deletes and re-creates
vxlan0), with the same packet stream, in the same run.

    sudo .venv/bin/python bench/bench_reapply_loss.py --reps 7
    sudo .venv/bin/python bench/bench_reapply_loss.py --reps 3 --vpc-accepts-redirects

Each repetition, for each method (the order alternates between repetitions): a ping stream from
the VPC host to a device through the tunnel (`ping -i 0.002`, 3 s, 1500 packets), the re-apply
one second into it, then the stream's lost packets and its outage (the longest run of lost
packets times 2 ms). After the script the agent re-converges the peer (not measured) so that
every `gatepeer apply` starts from a converged peer, as a re-run on a working appliance does.
Nothing flushes the VPG endpoints' ARP caches: the real VPG would not either.

While vxlan0 is gone, the gate peer routes device-bound packets back out of eth0 and sends the
VPC host an ICMP redirect to the VPC router, which the host caches for 300 s: in this lab the
devices then stay unreachable from it for five minutes. By default the VPC host ignores
redirects (accept_redirects = 0), so the numbers are the tunnel's own gap; with
--vpc-accepts-redirects it keeps the kernel default, and its route cache is flushed after each
repetition so that the next one starts clean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import PingStream, ms, netns, summary, wait_ping  # noqa: E402

INTERVAL = 0.002
COUNT = 1500
LEAD_S = 1.0


def one(lab: benchlib.Lab, device: str, cmd: list[str]) -> dict[str, float]:
    stream = PingStream(lab.layout.vpc_ns, device, INTERVAL, COUNT)
    time.sleep(LEAD_S)
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    took = time.perf_counter() - started
    result = stream.result()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return {**result, "command_s": took}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument(
        "--vpc-accepts-redirects",
        action="store_true",
        help="leave the VPC host's accept_redirects at the kernel default (1)",
    )
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {"gatepeer apply": [], "hand-made script": []}
    with benchlib.lab() as lab:
        device = str(lab.layout.devices[0])
        vpc = lab.layout.vpc_ns
        if not args.vpc_accepts_redirects:
            netns.write_sysctls(
                vpc,
                {"net.ipv4.conf.all.accept_redirects": 0, "net.ipv4.conf.eth0.accept_redirects": 0},
            )
        subprocess.run(lab.gatepeer("apply"), check=True, capture_output=True)
        lab.redirect_to_peer()
        handmade = lab.handmade()
        wait_ping(lab.layout.vpc_ns, device)
        for rep in range(args.reps):
            order = ["gatepeer apply", "hand-made script"]
            if rep % 2:
                order.reverse()
            for method in order:
                cmd = lab.gatepeer("apply") if method == "gatepeer apply" else handmade
                results[method].append(one(lab, device, cmd))
                if method == "hand-made script":
                    # Back to the agent's converged state (untimed), and traffic flowing.
                    subprocess.run(lab.gatepeer("apply"), check=True, capture_output=True)
                netns.ip(vpc, "route", "flush", "cache")  # a cached redirect, if any
                wait_ping(vpc, device)
                time.sleep(0.2)

    report(results, args.reps, args.vpc_accepts_redirects)
    if args.json:
        args.json.write_text(json.dumps({"machine": benchlib.machine(), "samples": results}))


def report(results: dict[str, list[dict[str, Any]]], reps: int, redirects: bool) -> None:
    print(f"# {benchlib.machine()}")
    print(f"# VPC host accepts ICMP redirects: {'yes (kernel default)' if redirects else 'no'}")
    print(
        f"# {reps} repetitions, ping every {INTERVAL * 1000:g} ms ({COUNT} packets), "
        "medians (min-max)"
    )
    print(f"{'method':<18} {'lost packets':>14} {'outage':>22} {'command':>12}")
    for method, rows in results.items():
        lost = [r["lost"] for r in rows]
        outage = [r["outage_s"] for r in rows]
        cmd = [r["command_s"] for r in rows]
        print(
            f"{method:<18} {statistics.median(lost):>6g} ({min(lost):g}-{max(lost):g})"
            f" {ms(statistics.median(outage)):>10} ({ms(min(outage))}-{ms(max(outage))})"
            f" {ms(summary(cmd)['median']):>10}"
        )
        print(f"  lost per repetition: {lost}")
        print(f"  outage per repetition (ms): {[round(o * 1000) for o in outage]}")


if __name__ == "__main__":
    main()
