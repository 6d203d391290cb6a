#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: lint, format, types, then the test suite,
# including the tests that build network namespaces (they need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff check";  .venv/bin/ruff check gatepeer tests bench
echo "== ruff format"; .venv/bin/ruff format --check gatepeer tests bench
echo "== mypy";        .venv/bin/mypy
echo "== mkdocs";      .venv/bin/mkdocs build --strict --quiet  # a broken link fails
# The in-process benchmarks, each once as a plain test (timing is bench/README.md's business).
echo "== bench";       .venv/bin/pytest -q bench/bench_inprocess.py
echo "== pytest";      .venv/bin/pytest -q "$@"
