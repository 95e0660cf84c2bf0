"""Rollouts end to end: `cloud push --wait-health`, and devices failing after the canaries passed.

Real things only: a real Mosquitto, the real `linewatch` command in its own process, real
OtaClients with their own model stores and tiny real int8 models, decisions made by those
models on their golden images.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cloud.config import CloudConfig, load_cloud_config
from cloud.ota_cli import rollout as rollout_cmd
from cloud.registry import Registry, init_keys, open_ota_store, public_key_path
from cloud.rollout import rollout_status, run_push
from cloud.store import open_store
from edge.config import parse_config
from edge.inference import Classifier
from edge.install import install_bundle
from edge.models import ModelStore
from edge.ota import OtaClient
from edge.ota_wire import ACTIVE, FAILED, HEALTH_WATCHING, ROLLED_BACK
from edge.protocol import StatusPayload
from tests.conftest import LINEWATCH, Broker
from tests.helpers import Host, Keys, state_is, wait_for


class Line:
    """A cloud config with its signing key, and devices running v1 that the cloud knows of."""

    def __init__(self, tmp_path: Path, broker: Broker, v1: Path) -> None:
        self.tmp_path, self.broker, self.v1 = tmp_path, broker, v1
        self.toml = tmp_path / "cloud.toml"
        self.toml.write_text(f'data_dir = "cloud-data"\nstore.path = "cloud.db"\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n')
        self.cfg: CloudConfig = load_cloud_config(self.toml)
        init_keys(self.cfg)
        self.clients: dict[str, OtaClient] = {}
        self.hosts: dict[str, Host] = {}
        self.stores: dict[str, ModelStore] = {}

    def add(self, device: str, *, trusted: Path | None = None, health_parts: int = 10) -> OtaClient:
        root = self.tmp_path / device
        store = ModelStore(root / "models")
        (root / "frames").mkdir(parents=True)
        config = parse_config(
            {"device_id": device, "groups": ["line1"], "camera": {"source": str(root / "frames")},
             "model": {"path": str(store.root)}, "buffer": {"path": str(root / "buffer.db")},
             "mqtt": {"host": self.broker.host, "port": self.broker.port},
             "ota": {"trusted_keys": [str(trusted or public_key_path(self.cfg))], "health_parts": health_parts}},
            base=root,
        )  # fmt: skip
        first = install_bundle(self.v1, store, config.ota.model_copy(update={"allow_unsigned": True}), None)
        assert first.ok, first.reason
        with open_store(self.cfg) as cs:  # as ingest records the device's status message
            cs.record_status(
                StatusPayload(v=1, state="online", device_id=device, ts=time.time(), model_version="tiny-1", groups=["line1"]),
                received=time.time(), retained=False,
            )  # fmt: skip
        host = Host(Classifier(store.current()))
        client = OtaClient(config, host)
        client.start()
        self.clients[device], self.hosts[device], self.stores[device] = client, host, store
        return client

    def version(self, device: str) -> str:
        return Classifier(self.stores[device].current()).version

    def decide(self, device: str, parts: int) -> None:
        """``parts`` decisions of the device's running model on its golden images, as the agent reports them."""
        clf = self.hosts[device].classifier
        golden = [clf.bundle_dir / "golden" / Path(g.file).name for g in clf.manifest.golden]
        for i in range(parts):
            self.clients[device].observe(clf.predict_file(golden[i % len(golden)]), clf.version)

    def close(self) -> None:
        for c in self.clients.values():
            c.stop()
        for c in self.clients.values():
            c.join()


@pytest.fixture
def line(tmp_path: Path, broker: Broker, v1: Path) -> Iterator[Line]:
    made = Line(tmp_path, broker, v1)
    yield made
    made.close()


def deployment(line: Line, device: str) -> dict[str, object]:
    rows = {d["device_id"]: d for d in rollout_status(line.cfg)["deployments"]}
    return rows.get(device, {})


def watching_in_cloud(line: Line, device: str) -> Callable[[], bool]:
    return lambda: deployment(line, device).get("health") == HEALTH_WATCHING


