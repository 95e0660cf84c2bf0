"""The fleet pages, the operator page and both /metrics, in a real browser against real processes.

One site per module (tests share it; each test only asserts what it changes itself): a real
Mosquitto, `linewatch cloud serve` with [web], two `linewatch edge run` agents replaying a
video with the tiny real model, cam-a's broker link through a TCP relay the test can cut,
and one headless Debian chromium driven by Playwright (``executable_path``: Playwright's own
browser download is not reachable from here).

The tiny model scores every part alike, so the tests make a verdict change the way a plant
would see one: a rollout of a "strict" copy of the model (threshold 0: every part fails).
Its health watch sees the fail rate jump and rolls back, so the canary rollout halts.

Set LINEWATCH_SCREENSHOTS=docs/screenshots to refresh the README's screenshots.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import helpers
from tests.conftest import LINEWATCH, Broker, make_broker
from tests.helpers import write_video

TOKEN = "test-token-0123456789abcdef"
FPS = 4

# Many checks reload a browser page: poll less often than the default.
wait_for = functools.partial(helpers.wait_for, interval=0.1)


def chromium_path() -> str:
    """Debian's chromium; a clear failure (never a skip) when it is missing."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("chromium is not installed: run `make test` (it installs it) or `apt-get install -y chromium`")


class Relay:
    """A TCP relay to the broker; ``cut()`` drops every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self.closed = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            if not self.open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while self.open.is_set():
                ready, _, _ = select.select([a, b], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                s.close()

    def cut(self) -> None:
        self.open.clear()
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:  # both sides: the broker sees the device go (and sends its last will)
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.cut()
        self.closed.set()
        self.listener.close()


class Process:
    """A `linewatch` process with its output in a log file; stopped by its own pid."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen([LINEWATCH, *args], stdout=fh, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.proc.args} exited:\n{self.output()[-3000:]}")
            return re.search(pattern, self.output())

        return wait_for(found, timeout, f"{pattern!r} in {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Agent:
    def __init__(self, directory: Path, proc: Process) -> None:
        self.dir, self.proc = directory, proc
        self.status_file = directory / "buffer.status.json"

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}


