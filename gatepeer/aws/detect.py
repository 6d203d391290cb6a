"""Is this host an EC2 instance? Decided from DMI and Xen's sysfs files, without a network call.

Nitro instances name "Amazon EC2" as board and system vendor; Xen instances carry an
"amazon" BIOS version and a UUID starting "ec2". A UUID prefix alone is not enough (one random
UUID in 4096 starts so), hence the Xen condition beside it.
"""

from __future__ import annotations

from pathlib import Path

SYS_ROOT = Path("/sys")
_VENDOR = "amazon ec2"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip().lower()
    except OSError:  # absent, or (product_uuid) readable by root only
        return ""


def ec2_evidence(sys_root: Path = SYS_ROOT) -> str | None:
    """The file that shows this host is an EC2 instance, or None when nothing does."""
    dmi = sys_root / "class" / "dmi" / "id"
    for name in ("board_vendor", "sys_vendor"):
        if _read(dmi / name) == _VENDOR:
            return f"{dmi / name}: Amazon EC2"
    if ".amazon" in _read(dmi / "bios_version"):
        return f"{dmi / 'bios_version'}: an Amazon Xen BIOS"
    xen = _read(sys_root / "hypervisor" / "type") == "xen" or _read(dmi / "sys_vendor") == "xen"
    if xen:
        for path in (sys_root / "hypervisor" / "uuid", dmi / "product_uuid"):
            if _read(path).startswith("ec2"):
                return f"{path}: a Xen UUID starting ec2"
    return None


def on_ec2(sys_root: Path = SYS_ROOT) -> bool:
    return ec2_evidence(sys_root) is not None
