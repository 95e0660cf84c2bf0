"""OTA on the device: the validation pipeline, the MQTT transfer, crash safety, health rollback.

Real things only: tiny real int8 bundles from the project's trainer (different versions and
input sizes), real Ed25519 keys, real tar files, a real Mosquitto, real kill -9.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edge.bundle import pack_bundle
from edge.config import AgentConfig, OtaConfig, parse_config
from edge.fsutil import sha256_file
from edge.health import HealthWatch
from edge.inference import Classifier, Prediction, check_golden
from edge.install import InstallStage, install_bundle, recover_store
from edge.models import ModelStore
from edge.ota import OtaClient
from edge.ota_wire import (
    ACTIVE,
    FAILED,
    ROLLED_BACK,
    OtaDesired,
    decode_chunk,
    encode_chunk,
    ota_topic,
)
from edge.protocol import MANIFEST_FILE, MODEL_FILE
from edge.signing import sign_bundle
from tests.conftest import REPO, Broker, shared_bundle
from tests.helpers import Host, Keys, state_is, wait_for

# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def v48(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same labels, another input size: not compatible with the 64x64 models."""
    return shared_bundle(tmp_path_factory, "tiny-48", seed=0, size=48)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def ota_config(keys: Keys, **kw: Any) -> OtaConfig:
    return OtaConfig(trusted_keys=[keys.public], **kw)


def signed_pack(
    bundle: Path, keys: Keys | None, out: Path, *, mutate: Callable[[Path], None] | None = None,
    after_sign: Callable[[Path], None] | None = None, pad: int = 0,
) -> Path:  # fmt: skip
    """Copy a bundle, change it, sign it (unless keys is None), change it again, pack it."""
    work = out.with_suffix(".dir")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(bundle, work)
    (work / "signature.json").unlink(missing_ok=True)
    if pad:
        (work / "report").mkdir(exist_ok=True)
        (work / "report" / "padding.bin").write_bytes(os.urandom(pad))
    if mutate:
        mutate(work)
    if keys is not None:
        sign_bundle(work, keys.key)
    if after_sign:
        after_sign(work)
    return pack_bundle(work, out)


def edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        raw = json.loads((work / MANIFEST_FILE).read_text())
        change(raw)
        (work / MANIFEST_FILE).write_text(json.dumps(raw, indent=2))

    return apply


@pytest.fixture
def live_store(tmp_path: Path, v1: Path, keys: Keys) -> ModelStore:
    """A store with v1 installed and current."""
    store = ModelStore(tmp_path / "models")
    res = install_bundle(signed_pack(v1, keys, tmp_path / "v1.lwb"), store, ota_config(keys), None)
    assert res.ok, res.reason
    return store


def assert_untouched(store: ModelStore, version: str) -> None:
    """The old model still serves, nothing is left in staging, versions/ holds only live ones."""
    clf = Classifier(store.current())
    assert clf.version == version
    assert check_golden(clf).ok
    staging = store.root / "staging"
    assert not staging.exists() or not any(staging.iterdir())


# -- install_bundle --------------------------------------------------------------------------------


def test_install_happy_path_then_reinstall_previous(tmp_path: Path, live_store: ModelStore, v1: Path, v2: Path, keys: Keys) -> None:
    current = Classifier(live_store.current())
    res = install_bundle(signed_pack(v2, keys, tmp_path / "v2.lwb"), live_store, ota_config(keys), current)
    assert res.ok and res.stage == "done", res.reason
    assert res.version == "tiny-2" and res.key_id is not None and res.golden is not None and res.golden.ok
    assert res.classifier is not None and res.classifier.version == "tiny-2"
    assert Classifier(live_store.current()).version == "tiny-2"
    prev = live_store.previous()
    assert prev is not None and Classifier(prev).version == "tiny-1"
    assert res.path is not None and res.path.parent.name == "versions" and res.path.name.startswith("tiny-2-")
    assert_untouched(live_store, "tiny-2")
    # Pushing v1 again (a rollback by the cloud) reuses the kept folder.
    older = signed_pack(v1, keys, tmp_path / "v1b.lwb")
    refused = install_bundle(older, live_store, ota_config(keys), res.classifier)
    assert not refused.ok and refused.stage == "downgrade" and "older than the running tiny-2" in str(refused.reason)
    assert Classifier(live_store.current()).version == "tiny-2", "anti-rollback left the running model"
    res1 = install_bundle(older, live_store, ota_config(keys), res.classifier, allow_downgrade=True)
    assert res1.ok and Classifier(live_store.current()).version == "tiny-1"
    assert sorted(p.name.split("-")[1] for p in (live_store.root / "versions").iterdir()) == ["1", "2"]


def test_install_from_folder_and_first_install(tmp_path: Path, v1: Path, keys: Keys) -> None:
    work = tmp_path / "signed"
    shutil.copytree(v1, work)
    sign_bundle(work, keys.key)
    store = ModelStore(tmp_path / "models")
    res = install_bundle(work, store, ota_config(keys), None)
    assert res.ok, res.reason
    assert Classifier(store.current()).version == "tiny-1" and store.previous() is None


