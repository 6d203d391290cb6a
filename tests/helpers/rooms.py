"""Which room a test belongs in: tests/unit/ runs anywhere, tests/lab/ holds only tests that need
root and network namespaces (the `netns` mark). Used by tests/unit/test_rooms.py.

`collected_netns_marks` collects in a separate pytest process with this module as a plugin, so
module, class and parametrize marks all count the way pytest itself applies them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
REPORT_ENV = "GATEPEER_ROOMS_REPORT"  # where the plugin writes {nodeid: has the netns mark}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Plugin hook: record every collected item's netns mark to the file REPORT_ENV names."""
    out = os.environ.get(REPORT_ENV)
    if out:
        marks = {i.nodeid: i.get_closest_marker("netns") is not None for i in session.items}
        Path(out).write_text(json.dumps(marks))


def collected_netns_marks(report: Path, *paths: Path) -> dict[str, bool]:
    """Collect `paths` (no test runs) and say of each test id whether it carries `netns`."""
    env = {**os.environ, REPORT_ENV: str(report), "PYTHONPATH": str(TESTS)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "helpers.rooms",
         *map(str, paths)],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return dict(json.loads(report.read_text()))


def misplaced(marks: Mapping[str, bool]) -> list[str]:
    """Test ids in the wrong room: a netns test under tests/unit/, or one without it in lab/."""
    wrong = []
    for nodeid, netns in marks.items():
        room = nodeid.split("/")[1] if nodeid.startswith("tests/") else ""
        if (room == "unit" and netns) or (room == "lab" and not netns):
            wrong.append(nodeid)
    return sorted(wrong)
