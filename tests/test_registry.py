"""The cloud side of OTA: keys, the registry, push with canaries, rollout status.

Devices here are real OtaClients (their own stores, real tiny models) on a real Mosquitto;
the fleet table is filled through the cloud store's own record_status, as ingest does.
"""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from cloud.config import CloudConfig
from cloud.exceptions import CloudError
from cloud.ota_cli import register
from cloud.registry import Registry, open_ota_store, public_key_path
from cloud.rollout import parse_canary, resolve_targets, run_push
from cloud.store import open_store
from edge.bundle import pack_bundle
from edge.cli import LinewatchGroup
from edge.config import parse_config
from edge.exceptions import LinewatchError
from edge.inference import Classifier
from edge.install import install_bundle
from edge.models import ModelStore
from edge.ota import OtaClient
from edge.ota_wire import ACTIVE, FAILED
from edge.protocol import MANIFEST_FILE, StatusPayload
from edge.signing import load_public_key, verify_bundle
from tests.conftest import Broker
from tests.helpers import Keys


@click.group(cls=LinewatchGroup)
def cloud() -> None:
    """Stand-in for cloud/cli.py's group, with the OTA commands attached the same way."""


register(cloud)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write_toml(tmp_path: Path, broker: Broker | None = None) -> Path:
    toml = tmp_path / "cloud.toml"
    port = broker.port if broker else 1883
    toml.write_text(f'data_dir = "cloud-data"\nstore.path = "cloud.db"\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n')
    return toml


def invoke(runner: CliRunner, *args: str) -> Any:
    result = runner.invoke(cloud, list(args), catch_exceptions=False)
    return result


@pytest.fixture
def cfg(tmp_path: Path, runner: CliRunner) -> CloudConfig:
    """A cloud config with its signing key made by `keys init`."""
    from cloud.config import load_cloud_config

    toml = write_toml(tmp_path)
    res = invoke(runner, "keys", "init", "--config", str(toml))
    assert res.exit_code == 0, res.output
    return load_cloud_config(toml)


def test_every_command_has_help_with_example(runner: CliRunner) -> None:
    for path in (["keys", "init"], ["models", "add"], ["models", "list"], ["models", "show"], ["push"], ["rollout", "status"]):
        res = invoke(runner, *path, "--help")
        assert res.exit_code == 0 and "Example:" in res.output, path


def test_keys_init(tmp_path: Path, runner: CliRunner) -> None:
    toml = write_toml(tmp_path)
    res = invoke(runner, "keys", "init", "--config", str(toml))
    assert res.exit_code == 0, res.output
    priv = tmp_path / "cloud-data" / "keys" / "signing.key"
    pub = tmp_path / "cloud-data" / "keys" / "signing.pub"
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600 and pub.is_file()
    assert "ota.trusted_keys" in res.output and str(pub) in res.output
    again = invoke(runner, "keys", "init", "--config", str(toml))
    assert again.exit_code == 1 and "already exists" in again.output
    assert invoke(runner, "keys", "init", "--config", str(toml), "--force").exit_code == 0


