#!/usr/bin/env bash
# Installs AWS's SSM Agent on the AMI's build instance, so an operator reaches each instance with
# Session Manager (no key pair, no inbound port). Debian's AMIs carry no SSM agent.
#
#   ssm-agent.sh install REGION ARCH KEY   download, verify and install (Packer runs this)
#   ssm-agent.sh verify DEB SIG KEY        verify only (the tests run this)
#
# ARCH is Debian's name (amd64, arm64). KEY is AWS's public key for the SSM Agent packages, as
# AWS prints it in "Verifying the signature of SSM Agent" (Systems Manager user guide). The key
# itself is not trusted: its fingerprint must be SSM_AGENT_KEY_FINGERPRINT below, and the
# signature must be a good one (not expired, not revoked) made by that key, or nothing is
# installed and the build fails. When AWS renews the key (it extends its expiry), put the new
# text in KEY; a new fingerprint means a new key and a reviewed change of this file.
set -euo pipefail

# AWS's SSM Agent signing key ("SSM Agent <ssm-agent-signer@amazon.com>").
SSM_AGENT_KEY_FINGERPRINT=DE92C7DA3E56E92331D62A36BC1F495C97DD04ED

fail() {
    echo "ssm-agent: $*" >&2
    exit 1
}

# Temporary directories, removed however the script ends.
temporary=()
trap 'rm -rf "${temporary[@]}"' EXIT

# verify DEB SIG KEY: exit 0 only for a good signature of DEB by the pinned key.
verify() {
    local deb=$1 sig=$2 key=$3 home status fingerprints
    for f in "$deb" "$sig" "$key"; do
        [ -f "$f" ] || fail "$f: no such file"
    done
    # A throwaway keyring: nothing the build host trusts takes part.
    home=$(mktemp -d)
    temporary+=("$home")
    fingerprints=$(gpg --homedir "$home" --batch --with-colons --import-options show-only \
        --import "$key" 2>/dev/null | awk -F: '$1 == "fpr" {print $10; exit}')
    if [ "$fingerprints" != "$SSM_AGENT_KEY_FINGERPRINT" ]; then
        fail "$key: key ${fingerprints:-(none)} is not AWS's SSM Agent key $SSM_AGENT_KEY_FINGERPRINT"
    fi
    gpg --homedir "$home" --batch --quiet --import "$key" 2>/dev/null ||
        fail "$key: gpg cannot import it"
    # --status-fd: machine-readable; the exit code alone also passes an expired key's signature.
    status=$(gpg --homedir "$home" --batch --status-fd 1 --verify "$sig" "$deb" 2>/dev/null) || true
    if ! grep -q "^\[GNUPG:\] GOODSIG " <<<"$status" ||
        ! grep -Eq "^\[GNUPG:\] VALIDSIG .* $SSM_AGENT_KEY_FINGERPRINT\$" <<<"$status"; then
        fail "$deb: no good signature by $SSM_AGENT_KEY_FINGERPRINT in $sig ($(grep -Eo \
            'GNUPG:\] (BADSIG|EXPKEYSIG|REVKEYSIG|EXPSIG|ERRSIG|NO_PUBKEY)' <<<"$status" |
            head -1 | cut -d' ' -f2 || true))"
    fi
    echo "ssm-agent: $deb: good signature by $SSM_AGENT_KEY_FINGERPRINT"
}

install_agent() {
    local region=$1 arch=$2 key=$3 dir base
    [[ $region =~ ^[a-z]{2}(-[a-z]+)+-[0-9]{1,2}$ ]] || fail "region $region: not an AWS region"
    [[ $arch =~ ^(amd64|arm64)$ ]] || fail "architecture $arch: amd64 or arm64"
    dir=$(mktemp -d)
    temporary+=("$dir")
    # The regional bucket, as AWS documents for Debian and Ubuntu.
    base="https://s3.$region.amazonaws.com/amazon-ssm-$region/latest/debian_$arch"
    curl --fail --silent --show-error --location --proto '=https' \
        -o "$dir/amazon-ssm-agent.deb" "$base/amazon-ssm-agent.deb"
    curl --fail --silent --show-error --location --proto '=https' \
        -o "$dir/amazon-ssm-agent.deb.sig" "$base/amazon-ssm-agent.deb.sig"
    verify "$dir/amazon-ssm-agent.deb" "$dir/amazon-ssm-agent.deb.sig" "$key"
    dpkg -i "$dir/amazon-ssm-agent.deb"
    systemctl enable amazon-ssm-agent.service
    echo "ssm-agent: installed $(dpkg-query -W -f='${Version}' amazon-ssm-agent)"
}

case ${1:-} in
verify) verify "${2:?DEB}" "${3:?SIG}" "${4:?KEY}" ;;
install) install_agent "${2:?REGION}" "${3:?ARCH}" "${4:?KEY}" ;;
*)
    echo "usage: ssm-agent.sh install REGION ARCH KEY | verify DEB SIG KEY" >&2
    exit 2
    ;;
esac
