"""Conntrack's sizing from the expected flows and cores, and the conntrack keys a kernel without
conntrack cannot take (the nftables I/O itself: tests/lab/test_nftables.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gatepeer.desired_state import conntrack_sysctls
from gatepeer.kernel import nftables as nf

# ---- conntrack sizing --------------------------------------------------------------------------


def test_conntrack_sizing() -> None:
    got = dict(conntrack_sysctls(50_000, 8))
    # 50,000 x 8 x 1.25 = 500,000 -> 2^19
    assert got["net/netfilter/nf_conntrack_max"] == 524_288
    assert got["net/netfilter/nf_conntrack_buckets"] == 524_288
    assert got["net/netfilter/nf_conntrack_tcp_timeout_established"] == 7440
    assert dict(conntrack_sysctls(50_000, 4))["net/netfilter/nf_conntrack_max"] == 262_144
    assert dict(conntrack_sysctls(10, 2))["net/netfilter/nf_conntrack_max"] == 65_536
    assert dict(conntrack_sysctls(100_000, 10))["net/netfilter/nf_conntrack_max"] == 2_097_152
    for path, value in conntrack_sysctls(1, 1):
        assert path.startswith("net/netfilter/nf_conntrack_") and value > 0
    with pytest.raises(ValueError):
        conntrack_sysctls(0, 8)


def test_unwritable_reports_absent_keys(tmp_path: Path) -> None:
    problems = nf.unwritable([("net/netfilter/nf_conntrack_max", 1)], root=tmp_path)
    assert problems == ["net/netfilter/nf_conntrack_max: absent (no conntrack in this kernel?)"]
