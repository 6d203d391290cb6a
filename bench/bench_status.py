"""How long `gatepeer status` takes, against `python -c "import pyroute2"` measured in the same
run: status must cost less than importing pyroute2 alone.

    sudo .venv/bin/python bench/bench_status.py --runs 30

A lab is built, the peer set up and `gatepeer run` started in its namespace (so status reads a
live daemon's state.json, the kernel through rtnetlink and /proc). Each round runs, in an order
that alternates between rounds, every variant once as a fresh process in the peer namespace:

- status          `gatepeer status` (exit 0 expected)
- status-json     `gatepeer status --json`
- import-pyroute2 `python -c "import pyroute2"` (the reference)
- python          `python -c pass` (interpreter start-up, for scale)

Prints medians and quartiles and the ratio status / import-pyroute2; --json FILE keeps every
sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ms, summary, timed  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()

    samples: dict[str, list[float]] = {
        k: [] for k in ("status", "status-json", "import-pyroute2", "python")
    }
    with benchlib.lab() as lab:
        timed(lab.gatepeer("apply"))
        daemon = benchlib.Daemon(lab, lab.paths.dir / "bench-daemon.log")
        try:
            commands = {
                "status": lab.gatepeer("status"),
                "status-json": lab.gatepeer("status", "--json"),
                "import-pyroute2": lab.in_peer(sys.executable, "-c", "import pyroute2"),
                "python": lab.in_peer(sys.executable, "-c", "pass"),
            }
            for command in commands.values():  # warm the page cache; not counted
                timed(command)
            order = list(commands)
            for round_ in range(args.runs):
                for name in order if round_ % 2 == 0 else reversed(order):
                    samples[name].append(timed(commands[name]))
        finally:
            daemon.stop()

    print(f"# {benchlib.machine()}")
    print(f"# {args.runs} runs each, every one a new process in the peer namespace")
    print("# medians (p25 - p75)")
    stats = {name: summary(values) for name, values in samples.items()}
    for name, s in stats.items():
        print(f"{name:<16} {ms(s['median']):>9}   ({ms(s['p25'])} - {ms(s['p75'])})")
    base = stats["import-pyroute2"]["median"]
    print(f"\nstatus / import pyroute2 = {stats['status']['median'] / base:.2f}")
    print(f"status --json / import pyroute2 = {stats['status-json']['median'] / base:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": benchlib.machine(), "samples": samples}))


if __name__ == "__main__":
    main()
