"""Tests sorted by what they need: nothing under tests/unit/ carries the `netns` mark, and
everything under tests/lab/ does (STYLE.md section 8)."""

from __future__ import annotations

from pathlib import Path

from helpers.rooms import TESTS, collected_netns_marks, misplaced


def test_unit_holds_no_namespace_test_and_lab_holds_only_those(tmp_path: Path) -> None:
    marks = collected_netns_marks(tmp_path / "marks.json", TESTS / "unit", TESTS / "lab")
    # The reading sees marks at all: the lab's tests are collected, and carry netns.
    lab = [nodeid for nodeid in marks if nodeid.startswith("tests/lab/")]
    assert lab and all(marks[nodeid] for nodeid in lab)
    assert any(nodeid.startswith("tests/unit/") for nodeid in marks)
    assert misplaced(marks) == []


def test_misplaced_names_a_namespace_test_in_unit_and_a_plain_one_in_lab() -> None:
    marks = {
        "tests/unit/test_a.py::test_pure": False,
        "tests/unit/test_a.py::test_builds_a_lab[x]": True,
        "tests/lab/test_b.py::test_builds_a_lab": True,
        "tests/lab/test_b.py::test_pure": False,
        "tests/delivery/test_c.py::test_either": True,
    }
    assert misplaced(marks) == [
        "tests/lab/test_b.py::test_pure",
        "tests/unit/test_a.py::test_builds_a_lab[x]",
    ]
