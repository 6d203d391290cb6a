"""How fast `gatepeer run` repairs drift: a VPG endpoint's flood entry deleted by hand, and
vxlan0 itself deleted by hand. Goal: under one second.

    sudo .venv/bin/python bench/bench_drift.py --runs 15

The daemon runs in the lab's peer namespace with reconcile_interval = "1h", so every repair
comes from the kernel event, not from the timer. A worker in the same namespace deletes the
object through rtnetlink, takes the time, and polls rtnetlink (every 0.5 ms) until the object
is back: the flood entry with its destination; vxlan0 up with its inner address and one flood
entry per endpoint. Medians of `--runs` deletions each.

What it replaces: nothing repairs the hand-made setup at all, and a daemon that only
reconciles on its timer repairs after half its interval on average (15 s with the default
30 s).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ZERO_MAC, ms, summary  # noqa: E402

POLL_S = 0.0005
DEADLINE_S = 10.0


def worker(kind: str, runs: int, endpoints: list[str]) -> None:
    """In the peer namespace: delete `kind` `runs` times, time each repair."""
    from pyroute2 import IPRoute

    ipr = IPRoute()

    def index() -> int | None:
        found = ipr.link_lookup(ifname="vxlan0")
        return int(found[0]) if found else None

    def flood(idx: int) -> set[str]:
        return {
            str(e.get_attr("NDA_DST"))
            for e in ipr.fdb("dump", ifindex=idx)
            if e["ifindex"] == idx and e.get_attr("NDA_LLADDR") == ZERO_MAC
        }

    def link_converged() -> bool:
        idx = index()
        if idx is None:
            return False
        link = ipr.link("get", index=idx)[0]
        if not link["flags"] & 1:  # IFF_UP
            return False
        if not ipr.addr("dump", family=socket.AF_INET, index=idx):
            return False
        return flood(idx) == set(endpoints)

    def wait(done: object) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < DEADLINE_S:
            if done():  # type: ignore[operator]
                return time.perf_counter() - started
            time.sleep(POLL_S)
        raise SystemExit(f"{kind}: not repaired within {DEADLINE_S:g}s")

    target = endpoints[0]
    times: list[float] = []
    for _ in range(runs):
        wait(link_converged)
        time.sleep(0.2)  # let the daemon go back to waiting
        idx = index()
        assert idx is not None
        if kind == "fdb":
            started = time.perf_counter()
            ipr.fdb("del", ifindex=idx, lladdr=ZERO_MAC, dst=target)
            while True:
                now = index()
                if now is not None and target in flood(now):
                    break
                if time.perf_counter() - started > DEADLINE_S:
                    raise SystemExit("fdb: not repaired")
                time.sleep(POLL_S)
            times.append(time.perf_counter() - started)
        else:
            started = time.perf_counter()
            ipr.link("del", index=idx)
            while not link_converged():
                if time.perf_counter() - started > DEADLINE_S:
                    raise SystemExit("link: not repaired")
                time.sleep(POLL_S)
            times.append(time.perf_counter() - started)
    ipr.close()
    json.dump(times, sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--worker", choices=("fdb", "link"), help=argparse.SUPPRESS)
    parser.add_argument("--endpoints", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.runs, args.endpoints)
        return

    samples: dict[str, list[float]] = {}
    with benchlib.lab() as lab, tempfile.TemporaryDirectory() as tmp:
        text = lab.paths.config.read_text().replace(
            'reconcile_interval = "30s"', 'reconcile_interval = "1h"'
        )
        lab.paths.config.write_text(text)
        endpoints = [str(ep.outer) for ep in lab.layout.endpoints]
        daemon = benchlib.Daemon(lab, Path(tmp) / "run.log")
        try:
            for kind, label in (("fdb", "flood entry deleted"), ("link", "vxlan0 deleted")):
                proc = subprocess.run(
                    lab.in_peer(sys.executable, __file__, "--worker", kind,
                                "--runs", str(args.runs), "--endpoints", *endpoints),
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if proc.returncode != 0:
                    log = (Path(tmp) / "run.log").read_text()
                    raise SystemExit(f"worker {kind} failed:\n{proc.stderr}\n{log[-3000:]}")
                samples[label] = json.loads(proc.stdout)
            api_counts = lab.emulator_state()["counts"]
        finally:
            daemon.stop()

    print(f"# {benchlib.machine()}")
    print(f"# {args.runs} deletions each, daemon interval 1h (repairs by kernel event only)")
    for label, values in samples.items():
        s = summary(values)
        print(
            f"{label:<22} median {ms(s['median']):>9}   p25-p75 {ms(s['p25'])} - {ms(s['p75'])}"
            f"   max {ms(s['max'])}"
        )
    print(f"emulator calls during the whole run: {api_counts} (repairs make none)")
    if args.json:
        args.json.write_text(json.dumps({"machine": benchlib.machine(), "samples": samples}))


if __name__ == "__main__":
    main()
