"""``linewatch cloud drift`` and ``linewatch cloud samples list/export``: what the line's
pictures did, and the pictures themselves, ready to label.

Samples come from the devices' sample path (docs/sync.md): failed, low-confidence and
reservoir parts, and while a drift measure is out of band ``drift_<kind>:<measures>``
(kind: fail, near_threshold or random; measures: brightness+sharpness, ...). Export copies
them into the training folder layout (docs/training.md): ``OUT/unlabelled/`` by default, or
``OUT/<predicted class>/`` with ``--by-prediction``; a sample already labelled in the store
goes under its label. ``OUT/linewatch-samples.csv`` lists what was exported and why.
"""

from __future__ import annotations

import csv
import io
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from cloud.cli_common import config_option, load_config, open_readonly_store
from edge.cli import LinewatchGroup, echo_json
from edge.fsutil import atomic_write

UNLABELLED = "unlabelled"
INDEX_FILE = "linewatch-samples.csv"
INDEX_COLUMNS = ("file", "device_id", "seq", "result_seq", "ts", "time_utc", "reason", "label", "score", "sha256")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def parse_when(text: str | None, *, now: float | None = None) -> float | None:
    """Unix seconds from ``1765100000``, ``2026-12-07T14:00`` (UTC unless it says) or ``2h`` ago (s, m, h, d)."""
    if text is None or text == "":
        return None
    now = time.time() if now is None else now
    t = text.strip()
    rel = _RELATIVE.match(t)
    if rel:
        return now - float(rel[1]) * _UNIT_S[rel[2]]
    try:
        return float(t)
    except ValueError:
        pass
    try:
        # Python 3.10's fromisoformat does not read a "Z" suffix; 3.11's does.
        dt = datetime.fromisoformat(t[:-1] + "+00:00" if t[-1:] in ("Z", "z") else t)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a time; use unix seconds, an ISO date like 2026-12-07T14:00 (UTC), or an age like 2h"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _utc(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _filters(fn: Any) -> Any:
    fn = click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many samples.")(fn)
    fn = click.option("--reason", default=None, help="Reason or its start: fail, drift, drift_fail, drift_random:brightness ...")(fn)
    fn = click.option("--until", default=None, help="Parts up to this time (unix s, ISO date in UTC, or an age like 30m).")(fn)
    fn = click.option("--since", default=None, help="Parts from this time (unix s, ISO date in UTC, or an age like 2h).")(fn)
    fn = click.option("--device", "device_id", default=None, help="Only this device.")(fn)
    return config_option(fn)


def _query(config_file: Path | None, device_id: str | None, since: str | None, until: str | None, reason: str | None,
           limit: int | None) -> list[dict[str, Any]]:
    config = load_config(config_file)
    lo, hi = parse_when(since), parse_when(until)
    with open_readonly_store(config) as store:
        return list(store.samples(device_id, since=lo, until=hi, reason=reason, limit=limit))


@click.command("drift")
@click.option("--device", "device_id", default=None, help="Only this device.")
@config_option
@click.option("--limit", type=click.IntRange(min=1), default=1000, show_default=True, help="At most this many changes.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def drift(device_id: str | None, config_file: Path | None, limit: int, as_json: bool) -> None:
    """Show the drift state changes devices reported (ok, warning, drift), oldest first.

    Each line says when, from which state to which, and why (the measures out of band and
    what the operator was told). The current state per device is in `linewatch cloud fleet`.

    Example:

        linewatch cloud drift --device line1-cam1 --json
    """
    config = load_config(config_file)
    with open_readonly_store(config) as store:
        rows = store.drift_history(device_id, limit=limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no drift state changes stored" + (f" for {device_id}" if device_id else ""))
        return
    for r in rows:
        why = "; ".join(r["reasons"]) or r.get("why") or "back to usual"
        click.echo(f"{_utc(r['ts'])} {r['device_id']} {r['previous']} -> {r['state']} model={r['model_version']}: {why}")


@click.group("samples", cls=LinewatchGroup)
def samples() -> None:
    """List and export the pictures devices kept (failed, borderline, random, drift).

    Example:

        linewatch cloud samples export ./to-label --reason drift --since 24h
    """


@samples.command("list")
@_filters
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
def list_samples(config_file: Path | None, device_id: str | None, since: str | None, until: str | None,
                 reason: str | None, limit: int | None, as_json: bool) -> None:
    """List stored samples, filtered by device, time and reason.

    Example:

        linewatch cloud samples list --device line1-cam1 --reason drift --since 2026-12-07T06:00
    """
    rows = _query(config_file, device_id, since, until, reason, limit)
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo("no samples match")
        return
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        click.echo(f"{r['device_id']} #{r['seq']} {_utc(r['ts'])} {r['reason']} {r['label']} score={score} {r['file']}")


@samples.command("export")
@click.argument("out_dir", type=click.Path(path_type=Path, file_okay=False))
@_filters
@click.option("--by-prediction", is_flag=True,
              help="Put each picture under its predicted class instead of unlabelled/ (check them before training).")
def export_samples(out_dir: Path, config_file: Path | None, device_id: str | None, since: str | None,
                   until: str | None, reason: str | None, limit: int | None, by_prediction: bool) -> None:
    """Copy samples into a training folder: OUT_DIR/unlabelled/ (or OUT_DIR/<class>/).

    Sort the pictures in unlabelled/ into class folders (ok, scratch, ...) and the folder is
    a DATA_DIR for `linewatch train fit`. Exporting again adds only new pictures;
    OUT_DIR/linewatch-samples.csv says where each came from and why it was kept.

    Example:

        linewatch cloud samples export ./to-label --device line1-cam1 --reason drift --since 24h
    """
    rows = _query(config_file, device_id, since, until, reason, limit)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / INDEX_FILE
    index: dict[str, dict[str, Any]] = {}
    if index_path.is_file():
        with open(index_path, newline="", encoding="utf-8") as f:
            index = {row["file"]: row for row in csv.DictReader(f) if row.get("file")}
    copied = missing = 0
    for r in rows:
        src = Path(r["file"])
        if not src.is_file():
            missing += 1  # the index row outlived its file (a cleaned disk): say so, go on
            continue
        folder = r["labelled_as"] or (r["label"] if by_prediction and r["label"] else UNLABELLED)
        rel = f"{_SAFE_NAME.sub('_', folder)}/{_SAFE_NAME.sub('_', r['device_id'])}-{r['seq']}.jpg"
        dest = out_dir / rel
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            # An export is made again by running it again: whole files, but no fsync for each.
            atomic_write(dest, src.read_bytes(), durable=False)
            copied += 1
        index[rel] = {"file": rel, "device_id": r["device_id"], "seq": r["seq"], "result_seq": r["result_seq"],
                      "ts": r["ts"], "time_utc": _utc(r["ts"]), "reason": r["reason"], "label": r["label"],
                      "score": r["score"], "sha256": r["sha256"]}
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(INDEX_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for key in sorted(index):
        writer.writerow(index[key])
    atomic_write(index_path, table.getvalue(), durable=False)
    click.echo(f"{len(rows)} samples matched, {copied} copied into {out_dir}"
               + (f", {missing} listed in the store but their file is gone" if missing else ""))


COMMANDS = (drift, samples)


def register(group: click.Group) -> None:
    """Add the drift and samples commands to the ``cloud`` click group."""
    for cmd in COMMANDS:
        group.add_command(cmd)
