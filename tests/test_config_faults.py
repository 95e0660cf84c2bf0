"""Installer mistakes: validate-config names them, and none of them stops inspection.

A wrong CA path used to pass validate-config and then crash ``Agent.start`` with a
traceback (under systemd: a restart loop with no inspection).
"""

from __future__ import annotations

from pathlib import Path

from edge.signing import generate_keypair
from tests.conftest import Broker, run_cli, wait_status
from tests.helpers import agent_config, read_decisions, start_agent, stop, write_video

SECRET = "hunter2-secret"


def write(tmp_path: Path, extra: str, source: str = "parts.avi") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "cam-1"\ncamera.source = "{source}"\nmodel.path = "models"\nbuffer.path = "b.db"\n{extra}')
    return path


def test_validate_config_checks_every_file_and_warns_on_unsigned(tmp_path: Path) -> None:
    (tmp_path / "parts.avi").write_bytes(b"x")
    generate_keypair(tmp_path / "signing.key", tmp_path / "signing.pub")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    good = write(tmp_path, '[ota]\ntrusted_keys = ["signing.pub"]\n')
    proc = run_cli("edge", "validate-config", str(good))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr

    bad = write(
        tmp_path,
        '[mqtt]\ntls = true\nca_file = "nope/ca.crt"\ncert_file = "nope/cam.crt"\nkey_file = "nope/cam.key"\n'
        '[ota]\ntrusted_keys = ["missing.pub"]\nallow_unsigned = true\n',
        source="gone.mp4",
    )
    proc = run_cli("edge", "validate-config", str(bad))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out
    for expected in ("mqtt.ca_file", "nope/ca.crt: no such file", "ota.trusted_keys[0]", "missing.pub: no such file",
                     "warning: ota.allow_unsigned", "gone.mp4: no such video file"):  # fmt: skip
        assert expected in out, out
    junk = write(tmp_path, '[mqtt]\ntls = true\nca_file = "junk.pem"\n[ota]\ntrusted_keys = ["junk.pem"]\n')
    out = run_cli("edge", "validate-config", str(junk)).stderr
    assert "not a PEM CA certificate" in out and "not a PEM public key" in out, out


def test_camera_password_never_printed(tmp_path: Path) -> None:
    path = write(tmp_path, "", source=f"rtsp://admin:{SECRET}@10.0.0.9/stream1")
    proc = run_cli("edge", "validate-config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "rtsp://admin:***@10.0.0.9/stream1" in proc.stdout and SECRET not in proc.stdout + proc.stderr
    path.write_text(path.read_text() + "camera.queue_size = 0\n")  # an error elsewhere: the source is echoed too
    path.write_text(path.read_text().replace(f'camera.source = "rtsp://admin:{SECRET}@10.0.0.9/stream1"',
                                             f'camera.source = "ftp://admin:{SECRET}@10.0.0.9/x"'))  # fmt: skip
    proc = run_cli("edge", "validate-config", str(path))
    assert proc.returncode == 1 and "camera.source" in proc.stderr and SECRET not in proc.stdout + proc.stderr


def test_wrong_ca_path_keeps_the_line_inspecting(tmp_path: Path, tiny_bundle: Path, broker: Broker) -> None:
    """TLS on, CA path wrong: no traceback, no exit; decisions keep coming, buffered
    offline, and the status says what is wrong."""
    video = tmp_path / "parts.avi"
    write_video(video, 400)
    cfg = agent_config(tmp_path, tiny_bundle, str(video), extra="camera.fps = 50\n")
    text = cfg.read_text().replace("mqtt.enabled = false\n", "")
    cfg.write_text(text + f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ntls = true\nca_file = "{tmp_path}/no/ca.crt"\n')
    proc = start_agent(cfg)
    try:
        assert len(read_decisions(proc, 20)) == 20
        status = wait_status(cfg, lambda s: s.get("mqtt_error") and s["results"] >= 20 and (s.get("sync") or {}).get("last_error"))
        assert "mqtt.ca_file" in status["mqtt_error"] and "no such file" in status["mqtt_error"]
        assert "TLS setup failed" in status["sync"]["last_error"] and status["sync"]["connected"] is False
        assert status["ota"]["state"] == "off" and status["agent"] == "running"
        assert status["unsynced"] >= 20, "buffered offline"
        assert len(read_decisions(proc, 20)) == 20, "still inspecting"
        assert proc.poll() is None
    finally:
        stop(proc)
    assert "Traceback" not in proc.stderr_text, proc.stderr_text  # type: ignore[attr-defined]


def test_agent_never_logs_or_reports_the_camera_password(tmp_path: Path, tiny_bundle: Path) -> None:
    from tests.helpers import free_port

    cfg = agent_config(tmp_path, tiny_bundle, f"rtsp://admin:{SECRET}@127.0.0.1:{free_port()}/cam")
    proc = start_agent(cfg)
    try:
        status = wait_status(cfg, lambda s: s["camera"]["state"] == "down")
        assert SECRET not in str(status) and "admin:***@" in status["camera"]["source"]
        events = run_cli("edge", "status", "--config", str(cfg), "--json").stdout
        assert SECRET not in events
    finally:
        stop(proc)
    assert SECRET not in proc.stderr_text and "admin:***@" in proc.stderr_text  # type: ignore[attr-defined]