def test_models_add_signs_and_stores_by_content(tmp_path: Path, runner: CliRunner, cfg: CloudConfig, v1: Path) -> None:
    toml = str(tmp_path / "cloud.toml")
    res = invoke(runner, "models", "add", str(v1), "--config", toml, "--json")
    assert res.exit_code == 0, res.output
    entry = json.loads(res.output)
    packed = Path(entry["path"])
    assert packed.parent == tmp_path / "cloud-data" / "registry" and packed.name == f"{entry['sha256']}.lwb"
    import hashlib

    assert hashlib.sha256(packed.read_bytes()).hexdigest() == entry["sha256"]
    # The packed bundle verifies with the exported public key, as a device will check it.
    from edge.install import unpack_bundle

    unpack_bundle(packed, tmp_path / "check")
    pub = load_public_key(public_key_path(cfg))
    assert verify_bundle(tmp_path / "check", [public_key_path(cfg)]).key_id == entry["key_id"]
    assert pub is not None
    # adding again: the same entry; list and show find it
    again = json.loads(invoke(runner, "models", "add", str(v1), "--config", toml, "--json").output)
    assert again["sha256"] == entry["sha256"]
    listed = json.loads(invoke(runner, "models", "list", "--config", toml, "--json").output)
    assert [m["version"] for m in listed] == ["tiny-1"]
    shown = json.loads(invoke(runner, "models", "show", "tiny-1", "--config", toml, "--json").output)
    assert shown["manifest"]["version"] == "tiny-1" and shown["sha256"] == entry["sha256"]
    missing = invoke(runner, "models", "show", "nope", "--config", toml)
    assert missing.exit_code == 1 and "models add" in missing.output


def test_models_add_refusals(tmp_path: Path, cfg: CloudConfig, v1: Path) -> None:
    with open_ota_store(cfg) as store:
        reg = Registry(cfg, store)
        reg.add(v1)
        # same version, different content
        changed = tmp_path / "changed"
        import shutil

        shutil.copytree(v1, changed)
        raw = json.loads((changed / MANIFEST_FILE).read_text())
        raw["threshold"] = 0.42
        (changed / MANIFEST_FILE).write_text(json.dumps(raw))
        with pytest.raises(CloudError, match="already registered with different content"):
            reg.add(changed)
        # golden expectations the model cannot meet
        raw["version"] = "tiny-1b"
        for g in raw["golden"]:
            g["expected"] = [127 if x < 0 else -128 for x in g["expected"]]
        (changed / MANIFEST_FILE).write_text(json.dumps(raw))
        with pytest.raises(CloudError, match="golden images fail"):
            reg.add(changed)
        # a model that does not match its manifest
        raw["golden"] = json.loads((v1 / MANIFEST_FILE).read_text())["golden"]
        raw["model"]["sha256"] = "0" * 64
        (changed / MANIFEST_FILE).write_text(json.dumps(raw))
        with pytest.raises(CloudError, match="sha256"):
            reg.add(changed)
        # a bundle whose int8 model failed the trainer's quantization gate
        raw["model"]["sha256"] = json.loads((v1 / MANIFEST_FILE).read_text())["model"]["sha256"]
        raw["metrics"]["quantization_gate"] = {"passed": False, "message": "int8 is 3.0 points below float"}
        (changed / MANIFEST_FILE).write_text(json.dumps(raw))
        with pytest.raises(CloudError, match=r"quantization gate failed \(int8 is 3.0 points below float\).*--no-check"):
            reg.add(changed)
        assert [m.version for m in reg.list()] == ["tiny-1"]
        assert reg.add(changed, check=False).version == "tiny-1b"  # the operator's explicit override


def test_add_without_key_says_how_to_make_one(tmp_path: Path, v1: Path) -> None:
    from cloud.config import load_cloud_config

    config = load_cloud_config(write_toml(tmp_path))
    with open_ota_store(config) as store, pytest.raises(LinewatchError, match="keys init"):
        Registry(config, store).add(v1)


def test_parse_canary() -> None:
    assert parse_canary(None, 10) == 0
    assert parse_canary("2", 10) == 2
    assert parse_canary("25%", 10) == 3
    assert parse_canary("1%", 10) == 1
    assert parse_canary("50", 3) == 3
    with pytest.raises(CloudError):
        parse_canary("abc", 3)
    with pytest.raises(CloudError):
        parse_canary("0%", 3)


# -- push over MQTT --------------------------------------------------------------------------------


