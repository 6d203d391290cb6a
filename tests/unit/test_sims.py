"""The SIM map: built from listSims and the IP address map, fetched page by page from the
emulator on 127.0.0.1, kept on disk, and kept when a refresh fails."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from helpers.config_files import soracom_section, write_config, write_key

from gatepeer import sims
from gatepeer.config import ConfigError, load
from gatepeer.lab.emulator.model import EmulatorSettings, Sim
from gatepeer.lab.emulator.service import Emulator
from gatepeer.sim_refresh import SimRefresher
from gatepeer.soracom import SoracomClient, SoracomError

AUTH_KEY = "secret-sims-test-3b9f0e2a7c5d4e1f"
SETTINGS = EmulatorSettings(auth_key=AUTH_KEY)
VPG_ID = SETTINGS.vpg_id
OTHER_VPG = "00000000-0000-4000-8000-00000000beef"


def sim(n: int, **changes: Any) -> Sim:
    values: dict[str, Any] = {
        "sim_id": f"89423100000000{n:05d}",
        "imsi": f"4401030000{n:05d}",
        "name": f"pump-{n}",
        "group_id": "grp-pumps",
        "vpg_id": VPG_ID,
        "address": f"198.19.{128 + n // 250}.{n % 250 + 1}",
    }
    values.update(changes)
    return Sim(**values)


class Sleeps:
    """The client's clock and sleep: a wait is recorded and moves the clock, nothing sleeps."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self.now = 5000.0

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator(SETTINGS)
    emu.base_url = emu.start()  # type: ignore[attr-defined]
    yield emu
    emu.stop()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(emulator: Emulator, sleeps: Sleeps) -> SoracomClient:
    return SoracomClient(
        emulator.base_url,  # type: ignore[attr-defined]
        SETTINGS.auth_key_id,
        lambda: AUTH_KEY,
        timeout=5,
        attempts=3,
        sleep=sleeps,
        clock=sleeps.clock,
    )


# ----- pagination ----------------------------------------------------------------------


def test_list_sims_follows_every_page(emulator: Emulator, client: SoracomClient) -> None:
    emulator.set_sims([sim(n) for n in range(25)])
    rows = client.list_sims(page_size=10)
    assert [r["simId"] for r in rows] == sorted(sim(n).sim_id for n in range(25))
    assert emulator.counts()["listSims"] == 3  # 10 + 10 + 5: the last page has no next key


def test_ip_map_follows_every_page(emulator: Emulator, client: SoracomClient) -> None:
    emulator.set_sims(
        [sim(n, vpg_id=None, address=None, static_address=f"198.19.200.{n + 1}") for n in range(7)]
    )
    rows = client.list_ip_address_map(VPG_ID, page_size=3)
    statics = [r["ipAddress"] for r in rows if r["type"] == "static"]
    assert statics == [f"198.19.200.{n + 1}" for n in range(7)]
    # 7 SIMs and the VPG's two endpoints: 9 rows, three pages of three, then none left.
    assert emulator.counts()["listVirtualPrivateGatewayIpAddressMapEntries"] == 3


def test_a_page_rate_limited_is_asked_again_after_the_wait(
    emulator: Emulator, client: SoracomClient, sleeps: Sleeps
) -> None:
    emulator.set_sims([sim(n) for n in range(5)])
    client.authenticate()
    emulator.set_faults(rate_limit_next=1, rate_limit_seconds=7)
    rows = client.list_sims(page_size=2)
    assert len(rows) == 5
    # X-Soracom-Ratelimit-Seconds-Before-Refresh honoured once; the later pages need no wait.
    assert sleeps.waits == [7.0]
    assert emulator.counts()["listSims"] == 4  # one 429, then three pages


