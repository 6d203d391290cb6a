"""How long one `apply` takes, from scratch and when nothing is left to do, against the lab's
API emulator (no added latency); the hand-made script (bench/handmade_gate_init.sh) run the
same number of times, in the same rounds, is the baseline.

    sudo .venv/bin/python bench/bench_apply.py --runs 20

Variants, each timed once per round, rounds interleaved so the machine's noise hits all alike:

- cli-scratch        `gatepeer apply` (the command, in the peer namespace) with no vxlan0, no
                     registration, no state.json: auth, register, list, build, tune, verify
- cli-noop           `gatepeer apply` again on the converged peer
- handmade-scratch   the script with no vxlan0 (the peer registered beforehand, as its user
                     must do by hand: registration is not in the time)
- handmade-rerun     the script again: it deletes and re-creates vxlan0
- inproc-scratch     Agent(config).reconcile() in a Python process inside the peer namespace,
                     from scratch (as cli-scratch, without interpreter start-up and imports)
- inproc-noop        the same on the converged peer
- cli-version        `gatepeer --version` (interpreter and click start-up, no agent import)
- cli-imports        `python -c "import gatepeer.agent"` (start-up plus the agent's imports,
                     pyroute2 first): what a `gatepeer apply` costs before it does anything

Prints a table and, with --json FILE, writes every sample.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import ms, summary, timed  # noqa: E402


def worker(config: str, runs: int) -> None:
    """In the peer namespace: time Agent.reconcile() from scratch and as a no-op, `runs` each."""
    from gatepeer.agent import Agent
    from gatepeer.config import load
    from gatepeer.kernel import sysctl

    cfg = load(Path(config))
    out: dict[str, list[float]] = {"inproc-scratch": [], "inproc-noop": []}
    for _ in range(runs):
        # Untimed: back to nothing (no link, no registration, no state, sysctls as the lab has).
        agent = Agent(cfg)
        agent.teardown(unregister=True)
        agent.close()
        sysctl.write("net/ipv4/ip_forward", 0)
        sysctl.write("net/ipv4/conf/eth0/rp_filter", 0)
        for variant in ("inproc-scratch", "inproc-noop"):
            started = time.perf_counter()
            agent = Agent(cfg)
            try:
                result = agent.reconcile()
            finally:
                agent.close()
            took = time.perf_counter() - started
            if result.health != "ok" or (variant == "inproc-noop") == bool(result.actions):
                raise SystemExit(f"{variant}: {result.health} {result.reasons} {result.actions}")
            out[variant].append(took)
    json.dump(out, sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.runs)
        return

    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "cli-scratch",
            "cli-noop",
            "handmade-scratch",
            "handmade-rerun",
            "cli-version",
            "cli-imports",
        )
    }
    with benchlib.lab() as lab:
        # Warm-up (page cache, first registration's code paths); not counted.
        timed(lab.gatepeer("apply"))
        handmade = lab.handmade()
        timed(handmade)
        for round_ in range(args.runs):
            pair = [("cli", _cli_pair), ("handmade", _handmade_pair)]
            if round_ % 2:
                pair.reverse()
            for _, measure in pair:
                for variant, took in measure(lab, handmade):
                    samples[variant].append(took)
            samples["cli-version"].append(
                timed(lab.in_peer(*benchlib.gatepeer_command(), "--version"))
            )
            samples["cli-imports"].append(
                timed(lab.in_peer(sys.executable, "-c", "import gatepeer.agent"))
            )
        proc = subprocess.run(
            lab.in_peer(sys.executable, __file__, "--worker", str(lab.paths.config),
                        "--runs", str(args.runs)),
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"in-process worker failed:\n{proc.stderr}")
        samples.update(json.loads(proc.stdout))
        api_counts = lab.emulator_state()["counts"]

    report(samples, args.runs)
    print(f"\nemulator calls over the whole run: {api_counts}")
    if args.json:
        args.json.write_text(json.dumps({"machine": benchlib.machine(), "samples": samples}))


def _cli_pair(lab: benchlib.Lab, _handmade: list[str]) -> list[tuple[str, float]]:
    lab.reset_peer(unregister=True)
    scratch = timed(lab.gatepeer("apply"))
    noop = timed(lab.gatepeer("apply"))
    return [("cli-scratch", scratch), ("cli-noop", noop)]


def _handmade_pair(lab: benchlib.Lab, handmade: list[str]) -> list[tuple[str, float]]:
    lab.reset_peer(unregister=False)  # the script needs the registration; it is not timed
    scratch = timed(handmade)
    rerun = timed(handmade)
    return [("handmade-scratch", scratch), ("handmade-rerun", rerun)]


def report(samples: dict[str, list[float]], runs: int) -> None:
    print(f"# {benchlib.machine()}")
    print(f"# {runs} runs each, medians (p25-p75)")
    stats: dict[str, dict[str, Any]] = {k: summary(v) for k, v in samples.items()}
    for name, s in stats.items():
        print(f"{name:<18} {ms(s['median']):>10}   ({ms(s['p25'])} - {ms(s['p75'])})")
    base_scratch = stats["handmade-scratch"]["median"]
    base_rerun = stats["handmade-rerun"]["median"]
    print("\nratios of medians (agent / hand-made script):")
    for name, base, label in (
        ("cli-scratch", base_scratch, "handmade-scratch"),
        ("cli-noop", base_rerun, "handmade-rerun"),
        ("inproc-scratch", base_scratch, "handmade-scratch"),
        ("inproc-noop", base_rerun, "handmade-rerun"),
    ):
        print(f"  {name:<15} / {label:<17} = {stats[name]['median'] / base:.2f}")


if __name__ == "__main__":
    main()
