"""Fuzzing the configuration loader with hypothesis: whatever the file holds (wrong types,
missing or unknown keys, huge numbers, control characters, bytes that are not TOML or not
UTF-8), the user gets a Config or one clear error line naming a key or the file, never a
traceback, and the secret never shows.

The properties run in process against `gatepeer.config.load`; a smaller sample goes through
`gatepeer config check` in a subprocess, where a traceback would reach the terminal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatepeer.config import ConfigError, load

SECRET = "gpfuzzsecret-1d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a"
REPO = Path(__file__).resolve().parents[2]

SECTIONS: dict[str, list[str]] = {
    "soracom": ["endpoint", "auth_key_id", "auth_key_file", "vpg_id", "open_gate", "auth_key"],
    "tunnel": ["interface", "underlay_interface", "local_address", "mtu", "source_port_range"],
    "kernel": ["neighbour_table_devices"],
    "agent": ["reconcile_interval", "state_file", "gate_cache"],
    "packet_path": ["mode", "allowed_destinations", "flowtable", "flows_per_device"],
    "metrics": ["listen"],
    "probes": ["interval", "timeout"],
}

# Values of every TOML type, with the edges that break parsers: huge and negative integers,
# NaN and infinities, control characters (newline, NUL, CR, escape), empty strings.
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "vxlan0\n", "a\x00b", "\r\n", "\x1b[31m", "auto", "lo", "255.0.0.0"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


# A valid document: mutating one key of it reaches the checks behind the first missing key.
VALID: dict[str, dict[str, Any]] = {
    "soracom": {
        "endpoint": "http://127.0.0.1:8080",
        "auth_key_id": "keyId-fuzzfuzzfuzzfuzzfuzzfuzzfuzz01",
        "auth_key_file": "/etc/gatepeer/auth-key",
        "vpg_id": "vpg-0123abcd",
    },
    "tunnel": {"local_address": "198.18.0.10", "mtu": 1500},
}


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    """A config document: the valid one with keys changed, or known sections with known or
    unknown keys and any values."""
    if draw(st.booleans()):
        doc = {name: dict(table) for name, table in VALID.items()}
        for _ in range(draw(st.integers(1, 3))):
            section = draw(st.sampled_from(sorted(SECTIONS)))
            key = draw(st.sampled_from(SECTIONS[section]))
            doc.setdefault(section, {})[key] = draw(values)
        return doc
    doc = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS, "bogus"]), max_size=5)):
        keys = SECTIONS.get(section, ["x"]) + ["unknown_key"]
        doc[section] = draw(st.dictionaries(st.sampled_from(keys), values, max_size=4))
    return doc


def toml_text(doc: dict[str, Any]) -> str:
    """A minimal TOML writer for what `documents` makes (tomllib only reads)."""
    lines: list[str] = []
    for section, table in doc.items():
        lines.append(f"[{_key(section)}]")
        lines.extend(f"{_key(k)} = {_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _key(key: str) -> str:
    return _string(key)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("?")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"


def check_outcome(path: Path, text: str | bytes) -> None:
    """The one property: a Config, or a ConfigError of printable lines (one per problem, each
    naming its key or the file) without the secret."""
    try:
        load(path, check_system=False)
    except ConfigError as exc:
        assert exc.lines and str(exc) == "\n".join(exc.lines)
        for message in exc.lines:
            assert message, "an empty error message"
            assert "\n" not in message and "\r" not in message, f"not one line: {message!r}"
            assert "\x00" not in message and "\x1b" not in message, f"control: {message!r}"
            assert SECRET not in message
            head = message.split(":", 1)[0]
            assert head == str(path) or "." in head or head in SECTIONS or head == "bogus", (
                f"the error names neither a key nor the file: {message!r}"
            )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents())
def test_any_document_gives_a_config_or_one_line_naming_the_key(
    tmp_path_factory: Any, doc: dict[str, Any]
) -> None:
    path = tmp_path_factory.mktemp("cfg") / "gatepeer.toml"
    text = toml_text(doc)
    tomllib.loads(text)  # the writer itself must produce TOML
    path.write_text(text)
    check_outcome(path, text)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_give_one_line(tmp_path_factory: Any, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "gatepeer.toml"
    path.write_bytes(raw)
    check_outcome(path, raw)


@settings(max_examples=25, deadline=None)
@given(doc=documents())
def test_cli_never_prints_a_traceback(tmp_path_factory: Any, doc: dict[str, Any]) -> None:
    folder = tmp_path_factory.mktemp("cli")
    key = folder / "auth-key"
    key.write_text(SECRET)
    os.chmod(key, 0o600)
    doc.setdefault("soracom", {})["auth_key_file"] = str(key)
    path = folder / "gatepeer.toml"
    path.write_text(toml_text(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "gatepeer", "config", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode in (0, 2), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert SECRET not in proc.stderr + proc.stdout
    if proc.returncode == 2:
        lines = proc.stderr.strip().splitlines()
        assert lines, proc.stderr
        for line in lines:  # one line per problem
            assert line.startswith("gatepeer: config error: "), line
