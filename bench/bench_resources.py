"""The daemon's memory and CPU: `gatepeer run` idle with probes on, then under a neighbour load
of 20,000 devices, sampled with psutil.

    sudo .venv/bin/python bench/bench_resources.py --idle 600 --load 600 [--json out.json]

Phase "idle": the daemon with its defaults (30 s reconcile timer, probes every 5 s to both VPG
endpoints, /metrics scraped every 15 s as a Prometheus server would), and nothing happening.
Phase "neighbours": the same daemon while the VPC host sends one UDP datagram to each of 20,000
device addresses every --spray-every seconds, so vxlan0's neighbour table holds ~20,000 entries
that are created, confirmed and expire all the time: every one of those changes is an
rtnetlink RTM_NEWNEIGH/RTM_DELNEIGH the daemon's kernel watcher receives and must skip.

Each sample: RSS (MB) and CPU seconds of the daemon's process (its threads included). CPU is
reported as the share of one core over the phase (CPU seconds / wall seconds) and the worst
minute. Goals (issue 9): idle under 60 MB and under 1 % of a core.

The neighbour thresholds (`gc_thresh1-3`) exist only in the initial namespace: they are raised
for the load phase (the agent would do that on a real host) and put back afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

try:
    import psutil
except ImportError:  # the [bench] extra
    sys.exit("bench_resources.py needs psutil: .venv/bin/pip install -e '.[bench]'")

DEVICES = 20_000
METRICS_LISTEN = "198.18.0.10:8479"
SCRAPE_EVERY_S = 15.0
THRESH = [Path(f"/proc/sys/net/ipv4/neigh/default/gc_thresh{i}") for i in (1, 2, 3)]

# One UDP datagram to each of argv[1] addresses from 198.19.130.0 upwards (the device half of
# the lab's subnet, answered by the VPG endpoints' proxy ARP).
SPRAY = """
import ipaddress, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
base = int(ipaddress.IPv4Address("198.19.130.0"))
for i in range(int(sys.argv[1])):
    s.sendto(b"n", (str(ipaddress.IPv4Address(base + i)), 9))
"""


def sample_phase(
    proc: psutil.Process, seconds: float, every: float, stop: threading.Event
) -> list[dict[str, float]]:
    rows = []
    started = time.monotonic()
    while time.monotonic() - started < seconds and not stop.is_set():
        cpu = proc.cpu_times()
        rows.append(
            {
                "t": time.monotonic() - started,
                "rss_mb": proc.memory_info().rss / 1e6,
                "cpu_s": cpu.user + cpu.system,
            }
        )
        time.sleep(every)
    return rows


def phase_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    wall = rows[-1]["t"] - rows[0]["t"]
    cpu = rows[-1]["cpu_s"] - rows[0]["cpu_s"]
    rss = [r["rss_mb"] for r in rows]
    # The worst 60 s window (by samples that far apart).
    worst = 0.0
    j = 0
    for i, row in enumerate(rows):
        while rows[j]["t"] < row["t"] - 60:
            j += 1
        if row["t"] - rows[j]["t"] >= 55 and i > j:
            worst = max(worst, (row["cpu_s"] - rows[j]["cpu_s"]) / (row["t"] - rows[j]["t"]))
    return {
        "seconds": wall,
        "cpu_pct": 100 * cpu / wall if wall else 0.0,
        "cpu_pct_worst_minute": 100 * worst,
        "rss_mb_median": statistics.median(rss),
        "rss_mb_max": max(rss),
        "rss_mb_start": rss[0],
        "rss_mb_end": rss[-1],
    }


def scraper(stop: threading.Event, ns_url: str, lab: benchlib.Lab) -> None:
    """GET /metrics every 15 s from the VPC host (the metrics listener binds the peer's address)."""
    while not stop.wait(SCRAPE_EVERY_S):
        subprocess.run(
            ["ip", "netns", "exec", lab.layout.vpc_ns, sys.executable, "-c",
             f"import urllib.request; urllib.request.urlopen({ns_url!r}, timeout=5).read()"],
            capture_output=True, check=False,
        )  # fmt: skip


def sprayer(stop: threading.Event, lab: benchlib.Lab, every: float, counts: list[int]) -> None:
    while not stop.is_set():
        began = time.monotonic()
        subprocess.run(
            ["ip", "netns", "exec", lab.layout.vpc_ns, sys.executable, "-c", SPRAY, str(DEVICES)],
            capture_output=True, check=False, timeout=120,
        )  # fmt: skip
        out = subprocess.run(
            lab.in_peer("ip", "neigh", "show", "dev", "vxlan0"), capture_output=True, text=True
        ).stdout
        counts.append(sum(1 for ln in out.splitlines() if "lladdr" in ln))
        stop.wait(max(0.0, every - (time.monotonic() - began)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=float, default=600, help="seconds of the idle phase")
    ap.add_argument("--load", type=float, default=600, help="seconds of the neighbour phase")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    ap.add_argument("--spray-every", type=float, default=20.0)
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()

    saved = [int(p.read_text()) for p in THRESH]
    result: dict[str, Any] = {"machine": benchlib.machine(), "load_avg_start": psutil.getloadavg()}
    with benchlib.lab() as lab, tempfile.TemporaryDirectory() as tmp:
        config = lab.paths.config
        config.write_text(config.read_text() + f'\n[metrics]\nlisten = "{METRICS_LISTEN}"\n')
        daemon = benchlib.Daemon(lab, Path(tmp) / "run.log")
        stop = threading.Event()
        url = f"http://{METRICS_LISTEN}/metrics"
        threads = [threading.Thread(target=scraper, args=(stop, url, lab), daemon=True)]
        threads[0].start()
        try:
            proc = psutil.Process(daemon.proc.pid)
            time.sleep(5)  # past start-up
            print(f"idle phase: {opts.idle:g} s", flush=True)
            idle = sample_phase(proc, opts.idle, opts.every, stop)
            result["idle"] = phase_summary(idle)
            print(json.dumps(result["idle"]), flush=True)

            want = (DEVICES * 2, DEVICES * 4, DEVICES * 5)
            for path, old, new in sorted(zip(THRESH, saved, want, strict=True), reverse=True):
                path.write_text(str(max(old, new)))  # only raised; gc_thresh3 first
            counts: list[int] = []
            load = threading.Thread(
                target=sprayer, args=(stop, lab, opts.spray_every, counts), daemon=True
            )
            load.start()
            threads.append(load)
            print(f"neighbour phase: {opts.load:g} s", flush=True)
            loaded = sample_phase(proc, opts.load, opts.every, stop)
            result["neighbours"] = phase_summary(loaded)
            result["neighbours"]["entries_median"] = statistics.median(counts) if counts else 0
            result["neighbours"]["sprays"] = len(counts)
            print(json.dumps(result["neighbours"]), flush=True)
            if daemon.proc.poll() is not None:
                raise SystemExit("the daemon died during the run")
            state = benchlib._read_json(lab.paths.state_file) or {}
            result["daemon_health_at_end"] = state.get("health")
            result["reconciles"] = (state.get("counters") or {}).get("reconciles")
            if opts.json:
                result["samples"] = {"idle": idle, "neighbours": loaded}
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=130)
            subprocess.run(lab.in_peer("ip", "neigh", "flush", "dev", "vxlan0"), check=False)
            daemon.stop()
            for path, old in sorted(zip(THRESH, saved, strict=True)):
                path.write_text(str(old))  # gc_thresh1 first when lowering
    result["load_avg_end"] = psutil.getloadavg()
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if opts.json:
        opts.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
