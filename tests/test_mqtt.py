"""edge.mqtt.make_client: every paho client is set up one way (no broker needed here)."""

from __future__ import annotations

import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud.config import parse_cloud_config
from edge.config import parse_config
from edge.mqtt import LinkSettings, make_client, set_tls


def _agent_mqtt(tmp_path: Path, **mqtt_keys: object):
    raw = {"device_id": "cam-1", "camera": {"source": "parts.mp4"}, "model": {"path": "models"},
           "buffer": {"path": "buffer.db"}, "mqtt": mqtt_keys}  # fmt: skip
    return parse_config(raw, base=tmp_path).mqtt


def test_settings_of_an_agent_and_a_cloud_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LINEWATCH_MQTT_PASSWORD", "edge-secret")
    monkeypatch.setenv("LINEWATCH_CLOUD_MQTT_PASSWORD", "cloud-secret")
    section = _agent_mqtt(tmp_path, host="broker", port=8883, username="cam-1", tls=True, ca_file="ca.crt")
    assert LinkSettings.of(section, client_id="cam-1") == LinkSettings(
        host="broker", port=8883, client_id="cam-1", keepalive_s=30, username="cam-1",
        password="edge-secret", tls=True, ca_file=str(tmp_path / "ca.crt"),
    )  # fmt: skip
    cloud_section = parse_cloud_config({"mqtt": {"username": "ingest"}}, base=tmp_path).mqtt
    cloud = LinkSettings.of(cloud_section, client_id="w1")
    assert (cloud.username, cloud.password, cloud.tls, cloud.ca_file) == ("ingest", "cloud-secret", False, None)


def test_make_client_sets_id_credentials_and_inflight() -> None:
    settings = LinkSettings(host="h", port=1, client_id="cam-1-ota", username="u", password="p")
    client = make_client(settings, max_inflight_messages=64)
    assert client._client_id == b"cam-1-ota"  # noqa: SLF001 - paho has no getter
    assert client.username == "u" and client.password == "p"
    assert client._protocol == mqtt.MQTTv5 and client._max_inflight_messages == 64  # noqa: SLF001
    assert client._ssl_context is None  # noqa: SLF001


def test_tls_uses_the_closing_socket_and_fails_clearly(tmp_path: Path) -> None:
    settings = LinkSettings(
        host="h", port=1, client_id="c", tls=True
    )  # no ca_file: the system's CAs
    context = make_client(settings)._ssl_context  # noqa: SLF001
    assert (
        isinstance(context, ssl.SSLContext)
        and context.verify_mode == ssl.CERT_REQUIRED
        and context.check_hostname
    )
    assert context.sslsocket_class.__name__ == "_ClosingSSLSocket", (
        "a failed handshake closes its socket"
    )
    missing = LinkSettings(
        host="h", port=1, client_id="c", tls=True, ca_file=str(tmp_path / "nope.crt")
    )
    with pytest.raises(OSError):
        make_client(missing)
    deferred = make_client(missing, tls=False)  # MqttLink retries the TLS files itself
    assert deferred._ssl_context is None  # noqa: SLF001
    with pytest.raises(OSError):
        set_tls(deferred, missing)
