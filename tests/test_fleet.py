"""Fleet state in the cloud (online, offline_buffering, dead) and the cloud CLI that reads it."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from cloud.config import load_cloud_config, parse_cloud_config
from cloud.exceptions import CloudConfigError
from cloud.store import device_state
from tests.conftest import LINEWATCH, Broker
from tests.helpers import (
    all_synced,
    cloud_query,
    fill_buffer,
    fleet_states,
    start_device,
    start_ingest,
    unsynced,
    wait_until,
    write_agent_config,
    write_cloud_config,
)

# Large enough that one-row round trips cannot drain it before the kill, even on an idle box.
CRASHED_BACKLOG = 20_000


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINEWATCH, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_device_state_rules() -> None:
    kw = {"offline_after_s": 10.0, "dead_after_s": 100.0}
    assert device_state(now=50, last_seen=45, status_seen=45, reported_state="online", **kw) == "online"
    assert device_state(now=50, last_seen=49, status_seen=30, reported_state="online", **kw) == "offline_buffering"
    assert device_state(now=50, last_seen=45, status_seen=45, reported_state="offline", **kw) == "offline_buffering"
    assert device_state(now=500, last_seen=45, status_seen=45, reported_state="online", **kw) == "dead"
    assert device_state(now=50, last_seen=None, status_seen=None, reported_state="offline", **kw) == "dead"


def test_fleet_states_online_offline_buffering_and_dead(tmp_path: Path, broker: Broker) -> None:
    cloud_toml = write_cloud_config(tmp_path / "cloud", broker, fleet={"offline_after_s": 1.5, "dead_after_s": 4.0})
    ingest = start_ingest(cloud_toml)
    # alive: heartbeats every 0.5 s
    alive = write_agent_config(tmp_path / "alive", broker, "cam-alive")
    fill_buffer(alive, 50)
    # crashed: one row per round trip so a backlog is still there when it is killed
    crashed = write_agent_config(tmp_path / "crashed", broker, "cam-crashed", batch_rows=1, max_inflight=1, status_interval_s=60)
    fill_buffer(crashed, CRASHED_BACKLOG)
    # frozen: the process stops (SIGSTOP) so its heartbeats stop but its socket stays open
    frozen = write_agent_config(tmp_path / "frozen", broker, "cam-frozen")
    devs = {name: start_device(path, model_version=f"{name}-1") for name, path in
            (("alive", alive), ("crashed", crashed), ("frozen", frozen))}  # fmt: skip
    wait_until(lambda: all_synced(alive), 20, "the alive device to drain")
    wait_until(lambda: cloud_query(cloud_toml, "SELECT backlog FROM devices WHERE device_id = 'cam-crashed'") == [(CRASHED_BACKLOG,)],
               10, "the crashed device's first status")  # fmt: skip
    # (the crashed one only sends a status on connect, so it is "online" for offline_after_s at most)
    wait_until(lambda: (f := fleet_states(cloud_toml.parent)).get("cam-frozen", {}).get("state") == "online"
               and f["cam-alive"]["state"] == "online", 10, "alive and frozen online")  # fmt: skip
    devs["crashed"].kill9()  # the kernel closes its socket: the broker publishes the last will
    devs["frozen"].proc.send_signal(signal.SIGSTOP)
    try:
        assert unsynced(crashed)["results"] > 0
        state = wait_until(
            lambda: (f := fleet_states(cloud_toml.parent))["cam-crashed"]["state"] == "offline_buffering"
            and f["cam-frozen"]["state"] == "offline_buffering" and f,
            10, "crashed and frozen to show as offline_buffering",
        )  # fmt: skip
        assert state["cam-alive"]["state"] == "online"
        assert state["cam-alive"]["results"] == 50 and state["cam-alive"]["model_version"] == "alive-1"
        assert state["cam-alive"]["backlog"] == 0 and state["cam-alive"]["groups"] == ["line1"]
        c = state["cam-crashed"]
        assert c["reported_state"] == "offline" and c["offline_reason"] == "lost", "the last will was seen"
        assert c["backlog"] == CRASHED_BACKLOG, "backlog known from its last status"
        assert 0 < int(str(c["results"])) < CRASHED_BACKLOG
        assert state["cam-frozen"]["reported_state"] == "online", "no last will: heartbeats just stopped"
        # No status or message for dead_after_s: dead; the alive one stays online.
        final = wait_until(lambda: (f := fleet_states(cloud_toml.parent))["cam-crashed"]["state"] == "dead" and f, 10, "dead")
        assert final["cam-alive"]["state"] == "online"
        for key in ("device_id", "state", "results", "model_version", "last_seen", "backlog", "gaps", "evicted"):
            assert key in final["cam-alive"]
    finally:
        devs["frozen"].proc.send_signal(signal.SIGCONT)
    devs["frozen"].term()
    assert devs["alive"].term() == 0
    # A clean stop leaves a retained offline status, so the cloud knows at once.
    wait_until(lambda: fleet_states(cloud_toml.parent)["cam-alive"]["state"] == "offline_buffering", 10, "clean stop seen")
    ingest.term()


def test_cloud_cli_reads_the_store_with_and_without_config(tmp_path: Path, broker: Broker) -> None:
    cloud_toml = write_cloud_config(tmp_path / "cloud", broker)
    ingest = start_ingest(cloud_toml)
    agent = write_agent_config(tmp_path / "dev", broker, "cam-cli")
    fill_buffer(agent, 30)
    dev = start_device(agent)
    wait_until(lambda: all_synced(agent), 20, "the drain")
    dev.term()
    ingest.term()
    # cwd has cloud.toml: the exact form `linewatch cloud fleet --json` works.
    (d,) = fleet_states(cloud_toml.parent).values()
    assert d["device_id"] == "cam-cli" and d["results"] == 30 and d["state"] in ("online", "offline_buffering")
    out = cli("cloud", "results", "--device", "cam-cli", "--json", "--limit", "5", "--after", "10", cwd=tmp_path)
    assert out.returncode != 0 and "no cloud store" in out.stderr  # no cloud.toml in tmp_path
    out = cli(
        "cloud",
        "results",
        "--device",
        "cam-cli",
        "--json",
        "--limit",
        "5",
        "--after",
        "10",
        "--config",
        str(cloud_toml),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["seq"] for r in rows] == [11, 12, 13, 14, 15] and rows[0]["passed"] is True
    table = cli("cloud", "fleet", cwd=cloud_toml.parent)
    assert table.returncode == 0 and "cam-cli" in table.stdout
    counters = cli("cloud", "counters", "--json", cwd=cloud_toml.parent)
    assert json.loads(counters.stdout)["stored_results"] == 30
    bad = tmp_path / "bad.toml"
    bad.write_text("[fleet]\ndead_after_s = -1\n[mqtt]\nprot = 1\n")
    out = cli("cloud", "fleet", "--config", str(bad), cwd=tmp_path)
    assert out.returncode == 1 and "fleet.dead_after_s = -1" in out.stderr and "mqtt.prot" in out.stderr
    assert "Traceback" not in out.stderr


def test_cloud_config_defaults_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    default = load_cloud_config()
    assert default.store.path == tmp_path / "cloud.db" and default.data_dir == tmp_path / "cloud-data"
    (tmp_path / "etc").mkdir()
    f = tmp_path / "etc" / "cloud.toml"
    f.write_text('data_dir = "data"\nstore.path = "db/cloud.db"\n[mqtt]\nport = 1884\n')
    cfg = load_cloud_config(f)
    assert cfg.store.path == tmp_path / "etc" / "db" / "cloud.db" and cfg.samples_dir == tmp_path / "etc" / "data" / "samples"
    assert cfg.mqtt.port == 1884 and cfg.ingest.share_group == "linewatch-ingest"
    with pytest.raises(CloudConfigError, match="fleet: Value error, dead_after_s must be at least offline_after_s"):
        parse_cloud_config({"fleet": {"offline_after_s": 10, "dead_after_s": 5}}, base=tmp_path)
    with pytest.raises(CloudConfigError, match="no such file"):
        load_cloud_config(tmp_path / "missing.toml")