REFUSALS: list[tuple[str, InstallStage, str]] = [
    # (case, expected stage, text expected in the reason)
    ("truncated", InstallStage.UNPACK, "not a valid packed bundle"),
    ("corrupted_model", InstallStage.CHECKSUM, "sha256"),
    ("wrong_sha256", InstallStage.CHECKSUM, "does not match the manifest"),
    ("unsigned", InstallStage.SIGNATURE, "unsigned"),
    ("unknown_key", InstallStage.SIGNATURE, "unknown key"),
    ("altered_after_signing", InstallStage.SIGNATURE, "manifest altered after signing"),
    ("wrong_input_shape", InstallStage.COMPATIBLE, "input shape"),
    ("wrong_labels", InstallStage.COMPATIBLE, "labels"),
    ("golden_wrong", InstallStage.GOLDEN, "golden"),
    ("garbage_manifest", InstallStage.MANIFEST, "invalid"),
    ("manifest_not_json", InstallStage.MANIFEST, "not valid JSON"),
    ("over_latency_budget", InstallStage.LATENCY, "budget"),
    ("unsafe_path", InstallStage.UNPACK, "points outside the bundle"),
]


def _bad_bundle(case: str, tmp_path: Path, v2: Path, v48: Path, keys: Keys) -> Path:
    out = tmp_path / f"{case}.lwb"
    if case == "truncated":
        packed = signed_pack(v2, keys, out)
        data = packed.read_bytes()
        packed.write_bytes(data[: len(data) // 2])
        return packed
    if case == "corrupted_model":
        def flip(work: Path) -> None:
            m = bytearray((work / MODEL_FILE).read_bytes())
            m[len(m) // 2] ^= 0xFF
            (work / MODEL_FILE).write_bytes(bytes(m))
        return signed_pack(v2, keys, out, after_sign=flip)
    if case == "wrong_sha256":
        return signed_pack(v2, keys, out, mutate=edit_manifest(lambda m: m["model"].update(sha256="0" * 64)))
    if case == "unsigned":
        return signed_pack(v2, None, out)
    if case == "unknown_key":
        return signed_pack(v2, Keys(tmp_path / "stranger"), out)
    if case == "altered_after_signing":
        return signed_pack(v2, keys, out, after_sign=edit_manifest(lambda m: m.update(threshold=0.99)))
    if case == "wrong_input_shape":
        return signed_pack(v48, keys, out)
    if case == "wrong_labels":
        return signed_pack(v2, keys, out, mutate=edit_manifest(lambda m: m.update(labels=list(reversed(m["labels"])))))
    if case == "golden_wrong":
        def wrong(m: dict[str, Any]) -> None:
            for g in m["golden"]:
                g["expected"] = [127 if x < 0 else -128 for x in g["expected"]]
        return signed_pack(v2, keys, out, mutate=edit_manifest(wrong))
    if case == "garbage_manifest":
        return signed_pack(v2, keys, out, mutate=edit_manifest(lambda m: m.update(threshold="high", labels=[], input=7)))
    if case == "manifest_not_json":
        def not_json(work: Path) -> None:
            (work / MANIFEST_FILE).write_text("{nope")
        return signed_pack(v2, keys, out, mutate=not_json)
    if case == "over_latency_budget":
        return signed_pack(v2, keys, out, mutate=edit_manifest(lambda m: m.update(latency_budget_ms=1e-6)))
    if case == "unsafe_path":
        import tarfile

        packed = signed_pack(v2, keys, out)
        evil = tmp_path / "evil.lwb"
        with tarfile.open(packed) as src, tarfile.open(evil, "w") as dst:
            for m in src.getmembers():
                dst.addfile(m, src.extractfile(m))
            info = tarfile.TarInfo("../escaped.txt")
            info.size = 2
            import io

            dst.addfile(info, io.BytesIO(b"hi"))
        return evil
    raise AssertionError(case)


@pytest.mark.parametrize("case,stage,text", REFUSALS, ids=[c for c, _, _ in REFUSALS])
def test_install_refusals_leave_old_model(
    case: str, stage: str, text: str, tmp_path: Path, live_store: ModelStore, v2: Path, v48: Path, keys: Keys
) -> None:
    packed = _bad_bundle(case, tmp_path, v2, v48, keys)
    versions_before = sorted(p.name for p in (live_store.root / "versions").iterdir())
    current_before = os.readlink(live_store.root / "current")
    res = install_bundle(packed, live_store, ota_config(keys), Classifier(live_store.current()))
    assert not res.ok
    assert res.stage == stage, res.reason
    assert res.reason is not None and text in res.reason, res.reason
    assert res.classifier is None
    assert os.readlink(live_store.root / "current") == current_before
    assert sorted(p.name for p in (live_store.root / "versions").iterdir()) == versions_before
    assert not (tmp_path / "escaped.txt").exists() and not (live_store.root / "escaped.txt").exists()
    assert_untouched(live_store, "tiny-1")


def test_allow_unsigned_accepts_unsigned_only(tmp_path: Path, live_store: ModelStore, v2: Path, keys: Keys) -> None:
    cfg = ota_config(keys, allow_unsigned=True)
    res = install_bundle(signed_pack(v2, Keys(tmp_path / "other"), tmp_path / "x.lwb"), live_store, cfg, None)
    assert not res.ok and res.stage == InstallStage.SIGNATURE
    res = install_bundle(signed_pack(v2, None, tmp_path / "u.lwb"), live_store, cfg, None)
    assert res.ok and res.key_id is None


def test_single_bundle_store_refused(tmp_path: Path, v1: Path, v2: Path, keys: Keys) -> None:
    single = tmp_path / "single"
    shutil.copytree(v1, single)
    store = ModelStore(single)
    res = install_bundle(signed_pack(v2, keys, tmp_path / "v2.lwb"), store, ota_config(keys), None)
    assert not res.ok and res.stage == InstallStage.STORE and "store folder" in (res.reason or "")
    assert Classifier(store.current()).version == "tiny-1"


def test_recover_store_removes_leftovers(tmp_path: Path, live_store: ModelStore) -> None:
    (live_store.root / "staging" / "dead1" / "bundle").mkdir(parents=True)
    (live_store.root / "staging" / "dead1" / "bundle" / "model.tflite").write_bytes(b"half")
    orphan = live_store.root / "versions" / "tiny-9-000000000000"
    orphan.mkdir()
    removed = recover_store(live_store)
    assert any("dead1" in r for r in removed) and any("tiny-9" in r for r in removed)
    assert not orphan.exists()
    assert_untouched(live_store, "tiny-1")


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from edge.config import OtaConfig
    from edge.models import ModelStore
    from edge.install import install_bundle
    root, key, a, b = sys.argv[1:5]
    store = ModelStore(Path(root))
    cfg = OtaConfig(trusted_keys=[Path(key)])
    print("ready", flush=True)
    i = 0
    while True:
        res = install_bundle(Path(a if i % 2 else b), store, cfg, None)
        assert res.ok, res.reason
        i += 1
    """
)


def test_kill_9_during_installs_leaves_a_valid_model(tmp_path: Path, live_store: ModelStore, v1: Path, v2: Path, keys: Keys) -> None:
    a = signed_pack(v1, keys, tmp_path / "a.lwb")
    b = signed_pack(v2, keys, tmp_path / "b.lwb", pad=2_000_000)  # bigger: more time inside copy/fsync
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    delays = [0.05, 0.2, 0.35, 0.5, 0.8]
    for delay in delays:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILL_SCRIPT, str(live_store.root), str(keys.public), str(a), str(b)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        time.sleep(delay)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        # Whatever moment it died at, current is a complete, valid bundle (old or new)...
        clf = Classifier(live_store.current())
        assert clf.version in ("tiny-1", "tiny-2")
        assert check_golden(clf).ok
        # ...and start-up recovery clears what the dead install left.
        recover_store(live_store)
        assert not any((live_store.root / "staging").iterdir())
        assert_untouched(live_store, clf.version)


# -- the MQTT transfer -----------------------------------------------------------------------------


def agent_cfg(tmp_path: Path, store: ModelStore, broker: Broker, keys: Keys, device: str = "cam1", **ota: Any) -> AgentConfig:
    frames = tmp_path / "frames"
    frames.mkdir(exist_ok=True)
    raw = {
        "device_id": device,
        "groups": ["line1"],
        "camera": {"source": str(frames)},
        "model": {"path": str(store.root)},
        "buffer": {"path": str(tmp_path / f"{device}-buffer.db")},
        "mqtt": {"host": broker.host, "port": broker.port},
        "ota": {"trusted_keys": [str(keys.public)], **ota},
    }
    return parse_config(raw, base=tmp_path)


def cloud_cfg(tmp_path: Path, broker: Broker) -> Any:
    from cloud.config import parse_cloud_config

    return parse_cloud_config(
        {"data_dir": "cloud-data", "store": {"path": "cloud.db"}, "mqtt": {"host": broker.host, "port": broker.port}},
        base=tmp_path,
    )


def desired_for(device: str, transfer: str, packed: Path, version: str, chunk_bytes: int, rollout: str = "r-test") -> OtaDesired:
    size = packed.stat().st_size
    return OtaDesired(
        v=1, device_id=device, version=version, transfer=transfer, rollout=rollout, sha256=sha256_file(packed),
        size=size, chunks=-(-size // chunk_bytes), chunk_bytes=chunk_bytes, ts=time.time(),
    )  # fmt: skip


class Spy:
    """A plain MQTT client recording messages on a topic filter."""

    def __init__(self, broker: Broker, topic_filter: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.messages.append(m)
        ready = threading.Event()
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(topic_filter, qos=1)
        assert ready.wait(5)

    def payloads(self) -> list[bytes]:
        return [bytes(m.payload) for m in list(self.messages)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def ota_server(tmp_path: Path, broker: Broker) -> Iterator[Callable[..., Any]]:
    from cloud.ota_server import OtaServer

    servers: list[Any] = []

    def make(**kw: Any) -> Any:
        srv = OtaServer(cloud_cfg(tmp_path, broker), **kw)
        srv.start()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.stop()
        srv.join()


@pytest.fixture
def clients() -> Iterator[list[OtaClient]]:
    made: list[OtaClient] = []
    yield made
    for c in made:
        c.stop()
        c.join()


def test_chunk_encoding_roundtrip() -> None:
    data = os.urandom(1000)
    transfer, index, digest, out = decode_chunk(encode_chunk("r1.abc", 7, data))
    assert (transfer, index, out) == ("r1.abc", 7, data)
    import hashlib

    assert digest == hashlib.sha256(data).digest()
    with pytest.raises(ValueError):
        decode_chunk(b"XXXX" + bytes(50))
    with pytest.raises(ValueError):
        decode_chunk(encode_chunk("r1", 1, b"ab")[:10])


def test_happy_path_over_mqtt(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v2: Path, keys: Keys,
    ota_server: Callable[..., Any], clients: list[OtaClient],
) -> None:  # fmt: skip
    from cloud.ota_server import Transfer

    packed = signed_pack(v2, keys, tmp_path / "v2.lwb", pad=100_000)
    desired = desired_for("cam1", "t-happy", packed, "tiny-2", 16 * 1024)
    srv = ota_server()
    srv.offer(Transfer(desired.transfer, packed, str(desired.sha256), packed.stat().st_size, desired.chunk_bytes))
    srv.publish_desired(desired)
    host = Host(Classifier(live_store.current()))
    client = OtaClient(agent_cfg(tmp_path, live_store, broker, keys), host)
    clients.append(client)
    client.start()
    wait_for(state_is(client, ACTIVE, FAILED), what="active")
    assert client.state is not None and client.state["state"] == ACTIVE, client.state
    assert client.state["health"] == "watching" and client.state["model_version"] == "tiny-2"
    assert [c.version for c in host.swapped] == ["tiny-2"]
    assert Classifier(live_store.current()).version == "tiny-2"
    kinds = host.kinds()
    assert kinds[:4] == ["ota_downloading", "ota_verifying", "ota_validating", "ota_active"], kinds
    # every chunk crossed the wire once; nothing left in downloads/ or staging/
    assert srv.stats["chunks_sent"] == desired.chunks and client.stats["duplicates"] == 0
    assert not any((live_store.root / "downloads").iterdir())
    # the cloud saw the states (retained on the broker, recorded by the server)
    wait_for(lambda: srv.states.get("cam1") is not None and srv.states["cam1"].state == ACTIVE, what="server saw active")
    spy = Spy(broker, ota_topic("linewatch", "cam1", "state"))
    wait_for(spy.payloads, what="retained state")
    assert json.loads(spy.payloads()[-1])["state"] == ACTIVE
    spy.close()


def test_resume_after_restart_asks_only_for_missing_chunks(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v2: Path, keys: Keys,
    ota_server: Callable[..., Any], clients: list[OtaClient],
) -> None:  # fmt: skip
    from cloud.ota_server import Transfer

    packed = signed_pack(v2, keys, tmp_path / "v2.lwb", pad=400_000)
    desired = desired_for("cam1", "t-resume", packed, "tiny-2", 4096)
    assert desired.chunks is not None and desired.chunks > 80
    srv = ota_server(rate_limit_bps=400_000)  # ~1 s for the whole file: room to cut in the middle
    srv.offer(Transfer(desired.transfer, packed, str(desired.sha256), packed.stat().st_size, desired.chunk_bytes))
    srv.publish_desired(desired)
    cfg = agent_cfg(tmp_path, live_store, broker, keys)
    first = OtaClient(cfg, Host(Classifier(live_store.current())))
    clients.append(first)
    first.start()
    wait_for(lambda: first.stats["chunks"] >= 20, what="some chunks")
    first.stop()
    first.join()
    bitmap = (live_store.root / "downloads" / desired.transfer / "bitmap").read_bytes()
    had = {i for i, b in enumerate(bitmap) if b == 1}
    in_flight = {i for i, b in enumerate(bitmap) if b == 2}  # requested, reply not in yet
    assert 20 <= len(had) < desired.chunks and len(in_flight) <= first.window

    spy = Spy(broker, ota_topic("linewatch", "cam1", "req"))
    host = Host(Classifier(live_store.current()))
    second = OtaClient(cfg, host)
    clients.append(second)
    second.start()
    wait_for(state_is(second, ACTIVE, FAILED), what="active")
    assert second.state is not None and second.state["state"] == ACTIVE, second.state
    asked = {i for p in spy.payloads() for i in json.loads(p)["indexes"]}
    spy.close()
    assert not asked & had, f"asked again for chunks it had: {sorted(asked & had)}"
    assert asked | had | in_flight == set(range(desired.chunks))
    # The replies in flight at the cut waited in the broker (persistent session) and were
    # not asked for again: the cloud sent no chunk twice. (The broker may deliver again a
    # chunk whose PUBACK the stopping client never sent: QoS 1, harmless, counted.)
    twice = [k for k, n in srv.sent.items() if n > 1]
    assert twice == [], twice
    assert second.stats["duplicates"] <= first.window
    assert Classifier(live_store.current()).version == "tiny-2"


def test_protocol_edge_cases_bad_unknown_duplicate_out_of_order_chunks(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v2: Path, keys: Keys, clients: list[OtaClient]
) -> None:
    """A hand-driven cloud: corrupt chunk re-requested, unknown transfer ignored, dups harmless."""
    packed = signed_pack(v2, keys, tmp_path / "v2.lwb", pad=20_000)
    data = packed.read_bytes()
    cb = 8192
    desired = desired_for("cam1", "t-manual", packed, "tiny-2", cb)
    n = int(desired.chunks or 0)
    chunk_topic = ota_topic("linewatch", "cam1", "chunk")
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    spy = Spy(broker, ota_topic("linewatch", "cam1", "req"))
    pub.publish(ota_topic("linewatch", "cam1", "desired"), desired.model_dump_json(), qos=1, retain=True).wait_for_publish(5)
    client = OtaClient(agent_cfg(tmp_path, live_store, broker, keys), Host(Classifier(live_store.current())), window=n)
    clients.append(client)
    client.start()
    wait_for(spy.payloads, what="first request")
    first = json.loads(spy.payloads()[0])
    assert first["transfer"] == "t-manual" and first["indexes"] == list(range(min(n, 64)))

    def chunk(i: int, transfer: str = "t-manual", corrupt: bool = False) -> bytes:
        body = data[i * cb : (i + 1) * cb]
        msg = bytearray(encode_chunk(transfer, i, body))
        if corrupt:
            msg[-1] ^= 0xFF  # the data no longer matches the sha256 in the header
        return bytes(msg)

    pub.publish(chunk_topic, chunk(0, corrupt=True), qos=1).wait_for_publish(5)
    pub.publish(chunk_topic, chunk(1, transfer="t-other"), qos=1).wait_for_publish(5)
    wait_for(lambda: client.stats["corrupt"] == 1 and client.stats["unknown_transfer"] == 1, what="corrupt counted")
    wait_for(lambda: any(0 in json.loads(p)["indexes"] for p in spy.payloads()[1:]), what="chunk 0 asked again")
    for i in reversed(range(n)):  # out of order, each twice
        pub.publish(chunk_topic, chunk(i), qos=1).wait_for_publish(5)
        pub.publish(chunk_topic, chunk(i), qos=1).wait_for_publish(5)
    wait_for(state_is(client, ACTIVE, FAILED), what="active")
    assert client.state is not None and client.state["state"] == ACTIVE, client.state
    assert client.stats["duplicates"] >= n - 1 and client.stats["chunks"] == n
    spy.close()
    pub.disconnect()
    pub.loop_stop()


def test_lost_session_probes_with_one_chunk_before_asking_again(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v2: Path, keys: Keys, clients: list[OtaClient]
) -> None:
    """A broker restart without persistence loses the session with 4 chunks in flight.

    The device asks for ONE chunk it never asked for (the cloud answers in order, so its
    reply comes after any late ones), asks for nothing else until that reply is in, and
    then asks again only for the chunks in flight that did not arrive meanwhile.
    """
    packed = signed_pack(v2, keys, tmp_path / "v2.lwb", pad=60_000)
    data = packed.read_bytes()
    cb = 4096
    desired = desired_for("cam1", "t-probe", packed, "tiny-2", cb)
    n = int(desired.chunks or 0)
    assert n > 12
    chunk_topic = ota_topic("linewatch", "cam1", "chunk")

    def connect() -> tuple[mqtt.Client, Spy]:
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        return pub, Spy(broker, ota_topic("linewatch", "cam1", "req"))

    def send(pub: mqtt.Client, *indexes: int) -> None:
        for i in indexes:
            pub.publish(chunk_topic, encode_chunk("t-probe", i, data[i * cb : (i + 1) * cb]), qos=1).wait_for_publish(5)

    def asked(spy: Spy) -> list[list[int]]:
        return [json.loads(p)["indexes"] for p in spy.payloads()]

    pub, spy = connect()
    pub.publish(ota_topic("linewatch", "cam1", "desired"), desired.model_dump_json(), qos=1, retain=True).wait_for_publish(5)
    client = OtaClient(agent_cfg(tmp_path, live_store, broker, keys), Host(Classifier(live_store.current())))
    clients.append(client)
    client.start()
    wait_for(lambda: asked(spy) == [[0, 1, 2, 3]], what="first request")
    send(pub, 0, 1)
    wait_for(lambda: sorted(i for r in asked(spy) for i in r) == [0, 1, 2, 3, 4, 5], what="window refilled")
    time.sleep(0.2)  # the broker's PUBACKs reach the device (else paho would send those requests again)
    pub.disconnect()
    pub.loop_stop()
    spy.close()

    broker.stop()  # no persistence: the device's session and everything in flight are gone
    broker.start()
    pub, spy = connect()  # subscribed before the device's reconnect (its first retry is after 1 s)
    wait_for(lambda: asked(spy) == [[6]], what="probe", timeout=15)
    send(pub, 3)  # a late reply to a request from before the restart
    time.sleep(0.5)
    assert asked(spy) == [[6]], "asked for more before the probe's reply came"
    send(pub, 6)
    wait_for(lambda: len({i for r in asked(spy) for i in r}) >= 5, what="window reopened")
    again = [i for r in asked(spy)[1:] for i in r]
    assert again[:3] == [2, 4, 5], again  # the chunks in flight that did not come; not 3
    assert client.stats["duplicates"] == 0

    send(pub, *[i for i in range(n) if i not in (0, 1, 3, 6)])
    wait_for(state_is(client, ACTIVE, FAILED), what="active")
    assert client.state is not None and client.state["state"] == ACTIVE, client.state
    spy.close()
    pub.disconnect()
    pub.loop_stop()


def test_broker_restart_without_persistence_resumes_the_transfer(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v2: Path, keys: Keys,
    ota_server: Callable[..., Any], clients: list[OtaClient],
) -> None:  # fmt: skip
    """The whole path (real cloud server, real device) through a broker restart that loses every session.

    What the broker held when it stopped is gone, so a chunk may have to be sent again, but
    never more than the request window: the device probes before asking again, and the
    cloud drops requests that came in on the broken link. (How many in practice, usually
    0 or 1, is measured by benchmarks/ota.py; it depends on timing.)
    """
    from cloud.ota_server import Transfer

    packed = signed_pack(v2, keys, tmp_path / "v2.lwb", pad=400_000)
    desired = desired_for("cam1", "t-broker", packed, "tiny-2", 8192)
    srv = ota_server(rate_limit_bps=300_000)  # ~2 s for the file: room to restart in the middle
    srv.offer(Transfer(desired.transfer, packed, str(desired.sha256), packed.stat().st_size, desired.chunk_bytes))
    srv.publish_desired(desired)
    client = OtaClient(agent_cfg(tmp_path, live_store, broker, keys), Host(Classifier(live_store.current())))
    clients.append(client)
    client.start()
    wait_for(lambda: client.stats["chunks"] >= 0.4 * int(desired.chunks or 0), what="40% in")
    broker.stop()
    broker.start()
    wait_for(state_is(client, ACTIVE, FAILED), what="active", timeout=60)
    assert client.state is not None and client.state["state"] == ACTIVE, client.state
    twice = [k for k, n in srv.sent.items() if n > 1]
    assert len(twice) <= client.window and all(n <= 2 for n in srv.sent.values()), srv.sent


def test_refused_bundle_over_mqtt_reports_failed_and_is_not_retried(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v48: Path, keys: Keys,
    ota_server: Callable[..., Any], clients: list[OtaClient],
) -> None:  # fmt: skip
    from cloud.ota_server import Transfer

    packed = signed_pack(v48, keys, tmp_path / "v48.lwb")
    desired = desired_for("cam1", "t-bad", packed, "tiny-48", 16384)
    srv = ota_server()
    srv.offer(Transfer(desired.transfer, packed, str(desired.sha256), packed.stat().st_size, desired.chunk_bytes))
    srv.publish_desired(desired)
    cfg = agent_cfg(tmp_path, live_store, broker, keys)
    host = Host(Classifier(live_store.current()))
    client = OtaClient(cfg, host)
    clients.append(client)
    client.start()
    wait_for(state_is(client, ACTIVE, FAILED), what="failed")
    st = client.state
    assert st is not None and st["state"] == FAILED and st["stage"] == InstallStage.COMPATIBLE and "input shape" in st["reason"]
    assert host.swapped == [] and Classifier(live_store.current()).version == "tiny-1"
    assert "ota_failed" in host.kinds()
    sent = srv.stats["chunks_sent"]
    client.stop()
    client.join()
    # restart: the retained desired comes again, the refusal is remembered, nothing is downloaded
    again = OtaClient(cfg, Host(Classifier(live_store.current())))
    clients.append(again)
    again.start()
    wait_for(state_is(again, FAILED), what="re-reported")
    time.sleep(0.3)
    assert srv.stats["chunks_sent"] == sent


# -- health watch ----------------------------------------------------------------------------------


def _pred(raw: tuple[int, ...], passed: bool = True, score: float = 0.1) -> Prediction:
    return Prediction(label="ok" if passed else "scratch", score=score, passed=passed, probabilities=(1 - score, score),
                      raw=raw, preprocess_ms=0.1, invoke_ms=0.1)  # fmt: skip


def test_health_watch_rules() -> None:
    varied = [(True, (10 + i % 3, -10)) for i in range(40)]
    ok = HealthWatch("v", 10, varied)
    verdicts = [ok.add(_pred((i % 4, 0))) for i in range(10)]
    assert verdicts[-1] is not None and verdicts[-1].ok and all(v is None for v in verdicts[:-1])

    nan = HealthWatch("v", 10, varied)
    assert nan.add(_pred((1, 2), score=float("nan"))) is not None and nan.verdict is not None and not nan.verdict.ok

    errors = HealthWatch("v", 100, varied)
    results = [errors.add_error("invoke failed") for _ in range(6)]
    tripped = next(r for r in results if r is not None)
    assert not tripped.ok and "invoke errors" in (tripped.reason or "")

    const = HealthWatch("v", 10, varied)
    for _ in range(10):
        verdict = const.add(_pred((5, 5)))
    assert verdict is not None and not verdict.ok and "constant output" in (verdict.reason or "")

    fails = HealthWatch("v", 20, [(i % 10 != 0, (i % 5, 0)) for i in range(40)])  # previous: 10% fails
    for i in range(20):
        verdict = fails.add(_pred((i % 7, 1), passed=i % 2 == 0, score=0.9 if i % 2 else 0.1))
    assert verdict is not None and not verdict.ok and "fail rate" in (verdict.reason or "")


def test_rollback_on_health_trip(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v2: Path, keys: Keys,
    ota_server: Callable[..., Any], clients: list[OtaClient],
) -> None:  # fmt: skip
    from cloud.ota_server import Transfer

    packed = signed_pack(v2, keys, tmp_path / "v2.lwb")
    desired = desired_for("cam1", "t-health", packed, "tiny-2", 65536)
    srv = ota_server()
    srv.offer(Transfer(desired.transfer, packed, str(desired.sha256), packed.stat().st_size, desired.chunk_bytes))
    srv.publish_desired(desired)
    old = Classifier(live_store.current())
    host = Host(old)
    cfg = agent_cfg(tmp_path, live_store, broker, keys, health_parts=20)
    client = OtaClient(cfg, host)
    clients.append(client)
    client.start()
    golden = [old.bundle_dir / "golden" / Path(g.file).name for g in old.manifest.golden]
    for i in range(30):  # the old model's decisions: the baseline
        client.observe(old.predict_file(golden[i % len(golden)]), "tiny-1")
    wait_for(state_is(client, ACTIVE, FAILED), what="active")
    assert host.classifier.version == "tiny-2"
    for _ in range(3):
        client.observe_error(RuntimeError("invoke failed"), "tiny-2")
    wait_for(state_is(client, ROLLED_BACK), what="rolled back")
    st = client.state
    assert st is not None and st["stage"] == "health" and "invoke errors" in st["reason"]
    assert host.classifier.version == "tiny-1" and Classifier(live_store.current()).version == "tiny-1"
    assert "ota_rolled_back" in host.kinds()
    wait_for(lambda: srv.states.get("cam1") is not None and srv.states["cam1"].state == ROLLED_BACK, what="cloud saw it")
    # the retained desired still names tiny-2: a restart must not install it again
    client.stop()
    client.join()
    again = OtaClient(cfg, Host(Classifier(live_store.current())))
    clients.append(again)
    again.start()
    wait_for(state_is(again, ROLLED_BACK), what="re-reported")
    assert Classifier(live_store.current()).version == "tiny-1"


def test_healthy_model_reports_health_ok(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v2: Path, keys: Keys,
    ota_server: Callable[..., Any], clients: list[OtaClient],
) -> None:  # fmt: skip
    from cloud.ota_server import Transfer

    packed = signed_pack(v2, keys, tmp_path / "v2.lwb")
    desired = desired_for("cam1", "t-ok", packed, "tiny-2", 65536)
    srv = ota_server()
    srv.offer(Transfer(desired.transfer, packed, str(desired.sha256), packed.stat().st_size, desired.chunk_bytes))
    srv.publish_desired(desired)
    host = Host(Classifier(live_store.current()))
    client = OtaClient(agent_cfg(tmp_path, live_store, broker, keys, health_parts=8), host)
    clients.append(client)
    client.start()
    wait_for(state_is(client, ACTIVE, FAILED), what="active")
    new = host.classifier
    golden = [new.bundle_dir / "golden" / Path(g.file).name for g in new.manifest.golden]
    for i in range(8):
        client.observe(new.predict_file(golden[i % len(golden)]))
    wait_for(lambda: client.state is not None and client.state.get("health") == "ok", what="health ok")
    assert "ota_healthy" in host.kinds() and Classifier(live_store.current()).version == "tiny-2"


def test_real_agent_switches_between_frames_and_keeps_inspecting(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v2: Path, keys: Keys, ota_server: Callable[..., Any],
) -> None:  # fmt: skip
    """The lead's Agent with a looping image-folder camera: the update lands, frames keep flowing."""
    import cv2
    import numpy as np

    from cloud.ota_server import Transfer
    from edge.agent import Agent
    from edge.buffer import Buffer

    config = agent_cfg(tmp_path, live_store, broker, keys)
    frames = Path(str(config.camera.source))
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(frames / f"part{i}.png"), rng.integers(90, 160, (120, 160), dtype=np.uint8))
    config = config.model_copy(update={"camera": config.camera.model_copy(update={"loop": True, "fps": 100.0})})
    agent = Agent(config)
    agent.start()
    client = agent.ota  # the agent starts its own OTA client when MQTT is enabled
    assert isinstance(client, OtaClient)
    try:
        wait_for(lambda: agent.last is not None and agent.last.model_version == "tiny-1", what="decisions with tiny-1")
        before = agent.counts["results"]
        packed = signed_pack(v2, keys, tmp_path / "v2.lwb", pad=200_000)
        desired = desired_for("cam1", "t-agent", packed, "tiny-2", 65536)
        srv = ota_server()
        srv.offer(Transfer(desired.transfer, packed, str(desired.sha256), packed.stat().st_size, desired.chunk_bytes))
        srv.publish_desired(desired)
        wait_for(state_is(client, ACTIVE, FAILED), what="active")
        assert client.state is not None and client.state["state"] == ACTIVE, client.state
        wait_for(lambda: agent.last is not None and agent.last.model_version == "tiny-2", what="decisions with tiny-2")
        during = agent.counts["results"]
        wait_for(lambda: agent.counts["results"] > during + 20, what="more decisions")
        assert during > before and agent.counts["errors"] == 0
    finally:
        agent.stop()
        agent.join(timeout=5)
    with Buffer.open_readonly(config.buffer.path) as buf:
        kinds = [e["kind"] for e in buf.events_tail(200)]
        versions = {r["model_version"] for r in buf.tail(100000)}
    assert {"ota_downloading", "ota_validating", "ota_active", "model_switched"} <= set(kinds), kinds
    assert versions == {"tiny-1", "tiny-2"}


def test_anti_rollback_refuses_an_older_version_unless_the_push_signed_it(
    tmp_path: Path, broker: Broker, live_store: ModelStore, v1: Path, v2: Path, keys: Keys,
    ota_server: Callable[..., Any], clients: list[OtaClient],
) -> None:  # fmt: skip
    """Running tiny-2, the box is told to go to tiny-1: refused without a signed downgrade
    intent (none, or one signed by an unknown key), accepted with one."""
    from cloud.ota_server import Transfer
    from edge.ota_wire import sign_downgrade

    res = install_bundle(signed_pack(v2, keys, tmp_path / "v2.lwb"), live_store, ota_config(keys), Classifier(live_store.current()))
    assert res.ok, res.reason
    packed = signed_pack(v1, keys, tmp_path / "v1.lwb")
    srv = ota_server()
    host = Host(Classifier(live_store.current()))
    client = OtaClient(agent_cfg(tmp_path, live_store, broker, keys), host)
    clients.append(client)
    client.start()
    stranger = Keys(tmp_path / "stranger")
    for transfer, sign_with in (("t-old", None), ("t-forged", stranger)):
        desired = desired_for("cam1", transfer, packed, "tiny-1", 16384)
        if sign_with is not None:
            desired = sign_downgrade(desired, sign_with.key)
        srv.offer(Transfer(desired.transfer, packed, str(desired.sha256), packed.stat().st_size, desired.chunk_bytes))
        srv.publish_desired(desired)
        wait_for(lambda t=transfer: client.state is not None and client.state.get("transfer") == t
                 and client.state["state"] == FAILED, what=f"{transfer} refused")  # fmt: skip
        assert client.state["stage"] == "downgrade" and "older than the running tiny-2" in client.state["reason"]
    assert srv.stats["chunks_sent"] == 0 and host.swapped == [] and Classifier(live_store.current()).version == "tiny-2"
    unsigned_ask = desired_for("cam1", "t-unsigned", packed, "tiny-1", 16384).model_copy(update={"allow_downgrade": True})
    srv.offer(Transfer(unsigned_ask.transfer, packed, str(unsigned_ask.sha256), packed.stat().st_size, unsigned_ask.chunk_bytes))
    srv.publish_desired(unsigned_ask)
    wait_for(lambda: client.state is not None and client.state.get("transfer") == "t-unsigned"
             and client.state["state"] == FAILED, what="unsigned ask refused")  # fmt: skip
    signed = sign_downgrade(desired_for("cam1", "t-signed", packed, "tiny-1", 16384), keys.key)
    srv.offer(Transfer(signed.transfer, packed, str(signed.sha256), packed.stat().st_size, signed.chunk_bytes))
    srv.publish_desired(signed)
    wait_for(lambda: client.state is not None and client.state.get("transfer") == "t-signed"
             and client.state["state"] in (ACTIVE, FAILED), what="signed downgrade active")  # fmt: skip
    assert client.state["state"] == ACTIVE, client.state
    assert Classifier(live_store.current()).version == "tiny-1" and [c.version for c in host.swapped] == ["tiny-1"]


def test_oversized_and_deeply_nested_manifests_are_clean_refusals(tmp_path: Path, live_store: ModelStore, v2: Path, keys: Keys) -> None:
    """Even with allow_unsigned: a 2 MiB manifest is refused before it is read, a manifest
    nested 100,000 deep is refused without a RecursionError, and the running model stays."""
    from edge.protocol import MAX_MANIFEST_BYTES

    cfg = ota_config(keys, allow_unsigned=True)
    for case, text in (("huge", '{"pad": "' + "x" * (2 * MAX_MANIFEST_BYTES) + '"}'), ("deep", "[" * 100_000 + "]" * 100_000)):
        work = tmp_path / case
        shutil.copytree(v2, work)
        (work / "signature.json").unlink(missing_ok=True)
        (work / MANIFEST_FILE).write_text(text)
        res = install_bundle(work, live_store, cfg, Classifier(live_store.current()))
        assert not res.ok and res.reason is not None, case
        expected = "byte limit" if case == "huge" else "nested too deeply"
        assert expected in res.reason, (case, res.stage, res.reason)
        assert_untouched(live_store, "tiny-1")