class Site:
    def __init__(self, root: Path, broker: Broker, cloud_toml: Path, cloud: Process, web_url: str,
                 relay: Relay, agents: dict[str, Agent], browser: Any, shots: Path) -> None:  # fmt: skip
        self.root, self.broker, self.cloud_toml, self.cloud, self.web_url = root, broker, cloud_toml, cloud, web_url
        self.relay, self.agents, self.browser, self.shots = relay, agents, browser, shots

    def logged_in_page(self) -> Any:
        """A fresh browser context that has logged in through the form."""
        context = self.browser.new_context(viewport={"width": 1280, "height": 800})
        page = context.new_page()
        page.goto(self.web_url)
        assert "/login" in page.url, "the fleet page asks for the token first"
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("table#fleet")
        return page

    def get(self, path: str, *, token: str | None = TOKEN) -> tuple[int, str]:
        req = urllib.request.Request(self.web_url.rstrip("/") + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def shot(self, page: Any, name: str) -> None:
        page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {'name{labels}': value}."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def start_agent(root: Path, name: str, groups: list[str], broker_port: int, video: Path, bundle: Path, pub: Path) -> Agent:
    from edge.config import load_config
    from edge.install import install_bundle
    from edge.models import ModelStore

    d = root / name
    d.mkdir()
    toml = d / "agent.toml"
    toml.write_text(
        f'device_id = "{name}"\nline = "Line 1"\ngroups = {json.dumps(groups)}\n'
        f'[camera]\nsource = "{video}"\nfps = {FPS}\nloop = true\n'
        '[model]\npath = "models"\n[buffer]\npath = "buffer.db"\nsynchronous = "NORMAL"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker_port}\nstatus_interval_s = 0.5\nkeepalive_s = 5\nack_timeout_s = 1.0\n'
        f'[ota]\ntrusted_keys = ["{pub}"]\nhealth_parts = 8\n'
        '[operator]\nport = 0\n[metrics]\nport = 0\n'
    )
    config = load_config(toml)
    first = install_bundle(bundle, ModelStore(config.model.path), config.ota.model_copy(update={"allow_unsigned": True}), None)
    assert first.ok, first.reason
    agent = Agent(d, Process(["edge", "run", "--config", str(toml)], d / "agent.log"))
    wait_for(lambda: agent.status().get("operator_url") and agent.status().get("metrics_url")
             and (agent.status().get("session") or {}).get("results", 0) > 0, 60, f"{name} to decide")  # fmt: skip
    return agent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Site]:
    from playwright.sync_api import sync_playwright

    from cloud.config import load_cloud_config
    from cloud.registry import Registry, init_keys, open_ota_store, public_key_path

    executable = chromium_path()
    root = tmp_path_factory.mktemp("web")
    shots = Path(os.environ.get("LINEWATCH_SCREENSHOTS") or root / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    broker = make_broker(root / "broker")
    broker.start()
    cloud_toml = root / "cloud" / "cloud.toml"
    cloud_toml.parent.mkdir()
    cloud_toml.write_text(
        f'data_dir = "cloud-data"\nstore.path = "cloud.db"\n[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\n'
        f'[fleet]\noffline_after_s = 2.0\ndead_after_s = 600\n[web]\nport = 0\ntoken = "{TOKEN}"\n'
    )
    cfg = load_cloud_config(cloud_toml)
    init_keys(cfg)
    # The tiny bundle tests plumbing, not accuracy (its scores barely move from part to part),
    # so the running model is a copy that passes every part; a strict copy fails every part.
    running = root / "tiny-passing"
    shutil.copytree(tiny_bundle, running)
    manifest = json.loads((running / "manifest.json").read_text())
    (running / "manifest.json").write_text(json.dumps({**manifest, "threshold": 1.0}, indent=2))
    with open_ota_store(cfg) as store:  # the running model is in the registry, with its report pictures
        Registry(cfg, store).add(running)
    cloud = Process(["-v", "cloud", "serve", "--config", str(cloud_toml)], cloud_toml.parent / "cloud.log")
    web_url = cloud.wait_for(r"linewatch web: (http://\S+)").group(1)
    cloud.wait_for("connected to")
    relay = Relay(broker.port)
    video = root / "parts.avi"
    write_video(video, 40)
    pub = public_key_path(cfg)
    agents = {"cam-a": start_agent(root, "cam-a", ["line1"], relay.port, video, running, pub),
              "cam-b": start_agent(root, "cam-b", ["line1", "packing"], broker.port, video, running, pub)}  # fmt: skip
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
    try:
        yield Site(root, broker, cloud_toml, cloud, web_url, relay, agents, browser, shots)
    finally:
        browser.close()
        pw.stop()
        for agent in agents.values():
            agent.proc.stop()
        cloud.stop()
        relay.close()
        broker.stop()


def fleet_row(page: Any, device: str) -> dict[str, str]:
    cells = page.locator(f"tr[data-device='{device}'] td").all_inner_texts()
    keys = ("device", "state", "line", "groups", "model", "backlog", "last_seen", "pass_rate", "results", "drift")
    return dict(zip(keys, cells, strict=False))


def test_pages_refuse_requests_without_the_token(site: Site) -> None:
    for path in ("/", "/api/fleet", "/metrics", "/devices/cam-a", "/models"):
        code, body = site.get(path, token=None)
        assert code == 401 and "token" in body, path
        assert site.get(path, token="wrong-token-0123456789")[0] == 401, path
    assert site.get("/healthz", token=None) == (200, "ok")
    # each agent's first status may still be on its way to the cloud
    wait_for(lambda: {d["device_id"] for d in json.loads(site.get("/api/fleet")[1])} == {"cam-a", "cam-b"},
             30, "both devices in the fleet")  # fmt: skip
    # a browser without the cookie lands on the login form; a wrong token stays there
    page = site.browser.new_context().new_page()
    page.goto(site.web_url + "devices/cam-a")
    assert "/login" in page.url
    page.fill("input[name=token]", "not-the-token-at-all")
    page.click("button[type=submit]")
    assert page.locator("#login-error").inner_text() == "wrong token"
    site.shot(page, "login")
    page.fill("input[name=token]", TOKEN)
    page.click("button[type=submit]")
    page.wait_for_selector("#device-state")
    assert page.url.endswith("/devices/cam-a"), "back where the login began"
    # the pages never show the signing key or the token
    for path in ("/", "/models", "/devices/cam-a", "/api/fleet", "/metrics"):
        assert "PRIVATE KEY" not in site.get(path)[1] and TOKEN not in site.get(path)[1]
    page.context.close()


def test_agent_metrics_move_with_decisions(site: Site) -> None:
    url = site.agents["cam-b"].status()["metrics_url"]
    first = scrape(url)
    time.sleep(2.5)
    second = scrape(url)
    decided = 'linewatch_decisions_total{verdict="pass"}'
    assert second[decided] - first[decided] >= 4, "about FPS decisions a second"
    assert second["linewatch_frames_total"] > first["linewatch_frames_total"]
    assert second["linewatch_invoke_seconds_count"] > first["linewatch_invoke_seconds_count"]
    assert second["linewatch_decision_latency_seconds_count"] > first["linewatch_decision_latency_seconds_count"]
    assert 0 < second["linewatch_invoke_seconds_sum"] / second["linewatch_invoke_seconds_count"] < 0.5
    assert second['linewatch_camera_state{state="up"}'] == 1.0 and second['linewatch_camera_state{state="down"}'] == 0.0
    assert second["linewatch_buffer_bytes"] > 0
    assert 'linewatch_model_info{runtime="litert",version="tiny-1"}' in second
    assert second["linewatch_sync_lag_seconds"] < 30, "a connected device keeps up"
    assert 'linewatch_buffer_evictions_total{kind="evicted_synced"}' in second


def test_grafana_dashboard_uses_only_metrics_that_exist(site: Site) -> None:
    dashboard = (Path(__file__).resolve().parent.parent / "firmware-config" / "grafana-fleet.json").read_text()
    used = set(re.findall(r"linewatch_[a-z_]+", dashboard))
    exposed = {re.sub(r"\{.*", "", k) for k in scrape(site.agents["cam-b"].status()["metrics_url"])}
    exposed |= {ln.split("{")[0].split(" ")[0] for ln in site.get("/metrics")[1].splitlines() if ln.startswith("linewatch_")}
    exposed |= {ln.split(" ")[2] for ln in site.get("/metrics")[1].splitlines() if ln.startswith("# TYPE")}
    # only exposed once there is something to say: an OTA state, a drift check
    later = {"linewatch_ota_state", "linewatch_drift_state"}
    assert used - exposed - later == set(), "dashboard panels name metrics nobody exports"


def test_cloud_metrics_count_ingest_devices_and_lag(site: Site) -> None:
    code, body = site.get("/metrics")
    assert code == 200
    before = {k: v for k, v in (ln.rpartition(" ")[::2] for ln in body.splitlines() if ln and not ln.startswith("#"))}
    time.sleep(2.0)
    after = {k: v for k, v in (ln.rpartition(" ")[::2] for ln in site.get("/metrics")[1].splitlines() if ln and not ln.startswith("#"))}
    stored = 'linewatch_cloud_stored_total{kind="results"}'
    assert float(after[stored]) > float(before[stored]), "ingest rate is rate() of this counter"
    assert float(after['linewatch_cloud_device_last_seen_age_seconds{device="cam-b"}']) < 5
    assert 'linewatch_cloud_device_backlog_rows{device="cam-b"}' in after
    assert float(after["linewatch_cloud_acks_sent_total"]) > 0


def test_fleet_page_shows_filters_and_sorts_the_devices(site: Site) -> None:
    page = site.logged_in_page()
    wait_for(lambda: page.reload() or fleet_row(page, "cam-a").get("state") == "online"
             and fleet_row(page, "cam-b").get("state") == "online", 20, "both online")  # fmt: skip
    a = fleet_row(page, "cam-a")
    assert a["line"] == "Line 1" and a["groups"] == "line1" and a["model"] in ("tiny-1", "tiny-1-strict")
    assert a["pass_rate"].endswith("%") and int(a["results"]) > 0
    site.shot(page, "fleet")
    page.select_option("select[name=group]", "packing")
    page.wait_for_url(re.compile(r"group=packing"))
    assert page.locator("tr[data-device]").count() == 1 and fleet_row(page, "cam-b")["device"] == "cam-b"
    page.goto(site.web_url + "?sort=device_id&desc=1")
    assert page.locator("tr[data-device]").evaluate_all("rows => rows.map(r => r.dataset.device)") == ["cam-b", "cam-a"]
    page.context.close()


def test_device_goes_offline_buffering_when_its_link_is_cut_then_back(site: Site) -> None:
    page = site.logged_in_page()
    site.relay.cut()
    try:
        wait_for(lambda: page.reload() or fleet_row(page, "cam-a").get("state") == "offline_buffering", 20,
                 "cam-a offline_buffering on the fleet page")  # fmt: skip
        assert fleet_row(page, "cam-b")["state"] == "online", "the other device is not affected"
        # the line keeps inspecting; its backlog grows on the box
        agent = site.agents["cam-a"]
        before = agent.status()["session"]["results"]
        wait_for(lambda: agent.status()["session"]["results"] > before + 2, 10, "cam-a to keep deciding")
        metrics = scrape(agent.status()["metrics_url"])
        assert metrics["linewatch_buffer_unsynced_rows"] > 0 and metrics["linewatch_sync_lag_seconds"] > 0
        page.goto(site.web_url + "devices/cam-a")
        assert page.locator("#device-state").inner_text() == "offline_buffering"
        site.shot(page, "device-offline")
    finally:
        site.relay.restore()
    page.goto(site.web_url)
    wait_for(lambda: page.reload() or fleet_row(page, "cam-a").get("state") == "online", 30, "cam-a back online")
    wait_for(lambda: scrape(site.agents["cam-a"].status()["metrics_url"])["linewatch_sync_lag_seconds"] < 10, 30, "the backlog to drain")
    page.context.close()


def test_rollout_progress_verdict_change_and_halt(site: Site, tiny_bundle: Path) -> None:
    # A copy of the running model that fails every part: the canary's health watch sees the
    # fail rate jump and rolls back; the rollout halts before the second device.
    strict = site.root / "strict"
    shutil.copytree(tiny_bundle, strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest.update(version="tiny-1-strict", threshold=0.0)
    (strict / "manifest.json").write_text(json.dumps(manifest, indent=2))
    operator = site.browser.new_context().new_page()
    operator.goto(site.agents["cam-a"].status()["operator_url"])
    operator.wait_for_function("document.getElementById('verdict').textContent.startsWith('PASS')", timeout=20_000)
    push = subprocess.Popen(
        [LINEWATCH, "cloud", "push", str(strict), "--to", "line1", "--canary", "1", "--wait-health", "--timeout", "90",
         "--json", "--config", str(site.cloud_toml)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    fleet = site.logged_in_page()
    try:
        # the operator sees the canary's verdict change, then change back after the rollback
        operator.wait_for_function("document.getElementById('verdict').textContent.startsWith('FAIL')", timeout=60_000)
        site.shot(operator, "operator-fail")
        fleet.goto(site.web_url + "models")
        rollout_link = fleet.locator("#rollouts a").first
        rollout_link.wait_for(timeout=20_000)
        rollout_link.click()
        fleet.wait_for_selector("#deployments tr[data-device='cam-a']")
        operator.wait_for_function("document.getElementById('verdict').textContent.startsWith('PASS')", timeout=60_000)
        out, err = push.communicate(timeout=120)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
    assert push.returncode == 1, err
    outcome = json.loads(out)
    assert outcome["state"] == "halted" and outcome["canaries"] == ["cam-a"], outcome
    wait_for(lambda: fleet.reload() or fleet.locator("#rollout-state").inner_text() == "halted", 20, "the page to show the halt")
    assert "halted after canaries" in fleet.locator("#rollout-message").inner_text()
    states = dict(zip(fleet.locator("#deployments td:nth-child(1)").all_inner_texts(),
                      fleet.locator("#deployments td:nth-child(3)").all_inner_texts(), strict=True))  # fmt: skip
    assert states["cam-a"] == "rolled_back", states
    site.shot(fleet, "rollout-halted")
    fleet.goto(site.web_url + "models")
    assert fleet.locator("#rollouts td.halted").count() >= 1
    assert fleet.locator("#model-tiny-1 img[alt='confusion of tiny-1']").evaluate("i => i.naturalWidth") > 0, "model card picture"
    site.shot(fleet, "models")
    # the device page: the failed parts' pictures, the chart with fails, the OTA history, the swap events
    fleet.goto(site.web_url + "devices/cam-a")
    wait_for(lambda: fleet.reload() or fleet.locator("#failed-pictures img").count() > 0, 30, "failed pictures synced")
    assert fleet.locator("#failed-pictures img").first.evaluate("i => i.complete && i.naturalWidth") > 0
    assert fleet.locator("#chart rect[fill='#d13b30']").count() > 0 and fleet.locator("#chart rect[fill='#2e9e55']").count() > 0
    assert "rolled_back" in fleet.locator("#ota").inner_text()
    wait_for(lambda: fleet.reload() or "model_switched" in fleet.locator("#events").inner_text(), 20, "swap events synced")
    site.shot(fleet, "device")
    operator.goto(site.agents["cam-a"].status()["operator_url"])
    operator.wait_for_function("document.getElementById('verdict').textContent.startsWith('PASS')", timeout=20_000)
    site.shot(operator, "operator")
    fleet.context.close()
    operator.context.close()


def test_web_and_metrics_config_errors_are_one_clear_line(tmp_path: Path) -> None:
    from cloud.config import parse_cloud_config
    from cloud.exceptions import CloudConfigError
    from cloud.web import build_app
    from edge.config import parse_config
    from edge.exceptions import ConfigError

    with pytest.raises(CloudConfigError, match=r"web.token = 'short': String should have at least 16 characters"):
        parse_cloud_config({"web": {"token": "short"}}, base=tmp_path)
    with pytest.raises(CloudConfigError, match="the web pages need a token"):
        build_app(parse_cloud_config({"web": {"port": 0}}, base=tmp_path))
    agent = {"device_id": "cam", "camera": {"source": "x.avi"}, "model": {"path": "m"}, "buffer": {"path": "b.db"}}
    assert parse_config(dict(agent), base=tmp_path).metrics is None, "metrics are off without the section"
    with pytest.raises(ConfigError, match="metrics.port: Field required|metrics.port: required key is missing"):
        parse_config({**agent, "metrics": {"host": "0.0.0.0"}}, base=tmp_path)
    (tmp_path / "cloud.toml").write_text("[mqtt]\nport = 1883\n")
    out = subprocess.run([LINEWATCH, "cloud", "web", "--config", str(tmp_path / "cloud.toml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no [web] section" in out.stderr and "Traceback" not in out.stderr


def test_drift_in_the_status_becomes_metrics(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from edge.metrics import AgentMetrics

    status: dict[str, Any] = {"session": {"passed": 3, "failed": 1}, "camera": {"state": "up", "frames": 4}, "model_version": "m1",
                              "runtime": "litert", "drift": {"state": "warning", "measures": {"psi": 0.31, "label": "x",
                                                                     "brightness": {"value": 92.5, "band": [100, 140]}}}}  # fmt: skip
    metrics = AgentMetrics(lambda: status, tmp_path / "no-buffer.db")
    metrics.observe(0.4, 12.0)
    text = generate_latest(metrics.registry).decode()
    assert 'linewatch_drift_state{state="warning"} 1.0' in text and 'linewatch_drift_state{state="ok"} 0.0' in text
    assert 'linewatch_drift_measure{measure="psi"} 0.31' in text and 'linewatch_drift_measure{measure="brightness.value"} 92.5' in text
    assert "label" not in text.split("linewatch_drift_measure")[-1] and "band" not in text
    assert 'linewatch_decisions_total{verdict="fail"} 1.0' in text and "linewatch_sync_lag_seconds 0.0" in text
    assert 'linewatch_decision_latency_seconds_bucket{le="0.025"} 1.0' in text
    status.pop("drift")
    assert "linewatch_drift" not in generate_latest(metrics.registry).decode(), "no drift check, no drift series"
