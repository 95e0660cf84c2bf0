"""``linewatch cloud ...``: ingest, fleet state and stored results.

Loaded lazily by the root command (``edge.cli``) as ``cloud.cli:cloud``. Keep this module
light at import time: every command imports what it needs inside its body.

Commands read the cloud config from ``--config FILE``; without it, ``./cloud.toml`` if
present, else the built-in defaults (``store.path = "cloud.db"`` in the working folder).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from cloud.cli_common import CONFIG_HELP, load_config_or_fail
from edge.cli import echo_json, fail


def _store(config: Any) -> Any:
    from cloud.store import open_store
    from edge.exceptions import LinewatchError

    try:
        return open_store(config, readonly=True)
    except LinewatchError as exc:
        raise fail(exc) from exc


@click.group()
def cloud() -> None:
    """Run the cloud side: MQTT ingest, fleet state, stored results.

    Example:

        linewatch cloud serve --config cloud.toml
    """


@cloud.command("serve")
@click.option("--config", "config_file", required=True, type=click.Path(path_type=Path), help="Cloud TOML file.")
def serve(config_file: Path) -> None:
    """Run one ingest worker until SIGTERM or Ctrl-C (start several: they share the load).

    Stores what devices send, once per (device, seq), and acks it after the commit.

    Example:

        linewatch cloud serve --config cloud.toml
    """
    from cloud.ingest import run_ingest
    from edge.exceptions import LinewatchError

    config = load_config_or_fail(config_file)
    try:
        code = run_ingest(config)
    except LinewatchError as exc:
        raise fail(exc) from exc
    sys.exit(code)


@cloud.command("fleet")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per device.")
def fleet(config_file: Path | None, as_json: bool) -> None:
    """Show every device: online, offline_buffering or dead, rows stored, backlog, gaps.

    Example:

        linewatch cloud fleet --json
    """
    config = load_config_or_fail(config_file)
    with _store(config) as store:
        devices = store.fleet(now=time.time(), offline_after_s=config.fleet.offline_after_s, dead_after_s=config.fleet.dead_after_s)
    if as_json:
        echo_json(devices)
        return
    if not devices:
        click.echo("no devices yet")
        return
    click.echo(f"{'device':<24} {'state':<18} {'results':>9} {'backlog':>8} {'evicted':>8}  model  last seen")
    for d in devices:
        ago = "never" if d["last_seen_s_ago"] is None else f"{d['last_seen_s_ago']:.0f} s ago"
        # A changed or doubled buffer must not hide in the JSON only.
        identity = {"new_buffer": f"  NEW BUFFER ({len(d['buffers'])} buffers)",
                    "conflict": f"  ID CONFLICT ({d['conflicts']} rows kept aside, {len(d['buffers'])} buffers)"}.get(
            d["identity"], "")  # fmt: skip
        click.echo(
            f"{d['device_id']:<24} {d['state']:<18} {d['results']:>9} {d['backlog'] if d['backlog'] is not None else '-':>8}"
            f" {d['evicted']:>8}  {d['model_version'] or '-'}  {ago}{identity}"
        )


@cloud.command("results")
@click.option("--device", "device_id", required=True, help="Device id.")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--after", "after_seq", default=0, show_default=True, help="Only seqs above this.")
@click.option("--limit", default=100, show_default=True, help="At most this many rows.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def results(device_id: str, config_file: Path | None, after_seq: int, limit: int, as_json: bool) -> None:
    """Show the results the cloud stored for one device, in seq order.

    A tiled model's rows also show the deciding tile: box=x,y WxH in camera pixels.

    Example:

        linewatch cloud results --device line1-cam1 --limit 20 --json
    """
    config = load_config_or_fail(config_file)
    with _store(config) as store:
        rows = store.results(device_id, limit=limit, after_seq=after_seq)
    if as_json:
        echo_json(rows)
        return
    from edge.cli import box_text

    for r in rows:
        verdict = "PASS" if r["passed"] else "FAIL"
        click.echo(
            f"{r['seq']:>8} {r['ts']:.3f} part={r['part_id']} {verdict} {r['label']} score={r['score']:.3f}"
            f" model={r['model_version']}{box_text(r.get('box'))}"
        )


@cloud.command("counters")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def counters(config_file: Path | None, as_json: bool) -> None:
    """Show ingest counters: rows stored, duplicates ignored, messages rejected and why.

    Example:

        linewatch cloud counters --json
    """
    config = load_config_or_fail(config_file)
    with _store(config) as store:
        values = store.counters()
    if as_json:
        echo_json(values)
        return
    for name, value in values.items():
        click.echo(f"{name:>32}: {value}")


# Registry, signing keys, push and rollout commands (cloud/ota_cli.py).
from cloud.ota_cli import register as _register_ota  # noqa: E402 - attaches to the group above

_register_ota(cloud)
