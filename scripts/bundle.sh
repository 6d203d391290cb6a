#!/usr/bin/env bash
# Makes the directory scripts/provision.sh installs from, out of this checkout:
#
#   bundle.sh OUT [--with-dependencies]
#
# OUT/wheels holds the gatepeer wheel (and, with --with-dependencies, the wheels of everything
# it and its [aws] extra depend on, for this machine's architecture and Python, so provisioning
# needs no index);
# OUT/systemd the unit, sysusers.d and sysctl.d files; OUT/provision.sh and OUT/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:?usage: bundle.sh OUT [--with-dependencies]}
deps=${2:-}
python=${PYTHON:-.venv/bin/python}
rm -rf "$out"
mkdir -p "$out/wheels" "$out/systemd"
if [ "$deps" = "--with-dependencies" ]; then
    # The image reads the auth key from SSM and its facts from IMDS: the [aws] extra (boto3).
    "$python" -m pip wheel -q --disable-pip-version-check --wheel-dir "$out/wheels" ".[aws]"
else
    "$python" -m pip wheel -q --disable-pip-version-check --no-deps --wheel-dir "$out/wheels" .
fi
cp systemd/gatepeer.service systemd/gatepeer.sysusers systemd/gatepeer.sysctl.conf \
    systemd/keepalived-gatepeer.conf systemd/conntrackd-gatepeer.conf "$out/systemd/"
cp scripts/provision.sh README.md "$out/"
echo "bundle: $out ($(cd "$out/wheels" && echo *.whl))"
