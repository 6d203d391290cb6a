#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then builds the lab and runs the demo: a gate peer in its own
# namespace, traffic from a VPC host to devices behind the emulated VPG through vxlan0.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/gatepeer lab demo "$@"
