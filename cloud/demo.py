"""`linewatch demo`: the whole loop on one machine, with real parts.

1. generate a synthetic labelled set and train two int8 bundles (reports included);
2. render an inspection video of parts passing by;
3. start Mosquitto on a free loopback port and the cloud service; sign both bundles;
   install version 1 on the box;
4. run the edge agent on the video, cut the broker mid-run, bring it back;
5. push version 2 over the air while the line runs;
6. show every decision arriving in the cloud exactly once, across the outage and the switch.

Every step runs the real ``linewatch`` commands as subprocesses, as a plant would.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _linewatch() -> list[str]:
    exe = Path(sys.executable).parent / "linewatch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edge.cli"]


def _step(text: str) -> None:
    click.secho(f"\n==> {text}", fg="cyan", bold=True)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*_linewatch(), *args], text=True, capture_output=True)
    if proc.returncode != 0:
        raise click.ClickException(f"`linewatch {' '.join(args)}` failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _fit(data: Path, bundle: Path, epochs: int | None, *, seed: int, version: str) -> None:
    """`train fit` with its defaults and its progress on the terminal: the model a plant gets.

    The quantization gate applies as it does for a plant: a failing fit stops the demo.
    """
    cmd = [*_linewatch(), "train", "fit", str(data), "--out", str(bundle), "--seed", str(seed), "--version", version]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if subprocess.run(cmd).returncode != 0:
        raise click.ClickException(f"`linewatch train fit` for {bundle.name} failed (see above)")


def _json(*args: str) -> Any:
    return json.loads(_run(*args).stdout)


def _mosquitto(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(binary).exists():
        raise click.ClickException("mosquitto is not installed: sudo apt-get install -y mosquitto")
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise click.ClickException(f"mosquitto did not start on port {port}")


def _wait(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise click.ClickException(f"timed out waiting for {what}")


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _verdicts(rows: list[dict[str, Any]], truth: list[dict[str, Any]]) -> None:
    """What the line operator cares about: good parts passed, scratched parts failed, overall
    and per model version.

    The agent numbers the video's frames 1, 2, ... in order (part_id), one part per frame.
    """
    by_part = {int(r["part_id"]): r for r in rows}
    missing = sum(1 for i in range(len(truth)) if i + 1 not in by_part)
    if missing:
        click.echo(f"({missing} frames without a decision are left out below)")

    def rates(version: str | None) -> tuple[float, int, float, int]:
        decided = [(t, by_part[i + 1]) for i, t in enumerate(truth) if i + 1 in by_part]
        if version is not None:
            decided = [(t, r) for t, r in decided if r["model_version"] == version]
        good = [bool(r["passed"]) for t, r in decided if not t.get("scratched")]
        bad = [not r["passed"] for t, r in decided if t.get("scratched")]
        return sum(good) / max(1, len(good)), len(good), sum(bad) / max(1, len(bad)), len(bad)

    for version in sorted({str(r["model_version"]) for r in rows}):
        p, n_good, rec, n_bad = rates(version)
        click.echo(f"  model {version}: {p:.1%} of {n_good} good parts passed, {rec:.1%} of {n_bad} scratched parts failed")
    pass_rate, n_good, recall, n_bad = rates(None)
    ok = pass_rate >= 0.95 and recall >= 0.95
    click.secho(
        f"verdicts: {pass_rate:.1%} of {n_good} good parts passed, {recall:.1%} of {n_bad} scratched parts failed"
        + ("" if ok else " (below the 95 % / 95 % a line needs: see docs/training.md)"),
        fg="green" if ok else "yellow",
        bold=True,
    )


@click.command("demo")
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(path_type=Path), help="Working folder.")
# train synth's and train fit's defaults: the demo trains the model a plant would get.
@click.option("--count", default=8000, show_default=True, help="Synthetic training images.")
@click.option("--epochs", default=None, type=int, help="Training epochs.  [default: train fit's (about 112,000 image passes)]")
@click.option("--parts", default=900, show_default=True, help="Parts in the inspection video (25 per second).")
@click.option("--retrain/--reuse", default=False, help="Train again even if the bundle exists.")
def demo(out_dir: Path, count: int, epochs: int | None, parts: int, retrain: bool) -> None:
    """Train, deploy and run the whole loop on this machine.

    Example:

        linewatch demo --out demo-out
    """
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data, bundle = out_dir / "data", out_dir / "bundle-v1"

    _step(f"1/6 synthetic dataset ({count} images) and training")
    if retrain or not (bundle / "manifest.json").exists():
        shutil.rmtree(data, ignore_errors=True)
        _run("train", "synth", str(data), "--count", str(count), "--seed", "1", "--workers", "2")
        _fit(data, bundle, epochs, seed=1, version="1.0.0")
    else:
        click.echo(f"reusing {bundle} (--retrain to train again)")
    bundle2 = out_dir / "bundle-v2"
    if retrain or not (bundle2 / "manifest.json").exists():
        # A line engineer moves the operating point without retraining, trading a few more
        # false rejects (at most 6 % on the stored scores) for recall; the new version goes
        # out over the air later.
        click.echo("a second version: the same model with its operating point moved (train threshold)")
        shutil.rmtree(bundle2, ignore_errors=True)
        click.echo(_run("train", "threshold", str(bundle), "--out", str(bundle2), "--max-false-reject", "0.06",
                        "--version", "2.0.0").stdout.rstrip())
    metrics = _json("train", "eval", str(bundle), "--data", str(data), "--json")
    click.echo(
        f"int8 model on the whole synthetic set: balanced accuracy {metrics['balanced_accuracy']:.3f}, "
        f"defect recall {metrics['defect_recall']:.3f}, false-reject rate {metrics['false_reject_rate']:.3f}"
    )
    click.echo(f"bundle: {bundle}\nreport: {bundle / 'report'}")

    _step(f"2/6 inspection video of {parts} parts")
    from training.synth import render_video

    video = out_dir / "line1.avi"
    truth = render_video(video, parts=parts, seed=2, fps=25)
    scratched = sum(1 for t in truth if t.get("scratched"))
    click.echo(f"{video}: {len(truth)} frames, {scratched} with a scratch")
    # The camera sees the part on a conveyor; the agent inspects the part's face where parts
    # stop. Its rounded corners (radius 5 % of the side) show the belt up to 1.5 % in from
    # the bounding box: the model learned faces, and with the corners in view it failed 19 %
    # of good parts instead of 1.6 % (docs/training.md, "Demo").
    x, y, w, h = truth[0]["bbox"]
    inset = round(0.015 * w)
    roi = [x + inset, y + inset, w - 2 * inset, h - 2 * inset]

    _step("3/6 Mosquitto, the cloud service, signing key, model v1 installed on the box")
    port = _free_port()
    run_dir = out_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    cloud_cfg = run_dir / "cloud.toml"
    cloud_cfg.write_text(
        f'store.path = "cloud.db"\ndata_dir = "cloud-data"\n\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n'
    )
    agent_cfg = run_dir / "agent.toml"
    agent_cfg.write_text(
        f'device_id = "line1-cam1"\ngroups = ["line1"]\nline = "demo line 1"\n\n'
        f'[camera]\nsource = "{video}"\nfps = 25\nroi = {list(roi)}\n\n[model]\npath = "models"\n\n'
        f'[ota]\ntrusted_keys = ["{run_dir / "cloud-data" / "keys" / "signing.pub"}"]\nhealth_parts = 50\n\n'
        f'[buffer]\npath = "buffer.db"\nmax_bytes = 50_000_000\n\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\nstatus_interval_s = 1\nack_timeout_s = 3\n'
    )
    keys = _run("cloud", "keys", "init", "--config", str(cloud_cfg)).stdout
    pub = Path(re.search(r"public key:\s+(\S+)", keys).group(1))  # type: ignore[union-attr]
    agent_cfg.write_text(agent_cfg.read_text().replace(str(run_dir / "cloud-data" / "keys" / "signing.pub"), str(pub)))
    packed = {}
    for b in (bundle, bundle2):
        entry = _json("cloud", "models", "add", str(b), "--config", str(cloud_cfg), "--json")
        packed[entry["version"]] = entry["path"]
        click.echo(f"registered and signed {entry['version']}: {entry['path']}")
    click.echo(_run("edge", "install-model", packed["1.0.0"], "--config", str(agent_cfg)).stdout.strip())
    broker = _mosquitto(port, run_dir)
    cloud = agent = None
    try:
        cloud = subprocess.Popen([*_linewatch(), "cloud", "serve", "--config", str(cloud_cfg)], stdout=open(run_dir / "cloud.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
        click.echo(f"broker on 127.0.0.1:{port}, cloud log {run_dir / 'cloud.log'}")

        _step("4/6 edge agent on the video; the broker is cut mid-run")
        agent = subprocess.Popen([*_linewatch(), "edge", "run", "--config", str(agent_cfg)], stdout=subprocess.DEVNULL, stderr=open(run_dir / "agent.log", "w"))  # noqa: SIM115
        status = lambda: _json("edge", "status", "--config", str(agent_cfg), "--json")  # noqa: E731
        _wait("the first decisions", lambda: status()["results"] >= len(truth) // 4, 120)
        broker.send_signal(signal.SIGTERM)
        broker.wait(10)
        cut_at = status()["results"]
        click.echo(f"broker stopped after {cut_at} decisions; the agent keeps inspecting and buffering")
        time.sleep(4)
        during = status()
        click.echo(f"while offline: {during['results']} decisions, {during['unsynced']} waiting in the buffer")
        broker = _mosquitto(port, run_dir)
        click.echo("broker back")
        _step("5/6 model 2.0.0 over the air while the line runs")
        before = status()
        push = subprocess.run([*_linewatch(), "cloud", "push", "2.0.0", "--to", "line1", "--config", str(cloud_cfg), "--timeout", "120"], text=True)
        if push.returncode != 0:
            raise click.ClickException("the push did not complete; see the output above")
        _wait("the agent to run 2.0.0", lambda: status()["model_version"] == "2.0.0", 60)
        after = status()
        click.echo(f"switched from {before['model_version']} to {after['model_version']} while inspecting "
                   f"({before['results']} -> {after['results']} decisions)")
        final = _wait("the video to end", lambda: (s := status())["camera"]["state"] == "ended" and s, 300)

        _step("6/6 results in the cloud")
        _wait("the buffer to drain", lambda: status()["unsynced"] == 0, 120)
        fleet = _json("cloud", "fleet", "--config", str(cloud_cfg), "--json")
        final = status()
        for dev in fleet:
            click.echo(f"  {dev['device_id']}: state={dev['state']} results={dev['results']} model={dev['model_version']}")
        cloud_rows = _json("cloud", "results", "--config", str(cloud_cfg), "--device", "line1-cam1", "--limit", "10000000", "--json")
        seqs = [r["seq"] for r in cloud_rows]
        click.echo(
            f"agent decided {final['results']} parts ({final['failed']} failed); cloud holds {len(seqs)} results, "
            f"{len(set(seqs))} distinct seqs, in order: {seqs == sorted(seqs)}"
        )
        if len(set(seqs)) != final["results"] or len(seqs) != len(set(seqs)):
            raise click.ClickException("the cloud does not hold every result exactly once")
        part_ids = [r["part_id"] for r in cloud_rows]
        versions = sorted({r["model_version"] for r in cloud_rows})
        gapless = part_ids == list(range(part_ids[0], part_ids[0] + len(part_ids))) if part_ids else False
        click.echo(f"model versions seen: {', '.join(versions)}; part ids without a gap across the switch: {gapless}")
        click.secho("every decision reached the cloud exactly once, through a broker outage", fg="green", bold=True)
        _verdicts(cloud_rows, truth)
    finally:
        _stop(agent)
        _stop(cloud)
        _stop(broker)