def test_a_next_key_that_repeats_is_refused(
    emulator: Emulator, client: SoracomClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API that hands back the same key would page forever; the client stops and says so."""
    emulator.set_sims([sim(n) for n in range(3)])
    real = client._exchange

    def same_key(*args: Any, **kwargs: Any) -> tuple[int, Any, dict[str, str]]:
        status, data, headers = real(*args, **kwargs)
        return status, data, {**headers, "x-soracom-next-key": "8942310000000000000"}

    monkeypatch.setattr(client, "_exchange", same_key)
    with pytest.raises(SoracomError, match="next key repeated"):
        client.list_sims(page_size=1)


# ----- which SIMs are this peer's devices ----------------------------------------------


def test_fetch_keeps_this_vpgs_sessions_and_its_ip_map(
    emulator: Emulator, client: SoracomClient
) -> None:
    emulator.set_sims(
        [
            sim(1),
            sim(2, vpg_id=OTHER_VPG),  # another VPG's device, same subnet: not ours
            sim(3, online=False),  # session ended: its address may be reused
            sim(4, vpg_id=None, address=None, online=False, static_address="198.19.250.4"),
            sim(5, name=None, group_id=None),
        ]
    )
    got = sims.fetch(client, VPG_ID, now=1234.0)
    assert set(got.records) == {
        IPv4Address(sim(1).address),
        IPv4Address("198.19.250.4"),
        IPv4Address(sim(5).address),
    }
    one = got.records[IPv4Address(sim(1).address)]
    assert one == sims.SimRecord(
        address=IPv4Address(sim(1).address),
        imsi=sim(1).imsi,
        sim_id=sim(1).sim_id,
        name="pump-1",
        group_id="grp-pumps",
        online=True,
        source="session",
    )
    static = got.records[IPv4Address("198.19.250.4")]
    assert (static.name, static.online, static.source) == ("pump-4", False, "ip_map")
    assert got.name_for(IPv4Address(sim(5).address)) is None
    assert got.name_for(IPv4Address(sim(2).address)) is None
    # The VPG's own endpoints and gate peers are in the IP map but are no devices.
    for endpoint in SETTINGS.endpoints:
        assert IPv4Address(endpoint.inner_ip) not in got.records
    assert got.fetched_at == 1234.0 and got.error is None


def test_a_session_wins_over_the_ip_map_for_the_same_address() -> None:
    row = {
        "simId": "s1",
        "tags": {"name": "live"},
        "sessionStatus": {
            "online": True,
            "imsi": "440100000000001",
            "vpgId": "v",
            "ueIpAddress": "198.19.0.9",
        },
    }
    entry = {"ipAddress": "198.19.0.9", "key": "440100000000001", "type": "static"}
    got = sims.build("v", [row], [entry], 1.0)
    assert got.records[IPv4Address("198.19.0.9")].source == "session"


def test_odd_rows_are_skipped_not_fatal() -> None:
    rows: list[dict[str, Any]] = [
        {
            "simId": "bad-address",
            "sessionStatus": {
                "online": True,
                "imsi": "1",
                "vpgId": "v",
                "ueIpAddress": "not-an-ip",
            },
        },
        {"simId": "no-session"},
        {
            "simId": "ok",
            "sessionStatus": {
                "online": True,
                "imsi": "2",
                "vpgId": "v",
                "ueIpAddress": "198.19.0.2",
            },
        },
    ]
    entries: list[dict[str, Any]] = [
        {"ipAddress": "198.19.0.1", "key": "198.19.0.1", "type": "customerGatePeer"},
        {"ipAddress": "bogus", "key": "3", "type": "static"},
    ]
    got = sims.build("v", rows, entries, 1.0)
    assert list(got.records) == [IPv4Address("198.19.0.2")]


# ----- refresh and the cache -----------------------------------------------------------


def test_a_failed_refresh_keeps_the_last_map_and_says_why(
    emulator: Emulator, client: SoracomClient, tmp_path: Path
) -> None:
    path = tmp_path / "sims.json"
    emulator.set_sims([sim(1), sim(2)])
    good = sims.refresh(client, VPG_ID, path, sims.SimMap(), now=100.0)
    assert len(good.records) == 2 and good.error is None
    emulator.set_faults(fail_next=10, fail_status=503)
    kept = sims.refresh(client, VPG_ID, path, good, now=200.0)
    assert kept.records == good.records
    assert kept.fetched_at == 100.0  # the age of what is shown, not of the failed attempt
    assert kept.error is not None and "HTTP 503" in kept.error
    on_disk = sims.load(path)
    assert on_disk == kept
    emulator.reset_faults()
    again = sims.refresh(client, VPG_ID, path, kept, now=300.0)
    assert again.error is None and again.fetched_at == 300.0


def test_cache_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "sims.json"
    original = sims.build(
        "v",
        [
            {
                "simId": "8942",
                "groupId": "g",
                "tags": {"name": "名前 with spaces"},
                "sessionStatus": {
                    "online": True,
                    "imsi": "440100000000001",
                    "vpgId": "v",
                    "ueIpAddress": "198.19.0.9",
                },
            }
        ],
        [{"ipAddress": "198.19.0.10", "key": "440100000000002", "type": "static"}],
        fetched_at=42.5,
    ).failed("SORACOM API listSims failed with HTTP 503")
    sims.keep(path, original)
    assert sims.load(path) == original
    doc = json.loads(path.read_text())
    assert doc["sims"][0][doc["fields"].index("name")] == "名前 with spaces"


def test_a_damaged_cache_is_an_empty_map_that_says_so(tmp_path: Path) -> None:
    path = tmp_path / "sims.json"
    path.write_text(json.dumps({"format": 1, "sims": [{"address": "nope"}]}))
    got = sims.load(path)
    assert got.records == {} and got.error is not None and str(path) in got.error
    assert sims.load(tmp_path / "absent.json") == sims.SimMap()


# ----- config ----------------------------------------------------------------------------


def _config(tmp_path: Path, devices: str) -> Path:
    key = write_key(tmp_path / "key")
    return write_config(tmp_path, soracom_section(key) + "[devices]\n" + devices)


def test_devices_config_defaults_and_values(tmp_path: Path) -> None:
    cfg = load(_config(tmp_path, ""), check_system=False)
    assert cfg.devices.sim_refresh_seconds == 900
    assert sims.cache_path(cfg) == Path("/var/lib/gatepeer/sims.json")  # beside gate.json
    no_gate_cache = _config(tmp_path, "").read_text() + (
        f'[agent]\ngate_cache = ""\nstate_file = "{tmp_path / "run" / "state.json"}"\n'
    )
    cfg = load(write_config(tmp_path, no_gate_cache), check_system=False)
    assert sims.cache_path(cfg) == tmp_path / "run" / "sims.json"  # beside the state file
    cfg = load(_config(tmp_path, 'sim_cache = "/srv/x.json"\n'), check_system=False)
    assert sims.cache_path(cfg) == Path("/srv/x.json")
    cfg = load(
        _config(tmp_path, 'sim_refresh_seconds = 0\nsim_cache = "/tmp/x.json"\n'),
        check_system=False,
    )
    assert sims.cache_path(cfg) is None  # off


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("sim_refresh_seconds = 5", "devices.sim_refresh_seconds: must be 0 (off) or at least 60"),
        ("sim_refresh_seconds = -1", "devices.sim_refresh_seconds: must be between 0 and 86400"),
        ('sim_refresh_seconds = "10m"', "devices.sim_refresh_seconds: must be an integer"),
        ('sim_cache = "relative.json"', "devices.sim_cache: must be an absolute path"),
        ("sim_refresh = 600", "devices.sim_refresh: unknown key"),
    ],
)
def test_bad_devices_keys_are_named(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(_config(tmp_path, text + "\n"), check_system=False)
    assert str(caught.value).startswith(named)


def test_the_devices_section_is_in_the_effective_config(tmp_path: Path) -> None:
    cfg = load(_config(tmp_path, ""), check_system=False)
    assert cfg.masked()["devices"] == {
        "sim_refresh_seconds": 900,
        "sim_cache": "(default)",
        "metrics_top_n": 10,
    }


# ----- the daemon's refresher ------------------------------------------------------------


def test_the_refresher_starts_from_the_kept_map_and_keeps_it_through_failures(
    emulator: Emulator, client: SoracomClient, tmp_path: Path
) -> None:
    path = tmp_path / "sims.json"
    sims.keep(path, sims.build(VPG_ID, [], [], fetched_at=10.0))
    changes: list[int] = []
    refresher = SimRefresher(
        client, VPG_ID, path, 3600, on_change=lambda: changes.append(1), clock=lambda: 50.0
    )
    assert refresher.current.fetched_at == 10.0  # before any fetch: what was kept
    emulator.set_sims([sim(1)])
    refresher.refresh_once()
    assert refresher.to_json() == {
        "sims": 1,
        "fetched_at": 50.0,
        "error": None,
        "path": str(path),
    }
    emulator.set_faults(fail_next=10, fail_status=403)
    refresher.refresh_once()
    assert refresher.to_json()["sims"] == 1
    assert "HTTP 403" in str(refresher.to_json()["error"])
    assert changes == [1, 1]  # each refresh rewrites the state document


def test_the_refresher_thread_fetches_at_start_and_stops(
    emulator: Emulator, client: SoracomClient, tmp_path: Path
) -> None:
    emulator.set_sims([sim(1), sim(2)])
    done = threading.Event()
    refresher = SimRefresher(client, VPG_ID, tmp_path / "sims.json", 3600, on_change=done.set)
    refresher.start()
    try:
        assert done.wait(10)
        assert len(refresher.current.records) == 2
    finally:
        refresher.stop()
        refresher.join(5)
    assert not refresher.is_alive()
    assert emulator.counts()["listSims"] == 1  # once at start; the next is an hour away
    assert len(sims.load(tmp_path / "sims.json").records) == 2


def test_packed_records_give_back_every_field() -> None:
    """The map's records are packed one string per SIM; each lookup gives the record back."""
    made = [
        sims.SimRecord(
            IPv4Address("198.19.0.2"), "001010000000002", "89", "a", "g", True, "session"
        ),
        sims.SimRecord(
            IPv4Address("198.19.0.3"), "001010000000003", None, None, None, False, "session"
        ),
        sims.SimRecord(
            IPv4Address("198.19.0.4"), "001010000000004", "s", "n", None, True, "ip_map"
        ),
        sims.SimRecord(
            IPv4Address("198.19.0.5"), "001010000000005", None, "x", "g", False, "ip_map"
        ),
        sims.SimRecord(
            IPv4Address("198.19.0.6"), "001010000000006", None, "nul\0in", "g", True, "session"
        ),
    ]
    records = sims.SimRecords(made)
    assert len(records) == 5 and list(records) == [r.address for r in made]
    assert [records[r.address] for r in made] == made
    assert records == {r.address: r for r in made}
    assert IPv4Address("198.19.0.9") not in records and "198.19.0.2" not in records
    assert records.get(IPv4Address("198.19.0.9")) is None
    # Through the cache's rows too, and the group is one string for every SIM of it.
    again = sims.SimMap.from_json(sims.SimMap(records=records, fetched_at=1.0).to_json())
    assert again.records == records
    assert again.records[made[0].address].group_id is again.records[made[3].address].group_id


def test_packed_records_given_out_of_order_keep_the_last_of_each_address() -> None:
    """Packed records are ordered by address whatever the order given; a later record for the
    same address replaces the earlier, whether either holds a NUL (kept aside) or not."""

    def record(last: int, name: str) -> sims.SimRecord:
        address = IPv4Address(f"198.19.0.{last}")
        return sims.SimRecord(address, f"00101000000000{last}", None, name, "g", True, "session")

    given = [record(9, "nine"), record(3, "three"), record(9, "nine\0again"), record(5, "five")]
    given += [record(3, "three again"), record(7, "odd\0one"), record(7, "seven")]
    records = sims.SimRecords(given)
    assert list(records) == [IPv4Address(f"198.19.0.{n}") for n in (3, 5, 7, 9)]
    assert [records[a].name for a in records] == ["three again", "five", "seven", "nine\0again"]
    assert records.group_of_int(int(IPv4Address("198.19.0.9"))) == (True, "g")
    assert records.group_of_int(int(IPv4Address("198.19.0.4"))) == (False, None)
    assert [f[1] for f in records.sorted_fields()] == [
        "three again",
        "five",
        "seven",
        "nine\0again",
    ]
