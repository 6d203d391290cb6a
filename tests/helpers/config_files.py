"""Config files for tests: a valid `[soracom]` section, a key file with the right mode."""

from __future__ import annotations

from pathlib import Path

SECRET = "gpsecret-7f3a9c1e5b2d4f6a8c0e1b3d5f7a9c2e"


KEY_ID = "keyId-testtesttesttesttesttesttest01"


VPG_ID = "vpg-0123abcd"


def soracom_section(key_file: Path, **changes: str | None) -> str:
    """A valid [soracom] table; a change to None drops that key."""
    values: dict[str, str | None] = {
        "endpoint": '"http://127.0.0.1:8080"',
        "auth_key_id": f'"{KEY_ID}"',
        "auth_key_file": f'"{key_file}"',
        "vpg_id": f'"{VPG_ID}"',
    }
    values.update(changes)
    lines = [f"{k} = {v}" for k, v in values.items() if v is not None]
    return "[soracom]\n" + "\n".join(lines) + "\n"


def write_key(path: Path, mode: int = 0o600) -> Path:
    path.write_text(SECRET + "\n")
    path.chmod(mode)
    return path


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gatepeer.toml"
    path.write_text(text)
    return path
