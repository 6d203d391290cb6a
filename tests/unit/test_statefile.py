"""atomic_json: atomic writes, and the temporary files of writers that died mid-write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gatepeer import atomic_json


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_write_is_whole_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_json.write(path, {"health": "ok"})
    assert atomic_json.read(path) == {"format": atomic_json.FORMAT_VERSION, "health": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    killed = tmp_path / f".state.json.{dead_pid()}.abc123.tmp"
    killed.write_text('{"format": 1, "heal')  # cut off mid-write
    live = tmp_path / f".state.json.{os.getpid()}.def456.tmp"  # a writer still at work
    live.write_text("{")
    other = tmp_path / f".gate.json.{dead_pid()}.xyz.tmp"  # another file's: not ours to judge
    other.write_text("{")

    atomic_json.write(path, {"health": "ok"})

    assert not killed.exists()
    assert live.exists() and other.exists()
    assert json.loads(path.read_text())["health"] == "ok"
