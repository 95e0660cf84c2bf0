"""The operator page: local by default, a token when it is opened to the LAN, bounded threads."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge.config import OperatorConfig
from edge.operator import OperatorPage

TOKEN = "a-long-enough-operator-token"


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_defaults_bind_loopback_only() -> None:
    cfg = OperatorConfig()
    assert cfg.host == "127.0.0.1" and cfg.token is None and cfg.max_clients == 8


def test_token_is_required_when_set(tmp_path: Path) -> None:
    page = OperatorPage("127.0.0.1", 0, lambda: {"device_id": "cam"}, tmp_path / "b.db", token=TOKEN)
    page.start()
    base = f"http://127.0.0.1:{page.port}"
    try:
        assert get(f"{base}/api/status")[0] == 401
        assert get(f"{base}/api/status?token=wrong-token-wrong-token")[0] == 401
        assert get(f"{base}/api/status", {"Authorization": "Bearer nope"})[0] == 401
        code, _, body = get(f"{base}/api/status", {"Authorization": f"Bearer {TOKEN}"})
        assert code == 200 and b'"cam"' in body
        code, headers, _ = get(f"{base}/?token={TOKEN}")
        assert code == 200 and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";", 1)[0]
        assert get(f"{base}/api/status", {"Cookie": cookie})[0] == 200, "the page's own requests carry the cookie"
    finally:
        page.close()


def test_a_flood_of_idle_connections_gets_a_bounded_pool(tmp_path: Path) -> None:
    page = OperatorPage("127.0.0.1", 0, lambda: {"ok": True}, tmp_path / "b.db", max_clients=2, request_timeout_s=1.0)
    page.start()
    idle = []
    try:
        for _ in range(12):  # each sends nothing: a slowloris
            idle.append(socket.create_connection(("127.0.0.1", page.port), timeout=5))
        deadline = time.monotonic() + 15
        while page.server.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert page.server.refused > 0, "connections beyond the waiting room were closed at once"
        workers = [t for t in threading.enumerate() if t.name.startswith(f"operator-req-{page.port}_")]
        assert 1 <= len(workers) <= 2, [t.name for t in workers]
        # The silent ones time out (1 s each here) and free the pool: a real request is answered.
        answer: tuple[int, dict[str, str], bytes] | None = None
        deadline = time.monotonic() + 20
        while answer is None and time.monotonic() < deadline:
            try:
                answer = get(f"http://127.0.0.1:{page.port}/api/status")
            except OSError:  # still closed at once: the waiting room is full
                time.sleep(0.2)
        assert answer is not None and answer[0] == 200 and answer[2] == b'{"ok": true}'
    finally:
        for s in idle:
            s.close()
        page.close()


@pytest.mark.parametrize("host", ["0.0.0.0"])
def test_validate_config_warns_about_an_open_page_without_token(tmp_path: Path, host: str) -> None:
    from tests.conftest import run_cli

    (tmp_path / "parts.avi").write_bytes(b"x")
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "c"\ncamera.source = "parts.avi"\nmodel.path = "m"\nbuffer.path = "b.db"\n'
                    f'mqtt.enabled = false\n[operator]\nhost = "{host}"\n')  # fmt: skip
    out = run_cli("edge", "validate-config", str(path))
    assert out.returncode == 0 and "warning: operator.host" in out.stdout, out.stdout + out.stderr
    path.write_text(path.read_text() + f'token = "{TOKEN}"\n')
    out = run_cli("edge", "validate-config", str(path))
    assert "operator.host" not in out.stdout
