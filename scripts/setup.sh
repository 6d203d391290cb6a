#!/usr/bin/env bash
# Prepares a Debian 12 host (as root) for gatepeer's lab and tests: the Debian packages the lab
# and the tests drive, and a virtual environment in .venv with gatepeer and its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
    python3 python3-venv python3-pip  # the interpreter and venv
    iproute2                          # ip, bridge: the lab and the baseline script
    nftables conntrack                # the packet path
    iperf3 iputils-ping tcpdump       # traffic in the lab and the benchmarks
    keepalived conntrackd             # high availability: the VRRP election, the conntrack sync
    ethtool                           # the ENA counters' ioctl checked against `ethtool -S`
    dnsmasq-base                      # the recipe labs' DNS stand-in (tests/helpers/recipe_lab.py)
    prometheus                        # promtool and the server for the metrics tests
    procps kmod ca-certificates
    systemd systemd-container         # systemd-analyze (unit checks), systemd-nspawn (boot test)
    debootstrap zstd                  # the boot test's Debian 12 root, cached as a tarball
    cloud-init packer                 # user-data schema, Packer fmt/validate
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own interpreter: the tests must not depend on whatever else is first on PATH.
if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: ready ($(.venv/bin/gatepeer --version))"
