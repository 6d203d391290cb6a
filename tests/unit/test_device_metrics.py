"""Per-device metrics: the tracker learns each device's usual interval and calls it silent
after twice that; only the top N devices get series of their own, every device counts in its
SIM group, whose counters never go down; nothing is exported while the kernel does not count
per device. Config keys [devices] and [flow_log]."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from helpers.config_files import soracom_section, write_config, write_key
from helpers.device_fakes import READING, SIMS, FakeDevices, set_traffic, traffic
from helpers.exposition import sample_names
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from gatepeer import config
from gatepeer.device_traffic import DeviceReading
from gatepeer.metrics.device_activity import (
    FORGET_AFTER_S,
    NO_GROUP,
    SILENT_FLOOR_S,
    UNKNOWN_SIM,
    DeviceActivity,
)
from gatepeer.metrics.devices import DeviceCollector

A = IPv4Address


def expose(collector: Any) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def no_group(_: int) -> str:
    return UNKNOWN_SIM


# ---- the tracker ---------------------------------------------------------------------------


def test_a_device_with_a_habit_is_silent_after_twice_its_interval_and_not_before() -> None:
    activity = DeviceActivity()
    now = 0.0
    # A packet every 300 s; readings every 30 s (the scrape interval).
    for step in range(0, 3000, 30):
        now = float(step)
        age = now % 300
        activity.observe(set_traffic(traffic("10.128.0.5", 100, 100, age)), no_group, now)
    (view,) = activity.top(1, now)
    assert view.usual_interval_s is not None and 300 <= view.usual_interval_s <= 345
    assert activity.silent_count(now) == 0
    # It stops: last packet at 2700; its element expires after 600 s, the tracker remembers.
    last = 2700.0
    for step in range(3000, 4500, 30):
        now = float(step)
        present = now - last < 600
        reading = set_traffic(traffic("10.128.0.5", 100, 100, now - last)) if present else {}
        activity.observe(reading, no_group, now)
        threshold = 2 * view.usual_interval_s
        assert activity.silent_count(now) == int(now - last > threshold), now


def test_one_gap_is_no_habit_and_short_gaps_are_held_to_the_floor() -> None:
    activity = DeviceActivity()
    for now in (0.0, 5.0, 10.0):  # two gaps of 5 s: not learned yet
        activity.observe(set_traffic(traffic("10.128.0.6", 1, 1, 0.0)), no_group, now)
    assert activity.top(1, 10.0)[0].usual_interval_s is None
    activity.observe({}, no_group, 10_000.0)
    assert activity.silent_count(10_000.0) == 0  # never judged without a habit
    busy = DeviceActivity()
    for now in range(0, 50, 5):  # every 5 s: usual interval ~5 s, but the floor is 60 s
        busy.observe(set_traffic(traffic("10.128.0.7", 1, 1, 0.0)), no_group, float(now))
    assert busy.silent_count(45.0 + SILENT_FLOOR_S - 1) == 0
    assert busy.silent_count(45.0 + SILENT_FLOOR_S + 1) == 1


def test_without_an_age_the_moving_counters_are_the_activity() -> None:
    activity = DeviceActivity()
    for i, now in enumerate(range(0, 1000, 100)):
        reading = traffic("10.128.0.8", 1000 + 100 * i, 0, None)
        activity.observe(set_traffic(reading), no_group, float(now))
    (view,) = activity.top(1, 900.0)
    assert view.usual_interval_s == pytest.approx(100, rel=0.15)
    assert view.last_seen_age_s == 0.0
    activity.observe(set_traffic(traffic("10.128.0.8", 1900, 0, None)), no_group, 1000.0)
    assert activity.top(1, 1000.0)[0].last_seen_age_s == 100.0  # unchanged counters: no packet


def test_group_counters_only_grow_across_expiry_and_recreation() -> None:
    activity = DeviceActivity()
    activity.observe(set_traffic(traffic("10.128.0.9", 5000, 700)), no_group, 0.0)
    activity.observe(set_traffic(traffic("10.128.0.9", 8000, 900)), no_group, 30.0)
    activity.observe({}, no_group, 60.0)  # the element expired: its counters are gone
    activity.observe(set_traffic(traffic("10.128.0.9", 300, 50)), no_group, 90.0)  # a new one
    totals = activity.groups[UNKNOWN_SIM]
    assert (totals.bytes_from_device, totals.bytes_to_device) == (8300, 950)
    assert totals.devices == 1


def test_a_device_unseen_for_a_week_is_forgotten() -> None:
    activity = DeviceActivity()
    activity.observe(set_traffic(traffic("10.128.0.10", 1, 1, 0.0)), no_group, 0.0)
    activity.observe({}, no_group, FORGET_AFTER_S - 1)
    assert A("10.128.0.10") in activity and len(activity) == 1
    activity.observe({}, no_group, FORGET_AFTER_S + 1)
    assert A("10.128.0.10") not in activity and len(activity) == 0


def test_top_is_by_bytes_both_ways_ties_by_address() -> None:
    activity = DeviceActivity()
    reading = set_traffic(
        traffic("10.128.0.1", 100, 900),  # 1000
        traffic("10.128.0.2", 2000, 0),  # 2000
        traffic("10.128.0.3", 500, 500),  # 1000, later address
        traffic("10.128.0.4", 10, 10),
    )
    activity.observe(reading, no_group, 0.0)
    assert [str(v.address) for v in activity.top(3, 0.0)] == [
        "10.128.0.2",
        "10.128.0.1",
        "10.128.0.3",
    ]
    assert activity.top(0, 0.0) == []


# ---- the collector -------------------------------------------------------------------------


def test_only_the_top_n_have_series_and_every_device_counts_in_its_group() -> None:
    collector = DeviceCollector(FakeDevices(READING, SIMS), top_n=lambda: 2, clock=lambda: 100.0)
    found = samples(expose(collector))
    per_device = {
        dict(labels)["address"]
        for (name, labels) in found
        if name == "gatepeer_device_sent_bytes_total"
    }
    assert per_device == {"10.128.0.3", "10.128.0.1"}
    labels = (
        ("address", "10.128.0.1"),
        ("group", "grp-meters"),
        ("imsi", "440103200000001"),
        ("name", "meter-001"),
    )
    assert found[("gatepeer_device_sent_bytes_total", labels)] == 4000
    assert found[("gatepeer_device_received_bytes_total", labels)] == 1000
    assert found[("gatepeer_device_last_seen_age_seconds", labels)] == 1.0
    group = {
        dict(k)["group"]: v
        for (n, k), v in found.items()
        if n.startswith("gatepeer_device_group_sent_bytes")
    }
    assert group == {"grp-meters": 4100, NO_GROUP: 9000, UNKNOWN_SIM: 50}
    assert found[("gatepeer_devices", ())] == 4
    assert found[("gatepeer_devices_silent", ())] == 0


def test_nothing_is_exported_while_the_kernel_does_not_count_per_device() -> None:
    assert expose(DeviceCollector(FakeDevices(None, SIMS))) == ""


def test_without_a_sim_map_devices_are_in_group_unknown_with_empty_names() -> None:
    collector = DeviceCollector(FakeDevices(READING, None), top_n=lambda: 1, clock=lambda: 1.0)
    found = samples(expose(collector))
    key = (
        "gatepeer_device_sent_bytes_total",
        (("address", "10.128.0.3"), ("group", UNKNOWN_SIM), ("imsi", ""), ("name", "")),
    )
    assert found[key] == 9000


def test_series_stay_bounded_with_many_devices() -> None:
    many = set_traffic(*(traffic(str(A("10.128.0.0") + i), i, i) for i in range(1, 5000)))
    text = expose(DeviceCollector(FakeDevices(many, SIMS), top_n=lambda: 10, clock=lambda: 5.0))
    lines = [x for x in text.splitlines() if x and not x.startswith("#")]
    # 5 per top device (4 counters + age; no usual interval yet), 6 per group (3 here:
    # grp-meters, none, unknown), 2 totals.
    assert len(lines) == 10 * 5 + 3 * 6 + 2
    assert "gatepeer_devices_silent" in sample_names(text)


# ---- config ---------------------------------------------------------------------------------


def _load(tmp_path: Path, extra: str) -> config.Config:
    key = write_key(tmp_path / "key")
    return config.load(write_config(tmp_path, soracom_section(key) + extra), check_system=False)


def test_devices_and_flow_log_defaults_and_values(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "")
    assert cfg.devices.metrics_top_n == 10 and cfg.flow_log.enabled is False
    cfg = _load(
        tmp_path,
        '\n[devices]\nmetrics_top_n = 3\n[flow_log]\nenabled = true\nfile = "/var/log/gp.jsonl"\n'
        "rate_per_second = 50\n",
    )
    assert cfg.devices.metrics_top_n == 3
    assert cfg.flow_log.file == Path("/var/log/gp.jsonl") and cfg.flow_log.rate_per_second == 50
    assert cfg.masked()["flow_log"]["file"] == "/var/log/gp.jsonl"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[devices]\nmetrics_top_n = -1\n", "devices.metrics_top_n: must be between 0 and 1000"),
        ("[devices]\ntop = 3\n", "devices.top: unknown key"),
        ('[flow_log]\nfile = "log.jsonl"\n', "flow_log.file: must be an absolute path"),
        ("[flow_log]\nrate_per_second = 0\n", "flow_log.rate_per_second: must be between"),
        ('[flow_log]\nenabled = "yes"\n', "flow_log.enabled: must be true or false"),
    ],
)
def test_bad_device_and_flow_log_keys_are_named(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        _load(tmp_path, "\n" + extra)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_in_the_daemon_a_scrape_exports_the_last_reading_and_reads_on_a_thread() -> None:
    now = [100.0]
    source = FakeDevices(set_traffic(traffic("10.128.0.1", 10, 10)), SIMS)
    collector = DeviceCollector(source, clock=lambda: now[0], background=True, min_interval_s=15.0)
    first = samples(expose(collector))  # the first scrape waits for the first reading
    assert first[("gatepeer_devices", ())] == 1
    source.readings = set_traffic(traffic("10.128.0.1", 10, 10), traffic("10.128.0.2", 5, 5))
    now[0] += 5
    assert samples(expose(collector))[("gatepeer_devices", ())] == 1  # fresh enough: no read
    assert collector._reading is None
    now[0] += 15
    stale = samples(expose(collector))  # stale: a read starts; this scrape has the last one
    assert stale[("gatepeer_devices", ())] == 1
    age_key = next(k for k in stale if k[0] == "gatepeer_device_last_seen_age_seconds")
    assert stale[age_key] == 1.0 + 20  # the age at the reading, plus the time since
    assert collector._reading is not None
    collector._reading.join(5)
    assert samples(expose(collector))[("gatepeer_devices", ())] == 2


def test_devices_joining_and_leaving_between_others_keep_their_own_history() -> None:
    """The tracker merges each reading into its columns by address: a new device between two
    known ones, a known one missing from a reading, and a reading given as columns."""
    activity = DeviceActivity()
    groups = {int(A("10.128.0.1")): "g1", int(A("10.128.0.3")): "g3"}

    def group_of(n: int) -> str:
        return groups.get(n, NO_GROUP)

    first = set_traffic(traffic("10.128.0.1", 100, 10, 0.0), traffic("10.128.0.3", 300, 30, 0.0))
    activity.observe(first, group_of, 0.0)
    second = DeviceReading.from_traffic(
        set_traffic(traffic("10.128.0.1", 150, 10, 0.0), traffic("10.128.0.2", 200, 20, 0.0))
    )
    activity.observe(second, group_of, 30.0)  # .2 is new, .3's element expired
    views = {
        str(v.address): v for v in activity.views([A(f"10.128.0.{i}") for i in (1, 2, 3)], 30.0)
    }
    assert (views["10.128.0.1"].bytes_from_device, views["10.128.0.1"].group) == (150, "g1")
    assert (views["10.128.0.2"].bytes_from_device, views["10.128.0.2"].group) == (200, NO_GROUP)
    assert views["10.128.0.3"].bytes_from_device == 0 and views["10.128.0.3"].group == "g3"
    assert views["10.128.0.3"].last_seen_age_s == 30.0
    assert [str(v.address) for v in activity.top(5, 30.0)] == ["10.128.0.2", "10.128.0.1"]
    assert {g: (t.bytes_from_device, t.devices) for g, t in activity.groups.items()} == {
        "g1": (150, 1),
        "g3": (300, 0),
        NO_GROUP: (200, 1),
    }
    activity.observe(
        set_traffic(traffic("10.128.0.2", 200, 20, 0.0)), group_of, FORGET_AFTER_S + 31
    )
    assert A("10.128.0.2") in activity and len(activity) == 1  # .1 and .3 forgotten


def test_a_reading_as_columns_is_ordered_by_address_and_keeps_the_last_row() -> None:
    rows = [(9, 1, 2, 3, 4, None), (3, 5, 6, 7, 8, 1.5), (9, 10, 20, 30, 40, 2.0)]
    reading = DeviceReading(rows)
    assert list(reading.rows()) == [(3, 5, 6, 7, 8, 1.5), (9, 10, 20, 30, 40, 2.0)]
    assert list(DeviceReading(rows[:2]).rows())[1] == (9, 1, 2, 3, 4, None)  # unknown age
    assert reading.traffic()[A("0.0.0.3")].bytes_to_device == 8