def test_push_wait_health_waits_for_the_verdict_and_reports_it(line: Line, v2: Path) -> None:
    """`linewatch cloud push --wait-health` stays until each health watch ends, then reports it.

    cam1's new model makes healthy decisions; cam2's fails to invoke and rolls itself back.
    Both are `active` (health watching) long before that: without --wait-health the push
    would have counted them as successes there.
    """
    line.add("cam1")
    line.add("cam2")
    push = subprocess.Popen(
        [LINEWATCH, "cloud", "push", str(v2), "--to", "line1", "--wait-health", "--min-success", "0.5",
         "--timeout", "60", "--chunk-bytes", "16384", "--config", str(line.toml), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for dev in ("cam1", "cam2"):
            wait_for(state_is(line.clients[dev], ACTIVE, FAILED), what=f"{dev} active", timeout=60)
            st = line.clients[dev].state
            assert st is not None and st["version"] == "tiny-2" and st["health"] == HEALTH_WATCHING, st
            # the push's own server has recorded it too
            wait_for(watching_in_cloud(line, dev), what=f"cloud saw {dev} watching")
        time.sleep(1.0)
        assert push.poll() is None, "push returned before the health verdicts"

        line.decide("cam1", 10)  # health_parts decisions of tiny-2: the watch passes
        for _ in range(3):  # over max(2, parts/20) invoke errors: the watch trips
            line.clients["cam2"].observe_error(RuntimeError("invoke failed"), "tiny-2")
        out, err = push.communicate(timeout=60)
    finally:
        if push.poll() is None:
            push.kill()
            push.communicate()
    assert push.returncode == 0, (out, err)
    result = json.loads(out)
    assert result["state"] == "done" and result["devices"] == {"cam1": "success", "cam2": "failure"}, result
    assert "rolled_back at health" in result["reasons"]["cam2"] and "invoke errors" in result["reasons"]["cam2"]
    # the progress lines show the wait: watching first, then the verdict
    lines = err.splitlines()
    watching = next(i for i, s in enumerate(lines) if "cam1: active tiny-2" in s and "health=watching" in s)
    healthy = next(i for i, s in enumerate(lines) if "cam1: active tiny-2" in s and "health=ok" in s)
    assert watching < healthy, err
    assert any("cam2: rolled_back" in s for s in lines), err
    assert line.version("cam1") == "tiny-2" and line.version("cam2") == "tiny-1"
    rows = {d["device_id"]: d for d in rollout_status(line.cfg)["deployments"]}
    assert rows["cam1"]["health"] == "ok" and rows["cam2"]["state"] == ROLLED_BACK


def test_devices_failing_after_the_canaries_passed_halt_and_roll_back(tmp_path: Path, line: Line, v2: Path) -> None:
    """The canary succeeds; then a main-phase device refuses the model, so --min-success 1.0
    cannot be met: the rollout halts, every device that may hold the new model goes back,
    and `rollout status` says so."""
    line.add("cam1")
    line.add("cam2")
    line.add("cam3", trusted=Keys(tmp_path / "stranger").public)  # refuses the cloud's signature
    with open_ota_store(line.cfg) as store:
        model = Registry(line.cfg, store).add(v2)
    lines: list[str] = []
    outcome = run_push(line.cfg, model, "line1", canary="1", min_success=1.0, timeout_s=60, chunk_bytes=16384, echo=lines.append)
    text = "\n".join(lines)
    assert outcome.state == "halted", (outcome, text)
    assert "canaries: 1/1 succeeded; proceeding" in text
    assert outcome.devices["cam1"] == "success" and outcome.devices["cam3"] == "failure"
    assert outcome.rolled_back == {"cam1": "rolled back", "cam2": "rolled back"}, outcome
    assert "unknown key" in outcome.reasons["cam3"] and "rolled back" in outcome.reasons["cam1"]
    assert outcome.message.startswith("halted in main phase:") and "rolled back 2 of 2: cam1, cam2" in outcome.message
    # every device runs the old model again; the refusing one never left it
    assert [line.version(d) for d in ("cam1", "cam2", "cam3")] == ["tiny-1"] * 3
    for dev in ("cam1", "cam2"):
        st = line.clients[dev].state
        assert st is not None and st["state"] == ACTIVE and st["version"] == "tiny-1", st

    runner = CliRunner()
    res = runner.invoke(rollout_cmd, ["status", "--config", str(line.toml), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    status = json.loads(res.output)
    assert status["rollout"]["state"] == "halted" and status["rollout"]["message"] == outcome.message
    rows = {d["device_id"]: d for d in status["deployments"]}
    assert rows["cam1"]["phase"] == "canary" and rows["cam2"]["phase"] == "main"
    for dev in ("cam1", "cam2"):
        assert rows[dev]["desired_version"] == "tiny-1" and rows[dev]["state"] == ACTIVE, rows[dev]
    assert rows["cam3"]["state"] == FAILED and rows["cam3"]["stage"] == "signature"
    res = runner.invoke(rollout_cmd, ["status", "--config", str(line.toml)], catch_exceptions=False)
    assert "halted - halted in main phase" in res.output, res.output
    assert sum("-> rolled back to tiny-1" in s for s in res.output.splitlines()) == 2, res.output
