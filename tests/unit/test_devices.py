"""`gatepeer devices`: the SIM map and the per-device counters joined by address, the
connection counts from one conntrack dump, text and JSON; what cannot be read is said."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers.config_files import soracom_section, write_config, write_key
from helpers.devices import conntrack_dump, device_address, sim_map

from gatepeer import atomic_json, device_reading, devices_report, sims
from gatepeer.cli import main
from gatepeer.config import load
from gatepeer.device_traffic import DeviceReading, DeviceTraffic
from gatepeer.kernel.conntrack import count_by_address, count_by_integer, count_by_text

STRANGER = IPv4Address("198.19.200.77")  # traffic from an address no SIM names


def _config(tmp_path: Path, devices: str = "") -> Path:
    """State (and so the daemon's device reading) in tmp_path, never the host's /run."""
    key = write_key(tmp_path / "key")
    cache = tmp_path / "sims.json"
    return write_config(
        tmp_path,
        soracom_section(key)
        + f'[agent]\nstate_file = "{tmp_path / "state.json"}"\n'
        + "[packet_path]\ndevice_counters = true\n"
        + f'[devices]\nsim_cache = "{cache}"\n{devices}',
    )


@pytest.fixture
def kept(tmp_path: Path) -> Path:
    """A config whose SIM cache holds two named SIMs, fetched at 1000 and kept since."""
    path = _config(tmp_path)
    sims.keep(tmp_path / "sims.json", sim_map(2, fetched_at=1000.0))
    return path


def readers(monkeypatch: pytest.MonkeyPatch, traffic: Any, dump: Any) -> None:
    """The kernel's readers replaced: `traffic` and `dump` are values or exceptions."""

    def answer(value: Any) -> Any:
        if isinstance(value, BaseException):
            raise value
        return value

    monkeypatch.setattr(devices_report, "read_traffic", lambda: answer(traffic))
    monkeypatch.setattr(devices_report, "read_connections", lambda: answer(dump))


def test_devices_seen_are_the_union_of_sims_and_traffic(
    kept: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = device_address(0), device_address(1)
    traffic = {
        a: DeviceTraffic(a, 3, 300, 2, 200, 4.0),
        STRANGER: DeviceTraffic(STRANGER, 1, 60, 0, 0, 12.0),
    }
    dump = conntrack_dump([(a, "203.0.113.5"), (a, "203.0.113.6"), (STRANGER, "203.0.113.5")])
    readers(monkeypatch, traffic, dump)
    result = CliRunner().invoke(main, ["devices", "--json", "--config", str(kept)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    rows = {r["address"]: r for r in doc["devices"]}
    assert list(rows) == [str(a), str(b), str(STRANGER)]  # by address
    assert rows[str(a)] == {
        "address": str(a),
        "name": "sensor-0",
        "imsi": "440100000000000",
        "sim_id": "8942310000000000000",
        "group_id": "grp-sensors",
        "online": True,
        "source": "session",
        "last_packet_age_s": 4.0,
        "packets_from_device": 3,
        "bytes_from_device": 300,
        "packets_to_device": 2,
        "bytes_to_device": 200,
        "connections": 2,
    }
    # A SIM without traffic: its counters unknown (not zero); no connection open.
    assert rows[str(b)]["packets_from_device"] is None and rows[str(b)]["connections"] == 0
    assert rows[str(STRANGER)]["name"] is None and rows[str(STRANGER)]["connections"] == 1
    assert doc["sim_map"]["sims"] == 2 and doc["sim_map"]["fetched_at"] == 1000.0
    assert doc["notes"] == []


def test_text_output_names_each_device(kept: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = device_address(0)
    readers(monkeypatch, {a: DeviceTraffic(a, 5, 2048, 4, 100, 3.0)}, conntrack_dump([]))
    result = CliRunner().invoke(main, ["devices", "--config", str(kept)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("devices: 2 seen; SIM map: 2 SIMs, fetched ")
    assert lines[1].split() == [
        "ADDRESS",
        "SIM",
        "IMSI",
        "ONLINE",
        "LAST",
        "PACKET",
        "FROM",
        "DEVICE",
        "TO",
        "DEVICE",
        "CONNS",
    ]
    assert lines[2].split() == [
        str(a),
        "sensor-0",
        "440100000000000",
        "yes",
        "3s",
        "ago",
        "5",
        "pkt",
        "/",
        "2.0",
        "KiB",
        "4",
        "pkt",
        "/",
        "100",
        "B",
        "0",
    ]
    assert lines[3].split()[:4] == [str(device_address(1)), "sensor-1", "440100000000001", "yes"]
    assert lines[3].split()[4:] == ["-", "-", "-", "0"]


def test_what_cannot_be_read_is_said_and_left_blank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(tmp_path)
    kept = sim_map(1).failed("SORACOM API listSims failed with HTTP 403: forbidden")
    sims.keep(tmp_path / "sims.json", kept)
    readers(monkeypatch, LookupError("no per-device counters"), OSError("conntrack: not found"))
    result = CliRunner().invoke(main, ["devices", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert "note: SIM map: SORACOM API listSims failed with HTTP 403: forbidden" in result.output
    assert "note: traffic: cannot read the per-device counters: no per-device counters" in (
        result.output
    )
    assert "note: connections: conntrack: not found" in result.output
    row = result.output.splitlines()[-1].split()
    assert row[1] == "sensor-0" and row[-1] == "-"  # the last map, kept; connections unknown


def test_no_map_yet_is_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readers(monkeypatch, {}, "")
    report = devices_report.gather(load(_config(tmp_path), check_system=False), now=5.0)
    assert len(report) == 0 and report.devices() == []
    assert report.notes == [
        f"SIM map: none kept in {tmp_path / 'sims.json'} yet (the daemon fetches it)"
    ]


def test_a_bad_devices_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = _config(tmp_path, "sim_refresh_seconds = 10\n")
    result = CliRunner().invoke(main, ["devices", "--config", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().startswith(
        "gatepeer: config error: devices.sim_refresh_seconds: must be 0 (off) or at least 60"
    )
    assert len(result.output.strip().splitlines()) == 1


def test_connections_count_both_directions_once_per_entry() -> None:
    a, b = device_address(0), device_address(1)
    dump = conntrack_dump([(a, "203.0.113.1"), (a, str(b))])  # a to b: both are devices
    dump += (
        f"udp      17 29 src=192.0.2.10 dst={b} sport=5000 dport=53 "
        f"[UNREPLIED] src={b} dst=192.0.2.10 sport=53 dport=5000 mark=0 use=1\n"
    )
    counts = count_by_address(dump, [a, b, STRANGER])
    assert counts == {a: 2, b: 2, STRANGER: 0}


def test_counters_off_is_said_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = write_key(tmp_path / "key")
    path = write_config(
        tmp_path, soracom_section(key) + f'[devices]\nsim_cache = "{tmp_path / "s.json"}"\n'
    )
    readers(monkeypatch, AssertionError("must not be read"), "")
    report = devices_report.gather(load(path, check_system=False))
    assert "traffic: not counted (packet_path.device_counters = false)" in report.notes


def test_the_vpg_endpoints_and_this_peer_are_no_devices(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probes' echo replies from the VPG's inner addresses are counted by the kernel; the
    report leaves those addresses (and this peer's own) out."""
    path = _config(tmp_path)
    state = tmp_path / "state.json"
    gate = {
        "vpg_id": "vpg-0123abcd",
        "vni": 10,
        "device_subnet": "198.19.0.0/16",
        "gate_opened": True,
        "inner": "198.19.0.3/16",
        "outer": "198.18.0.10",
        "endpoints": [
            {"outer": "198.18.1.11", "inner": "198.19.0.1"},
            {"outer": "198.18.1.12", "inner": "198.19.0.2"},
        ],
    }
    atomic_json.write(state, {"gate": gate})
    a = device_address(0)
    seen = {
        address: DeviceTraffic(address, 1, 84, 1, 84, 1.0)
        for address in (a, IPv4Address("198.19.0.1"), IPv4Address("198.19.0.3"))
    }
    readers(monkeypatch, seen, "")
    report = devices_report.gather(load(path, check_system=False))
    assert [d["address"] for d in report.devices()] == [str(a)]


# The daemon's kept reading (gatepeer.device_reading): used when recent, the kernel else.


def _keep_reading(
    tmp_path: Path,
    traffic: dict[IPv4Address, DeviceTraffic],
    at: float,
    sim_map: sims.SimMap | None = None,
) -> Path:
    path = tmp_path / device_reading.FILE_NAME
    device_reading.keep(path, traffic, at, sim_map)
    return path


def test_a_kept_reading_reads_back_as_it_was(tmp_path: Path) -> None:
    a, b = device_address(0), device_address(1)
    traffic = {a: DeviceTraffic(a, 3, 300, 2, 200, 4.0), b: DeviceTraffic(b, 1, 60, 0, 0, None)}
    path = _keep_reading(tmp_path, traffic, 2000.0)
    reading = device_reading.load(path)
    assert reading is not None and reading.read_at == 2000.0 and reading.sim_map is None
    assert reading.traffic().traffic() == traffic
    assert reading.rows[1] == [str(b), *[None] * 6, None, 1, 60, 0, 0]


def test_a_kept_reading_is_joined_with_the_sim_map_by_address(tmp_path: Path) -> None:
    """Every SIM of the map and every address counted, one row each, by address; the SIM's
    fields beside the counters, null where either is missing."""
    kept_map = sim_map(3, fetched_at=1500.0).failed("listSims: HTTP 500")
    first, third = device_address(0), device_address(2)
    low = IPv4Address("198.19.0.9")  # counted, named by no SIM, before the map's addresses
    traffic = {
        third: DeviceTraffic(third, 1, 2, 3, 4, 5.0),
        low: DeviceTraffic(low, 6, 7, 8, 9, None),
        first: DeviceTraffic(first, 10, 11, 12, 13, 14.0),
    }
    reading = device_reading.load(_keep_reading(tmp_path, traffic, 2000.0, kept_map))
    assert reading is not None
    assert reading.sim_map == {"fetched_at": 1500.0, "error": "listSims: HTTP 500", "sims": 3}
    sim = ["440100000000000", "8942310000000000000", "grp-sensors", True, "session"]
    assert reading.rows == [
        [str(low), None, None, None, None, None, None, None, 6, 7, 8, 9],
        [str(first), "sensor-0", *sim, 14.0, 10, 11, 12, 13],
        [str(device_address(1)), "sensor-1", "440100000000001", "8942310000000000001",
         "grp-sensors", True, "session", None, None, None, None, None],
        [str(third), "sensor-2", "440100000000002", "8942310000000000002",
         "grp-sensors", True, "session", 5.0, 1, 2, 3, 4],
    ]  # fmt: skip


def _doc(**changed: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": device_reading.VERSION,
        "read_at": 1.0,
        "sim_map": None,
        "fields": list(device_reading.FIELDS),
        "devices": [["198.19.128.1", *[None] * 7, 1, 2, 3, 4]],
    }
    return doc | changed


@pytest.mark.parametrize(
    "doc",
    [
        _doc(version=1),
        _doc(read_at="x"),
        _doc(fields=["address"]),
        _doc(devices=[[1]]),
        _doc(devices=[[1, *[None] * 7, 1, 2, 3, 4]]),  # the address not a dotted quad's text
        _doc(devices=[["198.19.128.1", *[None] * 7, "1", 2, 3, 4]]),
        _doc(devices=[["198.19.128.1", *[None] * 4, "yes", *[None] * 2, 1, 2, 3, 4]]),
        _doc(sim_map={"fetched_at": 1.0}),
    ],
)
def test_an_unreadable_reading_is_none(tmp_path: Path, doc: dict[str, Any]) -> None:
    path = tmp_path / device_reading.FILE_NAME
    atomic_json.write(path, _doc())
    assert device_reading.load(path) is not None  # the well-formed one reads
    atomic_json.write(path, doc)
    assert device_reading.load(path) is None
    assert device_reading.load(tmp_path / "absent.json") is None


def test_a_recent_daemon_reading_is_shown_with_its_age(
    kept: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = device_address(0)
    _keep_reading(tmp_path, {a: DeviceTraffic(a, 5, 2048, 4, 100, 3.0)}, 1990.0)
    readers(monkeypatch, AssertionError("the kernel must not be read"), conntrack_dump([]))
    report = devices_report.gather(load(kept, check_system=False), now=2002.0)
    doc = report.to_json()
    assert doc["traffic"] == {"source": "daemon", "read_at": 1990.0, "age_s": 12.0, "why": None}
    row = next(r for r in doc["devices"] if r["address"] == str(a))
    assert row["last_packet_age_s"] == 15.0 and row["bytes_from_device"] == 2048
    assert report.notes == []
    assert "; traffic: the daemon's reading, 12s old" in devices_report.render(report)


@pytest.mark.parametrize(
    ("read_at", "live", "why"),
    [
        (None, False, "no daemon reading in {path}"),
        (2002.0 - 600, False, "the daemon's reading is 10m old"),
        (2002.0 + 60, False, "the daemon's reading is dated ahead of this clock"),
        (2000.0, True, "asked to (--live)"),
    ],
)
def test_without_a_recent_reading_the_kernel_is_read_and_why_said(
    kept: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    read_at: float | None,
    live: bool,
    why: str,
) -> None:
    a = device_address(0)
    if read_at is not None:
        _keep_reading(tmp_path, {a: DeviceTraffic(a, 1, 1, 1, 1, 1.0)}, read_at)
    readers(monkeypatch, {a: DeviceTraffic(a, 7, 700, 0, 0, 2.0)}, conntrack_dump([]))
    report = devices_report.gather(load(kept, check_system=False), now=2002.0, live=live)
    said = why.format(path=tmp_path / device_reading.FILE_NAME)
    assert report.to_json()["traffic"] == {
        "source": "kernel",
        "read_at": 2002.0,
        "age_s": 0.0,
        "why": said,
    }
    row = report.devices()[0]
    assert row["address"] == str(a) and row["name"] == "sensor-0"
    assert [row[k] for k in device_reading.COUNTER_FIELDS] == [2.0, 7, 700, 0, 0]
    assert f"; traffic: read from the kernel now ({said})" in devices_report.render(report)


def test_the_cli_reads_the_kernel_when_asked_live(
    kept: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = device_address(0)
    _keep_reading(tmp_path, {a: DeviceTraffic(a, 1, 1, 1, 1, 1.0)}, 4e9)  # "recent" forever
    readers(monkeypatch, {a: DeviceTraffic(a, 9, 900, 0, 0, 2.0)}, conntrack_dump([]))
    result = CliRunner().invoke(main, ["devices", "--json", "--live", "--config", str(kept)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["traffic"]["source"] == "kernel"
    assert doc["devices"][0]["packets_from_device"] == 9


def test_the_daemons_source_keeps_each_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gatepeer.kernel import device_sets
    from gatepeer.metrics.sources import LiveDevices

    a = device_address(0)
    counted = {a: DeviceTraffic(a, 2, 200, 1, 100, 5.0)}
    monkeypatch.setattr(device_sets, "device_reading", lambda: DeviceReading.from_traffic(counted))
    path = tmp_path / device_reading.FILE_NAME
    source = LiveDevices(lambda: True, lambda: sim_map(2), reading_file=lambda: path)
    found = source.traffic()
    assert found is not None and found.traffic() == counted
    reading = device_reading.load(path)
    assert reading is not None and reading.traffic().traffic() == counted
    assert reading.sim_map == {"fetched_at": 1000.0, "error": None, "sims": 2}
    assert [r[1] for r in reading.rows] == ["sensor-0", "sensor-1"]
    # Not counting: nothing read, nothing kept.
    path.unlink()
    assert LiveDevices(lambda: False, lambda: None, reading_file=lambda: path).traffic() is None
    assert not path.exists()


@pytest.mark.parametrize("count", [0, 1, device_reading.ROWS_PER_WRITE, 2 * 1000 + 1])
def test_a_reading_is_whole_json_at_any_count(tmp_path: Path, count: int) -> None:
    """Written in chunks of rows: the document is valid whatever the count's remainder."""
    first = int(device_address(0))
    traffic = {
        (a := IPv4Address(first + i)): DeviceTraffic(a, i, 2 * i, 3 * i, 4 * i, i % 2 or None)
        for i in range(count)
    }
    path = _keep_reading(tmp_path, traffic, 7.0)
    reading = device_reading.load(path)
    assert reading is not None and reading.traffic().traffic() == traffic
    assert not (tmp_path / f".{path.name}.tmp").exists()


def test_a_reading_that_cannot_be_written_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    a = device_address(0)
    device_reading.keep(blocker / "sub" / "r.json", {a: DeviceTraffic(a, 1, 1, 1, 1, 1.0)}, 1.0)
    assert "cannot keep the device reading" in caplog.text


def test_connections_by_integer_count_as_by_address() -> None:
    a, b = device_address(0), device_address(1)
    dump = conntrack_dump([(a, "203.0.113.1"), (a, str(b)), (STRANGER, "203.0.113.1")])
    dump += "tcp      6 60 SYN_SENT src=2001:db8::1 dst=2001:db8::2 sport=1 dport=2 mark=0 use=1\n"
    by_address = count_by_address(dump, [a, b, STRANGER])
    by_integer = count_by_integer(dump, {int(a), int(b), int(device_address(2))})
    assert by_integer == {int(a): by_address[a], int(b): by_address[b]} == {int(a): 2, int(b): 1}
    by_text = count_by_text(dump, {str(a), str(b), str(device_address(2))})
    assert by_text == {str(a): 2, str(b): 1}
