#!/usr/bin/env bash
# Installs gatepeer on a Debian 12 system, as root: what the AMI bakes in (Packer runs this on
# the build instance) and what the lab's boot test runs inside a debootstrapped root.
#
#   provision.sh BUNDLE
#
# BUNDLE is what scripts/bundle.sh makes: wheels/ (the gatepeer wheel, and with
# --with-dependencies every wheel it needs), systemd/ (unit, sysusers.d and sysctl.d files) and
# README.md. pip takes dependencies missing from wheels/ from PyPI; set PIP_NO_INDEX=1 to forbid
# that. It installs:
#   /opt/gatepeer/venv                     a virtual environment with gatepeer from the wheel and
#                                          its [aws] extra (boto3: the key from SSM, IMDS facts,
#                                          the source/destination check, lifecycle hooks, routes)
#   /usr/local/bin/gatepeer                a link to its command, for operators
#   /usr/lib/systemd/system/gatepeer.service and /usr/lib/sysusers.d/gatepeer.conf
#   /usr/lib/sysctl.d/60-gatepeer.conf     forwarding and neighbour table defaults
#   /usr/lib/systemd/system/keepalived.service.d/gatepeer.conf
#                                          for an HA pair: keepalived (installed, disabled) after
#                                          gatepeer, its config rendered from [ha]; the pair's
#                                          user-data enables it
#   /usr/lib/systemd/system/conntrackd.service.d/gatepeer.conf
#                                          for an HA pair: conntrackd (installed, disabled) after
#                                          gatepeer and before keepalived, its config rendered
#                                          from [ha]; the pair's user-data enables it
#   the system user gatepeer, /etc/gatepeer, and enables gatepeer.service.
# It writes no config: cloud-init user-data (or whoever launches the machine) does. Running it
# again upgrades in place.
set -euo pipefail

bundle=${1:?usage: provision.sh BUNDLE (a directory made by scripts/bundle.sh)}
bundle=$(cd "$bundle" && pwd)
prefix=/opt/gatepeer

if [ "$(id -u)" -ne 0 ]; then
    echo "provision: must run as root" >&2
    exit 2
fi
for f in systemd/gatepeer.service systemd/gatepeer.sysusers systemd/gatepeer.sysctl.conf \
    systemd/keepalived-gatepeer.conf systemd/conntrackd-gatepeer.conf; do
    if [ ! -f "$bundle/$f" ]; then
        echo "provision: $bundle/$f missing: not a bundle from scripts/bundle.sh" >&2
        exit 2
    fi
done
shopt -s nullglob
wheels=("$bundle"/wheels/gatepeer-*.whl)
shopt -u nullglob
if ((${#wheels[@]} != 1)); then
    echo "provision: need exactly one gatepeer wheel in $bundle/wheels, found ${#wheels[@]}" >&2
    exit 2
fi

# The same Debian packages as CI: the interpreter, nft for the packet path, ip for operators;
# cloud-init writes the config from user-data at first boot (Debian's AMIs carry it already);
# keepalived elects an HA pair's master and conntrackd keeps its connections across a failover
# (docs/ha.md): in the image, so a pair in a VPC without a way to Debian's mirrors works too.
packages=(python3 python3-venv nftables iproute2 ca-certificates cloud-init conntrackd keepalived)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "provision: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "provision: system user gatepeer"
install -D -m 0644 "$bundle/systemd/gatepeer.sysusers" /usr/lib/sysusers.d/gatepeer.conf
systemd-sysusers gatepeer.conf

echo "provision: $prefix/venv from $(basename "${wheels[0]}")"
if [ ! -x "$prefix/venv/bin/python" ]; then
    install -d -m 0755 "$prefix"
    python3 -m venv "$prefix/venv"
fi
"$prefix/venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir \
    --upgrade --find-links "$bundle/wheels" "${wheels[0]}[aws]"
# Checked, not assumed: without boto3 the image would read no key from SSM.
"$prefix/venv/bin/python" -c "import boto3" || {
    echo "provision: boto3 missing from $prefix/venv after installing gatepeer[aws]" >&2
    exit 1
}
install -m 0644 "$bundle/README.md" "$prefix/README.md"
# Operators type `gatepeer status`; the unit runs the venv's own copy.
ln -sfn "$prefix/venv/bin/gatepeer" /usr/local/bin/gatepeer

echo "provision: unit, sysctl.d defaults, /etc/gatepeer"
install -D -m 0644 "$bundle/systemd/gatepeer.service" /usr/lib/systemd/system/gatepeer.service
install -D -m 0644 "$bundle/systemd/gatepeer.sysctl.conf" /usr/lib/sysctl.d/60-gatepeer.conf
# keepalived elects an HA pair's master. It stays off until a pair's user-data enables it; this
# drop-in orders it after gatepeer and renders its config from [ha] (docs/ha.md "Running it").
install -D -m 0644 "$bundle/systemd/keepalived-gatepeer.conf" \
    /usr/lib/systemd/system/keepalived.service.d/gatepeer.conf
systemctl disable keepalived.service
# conntrackd syncs a pair's connections. Debian enables it at install with a multicast example
# config; a single peer has no use for it, so it stays off until a pair's user-data enables it.
install -D -m 0644 "$bundle/systemd/conntrackd-gatepeer.conf" \
    /usr/lib/systemd/system/conntrackd.service.d/gatepeer.conf
systemctl disable conntrackd.service
# The config (no secret in it) is world-readable; the key file the user-data writes next to it
# belongs to gatepeer with mode 0600.
install -d -m 0755 /etc/gatepeer
systemctl enable gatepeer.service

"$prefix/venv/bin/gatepeer" --version
echo "provision: done; write /etc/gatepeer/gatepeer.toml (cloud-init user-data) to start it"
