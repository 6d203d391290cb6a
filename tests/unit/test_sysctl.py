"""The record of host-wide sysctls from before gatepeer, against a fake /proc/sys."""

from __future__ import annotations

from pathlib import Path

from gatepeer.kernel import sysctl


def fake_proc(root: Path, values: dict[str, int]) -> Path:
    for path, value in values.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(f"{value}\n")
    return root


def test_the_first_value_is_kept_and_down_restores_only_what_still_holds_ours(
    tmp_path: Path,
) -> None:
    proc = fake_proc(tmp_path / "sys", {"net/ipv4/ip_forward": 1, "net/a/b": 5, "net/a/c": 7})
    record = sysctl.OriginalValues.beside(tmp_path / "run" / "state.json")
    record.remember("net/ipv4/ip_forward", 0, 1)
    record.remember("net/ipv4/ip_forward", 1, 1)  # a later reconcile: not the original
    record.remember("net/a/b", 2, 4)  # then someone set 5
    record.remember("net/a/c", 7, 9)  # then someone set it back to 7
    record.remember("net/eth9/x", 1, 0)  # the key went away with its interface
    assert record.path == tmp_path / "run" / "sysctl-original.json"

    messages = record.restore(proc)
    assert messages == [
        "left net.a.b at 5: changed since gatepeer set 4 (it was 2 before)",
        "restored net.ipv4.ip_forward to 0 (gatepeer had set 1)",
    ]
    assert (proc / "net/ipv4/ip_forward").read_text() == "0\n"
    assert (proc / "net/a/b").read_text() == "5\n"
    assert not record.path.exists()
    assert record.restore(proc) == []  # nothing recorded any more


def test_a_damaged_record_restores_nothing(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "sys", {"net/ipv4/ip_forward": 1})
    record = sysctl.OriginalValues(tmp_path / "sysctl-original.json")
    record.path.write_text('{"format": 1, "sysctls": {"net/ipv4/ip_forward": {"original": "0"}}}')
    assert record.restore(proc) == []
    assert (proc / "net/ipv4/ip_forward").read_text() == "1\n"