class Fleet:
    """N devices, each an OtaClient with its own store running v1, announced to the cloud store."""

    def __init__(self, tmp_path: Path, broker: Broker, cfg: CloudConfig, v1: Path) -> None:
        self.tmp_path, self.broker, self.cfg = tmp_path, broker, cfg
        self.v1 = v1
        self.clients: dict[str, OtaClient] = {}
        self.stores: dict[str, ModelStore] = {}
        self.pub = public_key_path(cfg)

    def add(self, device: str, groups: list[str], *, trusted: Path | None = None) -> OtaClient:
        root = self.tmp_path / device
        store = ModelStore(root / "models")
        ota = {"trusted_keys": [str(trusted or self.pub)], "health_parts": 5}
        frames = root / "frames"
        frames.mkdir(parents=True)
        config = parse_config(
            {"device_id": device, "groups": groups, "camera": {"source": str(frames)}, "model": {"path": str(store.root)},
             "buffer": {"path": str(root / "buffer.db")}, "mqtt": {"host": self.broker.host, "port": self.broker.port},
             "ota": ota},
            base=root,
        )  # fmt: skip
        first = install_bundle(self.v1, store, config.ota.model_copy(update={"allow_unsigned": True}), None)
        assert first.ok, first.reason
        with open_store(self.cfg) as cs:
            cs.record_status(
                StatusPayload(v=1, state="online", device_id=device, ts=time.time(), model_version="tiny-1", groups=groups),
                received=time.time(), retained=False,
            )  # fmt: skip
        client = OtaClient(config)
        client.start()
        self.clients[device], self.stores[device] = client, store
        return client

    def version(self, device: str) -> str:
        return Classifier(self.stores[device].current()).version

    def close(self) -> None:
        for c in self.clients.values():
            c.stop()
        for c in self.clients.values():
            c.join()


@pytest.fixture
def fleet(tmp_path: Path, broker: Broker, v1: Path, runner: CliRunner) -> Iterator[Fleet]:
    from cloud.config import load_cloud_config

    toml = write_toml(tmp_path, broker)
    assert invoke(runner, "keys", "init", "--config", str(toml)).exit_code == 0
    f = Fleet(tmp_path, broker, load_cloud_config(toml), v1)
    yield f
    f.close()


def test_resolve_targets(fleet: Fleet) -> None:
    with open_store(fleet.cfg) as cs:
        for dev, groups in (("a1", ["line1"]), ("a2", ["line1", "north"]), ("b1", ["line2"])):
            cs.record_status(StatusPayload(v=1, state="online", device_id=dev, groups=groups), received=time.time(), retained=False)
    with open_ota_store(fleet.cfg) as store:
        assert resolve_targets(store, "line1") == ["a1", "a2"]
        assert resolve_targets(store, "b1,north") == ["b1", "a2"]
        with pytest.raises(CloudError, match="no device or group named 'x'"):
            resolve_targets(store, "x")


def test_push_canary_then_rest(tmp_path: Path, fleet: Fleet, v2: Path, runner: CliRunner) -> None:
    for dev in ("cam1", "cam2", "cam3"):
        fleet.add(dev, ["line1"])
    lines: list[str] = []
    with open_ota_store(fleet.cfg) as store:
        model = Registry(fleet.cfg, store).add(v2)
    outcome = run_push(fleet.cfg, model, "line1", canary="1", min_success=1.0, timeout_s=30, chunk_bytes=16384, echo=lines.append)
    assert outcome.state == "done", (outcome, lines)
    assert outcome.canaries == ("cam1",) and outcome.success_ratio == 1.0
    assert all(fleet.version(d) == "tiny-2" for d in ("cam1", "cam2", "cam3"))
    text = "\n".join(lines)
    assert "canary phase: cam1" in text and "proceeding" in text and "cam2: active tiny-2" in text
    # the canary was done before the others got their desired message
    status = json.loads(invoke(runner, "rollout", "status", "--config", str(tmp_path / "cloud.toml"), "--json").output)
    assert status["rollout"]["state"] == "done"
    rows = {d["device_id"]: d for d in status["deployments"]}
    assert rows["cam1"]["phase"] == "canary" and rows["cam2"]["phase"] == "main"
    assert all(r["state"] == ACTIVE and r["previous_version"] == "tiny-1" for r in rows.values())
    assert rows["cam1"]["updated"] < min(rows["cam2"]["updated"], rows["cam3"]["updated"])


