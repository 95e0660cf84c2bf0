"""Fleet page and metrics benchmark (issue 22).

Two parts, one run, one machine:

1. The fleet page with 1,000 simulated devices in a cloud store (10 groups, each device with
   a status and 120 results in the last hour, stored through the real ``store_results``), served
   by the real web app (uvicorn in this process) and loaded by headless Debian chromium
   through Playwright: ``page.goto(url, wait_until="load")`` wall time, which is server time
   plus transfer plus the browser's parse, layout and load, for the default page (200 rows)
   and for all 1,000 rows on one page (``web.page_size = 1000``), plus a group filter. The
   server's own render time is read from the page. 20 loads each after 3 warm-up loads.
   Target: <= 500 ms.
2. The agent's ``/metrics``: the real agent (`linewatch edge run --echo`) paced at 30 fps on a
   rendered video with ``[metrics]`` on, in alternating runs without and with a scrape every
   second (as Prometheus would): decision latency p50/p99 of each run (frame read ->
   committed), and the time of each scrape (HTTP GET of the whole page). Targets: a scrape
   <= 20 ms; p99 with scraping within 5 % of p99 without.

    python benchmarks/web.py [--devices N] [--paced-frames N] [--pairs N] [--bundle DIR]

Writes bench-out/web.json and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
OUT = REPO / "bench-out"
TOKEN = "bench-token-0123456789abcdef"

from pipeline import _cpu_s, default_bundle, machine, render, video_spec  # noqa: E402


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("chromium is not installed: `make chromium` or `apt-get install -y chromium`")


def fill_store(cloud_toml: Path, devices: int, results_per_device: int) -> float:
    """A cloud store with ``devices`` devices, each with a status and results in the last hour."""
    from cloud.config import load_cloud_config
    from cloud.store import open_store
    from edge.protocol import ResultsBatch, StatusPayload

    cfg = load_cloud_config(cloud_toml)
    t0 = time.perf_counter()
    now = time.time()
    n = results_per_device
    with open_store(cfg) as store:
        for i in range(devices):
            dev = f"line{i % 10:02d}-cam{i:04d}"
            ts = [now - 3500 + k * 3500 / n for k in range(n)]
            passed = [(k + i) % 17 != 0 for k in range(n)]
            batch = ResultsBatch.model_validate({
                "v": 1, "type": "results", "device_id": dev, "batch": "b1", "first_seq": 1, "last_seq": n,
                "seq": list(range(1, n + 1)),
                "cols": {"ts": ts, "part_id": list(range(n)), "model_version": ["1.4.0"] * n,
                         "label": ["ok" if p else "scratch" for p in passed], "score": [0.1 if p else 0.9 for p in passed],
                         "passed": passed, "capture_ms": [1.0] * n, "preprocess_ms": [0.5] * n, "invoke_ms": [0.3] * n,
                         "record_ms": [2.0] * n},
            })  # fmt: skip
            store.store_results(batch, received=now)
            state = "online" if i % 50 else "offline"
            store.record_status(
                StatusPayload.model_validate({"v": 1, "state": state, "device_id": dev, "ts": now, "model_version": "1.4.0",
                                              "unsynced": (i * 7) % 300, "groups": [f"line{i % 10:02d}", "plant-a"],
                                              "line": f"Line {i % 10}", "drift": {"state": "warning"} if i % 97 == 0 else None}),
                received=now - (i % 5), retained=False,
            )  # fmt: skip
    return time.perf_counter() - t0


def fleet_page(devices: int, results_per_device: int, loads: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from cloud.config import load_cloud_config
    from cloud.web import WebServer

    out: dict[str, Any] = {"devices": devices, "results_per_device": results_per_device, "loads": loads}
    with tempfile.TemporaryDirectory(prefix="lw-web-bench-") as tmp:
        base = Path(tmp)
        toml = base / "cloud.toml"
        common = 'store.path = "cloud.db"\nstore.synchronous = "NORMAL"\n[fleet]\noffline_after_s = 60\ndead_after_s = 3600\n'
        toml.write_text(common + f'[web]\nport = 0\ntoken = "{TOKEN}"\n')
        out["fill_s"] = fill_store(toml, devices, results_per_device)
        all_toml = base / "cloud-all.toml"
        all_toml.write_text(common + f'[web]\nport = 0\ntoken = "{TOKEN}"\npage_size = {devices}\n')
        servers = {"default": WebServer(load_cloud_config(toml)), "all_rows": WebServer(load_cloud_config(all_toml))}
        for s in servers.values():
            s.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
                context = browser.new_context(
                    extra_http_headers={"Authorization": f"Bearer {TOKEN}"}, viewport={"width": 1280, "height": 800}
                )
                page = context.new_page()
                # The browser's own main-thread work per load (parse, style, layout, paint, script),
                # from Chrome's Performance domain: CPU time, so far less inflated by a busy box
                # than the wall time, which also counts waiting for a core.
                cdp = context.new_cdp_session(page)
                cdp.send("Performance.enable")

                def task_s() -> float:
                    return float(next(m["value"] for m in cdp.send("Performance.getMetrics")["metrics"] if m["name"] == "TaskDuration"))
                cases = {
                    "default_page": servers["default"].url,
                    "all_rows_one_page": servers["all_rows"].url,
                    "group_filter": servers["default"].url + "?group=line03&sort=pass_rate",
                    "device_page": servers["default"].url + "devices/line03-cam0003",
                }
                for name, url in cases.items():
                    wall, server, tasks, html = [], [], [], 0
                    for i in range(3 + loads):
                        page.goto("about:blank")
                        task0 = task_s()
                        t0 = time.perf_counter()
                        resp = page.goto(url, wait_until="load")
                        dt = (time.perf_counter() - t0) * 1000.0
                        task_ms = (task_s() - task0) * 1000.0
                        assert resp is not None and resp.status == 200, (name, resp and resp.status)
                        if i >= 3:
                            wall.append(dt)
                            tasks.append(task_ms)
                            text = page.locator("p.muted").last.inner_text() if name != "device_page" else ""
                            if text.startswith("rendered in "):
                                server.append(float(text.split()[2]))
                            html = len(page.content())
                    out[name] = {"rows": page.locator("tr[data-device]").count(), "html_bytes": html,
                                 "load_ms_median": statistics.median(wall), "load_ms_p90": float(np.percentile(wall, 90)),
                                 "load_ms_max": max(wall), "browser_task_ms_median": statistics.median(tasks),
                                 "server_render_ms_median": statistics.median(server) if server else None}  # fmt: skip
                browser.close()
        finally:
            for s in servers.values():
                s.stop()
                s.join()
    return out


def agent_run(bundle: Path, video: Path, work: Path, frames: int, scrape_every_s: float | None) -> dict[str, Any]:
    """The paced agent with [metrics] on; optionally scraped every ``scrape_every_s``."""
    cfg = work / "agent.toml"
    db = work / "buffer.db"
    for suffix in ("", "-wal", "-shm", ".status.json"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    (work / "buffer.status.json").unlink(missing_ok=True)
    cfg.write_text(
        f'device_id = "bench"\n[camera]\nsource = "{video}"\nfps = 30\nloop = true\n[model]\npath = "{bundle}"\n'
        f'[buffer]\npath = "{db}"\n[mqtt]\nenabled = false\n[operator]\nenabled = false\n[metrics]\nport = 0\n'
    )
    exe = Path(sys.executable).parent / "linewatch"
    proc = subprocess.Popen([str(exe), "edge", "run", "--config", str(cfg), "--echo"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)  # fmt: skip
    assert proc.stdout is not None
    lat: list[float] = []
    scrapes: list[float] = []
    stop = threading.Event()

    def scraper() -> None:
        status = work / "buffer.status.json"
        url = None
        while url is None and not stop.wait(0.1):
            with contextlib.suppress(OSError, ValueError):  # not written yet, or half written
                url = json.loads(status.read_text()).get("metrics_url")
        while url and scrape_every_s and not stop.wait(scrape_every_s):
            t0 = time.perf_counter()
            body = urllib.request.urlopen(url, timeout=5).read()
            scrapes.append((time.perf_counter() - t0) * 1000.0)
            assert b"linewatch_decisions_total" in body

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    cpu0 = 0.0
    while len(lat) < frames:
        line = proc.stdout.readline()
        if not line:
            break
        lat.append(json.loads(line)["latency_ms"])
        if len(lat) == 30:
            cpu0 = _cpu_s(proc.pid)
    cpu1 = _cpu_s(proc.pid)
    stop.set()
    thread.join(5)
    proc.terminate()
    proc.wait(10)
    if len(lat) < 100:
        raise SystemExit(f"the agent gave only {len(lat)} decisions; run `linewatch edge run --config {cfg}` to see why")
    body = lat[30:]  # skip warm-up
    return {"frames": len(lat), "scraped": bool(scrape_every_s), "latency_p50_ms": float(np.percentile(body, 50)),
            "latency_p99_ms": float(np.percentile(body, 99)), "scrapes": len(scrapes),
            "cpu_ms_per_frame": (cpu1 - cpu0) * 1000.0 / max(1, len(lat) - 30),
            "scrape_ms": scrapes}  # fmt: skip


def scrape_cpu(rows: int = 5000, scrapes: int = 200) -> dict[str, float]:
    """CPU of one scrape's work in-process (collect + text format + the sync-lag query), on a
    buffer with ``rows`` unsynced results: what a scrape takes from the agent, without HTTP."""
    from prometheus_client import generate_latest

    from edge.buffer import Buffer, ResultRecord
    from edge.metrics import AgentMetrics

    with tempfile.TemporaryDirectory(prefix="lw-scrape-") as tmp:
        db = Path(tmp) / "buffer.db"
        with Buffer(db, max_bytes=50_000_000, device_id="bench") as buf:
            buf.record_results([ResultRecord(time.time(), "bench", i, "m", "ok", 0.1, True, 1.0, 0.5, 0.3) for i in range(rows)])
            status = {"session": {"results": rows, "passed": rows, "failed": 0, "errors": 0, "samples": 0},
                      "camera": {"state": "up", "frames": rows, "dropped": 0, "bad_frames": 0, "reconnects": 0, "fps": 30.0},
                      "model_version": "m", "runtime": "litert", "unsynced": rows, "buffer_bytes": 1 << 20,
                      "decisions_waiting": 0, "evictions": buf.counters(), "started": time.time()}  # fmt: skip
        metrics = AgentMetrics(lambda: status, db)
        for _ in range(1000):
            metrics.observe(0.3, 5.0)
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        for _ in range(scrapes):
            generate_latest(metrics.registry)
        return {"cpu_ms": (time.process_time() - t_cpu) * 1000.0 / scrapes, "wall_ms": (time.perf_counter() - t_wall) * 1000.0 / scrapes,
                "unsynced_rows": rows}  # fmt: skip


def metrics_cost(bundle: Path, frames: int, pairs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lw-metrics-bench-") as tmp:
        work = Path(tmp)
        video = work / "parts.avi"
        spec = render(video, 300, video_spec((640, 480), False))
        runs = []
        for i in range(pairs):
            for scraped in ((False, True) if i % 2 == 0 else (True, False)):  # alternate the order: drift cancels
                r = agent_run(bundle, video, work, frames, 1.0 if scraped else None)
                print(f"  run {len(runs) + 1}: scraped={scraped} p50 {r['latency_p50_ms']:.2f} ms p99 {r['latency_p99_ms']:.2f} ms"
                      f" cpu {r['cpu_ms_per_frame']:.3f} ms/frame scrapes {r['scrapes']}", flush=True)  # fmt: skip
                runs.append(r)
    plain = [r for r in runs if not r["scraped"]]
    scraped_runs = [r for r in runs if r["scraped"]]
    all_scrapes = [s for r in scraped_runs for s in r["scrape_ms"]]
    p99_plain = statistics.median(r["latency_p99_ms"] for r in plain)
    p99_scraped = statistics.median(r["latency_p99_ms"] for r in scraped_runs)
    return {
        "video": spec, "frames_per_run": frames, "pairs": pairs,
        "runs": [{k: v for k, v in r.items() if k != "scrape_ms"} for r in runs],
        "scrape_ms_median": statistics.median(all_scrapes), "scrape_ms_p99": float(np.percentile(all_scrapes, 99)),
        "scrape_ms_max": max(all_scrapes), "scrapes": len(all_scrapes),
        "p50_plain_ms": statistics.median(r["latency_p50_ms"] for r in plain),
        "p50_scraped_ms": statistics.median(r["latency_p50_ms"] for r in scraped_runs),
        "cpu_ms_per_frame_plain": statistics.median(r["cpu_ms_per_frame"] for r in plain),
        "cpu_ms_per_frame_scraped": statistics.median(r["cpu_ms_per_frame"] for r in scraped_runs),
        "p99_plain_ms": p99_plain, "p99_scraped_ms": p99_scraped, "p99_change_pct": 100.0 * (p99_scraped - p99_plain) / p99_plain,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000, help="simulated devices in the store (default 1000)")
    ap.add_argument("--results", type=int, default=120, help="results per device in the last hour (default 120)")
    ap.add_argument("--loads", type=int, default=20, help="page loads measured per case (default 20)")
    ap.add_argument("--paced-frames", type=int, default=1800, help="decisions per agent run at 30 fps (default 1800: a minute)")
    ap.add_argument("--pairs", type=int, default=2, help="pairs of agent runs, without and with scraping (default 2)")
    ap.add_argument("--bundle", type=Path, default=None, help="model bundle (default: as benchmarks/pipeline.py)")
    ap.add_argument("--skip-agent", action="store_true", help="only the fleet page")
    args = ap.parse_args()
    result: dict[str, Any] = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python", "benchmarks/web.py", *sys.argv[1:]]),
    }
    print("fleet page ...", flush=True)
    result["fleet"] = fleet_page(args.devices, args.results, args.loads)
    for name in ("default_page", "all_rows_one_page", "group_filter", "device_page"):
        f = result["fleet"][name]
        server = f["server_render_ms_median"]
        print(f"  {name:<18} rows {f['rows']:>5}  html {f['html_bytes'] / 1024:7.1f} KiB  load median {f['load_ms_median']:6.1f} ms"
              f"  p90 {f['load_ms_p90']:6.1f} ms  browser CPU {f['browser_task_ms_median']:6.1f} ms"
              + (f"  server {server:5.1f} ms" if server is not None else ""), flush=True)  # fmt: skip
    if not args.skip_agent:
        bundle = args.bundle or default_bundle()
        result["bundle"] = str(bundle)
        print(f"agent /metrics (bundle {bundle}) ...", flush=True)
        m = metrics_cost(bundle, args.paced_frames, args.pairs)
        m["in_process"] = scrape_cpu()
        result["metrics"] = m
        print(f"  scrape median {m['scrape_ms_median']:.2f} ms p99 {m['scrape_ms_p99']:.2f} ms over {m['scrapes']} scrapes")
        print(f"  decision p99 {m['p99_plain_ms']:.2f} ms without scraping, {m['p99_scraped_ms']:.2f} ms with"
              f" ({m['p99_change_pct']:+.1f} %); p50 {m['p50_plain_ms']:.2f} / {m['p50_scraped_ms']:.2f} ms;"
              f" agent CPU {m['cpu_ms_per_frame_plain']:.3f} / {m['cpu_ms_per_frame_scraped']:.3f} ms per frame")  # fmt: skip
        print(f"  one scrape in-process: {m['in_process']['cpu_ms']:.2f} ms CPU ({m['in_process']['wall_ms']:.2f} ms wall)")
    OUT.mkdir(exist_ok=True)
    (OUT / "web.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {OUT / 'web.json'}")


if __name__ == "__main__":
    main()
