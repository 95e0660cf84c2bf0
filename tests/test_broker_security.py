"""The shipped broker config, ACL and examples against a real Mosquitto over TLS.

One broker per module, started from firmware-config/mosquitto.conf with only its ports and
file paths changed; certificates from a site CA made here with ``cryptography``
(cloud/devices.py), password entries and ACL blocks written by the same code as
``linewatch cloud devices add``.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.config import load_cloud_config
from cloud.devices import DeviceKit, add_device, issue_certificate, site_ca
from edge.config import load_config
from edge.sync import SyncClient
from tests.conftest import REPO, Broker, run_cli
from tests.helpers import (
    all_synced,
    cloud_seqs,
    fill_buffer,
    free_port,
    start_device,
    start_ingest,
    wait_until,
)

PREFIX = "linewatch"  # the shipped ACL's prefix


@dataclass
class Site:
    root: Path
    broker: Broker
    device_port: int
    cloud_port: int
    kits: dict[str, DeviceKit]
    ca: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    ca = site_ca(root / "ca")
    server = issue_certificate(ca, "localhost", root / "broker", hosts=["127.0.0.1", "localhost"])
    devices_pw, cloud_pw = root / "broker" / "devices.passwd", root / "broker" / "cloud.passwd"
    acl = root / "broker" / "linewatch.acl"
    shutil.copy(REPO / "firmware-config" / "mosquitto.acl", acl)
    kits = {name: add_device(name, ca_dir=root / "ca", out_dir=root / "devices", passwd_file=devices_pw, acl_file=acl)
            for name in ("cam-a", "cam-b", "cam-c")}  # fmt: skip
    kits["linewatch-cloud"] = add_device("linewatch-cloud", ca_dir=root / "ca", out_dir=root / "devices",
                                         passwd_file=cloud_pw, acl_file=None, cloud_account=True)  # fmt: skip
    device_port, cloud_port = free_port(), free_port()
    conf = (REPO / "firmware-config" / "mosquitto.conf").read_text()
    for old, new in {
        "listener 8883": f"listener {device_port} 127.0.0.1",
        "listener 8884": f"listener {cloud_port} 127.0.0.1",
        "/etc/mosquitto/certs/ca.crt": str(ca.cert),
        "/etc/mosquitto/certs/server.crt": str(server.cert),
        "/etc/mosquitto/certs/server.key": str(server.key),
        "/etc/mosquitto/linewatch-devices.passwd": str(devices_pw),
        "/etc/mosquitto/linewatch-cloud.passwd": str(cloud_pw),
        "/etc/mosquitto/linewatch.acl": str(acl),
        "persistence true": "persistence false",
    }.items():
        assert old in conf, f"the shipped mosquitto.conf changed: {old!r} is gone"
        conf = conf.replace(old, new)
    # Test-only: stay the user that owns the files (as root, Mosquitto would switch to `mosquitto`).
    (root / "mosquitto.conf").write_text("user root\nlog_type error\nlog_type warning\nlog_type notice\n" + conf)
    broker = Broker(port=device_port, conf=root / "mosquitto.conf", log=root / "mosquitto.log")
    broker.start()
    yield Site(root, broker, device_port, cloud_port, kits, ca.cert)
    broker.stop()


def password(kit: DeviceKit) -> str:
    return kit.env_file.read_text().strip().split("=", 1)[1]


class Peer:
    """A paho client over TLS that records what happens to it."""

    def __init__(self, site: Site, kit: DeviceKit | None, *, username: str | None = None, client_id: str | None = None,
                 cloud: bool = False, cert: bool = True) -> None:  # fmt: skip
        name = username or (kit.name if kit else "nobody")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or name, protocol=mqtt.MQTTv5)
        self.got: list[mqtt.MQTTMessage] = []
        self.connack: Any = None
        self.disconnects: list[Any] = []
        self.subacks: list[Any] = []
        self.connected = threading.Event()
        self.answered = threading.Event()
        c = self.client
        c.tls_set(ca_certs=str(site.ca), certfile=str(kit.cert.cert) if kit and cert else None,
                  keyfile=str(kit.cert.key) if kit and cert else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)  # fmt: skip
        if kit is not None:
            c.username_pw_set(name, password(kit))
        c.on_connect = self._on_connect
        c.on_disconnect = lambda _c, _u, _f, rc, _p: (self.disconnects.append(rc), self.answered.set())
        c.on_message = lambda _c, _u, m: self.got.append(m)
        c.on_subscribe = lambda _c, _u, _mid, codes, _p: self.subacks.append(codes)
        self.port = site.cloud_port if cloud else site.device_port

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.connack = reason
        if not reason.is_failure:
            self.connected.set()
        self.answered.set()

    def start(self) -> Peer:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self.answered.wait(10)
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(name="watcher")
def watcher_fixture(site: Site) -> Iterator[Peer]:
    """The cloud account, reading everything under the prefix."""
    w = Peer(site, site.kits["linewatch-cloud"], cloud=True, client_id=f"watcher-{time.monotonic_ns()}").start()
    assert w.connected.is_set(), w.connack
    w.client.subscribe(f"{PREFIX}/#", qos=1)
    wait_until(lambda: w.subacks, 5, "the watcher's SUBACK")
    yield w
    w.stop()


def topics(peer: Peer) -> list[str]:
    return [m.topic for m in peer.got]


def test_anonymous_certless_and_wrong_password_clients_are_refused(site: Site) -> None:
    anonymous = Peer(site, None).start()  # a site certificate is not enough: no username
    assert not anonymous.connected.is_set()
    anonymous.stop()
    forged = Peer(site, site.kits["cam-a"])
    forged.client.username_pw_set("cam-a", "guessed-password")
    forged.start()
    assert not forged.connected.is_set() and forged.connack is not None and forged.connack.is_failure
    forged.stop()
    certless = Peer(site, site.kits["cam-a"], cert=False)
    refused = False
    try:  # require_certificate: the handshake fails (TLS 1.3 reports it at the first read)
        certless.client.connect("127.0.0.1", site.device_port)
        for _ in range(30):
            if certless.client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                refused = True
                break
    except (ssl.SSLError, OSError):
        refused = True
    assert refused and not certless.connected.is_set()
    # A device's own credentials do not open the cloud listener (another password file).
    device_on_cloud_port = Peer(site, site.kits["cam-a"], cloud=True).start()
    assert not device_on_cloud_port.connected.is_set()
    device_on_cloud_port.stop()


def test_a_device_writes_only_its_own_data_and_reads_only_its_own_acks(site: Site, watcher: Peer) -> None:
    a = Peer(site, site.kits["cam-a"]).start()
    assert a.connected.is_set(), a.connack
    forbidden = [
        (f"{PREFIX}/devices/cam-b/results", False),  # another device's data
        (f"{PREFIX}/devices/cam-b/status", True),
        (f"{PREFIX}/devices/cam-a/ack", False),  # its own acks (forging them marks rows synced)
        (f"{PREFIX}/devices/cam-a/ota/desired", True),  # OTA commands, even its own
        (f"{PREFIX}/devices/cam-a/ota/chunk", False),
        (f"{PREFIX}/devices/cam-b/ota/desired", True),
    ]
    for name, retain in forbidden:
        a.client.publish(name, b'{"forged":true}', qos=1, retain=retain).wait_for_publish(5)
    a.client.publish(f"{PREFIX}/devices/cam-a/results", b'{"allowed":true}', qos=1).wait_for_publish(5)
    wait_until(lambda: f"{PREFIX}/devices/cam-a/results" in topics(watcher), 10, "the allowed message")
    time.sleep(0.3)
    assert topics(watcher) == [f"{PREFIX}/devices/cam-a/results"], "only the device's own data topic got through"
    a.client.subscribe([(f"{PREFIX}/devices/cam-b/ack", 1), (f"{PREFIX}/devices/cam-a/ack", 1),
                        (f"{PREFIX}/devices/cam-b/ota/desired", 1)])  # fmt: skip
    wait_until(lambda: a.subacks, 5, "SUBACK")
    # Mosquitto grants the SUBACK and checks read access on every delivery: the cloud sends
    # to all three, only its own ack reaches the device.
    for name in (f"{PREFIX}/devices/cam-b/ack", f"{PREFIX}/devices/cam-b/ota/desired", f"{PREFIX}/devices/cam-a/ack"):
        watcher.client.publish(name, b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: a.got, 10, "the device's own ack")
    time.sleep(0.3)
    assert topics(a) == [f"{PREFIX}/devices/cam-a/ack"]
    # The OTA user reads its own desired model and writes its own OTA state, nothing else.
    ota = Peer(site, site.kits["cam-a"], username="cam-a-ota").start()
    assert ota.connected.is_set(), ota.connack
    ota.client.publish(f"{PREFIX}/devices/cam-a/results", b"{}", qos=1).wait_for_publish(5)
    ota.client.publish(f"{PREFIX}/devices/cam-a/ota/state", b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: f"{PREFIX}/devices/cam-a/ota/state" in topics(watcher), 10, "the OTA state")
    assert topics(watcher).count(f"{PREFIX}/devices/cam-a/results") == 1
    ota.client.subscribe(f"{PREFIX}/devices/cam-a/ota/desired", qos=1)
    wait_until(lambda: ota.subacks, 5, "SUBACK")
    assert not ota.subacks[0][0].is_failure
    for p in (a, ota):
        p.stop()


def test_a_stolen_client_id_cannot_knock_another_device_off(site: Site, watcher: Peer) -> None:
    b = Peer(site, site.kits["cam-b"]).start()
    assert b.connected.is_set(), b.connack
    for _ in range(3):  # again and again, as the audit did
        thief = Peer(site, site.kits["cam-c"], client_id="cam-b").start()
        assert thief.connected.is_set()  # allowed in, but as client id "cam-c"
        thief.stop()
    time.sleep(0.3)
    assert b.disconnects == [], "cam-b's session was never taken over"
    b.client.publish(f"{PREFIX}/devices/cam-b/results", b"{}", qos=1).wait_for_publish(5)
    wait_until(lambda: f"{PREFIX}/devices/cam-b/results" in topics(watcher), 10, "cam-b still publishing")
    b.stop()


def agent_toml(site: Site, directory: Path, device: str, **mqtt: Any) -> Path:
    """The shipped agent example with only host, port, file paths and the device id changed."""
    text = (REPO / "firmware-config" / "agent.example.toml").read_text()
    kit = site.kits[device]
    text = text.replace('device_id = "line1-cam1"', f'device_id = "{device}"')
    text = text.replace('username = "line1-cam1"', f'username = "{device}"')
    for old, new in {'host = "broker.plant.local"': 'host = "127.0.0.1"', "port = 8883": f"port = {site.device_port}",
                     "/etc/linewatch/ca.crt": str(kit.ca), "/etc/linewatch/device.crt": str(kit.cert.cert),
                     "/etc/linewatch/device.key": str(kit.cert.key)}.items():  # fmt: skip
        assert old in text, f"the shipped agent example changed: {old!r} is gone"
        text = text.replace(old, new)
    for key, value in mqtt.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, count=1, flags=re.M)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.toml"
    path.write_text(text.replace('[mqtt]\n', '[mqtt]\nack_timeout_s = 2.0\nstatus_interval_s = 1.0\n', 1))
    return path


def test_shipped_agent_cloud_and_broker_examples_work_together(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cloud_text = (REPO / "firmware-config" / "cloud.example.toml").read_text()
    kit = site.kits["linewatch-cloud"]
    for old, new in {'host = "broker.plant.local"': 'host = "127.0.0.1"', "port = 8884": f"port = {site.cloud_port}",
                     "/etc/linewatch/ca.crt": str(kit.ca), "/etc/linewatch/cloud.crt": str(kit.cert.cert),
                     "/etc/linewatch/cloud.key": str(kit.cert.key)}.items():  # fmt: skip
        assert old in cloud_text, f"the shipped cloud example changed: {old!r} is gone"
        cloud_text = cloud_text.replace(old, new)
    (tmp_path / "cloud").mkdir()
    cloud_toml = tmp_path / "cloud" / "cloud.toml"
    cloud_toml.write_text(cloud_text)
    assert load_cloud_config(cloud_toml).mqtt.tls
    monkeypatch.setenv("LINEWATCH_CLOUD_MQTT_PASSWORD", password(kit))
    monkeypatch.setenv("LINEWATCH_MQTT_PASSWORD", password(site.kits["cam-a"]))
    agent = agent_toml(site, tmp_path / "dev", "cam-a")
    assert load_config(agent).mqtt.tls
    fill_buffer(agent, 30, samples=[b"\xff\xd8jpeg"])
    ingest = start_ingest(cloud_toml)
    device = start_device(agent)
    wait_until(lambda: all_synced(agent), 30, "every row acked through TLS, passwords and the shipped ACL")
    assert cloud_seqs(cloud_toml, "cam-a") == list(range(1, 31))
    device.term()
    ingest.term()
    out = run_cli("cloud", "fleet", "--json", "--config", str(cloud_toml))
    assert json.loads(out.stdout)[0]["device_id"] == "cam-a", out.stderr


def test_wrong_ca_is_a_clear_status_not_a_crash(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other_ca = site_ca(tmp_path / "other-ca", name="Someone else's CA")
    monkeypatch.setenv("LINEWATCH_MQTT_PASSWORD", password(site.kits["cam-b"]))
    for case, ca_file, expected in (("other CA", str(other_ca.cert), "certificate verify failed"),
                                    ("missing CA", str(tmp_path / "nope.crt"), "TLS setup failed")):  # fmt: skip
        agent = agent_toml(site, tmp_path / case.replace(" ", "-"), "cam-b")
        agent.write_text(agent.read_text().replace(str(site.kits["cam-b"].ca), ca_file))
        fill_buffer(agent, 3)
        client = SyncClient(load_config(agent), reconnect_min_s=0.1, reconnect_max_s=0.5)
        client.start()
        try:
            error = wait_until(lambda c=client: c.snapshot()["last_error"], 10, f"the {case} reported")
            assert expected in error, error
            time.sleep(0.5)
            assert client.is_alive() and not client.connected and client.error is None
        finally:
            client.stop()
            client.join(3)
        assert not client.is_alive()


def test_devices_add_cli_writes_credentials_and_prints_where_they_go(tmp_path: Path) -> None:
    (tmp_path / "cloud.toml").write_text('data_dir = "data"\n')
    out = run_cli("cloud", "devices", "add", "line1-cam1", "--config", str(tmp_path / "cloud.toml"))
    assert out.returncode == 0, out.stderr
    kit = tmp_path / "data" / "devices" / "line1-cam1"
    secret = (kit / "agent.env").read_text().strip().split("=", 1)[1]
    assert len(secret) >= 24 and secret not in out.stdout + out.stderr, "the password is in agent.env only"
    assert oct((kit / "agent.env").stat().st_mode & 0o777) == "0o600"
    assert oct((kit / "line1-cam1.key").stat().st_mode & 0o777) == "0o600"
    assert "/etc/linewatch/device.crt" in out.stdout and 'username = "line1-cam1"' in out.stdout
    users = [ln.split(":")[0] for ln in (tmp_path / "data" / "broker" / "linewatch-devices.passwd").read_text().splitlines()]
    assert users == ["line1-cam1", "line1-cam1-ota"]
    acl = (tmp_path / "data" / "broker" / "linewatch.acl").read_text()
    assert "user linewatch-cloud" in acl and "topic write linewatch/devices/line1-cam1/results" in acl
    assert "topic read linewatch/devices/line1-cam1/ack" in acl and "ack\n" not in acl.split("topic write")[1]
    again = run_cli("cloud", "devices", "add", "line1-cam1", "--config", str(tmp_path / "cloud.toml"))
    assert again.returncode == 0 and (tmp_path / "data" / "broker" / "linewatch.acl").read_text().count("user line1-cam1\n") == 1
    bad = run_cli("cloud", "devices", "add", "bad id", "--config", str(tmp_path / "cloud.toml"))
    assert bad.returncode == 1 and "not a device id" in bad.stderr and "Traceback" not in bad.stderr