def test_push_halts_and_rolls_canaries_back(tmp_path: Path, fleet: Fleet, v2: Path, runner: CliRunner) -> None:
    stranger = Keys(tmp_path / "stranger")
    fleet.add("cam1", ["line1"])
    fleet.add("cam2", ["line1"], trusted=stranger.public)  # will refuse the cloud's signature
    cam3 = fleet.add("cam3", ["line1"])
    res = invoke(
        runner, "push", str(v2), "--to", "line1", "--canary", "2", "--min-success", "1.0", "--timeout", "30",
        "--chunk-bytes", "16384", "--config", str(tmp_path / "cloud.toml"), "--json",
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    out = json.loads(res.stdout)
    assert out["state"] == "halted" and out["canaries"] == ["cam1", "cam2"]
    assert "unknown key" in out["reasons"]["cam2"] and "rolled back" in out["reasons"]["cam1"]
    # cam1 was told to go back to tiny-1 (its kept previous model, no download); cam3 never moved
    assert fleet.version("cam1") == "tiny-1" and fleet.version("cam2") == "tiny-1" and fleet.version("cam3") == "tiny-1"
    st1 = fleet.clients["cam1"].state
    assert st1 is not None and st1["state"] == ACTIVE and st1["version"] == "tiny-1"
    assert cam3.state is None
    status = json.loads(invoke(runner, "rollout", "status", "--config", str(tmp_path / "cloud.toml"), "--json").output)
    assert status["rollout"]["state"] == "halted"
    rows = {d["device_id"]: d for d in status["deployments"]}
    assert rows["cam2"]["state"] == FAILED and rows["cam3"]["state"] == "pending"
    assert rows["cam1"]["state"] == ACTIVE and rows["cam1"]["desired_version"] == "tiny-1"


def test_push_unknown_target_is_a_clear_error(tmp_path: Path, fleet: Fleet, v2: Path, runner: CliRunner) -> None:
    fleet.add("cam1", ["line1"])
    res = invoke(runner, "push", str(v2), "--to", "line9", "--config", str(tmp_path / "cloud.toml"))
    assert res.exit_code == 1 and "no device or group named 'line9'" in res.output


def test_pack_is_repeatable(tmp_path: Path, v1: Path) -> None:
    a = pack_bundle(v1, tmp_path / "a.lwb")
    b = pack_bundle(v1, tmp_path / "b.lwb")
    assert a.read_bytes() == b.read_bytes()



def test_push_beside_cloud_serve_answers_each_request_once(fleet: Fleet, v2: Path) -> None:
    """A server in `cloud serve` and one in `cloud push` share the requests (found via the store)."""
    from cloud.ota_server import start_ota_server

    fleet.add("cam1", ["line1"])
    serve = start_ota_server(fleet.cfg)
    try:
        assert serve.wait_connected(10)
        with open_ota_store(fleet.cfg) as store:
            model = Registry(fleet.cfg, store).add(v2)
        outcome = run_push(fleet.cfg, model, "cam1", timeout_s=30, chunk_bytes=4096, echo=lambda _s: None)
        assert outcome.state == "done", outcome
    finally:
        serve.stop()
        serve.join()
    chunks = -(-model.size // 4096)
    assert fleet.version("cam1") == "tiny-2"
    # every chunk went out once in all: the shared subscription gave each request to one server
    assert fleet.clients["cam1"].stats["chunks"] == chunks and fleet.clients["cam1"].stats["duplicates"] == 0
    assert all(n == 1 for n in serve.sent.values())
    assert 0 < serve.stats["chunks_sent"] < chunks  # Mosquitto hands shared requests round-robin
