"""Agent config: every problem reported with its key path; relative paths resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import load_config
from edge.exceptions import ConfigError
from tests.conftest import REPO, run_cli

GOOD = """
device_id = "line1-cam1"
groups = ["line1"]
camera.source = "parts.mp4"
model.path = "models/"
buffer.path = "buffer.db"
buffer.max_bytes = 200_000_000
mqtt.host = "127.0.0.1"
mqtt.port = 1883
ota.trusted_keys = ["signing.pub"]
"""


def test_design_md_keys_parse_and_resolve_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD)
    cfg = load_config(path)
    assert cfg.device_id == "line1-cam1"
    assert cfg.groups == ["line1"]
    assert cfg.buffer.path == tmp_path / "buffer.db"
    assert cfg.model.path == tmp_path / "models"
    assert cfg.camera.source == str(tmp_path / "parts.mp4")
    assert cfg.ota.trusted_keys == [tmp_path / "signing.pub"]
    assert cfg.buffer.synchronous == "FULL"
    assert cfg.live_camera is False  # a file: backpressure, no drops


def test_example_template_is_valid() -> None:
    cfg = load_config(REPO / "firmware-config" / "agent.example.toml")
    assert cfg.device_id == "line1-cam1"


def test_every_error_has_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "bad id!"\n'
        "camera.source = 0\n"
        "camera.queue_size = 0\n"
        'model.path = "m"\n'
        'buffer.path = "b.db"\n'
        "buffer.max_bytes = 10\n"
        "mqtt.port = 99999\n"
        "mqtt.colour = 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for key in ("device_id", "camera.queue_size", "buffer.max_bytes", "mqtt.port", "mqtt.colour"):
        assert f"  {key}" in text, text
    assert "unknown key" in text
    assert "99999" in text  # the offending value is shown


def test_missing_section_and_bad_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "a"\n')
    with pytest.raises(ConfigError, match="camera: required key is missing"):
        load_config(path)
    path.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


def test_validate_config_cli_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD.replace('"line1-cam1"', '"x y"'))
    proc = run_cli("edge", "validate-config", str(path))
    assert proc.returncode != 0
    assert "device_id = 'x y'" in proc.stderr
    assert "Traceback" not in proc.stderr
    path.write_text(GOOD)
    proc = run_cli("edge", "validate-config", str(path))
    assert proc.returncode == 1 and "parts.mp4: no such video file" in proc.stderr, "the files it names are checked"
    (tmp_path / "parts.mp4").write_bytes(b"x")
    from edge.signing import generate_keypair

    generate_keypair(tmp_path / "signing.key", tmp_path / "signing.pub")
    proc = run_cli("edge", "validate-config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_password_comes_from_environment_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD + 'mqtt.password = "secret"\n')
    with pytest.raises(ConfigError, match="mqtt.password"):
        load_config(path)
    path.write_text(GOOD)
    monkeypatch.setenv("LINEWATCH_MQTT_PASSWORD", "s3cret")
    assert load_config(path).mqtt.password == "s3cret"


def test_cloud_example_template_is_valid() -> None:
    from cloud.config import load_cloud_config

    cfg = load_cloud_config(REPO / "firmware-config" / "cloud.example.toml")
    assert cfg.store.path.name == "cloud.db"
    assert cfg.mqtt.port == 8884 and cfg.mqtt.tls  # the broker's cloud listener
