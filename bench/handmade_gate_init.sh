#!/usr/bin/env bash
# The hand-made gate peer: what SORACOM's published gate_init_vxlan.sh does, written anew. The
# benchmarks compare the agent against it ("the hand-made setup"); `gatepeer lab up --baseline`
# brings the lab's gate peer up with it.
#
# usage: handmade_gate_init.sh INTERFACE LOCAL_ADDRESS INNER_CIDR VNI ENDPOINT [ENDPOINT...]
#   INTERFACE      the underlay, the instance's ENI (eth0)
#   LOCAL_ADDRESS  the instance's VPC address, registered as the gate peer's outer address
#   INNER_CIDR     the peer's inner address from registerGatePeer / the device subnet's length
#   VNI            the VPG's VXLAN id (gateVxlanId; 10 unless changed)
#   ENDPOINT       outer addresses of the VPG's tunnel endpoints (listGatePeers entries with
#                  ownedByCustomer false); one flood entry each
# environment:
#   VXLAN_IF=vxlan0   name of the tunnel link
#   FORWARDING=1      also turn on IPv4 forwarding (SORACOM's guide does it as a separate
#                     manual step; the VPC reaches the devices only with it); 0 leaves it
#
# As with the original: nothing here survives a reboot, and running it again deletes and
# re-creates the link, so traffic through it stops for that moment.
set -euo pipefail

usage() {
    echo "usage: $0 INTERFACE LOCAL_ADDRESS INNER_CIDR VNI ENDPOINT [ENDPOINT...]" >&2
    exit 2
}

is_ipv4() {
    local IFS=. octet
    local -a parts
    [[ $1 =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || return 1
    read -r -a parts <<<"$1"
    for octet in "${parts[@]}"; do
        ((10#$octet <= 255)) || return 1
    done
}

[[ $# -ge 5 ]] || usage
underlay=$1
local_address=$2
inner_cidr=$3
vni=$4
shift 4
endpoints=("$@")
vxlan_if=${VXLAN_IF:-vxlan0}
forwarding=${FORWARDING:-1}

is_ipv4 "$local_address" || { echo "not an IPv4 address: $local_address" >&2; usage; }
inner_address=${inner_cidr%/*}
inner_prefixlen=${inner_cidr##*/}
[[ $inner_cidr == */* && $inner_prefixlen =~ ^[0-9]+$ ]] && ((inner_prefixlen <= 32)) \
    && is_ipv4 "$inner_address" || { echo "not ADDRESS/PREFIXLEN: $inner_cidr" >&2; usage; }
[[ $vni =~ ^[0-9]+$ ]] && ((vni >= 1 && vni <= 16777215)) \
    || { echo "VNI must be 1-16777215: $vni" >&2; usage; }
for ep in "${endpoints[@]}"; do
    is_ipv4 "$ep" || { echo "not an IPv4 address: $ep" >&2; usage; }
done

if ip link show dev "$vxlan_if" >/dev/null 2>&1; then
    echo "- Deleting the existing $vxlan_if"
    ip link del dev "$vxlan_if"
fi

# SORACOM pins both ports to 4789 and says they cannot be changed.
echo "- Creating vxlan interface $vxlan_if (VNI $vni, local $local_address, dev $underlay)"
ip link add "$vxlan_if" type vxlan id "$vni" dstport 4789 srcport 4789 4789 \
    local "$local_address" dev "$underlay"

echo "- Setting IP address of $vxlan_if to $inner_cidr"
ip addr add "$inner_cidr" dev "$vxlan_if"
ip link set dev "$vxlan_if" up

# Head-end replication: broadcast and unknown frames (ARP first of all) go to every endpoint.
for ep in "${endpoints[@]}"; do
    echo "- Registering $ep as a peer"
    bridge fdb append 00:00:00:00:00:00 dev "$vxlan_if" dst "$ep"
done

if [[ $forwarding == 1 ]]; then
    echo "- Enabling IPv4 forwarding"
    echo 1 >/proc/sys/net/ipv4/ip_forward
fi
